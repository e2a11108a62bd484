"""The coordinator's side of one device's connection (see ``_machine`` for the sans-I/O contract)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, TypeVar

import numpy as np

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._channel import FEATURE_DATA_CHANNEL
from edge_sdk.protocol._encodings import (
    CAPABILITY_ENCODINGS,
    check_encoding,
    decode_arrays,
    encoded_entry_check,
    encoding_feature,
)
from edge_sdk.protocol._events import (
    DeployResultReceived,
    ErrorReceived,
    EvalResultReceived,
    Event,
    HelloReceived,
    ProgressReceived,
    UpdateReceived,
    UpdateRejected,
)
from edge_sdk.protocol._machine import (
    MAX_ERROR_TEXT,
    BaseConnection,
    ConnectionState,
    TaskMessage,
    Tensors,
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
    EvalSettings,
    EvaluateTask,
    Hello,
    InferenceSettings,
    Message,
    Progress,
    TrainSettings,
    TrainTask,
    Update,
    Welcome,
    WireLimits,
)
from edge_sdk.protocol._payload import EncodedTensors
from edge_sdk.protocol._update_entries import update_entry_check
from edge_sdk.protocol._values import ValueScan, check_tensor_values
from edge_sdk.protocol._wire import CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR, JSONObject

__all__ = ["CoordinatorConnection"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T", TrainTask, EvaluateTask, Deploy)
_RESULT_FOR: dict[type[Message], type[Message]] = {
    TrainTask: Update,
    EvaluateTask: EvalResult,
    Deploy: DeployResult,
}


@dataclasses.dataclass(frozen=True)
class _Outstanding:
    task: TaskMessage
    max_norm: float | None


class CoordinatorConnection(BaseConnection):
    """The coordinator's side of one device's connection."""

    _side: ClassVar[str] = "coordinator"
    _transfer_error_code: ClassVar[str] = ErrorCode.BAD_UPDATE

    def __init__(self, *, limits: WireLimits | None = None) -> None:
        super().__init__(limits, ConnectionState.AWAITING_HELLO)
        self._hello: Hello | None = None
        self._outstanding: _Outstanding | None = None
        self._update: Update | None = None
        self._update_encoding: str | None = None
        self.channel_offered = False  # the Welcome offered a data channel (``_channel``)

    @property
    def update_encoding(self) -> str | None:
        """The encoding this device's Welcome granted for its updates (None: plain float32 weights)."""
        return self._update_encoding

    @property
    def hello(self) -> Hello | None:
        """The device's Hello, once received."""
        return self._hello

    @property
    def outstanding_task(self) -> TaskMessage | None:
        """The task sent and not answered yet."""
        return self._outstanding.task if self._outstanding is not None else None

    def send_welcome(
        self,
        *,
        run_id: str,
        round: int,
        server_time: float,
        device_id: str | None = None,
        update_encoding: str | None = None,
        data_channel: tuple[int, str] | None = None,
    ) -> Welcome:
        """Accept the device (after HelloReceived); ``device_id`` defaults to the one in its Hello.

        ``update_encoding`` (one of ``ENCODINGS``): granted when the Hello announced the encodings
        capability; the device then sends deltas packed with it (plain float32 weights stay accepted).
        ``data_channel`` (port, one-time token): offered when the Hello announced ``channel:tcp``.
        """
        self._require_state("send_welcome", ConnectionState.HELLO_RECEIVED)
        assert self._hello is not None
        features: list[str] = [f for f in (FEATURE_PROGRESS, FEATURE_CHUNK_XXH3) if f in self._hello.capabilities]
        self._chunk_xxh3 = FEATURE_CHUNK_XXH3 in features  # tasks then carry per-chunk digests
        if update_encoding is not None and CAPABILITY_ENCODINGS in self._hello.capabilities:
            features.append(encoding_feature(check_encoding(update_encoding)))
            self._update_encoding = update_encoding
        port, token = 0, ""
        if data_channel is not None and FEATURE_DATA_CHANNEL in self._hello.capabilities:
            features.append(FEATURE_DATA_CHANNEL)
            port, token = data_channel
            self.channel_offered = True
        welcome = Welcome(
            run_id=run_id,
            device_id=device_id if device_id is not None else self._hello.device_id,
            round=round,
            server_time=server_time,
            limits=self._limits,
            features=tuple(features),
            data_port=port,
            data_token=token,
        )
        self._queue(welcome)
        self._state = ConnectionState.READY
        return welcome

    def send_train_task(
        self,
        *,
        task_id: str,
        round: int,
        spec: JSONObject,
        model_config: JSONObject,
        settings: TrainSettings,
        tensors: Tensors,
        max_update_norm: float | None = None,
    ) -> TrainTask:
        """Send a training task; the Update must return the same tensor names, shapes and dtypes, or
        what ``settings.levers`` allows instead (``edge_sdk.protocol._update_entries``).

        ``max_update_norm``: bound on the global L2 norm of the returned tensors (for delta updates).
        ``tensors``: arrays, or an :class:`EncodedTensors` prepared once and sent to every device that
        gets the same tensors (the send then copies and hashes nothing).
        """
        self._require_state("send_train_task", ConnectionState.READY)
        manifest, encoded = self._encode_for_peer(tensors, f"train task {task_id!r}")
        task = TrainTask(
            task_id=task_id,
            round=round,
            spec=spec,
            model_config=model_config,
            settings=settings,
            weights=manifest,
        )
        return self._send_task(task, encoded, max_update_norm)

    def send_evaluate_task(
        self,
        *,
        task_id: str,
        round: int,
        spec: JSONObject,
        model_config: JSONObject,
        settings: EvalSettings,
        tensors: Tensors,
    ) -> EvaluateTask:
        """Send an evaluation task; the device answers with an EvalResult."""
        self._require_state("send_evaluate_task", ConnectionState.READY)
        manifest, encoded = self._encode_for_peer(tensors, f"evaluate task {task_id!r}")
        task = EvaluateTask(
            task_id=task_id,
            round=round,
            spec=spec,
            model_config=model_config,
            settings=settings,
            weights=manifest,
        )
        return self._send_task(task, encoded, None)

    def send_deploy(
        self,
        *,
        task_id: str,
        round: int,
        spec: JSONObject,
        model_config: JSONObject,
        settings: InferenceSettings,
        tensors: Tensors,
    ) -> Deploy:
        """Send a sub-network for deployment (ONNX export on the device); it answers with a DeployResult."""
        self._require_state("send_deploy", ConnectionState.READY)
        manifest, encoded = self._encode_for_peer(tensors, f"deploy {task_id!r}")
        task = Deploy(
            task_id=task_id,
            round=round,
            spec=spec,
            model_config=model_config,
            settings=settings,
            weights=manifest,
        )
        return self._send_task(task, encoded, None)

    def _send_task(self, task: _T, encoded: EncodedTensors, max_norm: float | None) -> _T:
        self._queue(task)
        self._queue_transfer(encoded, task.weights)
        self._outstanding = _Outstanding(task=task, max_norm=max_norm)
        self._state = ConnectionState.AWAITING_RESULT
        return task

    # -------------------------------------------------------------------------------- receiving

    def _on_message(self, message: Message) -> list[Event]:
        if isinstance(message, Hello):
            if self._state is not ConnectionState.AWAITING_HELLO:
                return self._unexpected(message)
            self._hello = message
            self._peer_limits = message.limits
            self._state = ConnectionState.HELLO_RECEIVED
            return [HelloReceived(hello=message)]
        if self._state is ConnectionState.AWAITING_HELLO:
            return self._violation(
                f"expected Hello first, got {kind_of(message)}", CLOSE_PROTOCOL_ERROR, ErrorCode.UNEXPECTED
            )
        if isinstance(message, Error):
            outstanding = self._outstanding
            if outstanding is not None and message.task_id == outstanding.task.task_id:
                logger.info("coordinator: device reports task %r failed: %s", message.task_id, message.message)
                self._outstanding = None
                self._state = ConnectionState.READY
            return [ErrorReceived(error=message)]
        if isinstance(message, Progress) and self._state in (ConnectionState.READY, ConnectionState.AWAITING_RESULT):
            return self._on_progress(message)
        if isinstance(message, (Update, EvalResult, DeployResult)) and self._state in (
            ConnectionState.READY,
            ConnectionState.AWAITING_RESULT,
        ):
            return self._on_result(message)
        return self._unexpected(message)

    def _on_progress(self, message: Progress) -> list[Event]:
        """Progress of the outstanding TrainTask is reported; any other (a task already answered, or
        not a training task) is dropped: it is informative, never worth the connection."""
        outstanding = self._outstanding
        if (
            outstanding is None
            or not isinstance(outstanding.task, TrainTask)
            or message.task_id != outstanding.task.task_id
        ):
            logger.debug("coordinator: dropped a Progress for task %r: not the running training task", message.task_id)
            return []
        return [ProgressReceived(progress=message)]

    def _on_result(self, message: Update | EvalResult | DeployResult) -> list[Event]:
        outstanding = self._outstanding
        task_id = message.task_id
        if outstanding is None or task_id != outstanding.task.task_id:
            known = f"the outstanding task is {outstanding.task.task_id!r}" if outstanding else "no task is outstanding"
            return self._violation(
                f"{kind_of(message)} for unknown task {task_id!r} ({known})",
                CLOSE_POLICY_VIOLATION,
                ErrorCode.UNKNOWN_TASK,
                task_id,
            )
        task = outstanding.task
        if not isinstance(message, _RESULT_FOR[type(task)]):
            return self._violation(
                f"{kind_of(message)} for task {task_id!r}, which is a {kind_of(task)} answered by"
                f" {_RESULT_FOR[type(task)].__name__}",
                CLOSE_PROTOCOL_ERROR,
                ErrorCode.UNEXPECTED,
                task_id,
            )
        if isinstance(message, Update):
            try:
                assert isinstance(task, TrainTask)  # an Update answers only a TrainTask (checked above)
                expected = update_entry_check(task.weights.entries, task.settings.levers)
                encoding = message.weights.encoding
                if encoding:
                    if encoding != self._update_encoding:
                        granted = self._update_encoding or "none"
                        raise ProtocolError(
                            f"update encoded as {encoding[:32]!r}, the Welcome granted {granted!r}",
                            CLOSE_POLICY_VIOLATION,
                        )
                    expected = encoded_entry_check(message.weights, expected)
                self._open_transfer(message.weights, expected, f"update for task {task_id!r}")
            except ProtocolError as exc:
                return self._violation(
                    str(exc), exc.close_code, error_code_for(exc.close_code, ErrorCode.BAD_UPDATE), task_id
                )
            self._update = message
            self._state = ConnectionState.RECEIVING
            return []
        self._outstanding = None
        self._state = ConnectionState.READY
        if isinstance(message, EvalResult):
            return [EvalResultReceived(result=message)]
        return [DeployResultReceived(result=message)]

    def _on_transfer_complete(self, tensors: dict[str, np.ndarray], values: ValueScan) -> list[Event]:
        update, outstanding = self._update, self._outstanding
        assert update is not None and outstanding is not None
        self._update = None
        self._outstanding = None
        self._state = ConnectionState.READY
        what = f"update for task {update.task_id!r}"
        try:
            if update.weights.encoding:  # sizes were checked against the manifest before any byte arrived
                tensors = decode_arrays(tensors, update.weights.logical, update.weights.encoding, what=what)
                norm = check_tensor_values(tensors, max_norm=outstanding.max_norm, what=what)
            else:  # scanned chunk by chunk as the bytes arrived
                norm = values.check(max_norm=outstanding.max_norm, what=what)
        except ProtocolError as exc:
            logger.warning("coordinator: rejected the update for task %r: %s", update.task_id, exc)
            self._queue(Error(task_id=update.task_id, code=ErrorCode.BAD_UPDATE, message=str(exc)[:MAX_ERROR_TEXT]))
            return [UpdateRejected(task_id=update.task_id, reason=str(exc))]
        return [UpdateReceived(update=update, tensors=tensors, norm=norm)]

    def _pending_task_id(self) -> str | None:
        return self._outstanding.task.task_id if self._outstanding is not None else None

    def _forget_task(self) -> None:
        self._outstanding = None
        self._update = None
