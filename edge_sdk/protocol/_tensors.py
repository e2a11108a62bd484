"""Tensors on the wire: safetensors bytes (never pickle), cut into framed binary chunks.

A transfer is announced by a :class:`TensorManifest` inside a JSON control message (names, shapes,
dtypes, total bytes, chunk size and count, and its digests), followed by ``num_chunks`` binary frames.

Digests catch corruption and truncation (they are no security boundary: TLS protects ``wss://``). A
manifest carries one of two kinds:

* ``chunk_xxh3`` (negotiated, :data:`CHUNK_XXH3`): the xxh3_128 of each chunk's payload, 32 hex digits
  per chunk. xxh3 hashes at about 14 GB/s (sha256: about 1 GB/s, the old bottleneck of a transfer),
  each chunk is verified as it arrives and a bad one is refused by its index; the sender hashes
  nothing else, and a coordinator hashes each shared encoding once for all its devices;
* ``sha256`` of the whole safetensors blob (protocol 1's only kind, for peers that do not announce
  the feature): checked once the last chunk is in.
 Each frame starts with a fixed 24-byte header::

    magic b"EFC1" (4 bytes) | transfer id (16 bytes: the manifest's 32 hex digits) | chunk index (u32 BE)

so a chunk from another transfer, out of order, duplicated or cut short is caught as it arrives.
:class:`TensorAssembler` (in ``_assembler``) rebuilds and checks the tensors on the receiving side;
:class:`EncodedTensors` (in ``_payload``) sends them without copying them (:func:`encode_tensors` here
makes the whole blob and every frame: for tests and tools).

Only numpy is needed here: an inference-only device without torch uses the same code. The torch
helpers import torch inside the function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy
import xxhash

from edge_sdk._errors import ConfigError, ProtocolError
from edge_sdk.protocol._wire import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    OPTIONAL_ON_WIRE,
    WireRecord,
    loads_json_object,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHUNK_HEADER_BYTES",
    "CHUNK_MAGIC",
    "CHUNK_XXH3",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_TRANSFER_BYTES",
    "DTYPES",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "TensorEntry",
    "TensorManifest",
    "chunk_blob",
    "chunk_xxh3",
    "decode_chunk",
    "describe_tensors",
    "encode_chunk",
    "encode_tensors",
    "entry_mismatches",
    "new_transfer_id",
    "numpy_to_torch",
    "read_safetensors_header",
    "torch_to_numpy",
    "wire_arrays",
]

logger = logging.getLogger(__name__)

MiB = 1 << 20
MIN_CHUNK_BYTES = 1 * MiB  # what a connection may be configured with (1 to 4 MiB)
DEFAULT_CHUNK_BYTES = 1 * MiB
MAX_CHUNK_BYTES = 4 * MiB
DEFAULT_MAX_TRANSFER_BYTES = 512 * MiB  # default bound on one transfer's safetensors bytes

CHUNK_MAGIC = b"EFC1"
_CHUNK_HEADER = struct.Struct(">4s16sI")
CHUNK_XXH3 = "xxh3_128"  # the per-chunk digest (``TensorManifest.chunk_xxh3``); "sha256": the whole blob's
CHUNK_HEADER_BYTES = _CHUNK_HEADER.size  # 24

_MAX_SAFETENSORS_HEADER_BYTES = 16 * MiB

# safetensors dtype name -> little-endian numpy dtype; the dtypes numpy can hold (no BF16, no F8).
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPES = frozenset(_NUMPY_DTYPES)

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name (``"F32"``) of a numpy dtype; ProtocolError(1003) if it has none."""
    for name, candidate in _NUMPY_DTYPES.items():
        if dtype.kind == candidate.kind and dtype.itemsize == candidate.itemsize:
            return name
    raise ProtocolError(f"dtype {dtype} cannot travel as safetensors for numpy", CLOSE_UNSUPPORTED_DATA)


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype for a safetensors dtype name."""
    try:
        return _NUMPY_DTYPES[name]
    except KeyError:
        raise ProtocolError(
            f"unsupported dtype {name!r} (supported: {', '.join(sorted(DTYPES))})", CLOSE_UNSUPPORTED_DATA
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry(WireRecord):
    """One tensor of a transfer; ``offset``/``length`` locate its bytes in the safetensors blob."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int | None = None
    length: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _NUMPY_DTYPES[self.dtype].itemsize

    def _validate(self) -> None:
        if not self.name or self.name == "__metadata__":
            raise self._invalid("name", f"invalid tensor name {self.name!r}")
        if any(dim < 0 for dim in self.shape):
            raise self._invalid("shape", f"negative dimension in {self.shape} for tensor {self.name!r}")
        if self.dtype not in DTYPES:
            raise self._invalid(
                "dtype",
                f"unsupported dtype {self.dtype!r} for tensor {self.name!r} (supported: {', '.join(sorted(DTYPES))})",
                CLOSE_UNSUPPORTED_DATA,
            )
        if (self.offset is None) != (self.length is None):
            raise self._invalid("offset", "offset and length must be given together or not at all")
        if self.offset is not None and self.offset < 0:
            raise self._invalid("offset", f"negative offset {self.offset}")
        if self.length is not None and self.length != self.nbytes:
            raise self._invalid(
                "length",
                f"tensor {self.name!r}: {self.length} bytes, but {self.shape} {self.dtype} is {self.nbytes}",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorManifest(WireRecord):
    """What a transfer will carry: announced in a control message before its chunks."""

    transfer_id: str
    entries: tuple[TensorEntry, ...]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    # Exactly one of: the sha256 of the whole blob (64 hex digits), or the xxh3_128 of each chunk's
    # payload (32 hex digits each, in chunk order; negotiated, see the module docstring).
    sha256: str = dataclasses.field(default="", metadata=OPTIONAL_ON_WIRE)
    chunk_xxh3: tuple[str, ...] = dataclasses.field(default=(), metadata=OPTIONAL_ON_WIRE)
    # An encoded transfer (``_encodings``): ``encoding`` names how the blob's tensors (``entries``) encode
    # the ``logical`` tensors the receiver gets back. Both absent (the default) for a plain transfer.
    encoding: str = dataclasses.field(default="", metadata=OPTIONAL_ON_WIRE)
    logical: tuple[TensorEntry, ...] = dataclasses.field(default=(), metadata=OPTIONAL_ON_WIRE)
    # Where the chunks travel: "" on the websocket, "tcp" on the connection's data channel (``_channel``).
    channel: str = dataclasses.field(default="", metadata=OPTIONAL_ON_WIRE)

    def _validate(self) -> None:
        if self.channel not in ("", "tcp"):
            raise self._invalid("channel", f"expected '' or 'tcp', got {self.channel[:16]!r}")
        if (self.encoding == "") != (not self.logical) or len(self.encoding) > 32:
            raise self._invalid(
                "encoding", f"encoding {self.encoding[:32]!r} needs its logical tensors (and only then)"
            )
        logical_names = [entry.name for entry in self.logical]
        if len(set(logical_names)) != len(logical_names):
            raise self._invalid("logical", "duplicate logical tensor names")
        if not _HEX32.fullmatch(self.transfer_id):
            raise self._invalid("transfer_id", f"expected 32 lowercase hex digits, got {self.transfer_id!r}")
        if not self.chunk_xxh3 and not _HEX64.fullmatch(self.sha256):
            raise self._invalid("sha256", f"expected 64 lowercase hex digits (or chunk_xxh3), got {self.sha256!r}")
        if self.chunk_xxh3 and self.sha256:
            raise self._invalid("sha256", "a manifest carries either sha256 or chunk_xxh3, not both")
        if self.total_bytes < 8:
            raise self._invalid("total_bytes", f"{self.total_bytes} is too small for a safetensors blob")
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise self._invalid("chunk_bytes", f"{self.chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}")
        expected_chunks = -(-self.total_bytes // self.chunk_bytes)
        if self.num_chunks != expected_chunks:
            raise self._invalid(
                "num_chunks",
                f"{self.num_chunks} chunks of {self.chunk_bytes} bytes cannot hold {self.total_bytes} bytes"
                f" (expected {expected_chunks})",
            )
        if self.chunk_xxh3 and len(self.chunk_xxh3) != self.num_chunks:
            raise self._invalid("chunk_xxh3", f"{len(self.chunk_xxh3)} digests for {self.num_chunks} chunks")
        bad = next((digest for digest in self.chunk_xxh3 if not _HEX32.fullmatch(digest)), None)
        if bad is not None:
            raise self._invalid("chunk_xxh3", f"expected 32 lowercase hex digits per chunk, got {bad[:40]!r}")
        names = [entry.name for entry in self.entries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise self._invalid("entries", f"duplicate tensor names {duplicates}")
        data_bytes = sum(entry.nbytes for entry in self.entries)
        if data_bytes > self.total_bytes:
            raise self._invalid("entries", f"tensors need {data_bytes} bytes but the transfer has {self.total_bytes}")
        if self.total_bytes - data_bytes > 8 + _MAX_SAFETENSORS_HEADER_BYTES:
            raise self._invalid(
                "total_bytes",
                f"{self.total_bytes} bytes for {data_bytes} bytes of tensors: more than a safetensors header",
            )

    def chunk_length(self, index: int) -> int:
        """Payload bytes of chunk ``index``: ``chunk_bytes`` except for a shorter last chunk."""
        if index < self.num_chunks - 1:
            return self.chunk_bytes
        return self.total_bytes - self.chunk_bytes * (self.num_chunks - 1)


def chunk_xxh3(payload: bytes | bytearray | memoryview) -> str:
    """The xxh3_128 digest of one chunk's payload, as a manifest lists it (32 hex digits)."""
    return xxhash.xxh3_128_hexdigest(payload)


def new_transfer_id() -> str:
    """A fresh random transfer id (32 hex digits)."""
    return uuid.uuid4().hex


def encode_chunk(transfer_id: str, index: int, payload: bytes | memoryview) -> bytes:
    """One binary chunk frame: the 24-byte header followed by ``payload``."""
    return _CHUNK_HEADER.pack(CHUNK_MAGIC, bytes.fromhex(transfer_id), index) + payload


def decode_chunk(frame: bytes | bytearray | memoryview) -> tuple[str, int, memoryview]:
    """Split a chunk frame into (transfer id, chunk index, payload); ProtocolError if malformed."""
    view = memoryview(frame)
    if len(view) < CHUNK_HEADER_BYTES:
        raise ProtocolError(
            f"truncated chunk frame: {len(view)} bytes, shorter than the {CHUNK_HEADER_BYTES}-byte chunk header",
            CLOSE_PROTOCOL_ERROR,
        )
    magic, raw_id, index = _CHUNK_HEADER.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise ProtocolError(
            f"not a chunk frame: magic {bytes(magic)!r}, expected {CHUNK_MAGIC!r}", CLOSE_PROTOCOL_ERROR
        )
    return raw_id.hex(), index, view[CHUNK_HEADER_BYTES:]


def read_safetensors_header(blob: bytes | bytearray | memoryview) -> tuple[TensorEntry, ...]:
    """Parse and check a safetensors header without touching tensor data.

    Every entry must have a supported dtype, a byte range matching its shape, and the ranges must tile
    the data section exactly. Returned entries carry absolute offsets into ``blob``, in data order.
    """
    view = memoryview(blob)
    if len(view) < 8:
        raise ProtocolError(f"safetensors blob of {len(view)} bytes has no header", CLOSE_PROTOCOL_ERROR)
    header_len = int.from_bytes(view[:8], "little")
    if header_len > min(len(view) - 8, _MAX_SAFETENSORS_HEADER_BYTES):
        raise ProtocolError(
            f"safetensors header length {header_len} exceeds the blob ({len(view)} bytes) or the limit",
            CLOSE_PROTOCOL_ERROR,
        )
    header = loads_json_object(bytes(view[8 : 8 + header_len]), "safetensors header")
    data_start = 8 + header_len
    data_len = len(view) - data_start
    spans: list[tuple[int, int, TensorEntry]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ProtocolError("safetensors header: __metadata__ must map str to str", CLOSE_PROTOCOL_ERROR)
            continue
        spans.append(_header_entry(name, info, data_start, data_len))
    spans.sort(key=lambda span: (span[0], span[1]))
    _check_tiling(spans, data_len)
    return tuple(entry for _, _, entry in spans)


def _header_entry(name: str, info: Any, data_start: int, data_len: int) -> tuple[int, int, TensorEntry]:
    """(begin, end, entry) of one tensor of a safetensors header: its data range (relative to the data
    section) checked against the data length and against its shape and dtype."""
    where = f"safetensors header, tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ProtocolError(f"{where}: expected dtype, shape and data_offsets", CLOSE_PROTOCOL_ERROR)
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise ProtocolError(f"{where}: bad data_offsets {offsets!r}", CLOSE_PROTOCOL_ERROR)
    begin, end = offsets
    entry = TensorEntry.from_json(
        {"name": name, "shape": info["shape"], "dtype": info["dtype"], "offset": None, "length": None},
        where,
    )
    if end - begin != entry.nbytes:
        raise ProtocolError(
            f"{where}: {end - begin} data bytes, but {entry.shape} {entry.dtype} needs {entry.nbytes}",
            CLOSE_PROTOCOL_ERROR,
        )
    return begin, end, dataclasses.replace(entry, offset=data_start + begin, length=end - begin)


def _check_tiling(spans: Sequence[tuple[int, int, TensorEntry]], data_len: int) -> None:
    """The sorted data ranges must tile the data section: no gap, no overlap, nothing left over."""
    position = 0
    for begin, end, entry in spans:
        if begin != position:
            raise ProtocolError(
                f"safetensors header: tensor {entry.name!r} starts at {begin}, expected {position}"
                " (data ranges must tile the data section)",
                CLOSE_PROTOCOL_ERROR,
            )
        position = end
    if position != data_len:
        raise ProtocolError(
            f"safetensors header: tensors cover {position} of {data_len} data bytes", CLOSE_PROTOCOL_ERROR
        )


def describe_tensors(tensors: Mapping[str, np.ndarray]) -> tuple[TensorEntry, ...]:
    """Entries (name, shape, dtype; no offsets) for in-memory arrays, e.g. to compare with a manifest."""
    for name, array in tensors.items():
        _require_ndarray(name, array)
    return tuple(
        TensorEntry(name=name, shape=tuple(array.shape), dtype=dtype_name(array.dtype))
        for name, array in tensors.items()
    )


def _require_ndarray(name: str, array: object) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"tensor {name!r}: expected a numpy array, got {type(array).__name__} (torch: use torch_to_numpy)"
        )


def entry_mismatches(actual: Iterable[TensorEntry], expected: Iterable[TensorEntry]) -> list[str]:
    """Every difference in names, shapes and dtypes between two entry lists (empty when they match)."""
    have = {entry.name: entry for entry in actual}
    want = {entry.name: entry for entry in expected}
    problems = [f"missing tensor {name!r}" for name in sorted(want.keys() - have.keys())]
    problems += [f"unexpected tensor {name!r}" for name in sorted(have.keys() - want.keys())]
    for name in sorted(have.keys() & want.keys()):
        got, exp = have[name], want[name]
        if got.shape != exp.shape:
            problems.append(f"tensor {name!r}: shape {list(got.shape)}, expected {list(exp.shape)}")
        if got.dtype != exp.dtype:
            problems.append(f"tensor {name!r}: dtype {got.dtype}, expected {exp.dtype}")
    return problems


def chunk_blob(
    blob: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, transfer_id: str | None = None, digest: str = "sha256"
) -> tuple[TensorManifest, list[bytes]]:
    """Cut an existing safetensors blob into chunk frames and describe it in a manifest (with the sha256
    of the blob, or with ``digest=CHUNK_XXH3`` each chunk's xxh3_128)."""
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES} (1 to 4 MiB recommended)")
    if digest not in ("sha256", CHUNK_XXH3):
        raise ConfigError(f"digest {digest!r} is neither 'sha256' nor {CHUNK_XXH3!r}")
    entries = read_safetensors_header(blob)
    view = memoryview(blob)
    pieces = [view[start : start + chunk_bytes] for start in range(0, len(blob), chunk_bytes)]
    xxh3 = digest == CHUNK_XXH3
    manifest = TensorManifest(
        transfer_id=transfer_id if transfer_id is not None else new_transfer_id(),
        entries=entries,
        total_bytes=len(blob),
        chunk_bytes=chunk_bytes,
        num_chunks=-(-len(blob) // chunk_bytes),
        sha256="" if xxh3 else hashlib.sha256(blob).hexdigest(),
        chunk_xxh3=tuple(chunk_xxh3(piece) for piece in pieces) if xxh3 else (),
    )
    frames = [encode_chunk(manifest.transfer_id, index, piece) for index, piece in enumerate(pieces)]
    return manifest, frames


def wire_arrays(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` checked (names, numpy arrays of a wire dtype) and laid out as they travel: C-contiguous
    and little-endian (a copy only for an array that is not already)."""
    prepared: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ProtocolError(f"invalid tensor name {name!r}", CLOSE_PROTOCOL_ERROR)
        _require_ndarray(name, array)
        # asarray, not ascontiguousarray: the latter turns a 0-d array into shape (1,).
        prepared[name] = np.asarray(array, dtype=_NUMPY_DTYPES[dtype_name(array.dtype)], order="C")
    return prepared


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    transfer_id: str | None = None,
    digest: str = "sha256",
) -> tuple[TensorManifest, list[bytes]]:
    """Serialize numpy arrays as safetensors and cut the bytes into chunk frames.

    Arrays are made C-contiguous and little-endian first (safetensors 0.8 ``save`` silently writes a
    non-contiguous array's memory in storage order, i.e. wrong values).
    """
    blob = safetensors.numpy.save(wire_arrays(tensors))
    return chunk_blob(blob, chunk_bytes=chunk_bytes, transfer_id=transfer_id, digest=digest)


def torch_to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies/views of torch tensors, ready for :func:`encode_tensors` (imports torch lazily)."""
    import torch

    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise ProtocolError(
                f"tensor {name!r} is bfloat16, which numpy cannot hold: convert it to float32 or float16 first",
                CLOSE_UNSUPPORTED_DATA,
            )
        out[name] = tensor.detach().cpu().contiguous().numpy()
    return out


def numpy_to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Torch tensors sharing memory with decoded arrays (imports torch lazily)."""
    import torch

    return {name: torch.from_numpy(array) for name, array in arrays.items()}
