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
from edge_sdk.protocol._settings import (
    MAX_TEXT_BYTES,
    EvalSettings,
    InferenceSettings,
    TrainSettings,
    WireLimits,
    require_field,
)
from edge_sdk.protocol._tensors import TensorManifest
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
    "FEATURE_CHUNK_XXH3",
    "FEATURE_PROGRESS",
    "MAX_MEMORY_BYTES",
    "MAX_NUM_SAMPLES",
    "MAX_PROGRESS_STEPS",
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
    "Progress",
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
_MAX_CLOSE_REASON_BYTES: Final = 123  # websocket close frames carry at most 123 bytes of reason
# RFC 6455, 7.4: the codes a close frame may carry (1004-1006 and 1015 are reserved, 1016-2999 for
# extensions and the IANA registry; 3000-4999 for libraries and applications).
_SENDABLE_CLOSE_CODES: Final = frozenset([*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)])
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


# Upper bounds on what a peer reports. A device's local dataset, its memory and its timings are each
# far below these; a count above them is a fault (or an attack: a sample count of 10**12 would make one
# update the whole weighted mean), refused when the message is decoded.
MAX_NUM_SAMPLES: Final = 2**31 - 1
MAX_MEMORY_BYTES: Final = 2**50  # 1 PiB
MAX_SECONDS: Final = 10_000_000  # about 116 days
MAX_METRICS: Final = 64  # entries in a metrics mapping
MAX_PROGRESS_STEPS: Final = 10_000_000  # steps a Progress may count (a task of more steps reports none)
# What a peer may announce in ``Hello.capabilities`` / ``Welcome.features``: "progress" (the device may
# send Progress while it trains; the coordinator lists it in its Welcome only if the Hello did).
FEATURE_PROGRESS: Final = "progress"
# "chunks:xxh3_128": transfers carry each chunk's xxh3_128 (``TensorManifest.chunk_xxh3``) instead of the
# blob's sha256, both ways. Every DeviceConnection announces it; a coordinator that knows it grants it.
FEATURE_CHUNK_XXH3: Final = "chunks:xxh3_128"
_BOUNDS: Final = {
    "round": MAX_NUM_SAMPLES,
    "num_samples": MAX_NUM_SAMPLES,
    "peak_rss_bytes": MAX_MEMORY_BYTES,
    "step_time_s": MAX_SECONDS,
    "train_time_s": MAX_SECONDS,
}


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
                require_field(self, name, 0 < len(value) <= 256, "must be 1 to 256 characters")
        for name, most in _BOUNDS.items():
            value = getattr(self, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                require_field(self, name, 0 <= value <= most, f"must be in 0..{most}, got {value}")
        metrics = getattr(self, "metrics", None)
        if isinstance(metrics, Mapping):
            require_field(
                self, "metrics", len(metrics) <= MAX_METRICS, f"{len(metrics)} entries, at most {MAX_METRICS}"
            )
            for key in metrics:
                require_field(self, "metrics", 0 < len(key) <= 64, f"a key of {len(key)} characters (1 to 64)")


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
    # Optional features this coordinator takes from this device (e.g. "progress"); only those the
    # device's Hello announced, so an older device never sees the field.
    features: tuple[str, ...] = dataclasses.field(default=(), metadata=OPTIONAL_ON_WIRE)
    # The data channel granted (feature "channel:tcp", see ``_channel``): its port and one-time token.
    data_port: int = dataclasses.field(default=0, metadata=OPTIONAL_ON_WIRE)
    data_token: str = dataclasses.field(default="", metadata=OPTIONAL_ON_WIRE)

    def _validate(self) -> None:
        super()._validate()
        require_field(self, "features", len(self.features) <= 16, f"{len(self.features)} entries, at most 16")
        for feature in self.features:
            require_field(self, "features", 0 < len(feature) <= 32, "each feature is 1 to 32 characters")
        require_field(self, "data_port", 0 <= self.data_port <= 65535, f"{self.data_port} is not a port")
        require_field(
            self,
            "data_token",
            self.data_token == ""
            or (len(self.data_token) == 32 and all(c in "0123456789abcdef" for c in self.data_token)),
            "expected 32 lowercase hex digits",
        )
        require_field(
            self, "data_token", (self.data_port == 0) == (self.data_token == ""), "port and token go together"
        )


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
class Progress(Message):
    """Device -> coordinator, while a TrainTask runs: ``steps_done`` of its ``steps_total`` steps.

    Informative only (the status page): sent at most about once a second, and only to a coordinator
    whose Welcome lists the "progress" feature. ``0 <= steps_done <= steps_total <= MAX_PROGRESS_STEPS``.
    """

    TYPE: ClassVar[str] = "progress"
    task_id: str
    steps_done: int
    steps_total: int

    def _validate(self) -> None:
        super()._validate()
        total, done = self.steps_total, self.steps_done
        require_field(self, "steps_total", 0 < total <= MAX_PROGRESS_STEPS, f"must be in 1..{MAX_PROGRESS_STEPS}")
        require_field(self, "steps_done", 0 <= done <= total, f"must be in 0..steps_total ({total}), got {done}")


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
        require_field(
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
        ok = self.code in _SENDABLE_CLOSE_CODES
        require_field(self, "code", ok, f"not a websocket close code a close frame can carry: {self.code}")
        size = len(self.reason.encode("utf-8"))
        require_field(
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
            Progress,
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
