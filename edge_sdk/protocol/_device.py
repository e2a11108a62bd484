"""The device's side of its connection to the coordinator (see ``_machine`` for the sans-I/O contract)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import ClassVar, Literal, TypeVar

import numpy as np

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._encodings import encode_arrays, granted_encoding
from edge_sdk.protocol._events import DeployReceived, ErrorReceived, Event, TaskReceived, TaskRejected, WelcomeReceived
from edge_sdk.protocol._machine import (
    MAX_ERROR_TEXT,
    BaseConnection,
    ConnectionState,
    TaskMessage,
    error_code_for,
    kind_of,
)
from edge_sdk.protocol._messages import (
    FEATURE_CHUNK_XXH3,
    FEATURE_PROGRESS,
    Deploy,
    DeployResult,
    Error,
    ErrorCode,
    EvalResult,
    EvaluateTask,
    Hello,
    Message,
    Progress,
    TrainTask,
    Update,
    Welcome,
    WireLimits,
)
from edge_sdk.protocol._tensors import describe_tensors
from edge_sdk.protocol._update_entries import update_entry_mismatches
from edge_sdk.protocol._values import ValueScan, check_tensor_values
from edge_sdk.protocol._wire import CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR, JSONObject

__all__ = ["DeviceConnection"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T", TrainTask, EvaluateTask, Deploy)


class DeviceConnection(BaseConnection):
    """The device's side of its connection to the coordinator."""

    _side: ClassVar[str] = "device"
    _transfer_error_code: ClassVar[str] = ErrorCode.BAD_TASK

    def __init__(self, *, limits: WireLimits | None = None) -> None:
        super().__init__(limits, ConnectionState.CONNECTING)
        self._welcome: Welcome | None = None
        self._task: TaskMessage | None = None

    @property
    def welcome(self) -> Welcome | None:
        """The coordinator's Welcome, once received."""
        return self._welcome

    @property
    def current_task(self) -> TaskMessage | None:
        """The task being received or worked on."""
        return self._task

    def send_hello(
        self, *, device_id: str, sdk_version: str, profile: JSONObject, capabilities: tuple[str, ...] = ()
    ) -> Hello:
        """Introduce the device (first message on a new connection); announces this side's limits and
        the capabilities of its protocol layer (per-chunk xxh3 digests, :data:`FEATURE_CHUNK_XXH3`)."""
        self._require_state("send_hello", ConnectionState.CONNECTING)
        if FEATURE_CHUNK_XXH3 not in capabilities:
            capabilities = (*capabilities, FEATURE_CHUNK_XXH3)
        hello = Hello(
            device_id=device_id,
            sdk_version=sdk_version,
            profile=profile,
            capabilities=capabilities,
            limits=self._limits,
        )
        self._queue(hello)
        self._state = ConnectionState.AWAITING_WELCOME
        return hello

    def send_update(
        self,
        *,
        task_id: str,
        tensors: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: Mapping[str, float],
        peak_rss_bytes: int,
        step_time_s: float,
        train_time_s: float,
        encoding: Literal["weights", "delta"] = "delta",
    ) -> Update:
        """Answer the running TrainTask with its trained tensors (same names, shapes, dtypes as received,
        or what the task's levers allow instead: row updates, LoRA factors, frozen tensors left out).
        A ``"delta"`` update is packed with the granted :attr:`update_encoding`, if any.

        Raises ProtocolError, queueing nothing, if the tensors differ from the task's, hold NaN/Inf or
        exceed the coordinator's transfer limit: report the failure with ``send_error`` instead.
        """
        task = self._working_task("send_update", task_id, TrainTask)
        what = f"update for task {task_id!r}"
        problems = update_entry_mismatches(describe_tensors(tensors), task.weights.entries, task.settings.levers)
        if problems:
            raise ProtocolError(
                f"{what} does not match the task's tensors: " + "; ".join(problems), CLOSE_POLICY_VIOLATION
            )
        check_tensor_values(tensors, what=what)
        packing = self.update_encoding if encoding == "delta" else None
        if packing is None:
            manifest, encoded = self._encode_for_peer(tensors, what)
        else:
            packed, logical = encode_arrays(tensors, packing)
            manifest, encoded = self._encode_for_peer(packed, what)
            manifest = dataclasses.replace(manifest, encoding=packing, logical=logical)
        update = Update(
            task_id=task_id,
            num_samples=num_samples,
            metrics=metrics,
            peak_rss_bytes=peak_rss_bytes,
            step_time_s=step_time_s,
            train_time_s=train_time_s,
            weights=manifest,
            encoding=encoding,
        )
        self._queue(update)
        self._queue_transfer(encoded, manifest)
        self._finish_task()
        return update

    @property
    def update_encoding(self) -> str | None:
        """The encoding the coordinator's Welcome granted: ``send_update(encoding="delta")`` packs the
        deltas with it (``_encodings``). None: no encoding granted, tensors travel as float32."""
        return granted_encoding(self._welcome.features) if self._welcome is not None else None

    @property
    def progress_accepted(self) -> bool:
        """The coordinator's Welcome lists the "progress" feature: :meth:`send_progress` may be used."""
        return self._welcome is not None and FEATURE_PROGRESS in self._welcome.features

    def send_progress(self, *, task_id: str, steps_done: int, steps_total: int) -> Progress:
        """Report the running TrainTask's steps (rate-limit it: about once a second at most).

        ProtocolError, queueing nothing, when the coordinator did not accept the "progress" feature,
        no such training task is running, or the numbers are out of bounds.
        """
        if not self.progress_accepted:
            raise ProtocolError("cannot send_progress: the coordinator did not accept the 'progress' feature")
        self._working_task("send_progress", task_id, TrainTask)
        progress = Progress(task_id=task_id, steps_done=steps_done, steps_total=steps_total)
        self._queue(progress)
        return progress

    def send_eval_result(self, *, task_id: str, num_samples: int, metrics: Mapping[str, float]) -> EvalResult:
        """Answer the running EvaluateTask."""
        self._working_task("send_eval_result", task_id, EvaluateTask)
        result = EvalResult(task_id=task_id, num_samples=num_samples, metrics=metrics)
        self._queue(result)
        self._finish_task()
        return result

    def send_deploy_result(
        self, *, task_id: str, ok: bool, metrics: Mapping[str, float], message: str = ""
    ) -> DeployResult:
        """Answer the running Deploy."""
        self._working_task("send_deploy_result", task_id, Deploy)
        result = DeployResult(task_id=task_id, ok=ok, metrics=metrics, message=message)
        self._queue(result)
        self._finish_task()
        return result

    def send_error(self, *, code: str, message: str, task_id: str | None = None) -> Error:
        """Queue an Error; naming the running task (e.g. ``task_failed``) ends that task."""
        error = super().send_error(code=code, message=message, task_id=task_id)
        if self._state is ConnectionState.WORKING and self._task is not None and task_id == self._task.task_id:
            self._finish_task()
        return error

    def _working_task(self, action: str, task_id: str, kind: type[_T]) -> _T:
        task = self._task
        if self._state is not ConnectionState.WORKING or task is None:
            raise ProtocolError(f"cannot {action}: no task is running (state {self._state.name})")
        if task.task_id != task_id:
            raise ProtocolError(f"cannot {action} for task {task_id!r}: the running task is {task.task_id!r}")
        if not isinstance(task, kind):
            raise ProtocolError(f"cannot {action} for task {task_id!r}: it is a {kind_of(task)}")
        return task

    def _finish_task(self) -> None:
        self._task = None
        self._state = ConnectionState.READY

    # -------------------------------------------------------------------------------- receiving

    def _on_message(self, message: Message) -> list[Event]:
        state = self._state
        if isinstance(message, Welcome):
            if state is not ConnectionState.AWAITING_WELCOME:
                return self._unexpected(message)
            self._welcome = message
            self._peer_limits = message.limits
            self._chunk_xxh3 = FEATURE_CHUNK_XXH3 in message.features
            self._state = ConnectionState.READY
            return [WelcomeReceived(welcome=message)]
        if isinstance(message, Error) and state is not ConnectionState.CONNECTING:
            return [ErrorReceived(error=message)]
        if isinstance(message, (TrainTask, EvaluateTask, Deploy)):
            if state is ConnectionState.READY:
                return self._on_task(message)
            if state is ConnectionState.WORKING and self._task is not None:
                return self._violation(
                    f"{kind_of(message)} {message.task_id!r} while task {self._task.task_id!r} is still running",
                    CLOSE_PROTOCOL_ERROR,
                    ErrorCode.UNEXPECTED,
                    message.task_id,
                )
        return self._unexpected(message)

    def _on_task(self, task: TaskMessage) -> list[Event]:
        try:
            self._open_transfer(task.weights, None, f"{kind_of(task)} {task.task_id!r}")
        except ProtocolError as exc:
            return self._violation(
                str(exc), exc.close_code, error_code_for(exc.close_code, ErrorCode.BAD_TASK), task.task_id
            )
        self._task = task
        self._state = ConnectionState.RECEIVING
        return []

    def _on_transfer_complete(self, tensors: dict[str, np.ndarray], values: ValueScan) -> list[Event]:
        task = self._task
        assert task is not None
        try:
            values.check(what=f"{kind_of(task)} {task.task_id!r}")
        except ProtocolError as exc:
            logger.warning("device: rejected task %r: %s", task.task_id, exc)
            self._finish_task()
            self._queue(Error(task_id=task.task_id, code=ErrorCode.BAD_TASK, message=str(exc)[:MAX_ERROR_TEXT]))
            return [TaskRejected(task_id=task.task_id, reason=str(exc))]
        self._state = ConnectionState.WORKING
        if isinstance(task, Deploy):
            return [DeployReceived(deploy=task, tensors=tensors)]
        return [TaskReceived(task=task, tensors=tensors)]

    def _pending_task_id(self) -> str | None:
        return self._task.task_id if self._task is not None else None

    def _forget_task(self) -> None:
        self._task = None
