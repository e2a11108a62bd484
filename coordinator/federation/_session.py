"""One device's connection as the federation sees it, sans I/O: frames in, engine calls, a verdict out.

A transport owns the bytes (the websocket server, or the simulator's in-memory frames). For each
message a device sends it calls :meth:`DeviceSession.receive`, sends what the session queued
(``session.conn.data_to_send()``: a Welcome, an Error, a Bye) and acts on the :class:`Verdict`: go
on, or close the connection with the verdict's code and reason. Both transports drive this one
class, so a device is treated the same whether it is real or simulated:

- ``HelloReceived``: the engine admits the device from its profile's budget and a Welcome is queued;
  a profile without a budget, or a budget no sub-network fits, gets ``Error(rejected)`` and a Bye,
  and the verdict closes with ``CLOSE_REJECTED``;
- ``UpdateReceived``: the engine takes the update. The protocol checked its values as they arrived
  (finite, global norm within the order's ``max_update_norm``), so the engine does not check them
  again (``values_checked``); shapes, dtypes, the size of the change and the reported figures it
  still checks. An update the engine refuses is answered with ``Error(bad_update)`` naming the task
  and the reason, so the device knows its round was lost and why;
- ``UpdateRejected`` (NaN/Inf or above the bound), an ``ErrorReceived`` naming a task, a
  ``ProtocolViolation`` naming one, a ``ByeReceived`` with a task pending, or the connection lost
  mid-task (:meth:`DeviceSession.lost`): that task failed. A violation or a Bye also closes (with
  the violation's code, or the one the device said goodbye with);
- ``DeployResultReceived``, and failures of a deploy task, go to the deploy awaiting them
  (``deploys``, see :class:`DeployInbox`), never to the round.

A device answers only for its own tasks: an Error, a violation or a result naming a task that was
not outstanding on this connection when its frame arrived never fails that task (it may be another
device's); the engine checks the owner again (``task_failed(device_id=...)``).

The bytes a device sends while a training task is out count as that round's traffic. The log lines a
device's messages cause are rate-limited per device (:class:`LogLimiter`) and the device's text in
them clipped (:func:`clip`), so a device cannot flood the log.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from coordinator.federation._ratelimit import LogLimiter, clip
from coordinator.federation._records import TrainOrder
from edge_sdk._errors import BudgetError, ProfileError, ProtocolError
from edge_sdk.protocol import (
    CLOSE_REJECTED,
    ByeReceived,
    ConnectionLost,
    ConnectionState,
    CoordinatorConnection,
    DeployResultReceived,
    EncodedTensors,
    ErrorCode,
    ErrorReceived,
    Event,
    Fragment,
    HelloReceived,
    ProgressReceived,
    ProtocolViolation,
    Update,
    UpdateReceived,
    UpdateRejected,
    WireLimits,
    thaw_json,
)

if TYPE_CHECKING:
    from coordinator.federation._engine import FederationEngine

__all__ = ["CHANGED", "GO_ON", "PROGRESS_MIN_INTERVAL_S", "DeployInbox", "DeviceSession", "TaskProgress", "Verdict"]

logger = logging.getLogger(__name__)
_device_log = LogLimiter(logger)  # keyed by device name: what one device's messages may log

_MAX_ERROR_TEXT = 2000  # characters of a refusal's reason sent back to the device
PROGRESS_MIN_INTERVAL_S = 0.5  # a device's Progress messages closer than this to the last one kept are dropped


@dataclasses.dataclass(frozen=True)
class TaskProgress:
    """The last steps a device reported for its running training task (``at``: the engine's clock)."""

    task_id: str
    steps_done: int
    steps_total: int
    at: float


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the transport does next: go on, or close with ``close_code`` and ``close_reason``.

    ``changed``: something a waiting round or deploy may care about happened (wake them up).
    """

    close_code: int | None = None
    close_reason: str = ""
    changed: bool = False

    @property
    def go_on(self) -> bool:
        return self.close_code is None

    def then(self, other: Verdict) -> Verdict:
        """Both verdicts of one frame's events: the first close stands."""
        first = self if not self.go_on else other
        return dataclasses.replace(first, changed=self.changed or other.changed)


GO_ON = Verdict()
CHANGED = Verdict(changed=True)


class DeployInbox(Protocol):
    """Where a deploy's answer goes: True when a deploy was awaiting ``task_id`` (and took it)."""

    def answer(self, task_id: str, ok: bool, metrics: Mapping[str, float], message: str) -> bool: ...


def frame_bytes(frame: str | bytes | Fragment) -> int:
    """A websocket message's payload size (text as UTF-8)."""
    return len(frame.encode("utf-8")) if isinstance(frame, str) else len(frame)


class DeviceSession:
    """The federation's side of one device connection (see the module docstring)."""

    def __init__(
        self,
        engine: FederationEngine,
        device_id: str,
        *,
        limits: WireLimits | None = None,
        deploys: DeployInbox | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.device_id = device_id
        self.conn = CoordinatorConnection(limits=limits)
        self.admitted = False
        self.bytes_in = 0
        self.last_update: Update | None = None  # the Update of the last task answered (for reports)
        self.progress: TaskProgress | None = None  # the running training task's steps, if the device reports them
        self.progress_dropped = 0  # Progress messages that came too fast and were not kept
        self._task_mark: int | None = None  # bytes_in when the outstanding training task was sent
        self._deploys = deploys
        self._wall_clock = wall_clock
        self.data_channel: tuple[int, str] | None = None  # (port, one-time token) offered in the Welcome

    @property
    def ready(self) -> bool:
        """Admitted, and no task outstanding: a round (or a deploy) may send it one."""
        return self.admitted and self.conn.state is ConnectionState.READY

    def receive(
        self, frame: str | bytes | Fragment, now: float, *, peak_of: Callable[[int], int] | None = None
    ) -> Verdict:
        """Handle one message from the device; ``now`` is the engine's clock (round deadlines).

        ``peak_of`` maps the peak resident set an Update reports to the device's own (a simulator
        measures a host worker and subtracts what the worker itself holds).
        """
        self.bytes_in += frame_bytes(frame)
        owned = self.owned()
        return self.handle_all(self.conn.receive(frame), now, peak_of=peak_of, owned=owned)

    def owned(self) -> str | None:
        """The task outstanding on this connection now (see :meth:`handle`'s ``owned``)."""
        task = self.conn.outstanding_task
        return task.task_id if task is not None else None

    def handle_all(
        self,
        events: list[Event],
        now: float,
        *,
        peak_of: Callable[[int], int] | None = None,
        owned: str | None = None,
    ) -> Verdict:
        """:meth:`handle` each event in turn (e.g. a transfer's, read from the data channel); what follows."""
        verdict = GO_ON
        for event in events:
            verdict = verdict.then(self.handle(event, now, peak_of=peak_of, owned=owned))
        return verdict

    def handle(
        self,
        event: Event,
        now: float,
        *,
        peak_of: Callable[[int], int] | None = None,
        owned: str | None = None,
    ) -> Verdict:
        """What one protocol event does to the engine (and the deploys), and what follows.

        ``owned``: the task outstanding on this connection when the event's frame arrived; an Error or a
        violation naming any other task fails nothing.
        """
        name = self.device_id
        if isinstance(event, HelloReceived):
            return self._hello(event)
        if isinstance(event, ProgressReceived):
            return self._progress(event, now)
        if isinstance(event, UpdateReceived):
            self._update(event, now, peak_of)
        elif isinstance(event, UpdateRejected):
            _device_log.warning(
                name, "device %s: update for %s rejected: %s", name, clip(event.task_id), clip(event.reason)
            )
            self._failed(event.task_id, f"update rejected: {event.reason}")
        elif isinstance(event, DeployResultReceived):
            result = event.result
            if not self._deploy_answer(result.task_id, result.ok, result.metrics, result.message):
                _device_log.warning(name, "device %s: late answer to deploy %s ignored", name, clip(result.task_id))
        elif isinstance(event, ErrorReceived):
            error = event.error
            on_task = f" for task {error.task_id}" if error.task_id else ""
            _device_log.warning(
                name, "device %s reports %s%s: %s", name, clip(error.code), clip(on_task), clip(error.message)
            )
            if error.task_id and error.task_id == owned:
                self._failed(error.task_id, f"device error {error.code}: {error.message[:200]}")
        elif isinstance(event, ProtocolViolation):
            _device_log.warning(
                name, "device %s broke the protocol (close %d): %s", name, event.close_code, clip(event.reason)
            )
            if event.task_id and event.task_id == owned:
                self._failed(event.task_id, f"protocol violation: {event.reason[:200]}")
            return Verdict(event.close_code, event.close_reason, changed=True)
        elif isinstance(event, ByeReceived):
            _device_log.info(name, "device %s says goodbye (%d %s)", name, event.bye.code, clip(event.bye.reason))
            if event.pending_task_id:
                self._failed(event.pending_task_id, "device left")
            return Verdict(event.bye.code, event.bye.reason, changed=True)
        else:
            _device_log.info(name, "device %s: ignoring %s", name, type(event).__name__)
            return GO_ON
        return CHANGED

    def start_task(self, order: TrainOrder, encoded: EncodedTensors | None = None) -> bool:
        """Queue ``order``'s TrainTask and tensors; False (the task failed) when they cannot go.

        ``encoded``: the order's tensors already laid out for the wire (shared by every device sent
        the same sub-network); without it they are laid out here.
        """
        try:
            order.send(self.conn, encoded)
        except ProtocolError as exc:  # e.g. the device's transfer limit is below the sub-network
            logger.warning("round %d: cannot send task to %s: %s", order.round, order.device_id, exc)
            self.engine.task_failed(order.task_id, f"cannot send: {exc}", device_id=self.device_id)
            return False
        self._task_mark = self.bytes_in
        return True

    def task_sent(self, order: TrainOrder, bytes_out: int) -> None:
        """The transport delivered the task's ``bytes_out`` bytes."""
        self.engine.record_traffic(self.device_id, bytes_out=bytes_out)
        logger.info(
            "round %d: sent task %s to %s (%.1f MB)", order.round, order.task_id, order.device_id, bytes_out / 1e6
        )

    def lost(self, code: int | None, reason: str) -> None:
        """The connection is gone: a task it owed fails now (the round goes on without it)."""
        for event in self.conn.receive_close(code, reason):
            if isinstance(event, ConnectionLost) and event.pending_task_id:
                _device_log.warning(
                    self.device_id,
                    "device %s disconnected (code %s) during task %s",
                    self.device_id,
                    code,
                    clip(event.pending_task_id),
                )
                self._failed(event.pending_task_id, f"disconnected (code {code})")
        _device_log.settle(self.device_id)  # a flood that ended over the rate is still reported

    # ------------------------------------------------------------------------------ internals

    def _hello(self, event: HelloReceived) -> Verdict:
        hello = event.hello
        try:
            plan = self.engine.admit(self.device_id, thaw_json(hello.profile))
        except (BudgetError, ProfileError) as exc:
            _device_log.warning(self.device_id, "device %s refused: %s", self.device_id, clip(exc))
            self.conn.send_error(code=ErrorCode.REJECTED, message=str(exc)[:2000])
            self.conn.send_bye(reason="rejected", code=CLOSE_REJECTED)
            return Verdict(CLOSE_REJECTED, "rejected")
        self.conn.send_welcome(
            run_id=self.engine.run_id,
            round=self.engine.round,
            server_time=self._wall_clock(),
            device_id=self.device_id,
            update_encoding=_granted(self.engine.federation.update_encoding),
            data_channel=self.data_channel,
        )
        self.admitted = True
        _device_log.info(
            self.device_id,
            "device %s (sdk %s, says it is %r) joined: %.2fM-parameter sub-network",
            self.device_id,
            clip(hello.sdk_version, 40),
            clip(hello.device_id, 80),
            plan.params / 1e6,
        )
        return CHANGED

    def _progress(self, event: ProgressReceived, now: float) -> Verdict:
        """Keep the steps (the protocol checked the task and bounds); messages faster than
        ``PROGRESS_MIN_INTERVAL_S`` are counted and dropped, never logged: a device cannot flood."""
        last, progress = self.progress, event.progress
        if last is not None and last.task_id == progress.task_id and now - last.at < PROGRESS_MIN_INTERVAL_S:
            self.progress_dropped += 1
            return GO_ON
        self.progress = TaskProgress(progress.task_id, progress.steps_done, progress.steps_total, now)
        return GO_ON

    def _update(self, event: UpdateReceived, now: float, peak_of: Callable[[int], int] | None) -> None:
        update = event.update
        self.last_update = update
        self._count_traffic()
        outcome = self.engine.accept_update(
            update.task_id,
            event.tensors,
            num_samples=update.num_samples,
            now=now,
            encoding=update.encoding,
            metrics=update.metrics,
            peak_rss_bytes=peak_of(update.peak_rss_bytes) if peak_of is not None else update.peak_rss_bytes,
            step_time_s=update.step_time_s,
            values_checked=True,  # the protocol checked finite values and the norm bound on arrival
        )
        if outcome.status != "ok":
            _device_log.warning(
                self.device_id,
                "device %s: update for %s not used: %s (%s)",
                self.device_id,
                clip(update.task_id),
                outcome.status,
                clip(outcome.reason),
            )
            message = f"update not used ({outcome.status}): {outcome.reason}"[:_MAX_ERROR_TEXT]
            self.conn.send_error(code=ErrorCode.BAD_UPDATE, message=message, task_id=update.task_id)

    def _failed(self, task_id: str, reason: str) -> None:
        """A task is over without a usable result: a deploy's, or else the round's."""
        if self._deploy_answer(task_id, False, {}, reason):
            return
        self._count_traffic()
        self.engine.task_failed(task_id, reason, device_id=self.device_id)

    def _deploy_answer(self, task_id: str, ok: bool, metrics: Mapping[str, float], message: str) -> bool:
        return self._deploys is not None and self._deploys.answer(task_id, ok, metrics, message)

    def _count_traffic(self) -> None:
        if self._task_mark is not None:
            self.engine.record_traffic(self.device_id, bytes_in=self.bytes_in - self._task_mark)
            self._task_mark = None


def _granted(update_encoding: str) -> str | None:
    """The encoding a Welcome grants for ``[federation] update_encoding`` ("weights": none)."""
    return None if update_encoding == "weights" else update_encoding
