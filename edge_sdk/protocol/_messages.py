"""Control messages: typed frozen records, sent as JSON text frames ``{"type": ..., "v": 1, ...}``.

Decoding is strict, in this order: size (1009), JSON object (1002), protocol version ``v`` (1002),
``type`` (unknown: 1003), then exactly the message's fields, each well typed (1002, naming the field).
Tensors never travel in a control message: a message that carries weights holds a
:class:`TensorManifest` and its binary chunk frames follow it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal

from edge_sdk._errors import ProtocolError
from edge_sdk._levers import Levers
from edge_sdk.protocol._tensors import (
    CHUNK_HEADER_BYTES,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_TRANSFER_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    TensorManifest,
)
from edge_sdk.protocol._wire import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    OPTIONAL_ON_WIRE,
    JSONObject,
    WireRecord,
    dumps_json,
    json_type_name,
    loads_json_object,
)

__all__ = [
    "MAX_TEXT_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Bye",
    "Deploy",
    "DeployResult",
    "Error",
    "ErrorCode",
    "EvalResult",
    "EvalSettings",
    "EvaluateTask",
    "Hello",
    "InferenceSettings",
    "Message",
    "TrainSettings",
    "TrainTask",
    "Update",
    "Welcome",
    "WireLimits",
    "decode_message",
    "encode_message",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_TEXT_BYTES: Final = 1 << 20  # default bound on one control message (UTF-8 bytes)
_MIN_TEXT_BYTES: Final = 64 << 10
_MAX_TEXT_BYTES_LIMIT: Final = 16 << 20
_MAX_CLOSE_REASON_BYTES: Final = 123  # websocket close frames carry at most 123 bytes of reason
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class ErrorCode:
    """Machine-readable ``Error.code`` values used by edge-fm (any short snake_case string is valid)."""

    BAD_MESSAGE: Final = "bad_message"  # malformed JSON, a missing/extra/mistyped field, out-of-order frames
    VERSION: Final = "version"  # the peer speaks another protocol version
    TOO_LARGE: Final = "too_large"  # a frame or transfer above the receiver's limit
    UNSUPPORTED: Final = "unsupported"  # unknown message type, a frame kind not expected now
    UNEXPECTED: Final = "unexpected"  # a valid message that is not allowed in the current state
    UNKNOWN_TASK: Final = "unknown_task"  # a result for a task that is not outstanding
    BAD_UPDATE: Final = "bad_update"  # an update with the wrong tensors, non-finite values or too large a norm
    BAD_TASK: Final = "bad_task"  # a task whose tensors the device cannot accept
    REJECTED: Final = "rejected"  # the coordinator refuses this device (after Hello)
    TASK_FAILED: Final = "task_failed"  # the device could not run the task (out of memory, ...)
    INTERNAL: Final = "internal"  # a bug on the sending side


def _require(record: WireRecord, field: str, ok: bool, problem: str) -> None:
    if not ok:
        raise record._invalid(field, problem)


# -------------------------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True, kw_only=True)
class WireLimits(WireRecord):
    """What one side accepts; each side announces its own (Hello, Welcome) and sends within the peer's.

    Set the websocket ``max_size`` to :attr:`max_frame_bytes`.
    """

    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES

    def _validate(self) -> None:
        _require(
            self,
            "max_chunk_bytes",
            MIN_CHUNK_BYTES <= self.max_chunk_bytes <= MAX_CHUNK_BYTES,
            f"{self.max_chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}",
        )
        _require(
            self,
            "max_text_bytes",
            _MIN_TEXT_BYTES <= self.max_text_bytes <= _MAX_TEXT_BYTES_LIMIT,
            f"{self.max_text_bytes} is outside {_MIN_TEXT_BYTES}..{_MAX_TEXT_BYTES_LIMIT}",
        )
        _require(self, "max_transfer_bytes", self.max_transfer_bytes > 0, "must be positive")

    @property
    def max_frame_bytes(self) -> int:
        """The largest websocket message this side accepts (its ``max_size``)."""
        return max(self.max_chunk_bytes + CHUNK_HEADER_BYTES, self.max_text_bytes)


MAX_GRAD_NORM: Final = 1e6  # the largest gradient-clipping bound a task may carry
PLAIN_LEVERS: Final = Levers()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings(WireRecord):
    """Local training of one task: exactly one of ``local_steps`` / ``local_epochs``.

    ``seq_len`` is the longest row a batch may hold (rows are truncated to it; each (micro-)batch is
    padded to its own longest row). The fields after ``seed`` came with the memory levers and are
    optional on the wire (sent only when set, so a device that predates them still gets plain tasks):
    ``levers`` is the training recipe the coordinator planned (its ``micro_batches`` split the batch,
    so at most ``batch_size``), ``max_grad_norm`` clips the global gradient norm (None: no clipping),
    ``dropout`` overrides the model's dropout probabilities (None: the model's own).
    ``dp_clip_norm`` and ``dp_noise_multiplier`` ask for local differential privacy: the update's
    delta clipped to that L2 norm and noised with std ``dp_noise_multiplier x dp_clip_norm`` before
    it is sent (None: no local DP). A device that predates them refuses such a task (unknown field).
    """

    local_steps: int | None = None
    local_epochs: int | None = None
    lr: float
    batch_size: int
    seq_len: int
    optimizer: str = "adamw"
    prox_mu: float = 0.0
    seed: int = 0
    levers: Levers = dataclasses.field(default=PLAIN_LEVERS, metadata=OPTIONAL_ON_WIRE)
    max_grad_norm: float | None = dataclasses.field(default=None, metadata=OPTIONAL_ON_WIRE)
    dropout: float | None = dataclasses.field(default=None, metadata=OPTIONAL_ON_WIRE)
    dp_clip_norm: float | None = dataclasses.field(default=None, metadata=OPTIONAL_ON_WIRE)
    dp_noise_multiplier: float = dataclasses.field(default=0.0, metadata=OPTIONAL_ON_WIRE)

    def _validate(self) -> None:
        _require(
            self,
            "local_steps",
            (self.local_steps is None) != (self.local_epochs is None),
            "give exactly one of local_steps and local_epochs",
        )
        for name in ("local_steps", "local_epochs"):
            value = getattr(self, name)
            _require(self, name, value is None or value >= 1, f"must be >= 1, got {value}")
        _require(self, "lr", self.lr > 0, f"must be > 0, got {self.lr}")
        _require(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        _require(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")
        _require(self, "optimizer", bool(self.optimizer), "must not be empty")
        _require(self, "prox_mu", self.prox_mu >= 0, f"must be >= 0, got {self.prox_mu}")
        _require(self, "seed", 0 <= self.seed < 2**63, f"must be in 0..2**63-1, got {self.seed}")
        _require(
            self,
            "levers",
            self.levers.micro_batches <= self.batch_size,
            f"{self.levers.micro_batches} micro-batches cannot split a batch of {self.batch_size}",
        )
        if self.max_grad_norm is not None:
            _require(
                self,
                "max_grad_norm",
                0 < self.max_grad_norm <= MAX_GRAD_NORM,
                f"must be in (0, {MAX_GRAD_NORM:g}] or null (no clipping), got {self.max_grad_norm}",
            )
        if self.dropout is not None:
            _require(self, "dropout", 0 <= self.dropout < 1, f"must be in [0, 1) or null, got {self.dropout}")
        if self.dp_clip_norm is not None:
            _require(
                self,
                "dp_clip_norm",
                0 < self.dp_clip_norm <= MAX_GRAD_NORM,
                f"must be in (0, {MAX_GRAD_NORM:g}] or null (no local DP), got {self.dp_clip_norm}",
            )
        _require(
            self,
            "dp_noise_multiplier",
            0 <= self.dp_noise_multiplier <= MAX_GRAD_NORM
            and (self.dp_clip_norm is not None or not self.dp_noise_multiplier),
            f"must be >= 0, and only with dp_clip_norm, got {self.dp_noise_multiplier}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings(WireRecord):
    batch_size: int
    seq_len: int

    def _validate(self) -> None:
        _require(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        _require(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceSettings(WireRecord):
    batch_size: int
    seq_len: int
    quantize: bool = False

    def _validate(self) -> None:
        _require(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        _require(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")


# ----------------------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message(WireRecord):
    """Base of all control messages; ``TYPE`` is the JSON ``type`` tag, ``v`` the protocol version."""

    TYPE: ClassVar[str] = ""
    v: int = PROTOCOL_VERSION

    def _validate(self) -> None:
        if self.v != PROTOCOL_VERSION:
            raise self._invalid("v", f"unsupported protocol version {self.v} (this side speaks {PROTOCOL_VERSION})")
        for name in ("task_id", "device_id", "run_id"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                _require(self, name, 0 < len(value) <= 256, "must be 1 to 256 characters")
        for name in ("round", "num_samples", "peak_rss_bytes"):
            value = getattr(self, name, None)
            if isinstance(value, int):
                _require(self, name, value >= 0, f"must be >= 0, got {value}")
        for name in ("step_time_s", "train_time_s"):
            value = getattr(self, name, None)
            if isinstance(value, float):
                _require(self, name, value >= 0, f"must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """Device -> coordinator, first message: who the device is and what it accepts."""

    TYPE: ClassVar[str] = "hello"
    device_id: str
    sdk_version: str
    profile: JSONObject
    capabilities: tuple[str, ...] = ()
    limits: WireLimits = WireLimits()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """Coordinator -> device, answer to Hello: the run, the device's id, the clock and round, limits."""

    TYPE: ClassVar[str] = "welcome"
    run_id: str
    device_id: str
    round: int
    server_time: float
    limits: WireLimits = WireLimits()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTask(Message):
    """Coordinator -> device: train this sub-network locally; its weights follow as chunks."""

    TYPE: ClassVar[str] = "train_task"
    task_id: str
    round: int
    spec: JSONObject
    model_config: JSONObject
    settings: TrainSettings
    weights: TensorManifest


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateTask(Message):
    """Coordinator -> device: evaluate this sub-network on local data; its weights follow as chunks."""

    TYPE: ClassVar[str] = "evaluate_task"
    task_id: str
    round: int
    spec: JSONObject
    model_config: JSONObject
    settings: EvalSettings
    weights: TensorManifest


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deploy(Message):
    """Coordinator -> device: export this sub-network for inference (ONNX); its weights follow."""

    TYPE: ClassVar[str] = "deploy"
    task_id: str
    round: int
    spec: JSONObject
    model_config: JSONObject
    settings: InferenceSettings
    weights: TensorManifest


