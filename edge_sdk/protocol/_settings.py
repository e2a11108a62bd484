"""The settings records a task carries, and the limits each side announces.

Typed frozen records checked on construction (from Python or from JSON), like every message; see
``_messages`` for the messages that carry them.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from edge_sdk._levers import Levers
from edge_sdk.protocol._tensors import (
    CHUNK_HEADER_BYTES,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_TRANSFER_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
)
from edge_sdk.protocol._wire import OPTIONAL_ON_WIRE, WireRecord

__all__ = [
    "MAX_GRAD_NORM",
    "MAX_TEXT_BYTES",
    "PLAIN_LEVERS",
    "EvalSettings",
    "InferenceSettings",
    "TrainSettings",
    "WireLimits",
    "require_field",
]

MAX_TEXT_BYTES: Final = 1 << 20  # default bound on one control message (UTF-8 bytes)
_MIN_TEXT_BYTES: Final = 64 << 10
_MAX_TEXT_BYTES_LIMIT: Final = 16 << 20


def require_field(record: WireRecord, field: str, ok: bool, problem: str) -> None:
    """ProtocolError naming ``record``'s ``field`` and the ``problem`` unless ``ok``."""
    if not ok:
        raise record._invalid(field, problem)


# -------------------------------------------------------------------------------------------- parts


MAX_CONTROL_PAYLOAD_BYTES: Final = 125  # a websocket ping, pong or close frame's payload at most


@dataclasses.dataclass(frozen=True, kw_only=True)
class WireLimits(WireRecord):
    """What one side accepts; each side announces its own (Hello, Welcome) and sends within the peer's.

    Set the websocket ``max_size`` to :attr:`websocket_max_size` (:attr:`max_frame_bytes` plus room
    for a control frame: see there).
    """

    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES

    def _validate(self) -> None:
        require_field(
            self,
            "max_chunk_bytes",
            MIN_CHUNK_BYTES <= self.max_chunk_bytes <= MAX_CHUNK_BYTES,
            f"{self.max_chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}",
        )
        require_field(
            self,
            "max_text_bytes",
            _MIN_TEXT_BYTES <= self.max_text_bytes <= _MAX_TEXT_BYTES_LIMIT,
            f"{self.max_text_bytes} is outside {_MIN_TEXT_BYTES}..{_MAX_TEXT_BYTES_LIMIT}",
        )
        require_field(self, "max_transfer_bytes", self.max_transfer_bytes > 0, "must be positive")

    @property
    def max_frame_bytes(self) -> int:
        """The largest websocket message this side accepts (its ``max_size``)."""
        return max(self.max_chunk_bytes + CHUNK_HEADER_BYTES, self.max_text_bytes)

    @property
    def websocket_max_size(self) -> int:
        """The websocket library's ``max_size``: :attr:`max_frame_bytes` plus the largest control frame
        payload (125 bytes, RFC 6455 5.5). A ping or pong may arrive between the fragments of a
        message, and ``websockets`` counts every frame, control frames too, against what is left of the
        message's ``max_size``: a keepalive ping (4 bytes) landing after the last piece of a full chunk
        and before its empty final fragment closed the connection with 1009. The protocol itself still
        refuses any chunk or text over :attr:`max_frame_bytes`."""
        return self.max_frame_bytes + MAX_CONTROL_PAYLOAD_BYTES


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
        require_field(
            self,
            "local_steps",
            (self.local_steps is None) != (self.local_epochs is None),
            "give exactly one of local_steps and local_epochs",
        )
        for name in ("local_steps", "local_epochs"):
            value = getattr(self, name)
            require_field(self, name, value is None or value >= 1, f"must be >= 1, got {value}")
        require_field(self, "lr", self.lr > 0, f"must be > 0, got {self.lr}")
        require_field(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        require_field(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")
        require_field(self, "optimizer", bool(self.optimizer), "must not be empty")
        require_field(self, "prox_mu", self.prox_mu >= 0, f"must be >= 0, got {self.prox_mu}")
        require_field(self, "seed", self.seed >= 0, f"must be >= 0, got {self.seed}")  # and <= 2**53, as every int
        require_field(
            self,
            "levers",
            self.levers.micro_batches <= self.batch_size,
            f"{self.levers.micro_batches} micro-batches cannot split a batch of {self.batch_size}",
        )
        if self.max_grad_norm is not None:
            require_field(
                self,
                "max_grad_norm",
                0 < self.max_grad_norm <= MAX_GRAD_NORM,
                f"must be in (0, {MAX_GRAD_NORM:g}] or null (no clipping), got {self.max_grad_norm}",
            )
        if self.dropout is not None:
            require_field(self, "dropout", 0 <= self.dropout < 1, f"must be in [0, 1) or null, got {self.dropout}")
        if self.dp_clip_norm is not None:
            require_field(
                self,
                "dp_clip_norm",
                0 < self.dp_clip_norm <= MAX_GRAD_NORM,
                f"must be in (0, {MAX_GRAD_NORM:g}] or null (no local DP), got {self.dp_clip_norm}",
            )
        require_field(
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
        require_field(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        require_field(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceSettings(WireRecord):
    batch_size: int
    seq_len: int
    quantize: bool = False
    # export through ONNX Runtime's transformer fusion (about twice the export's peak memory; the
    # coordinator asks for it only where that fits the device's budget)
    optimize: bool = dataclasses.field(default=False, metadata=OPTIONAL_ON_WIRE)

    def _validate(self) -> None:
        require_field(self, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")
        require_field(self, "seq_len", self.seq_len >= 1, f"must be >= 1, got {self.seq_len}")
