"""Events a connection state machine reports from :meth:`receive` (frozen dataclasses).

Events that carry decoded tensors compare by identity (``eq=False``): numpy arrays have no single
truth value for ``==``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from edge_sdk.protocol._messages import (
    Bye,
    Deploy,
    DeployResult,
    Error,
    EvalResult,
    EvaluateTask,
    Hello,
    Progress,
    TrainTask,
    Update,
    Welcome,
)

__all__ = [
    "ByeReceived",
    "ConnectionLost",
    "DeployReceived",
    "DeployResultReceived",
    "ErrorReceived",
    "EvalResultReceived",
    "Event",
    "HelloReceived",
    "ProgressReceived",
    "ProtocolViolation",
    "TaskReceived",
    "TaskRejected",
    "UpdateReceived",
    "UpdateRejected",
    "WelcomeReceived",
]

_MAX_CLOSE_REASON_BYTES = 123


@dataclasses.dataclass(frozen=True)
class Event:
    """Base of every event."""


@dataclasses.dataclass(frozen=True)
class HelloReceived(Event):
    """Coordinator side: a device introduced itself; answer with ``send_welcome`` (or refuse it)."""

    hello: Hello


@dataclasses.dataclass(frozen=True)
class WelcomeReceived(Event):
    """Device side: the coordinator accepted the device; tasks may come now."""

    welcome: Welcome


@dataclasses.dataclass(frozen=True, eq=False)
class TaskReceived(Event):
    """Device side: a train or evaluate task with all its tensors, verified and finite."""

    task: TrainTask | EvaluateTask
    tensors: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class DeployReceived(Event):
    """Device side: a deployment request with all its tensors, verified and finite."""

    deploy: Deploy
    tensors: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TaskRejected(Event):
    """Device side: a task arrived intact but its values are unusable (NaN/Inf); an Error was sent back."""

    task_id: str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class UpdateReceived(Event):
    """Coordinator side: a training update, tensors matching what was sent, finite and within the bound."""

    update: Update
    tensors: Mapping[str, np.ndarray]
    norm: float  # global L2 norm of the floating-point tensors


@dataclasses.dataclass(frozen=True)
class UpdateRejected(Event):
    """Coordinator side: an update arrived intact but with NaN/Inf or above the norm bound.

    An ``Error(code="bad_update")`` was sent to the device; the connection stays usable.
    """

    task_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ProgressReceived(Event):
    """Coordinator side: the device's running training task reports its steps (informative only)."""

    progress: Progress


@dataclasses.dataclass(frozen=True)
class EvalResultReceived(Event):
    result: EvalResult


@dataclasses.dataclass(frozen=True)
class DeployResultReceived(Event):
    result: DeployResult


@dataclasses.dataclass(frozen=True)
class ErrorReceived(Event):
    """The peer reported an error; if it names the outstanding task, that task is over."""

    error: Error


@dataclasses.dataclass(frozen=True)
class ByeReceived(Event):
    """The peer is closing cleanly; ``pending_task_id`` is the task left unfinished, if any."""

    bye: Bye
    pending_task_id: str | None = None


@dataclasses.dataclass(frozen=True)
class ProtocolViolation(Event):
    """The peer broke the protocol: an Error was queued for it; close the websocket with ``close_code``."""

    close_code: int
    reason: str
    task_id: str | None = None

    @property
    def close_reason(self) -> str:
        """``reason`` cut to the 123 UTF-8 bytes a websocket close frame can carry."""
        return _clip_utf8(self.reason, _MAX_CLOSE_REASON_BYTES)


@dataclasses.dataclass(frozen=True)
class ConnectionLost(Event):
    """The websocket closed without a Bye or a violation (e.g. a device dropped mid-task)."""

    code: int | None
    reason: str
    pending_task_id: str | None = None
    transfer_incomplete: bool = False


def _clip_utf8(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes; a lone surrogate (no UTF-8 form) is written ``\\udXXX``."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[: limit - 3].decode("utf-8", "ignore") + "..."