@dataclasses.dataclass(frozen=True, kw_only=True)
class Update(Message):
    """Device -> coordinator: the trained weights (or their delta) of a TrainTask; chunks follow."""

    TYPE: ClassVar[str] = "update"
    task_id: str
    num_samples: int
    metrics: Mapping[str, float]
    peak_rss_bytes: int
    step_time_s: float
    train_time_s: float
    weights: TensorManifest
    encoding: Literal["weights", "delta"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult(Message):
    """Device -> coordinator: the metrics of an EvaluateTask."""

    TYPE: ClassVar[str] = "eval_result"
    task_id: str
    num_samples: int
    metrics: Mapping[str, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeployResult(Message):
    """Device -> coordinator: whether a Deploy worked, with its parity/size/latency metrics."""

    TYPE: ClassVar[str] = "deploy_result"
    task_id: str
    ok: bool
    metrics: Mapping[str, float]
    message: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Error(Message):
    """Either direction: something went wrong, for one task (``task_id``) or the whole connection."""

    TYPE: ClassVar[str] = "error"
    task_id: str | None = None
    code: str
    message: str

    def _validate(self) -> None:
        super()._validate()
        _require(
            self,
            "code",
            bool(_ERROR_CODE.fullmatch(self.code)),
            f"expected a short snake_case code, got {self.code!r}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """Either direction: closing cleanly; ``code``/``reason`` are what the websocket close will carry."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""
    code: int = 1000

    def _validate(self) -> None:
        super()._validate()
        _require(self, "code", 1000 <= self.code <= 4999, f"not a websocket close code: {self.code}")
        size = len(self.reason.encode("utf-8"))
        _require(
            self,
            "reason",
            size <= _MAX_CLOSE_REASON_BYTES,
            f"{size} bytes, at most {_MAX_CLOSE_REASON_BYTES}",
        )


MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = types.MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (
            Hello,
            Welcome,
            TrainTask,
            EvaluateTask,
            Deploy,
            Update,
            EvalResult,
            DeployResult,
            Error,
            Bye,
        )
    }
)


# ----------------------------------------------------------------------------------------- encoding


def encode_message(message: Message, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The JSON text frame for ``message``; ProtocolError(1009) if above the receiver's ``max_bytes``."""
    text = dumps_json({"type": message.TYPE, **message.to_json()})
    size = len(text)  # ASCII: non-ASCII characters are escaped
    if size > max_bytes:
        raise ProtocolError(
            f"{type(message).__name__} message of {size} bytes exceeds the limit of {max_bytes}",
            CLOSE_MESSAGE_TOO_BIG,
        )
    return text


def parse_text_frame(text: str, *, max_bytes: int = MAX_TEXT_BYTES) -> dict[str, Any]:
    """Step 1 of decoding: bound the size, parse one JSON object."""
    if not isinstance(text, str):
        raise ProtocolError(f"control messages are text frames, got {type(text).__name__}", CLOSE_UNSUPPORTED_DATA)
    size = _utf8_size(text)
    if size > max_bytes:
        raise ProtocolError(f"text message of {size} bytes exceeds the limit of {max_bytes}", CLOSE_MESSAGE_TOO_BIG)
    return loads_json_object(text, "control message")


def check_version(obj: Mapping[str, Any]) -> None:
    """Step 2: the protocol version ``v`` must be present and equal :data:`PROTOCOL_VERSION`."""
    name = obj.get("type") if isinstance(obj.get("type"), str) else "?"
    if "v" not in obj:
        raise ProtocolError(f"{name} message: missing field 'v' (protocol version)", CLOSE_PROTOCOL_ERROR)
    version = obj["v"]
    if type(version) is not int:
        raise ProtocolError(
            f"{name} message: protocol version 'v' must be an integer, got {json_type_name(version)}",
            CLOSE_PROTOCOL_ERROR,
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{name} message: unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})",
            CLOSE_PROTOCOL_ERROR,
        )


def message_from_json(obj: Mapping[str, Any]) -> Message:
    """Step 3: the message type, then exactly its fields, each well typed."""
    if "type" not in obj:
        raise ProtocolError("control message: missing field 'type'", CLOSE_PROTOCOL_ERROR)
    tag = obj["type"]
    if not isinstance(tag, str):
        raise ProtocolError(
            f"control message: field 'type' must be a string, got {json_type_name(tag)}", CLOSE_PROTOCOL_ERROR
        )
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise ProtocolError(
            f"unknown message type {tag[:64]!r} (known: {', '.join(sorted(MESSAGE_TYPES))})",
            CLOSE_UNSUPPORTED_DATA,
        )
    fields = {key: value for key, value in obj.items() if key != "type"}
    return cls.from_json(fields)


def decode_message(text: str, *, max_bytes: int = MAX_TEXT_BYTES) -> Message:
    """Decode one text frame into its message; ProtocolError (with its close code) on any fault."""
    obj = parse_text_frame(text, max_bytes=max_bytes)
    check_version(obj)
    return message_from_json(obj)


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
