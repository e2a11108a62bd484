"""Update encodings: how a transfer's float32 tensors are packed for the wire, and checked unpacking.

An encoding is a base, ``fp32``, ``fp16`` or ``int8``, optionally followed by ``+zstd``:

* ``fp32``: the values as they are;
* ``fp16``: each value rounded to float16 (relative error at most 2**-11 in the normal range; a value
  beyond float16's range cannot be encoded);
* ``int8``: per row (the first dimension; a 0-D or 1-D tensor is one row), ``scale = max|row| / 127``
  in float32 and ``q = round(x / scale)`` in int8, so ``|x - q * scale| <= scale / 2``;
* ``+zstd``: each packed tensor's bytes compressed with zstandard (lossless).

Only float32 tensors are packed; any other dtype (row indices, float16 weights) travels as it is.
The blob on the wire is still safetensors: packed tensor ``NAME`` (``F16``, or ``I8`` with its scales
in ``NAME@scale``, ``F32 [rows]``), and with ``+zstd`` each of those as a ``U8 [n]`` tensor holding one
zstd frame. The manifest names the encoding and lists the ``logical`` tensors (names, shapes, dtypes)
the receiver gets back, so every size is known before a byte is unpacked:

* the blob's tensors must be exactly the ones the logical tensors pack into (names, dtypes, shapes;
  a zstd frame at most the compression bound of its packed size);
* a zstd frame must declare its content size, equal to the packed size the manifest implies, and is
  decompressed into exactly that many bytes (a bomb costs nothing: it is refused before decompression);
* int8 scales must be finite and non-negative, int8 values within -127..127.

Negotiation (version 1 of this set): a device able to send every encoding above announces
:data:`CAPABILITY_ENCODINGS` in its Hello; a coordinator that wants encoded updates lists
``encoding:<name>`` (:func:`encoding_feature`) in its Welcome. The device then sends its update as
deltas against the weights it received (``Update.encoding == "delta"``), packed with that encoding.
A device or coordinator without the capability keeps plain float32 weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import numpy as np
import zstandard

from edge_sdk._errors import ConfigError, ProtocolError
from edge_sdk.protocol._tensors import TensorEntry, TensorManifest, dtype_name, numpy_dtype
from edge_sdk.protocol._update_entries import ROWS_SUFFIX, split_update_name
from edge_sdk.protocol._wire import CLOSE_POLICY_VIOLATION

__all__ = [
    "CAPABILITY_ENCODINGS",
    "ENCODINGS",
    "SCALE_SUFFIX",
    "check_encoding",
    "decode_arrays",
    "delta_from_weights",
    "encode_arrays",
    "encoded_entry_check",
    "encoded_mismatches",
    "encoding_feature",
    "granted_encoding",
]

ENCODINGS: Final = ("fp32", "fp32+zstd", "fp16", "fp16+zstd", "int8", "int8+zstd")
CAPABILITY_ENCODINGS: Final = "encodings/1"  # Hello: this device can send every encoding in ENCODINGS
_FEATURE_PREFIX: Final = "encoding:"  # Welcome: "encoding:int8+zstd", the encoding this run takes
SCALE_SUFFIX: Final = "@scale"
_ZSTD_LEVEL: Final = 3
_INT8_MAX: Final = 127


def check_encoding(name: str) -> str:
    """``name`` if it is one of :data:`ENCODINGS`, else ConfigError listing them."""
    if name not in ENCODINGS:
        raise ConfigError(f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    return name


def encoding_feature(name: str) -> str:
    """The Welcome feature granting encoding ``name`` (``"encoding:int8+zstd"``)."""
    return _FEATURE_PREFIX + check_encoding(name)


def granted_encoding(features: Iterable[str]) -> str | None:
    """The encoding a Welcome's features grant (None: plain float32 weights; an unknown name is ignored)."""
    for feature in features:
        name = feature[len(_FEATURE_PREFIX) :] if feature.startswith(_FEATURE_PREFIX) else ""
        if name in ENCODINGS:
            return name
    return None


def _split(encoding: str) -> tuple[str, bool]:
    base, _, rest = encoding.partition("+")
    return base, rest == "zstd"


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _as_rows(array: np.ndarray) -> np.ndarray:
    """``array`` as a 2-D [rows, cols] view: rows = the first dimension (one row for 0-D and 1-D)."""
    shape = tuple(array.shape)
    cols = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
    return array.reshape(_rows(shape), cols)


def _packed(entry: TensorEntry, base: str) -> list[TensorEntry]:
    """What the blob holds (before zstd) for one logical tensor."""
    if entry.dtype != "F32" or base == "fp32":
        return [TensorEntry(name=entry.name, shape=entry.shape, dtype=entry.dtype)]
    if base == "fp16":
        return [TensorEntry(name=entry.name, shape=entry.shape, dtype="F16")]
    return [
        TensorEntry(name=entry.name, shape=entry.shape, dtype="I8"),
        TensorEntry(name=entry.name + SCALE_SUFFIX, shape=(_rows(entry.shape),), dtype="F32"),
    ]


def _zstd_bound(size: int) -> int:
    """At least zstd's worst-case compressed size of ``size`` bytes (ZSTD_COMPRESSBOUND plus slack)."""
    return size + (size >> 8) + 1024


# ------------------------------------------------------------------------------------------ encoding


def encode_arrays(
    tensors: Mapping[str, np.ndarray], encoding: str
) -> tuple[dict[str, np.ndarray], tuple[TensorEntry, ...]]:
    """Pack ``tensors`` with ``encoding``: (the arrays to send, the logical entries for the manifest).

    ProtocolError(1008) if a value cannot be packed (non-finite, or beyond float16's range for fp16).
    """
    base, zstd = _split(check_encoding(encoding))
    logical = tuple(
        TensorEntry(name=name, shape=tuple(array.shape), dtype=dtype_name(array.dtype))
        for name, array in tensors.items()
    )
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True) if zstd else None
    out: dict[str, np.ndarray] = {}
    for entry in logical:
        for name, packed in _pack(entry, np.asarray(tensors[entry.name]), base).items():
            if compressor is not None:
                frame = compressor.compress(np.ascontiguousarray(packed).tobytes())
                out[name] = np.frombuffer(frame, dtype=np.uint8)
            else:
                out[name] = packed
    return out, logical


def _pack(entry: TensorEntry, array: np.ndarray, base: str) -> dict[str, np.ndarray]:
    if entry.dtype != "F32" or base == "fp32":
        return {entry.name: array}
    if not np.isfinite(array).all():
        raise ProtocolError(f"tensor {entry.name!r}: non-finite values cannot be encoded", CLOSE_POLICY_VIOLATION)
    if base == "fp16":
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            half = array.astype(np.float16)
        if not np.isfinite(half).all():
            raise ProtocolError(
                f"tensor {entry.name!r}: values beyond float16's range cannot be encoded as fp16",
                CLOSE_POLICY_VIOLATION,
            )
        return {entry.name: half}
    rows = _as_rows(array)
    scale = (np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])).astype(np.float32) / np.float32(
        _INT8_MAX
    )
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(rows / safe[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return {entry.name: q.reshape(entry.shape), entry.name + SCALE_SUFFIX: scale}


def delta_from_weights(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a device sends as ``Update.encoding == "delta"``: ``trained`` less what it ``received``.

    Dense float tensors: ``trained - received``; row values ``NAME`` (with ``NAME@rows``):
    ``trained - received[NAME][rows]``; LoRA factors (deltas by nature), integer tensors and tensors
    not received stay as they are. The coordinator's ``weights_from_delta`` is the inverse.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in trained.items():
        _, suffix = split_update_name(name)
        ref = received.get(name)
        if suffix or array.dtype.kind != "f" or ref is None:
            out[name] = array
        elif name + ROWS_SUFFIX in trained:
            out[name] = array - ref[np.asarray(trained[name + ROWS_SUFFIX])]
        else:
            out[name] = array - ref
    return out


# ------------------------------------------------------------------------------------------ checking


def encoded_mismatches(entries: Iterable[TensorEntry], logical: Iterable[TensorEntry], encoding: str) -> list[str]:
    """Every difference between a blob's tensors and what ``logical`` packs into with ``encoding``."""
    if encoding not in ENCODINGS:
        return [f"unknown encoding {encoding[:32]!r} (known: {', '.join(ENCODINGS)})"]
    base, zstd = _split(encoding)
    packs = [packed for entry in logical for packed in _packed(entry, base)]
    want = {packed.name: packed for packed in packs}
    if len(want) != len(packs):
        return ["logical tensors whose packed names collide"]
    have = {entry.name: entry for entry in entries}
    problems = [f"missing packed tensor {name!r}" for name in sorted(want.keys() - have.keys())]
    problems += [f"unexpected packed tensor {name!r}" for name in sorted(have.keys() - want.keys())]
    for name in sorted(want.keys() & have.keys()):
        got, exp = have[name], want[name]
        if zstd:
            bound = _zstd_bound(exp.nbytes)
            if got.dtype != "U8" or len(got.shape) != 1 or not 0 < got.shape[0] <= bound:
                problems.append(f"packed tensor {name!r}: {got.dtype} {list(got.shape)}, expected U8 [1..{bound}]")
        elif got.dtype != exp.dtype or got.shape != exp.shape:
            problems.append(
                f"packed tensor {name!r}: {got.dtype} {list(got.shape)}, expected {exp.dtype} {list(exp.shape)}"
            )
    return problems


def encoded_entry_check(
    manifest: TensorManifest, logical_check: Callable[[Iterable[TensorEntry]], list[str]] | None = None
) -> Callable[[Iterable[TensorEntry]], list[str]]:
    """A tensor assembler's ``expected`` check for an encoded transfer: the manifest's logical tensors
    pass ``logical_check`` (e.g. the task's update rules) and the blob's tensors are what they pack into."""

    def check(entries: Iterable[TensorEntry]) -> list[str]:
        problems = logical_check(manifest.logical) if logical_check is not None else []
        return problems + encoded_mismatches(entries, manifest.logical, manifest.encoding)

    return check


def decode_arrays(
    arrays: Mapping[str, np.ndarray], logical: Iterable[TensorEntry], encoding: str, *, what: str = "transfer"
) -> dict[str, np.ndarray]:
    """The logical tensors back from a received blob's arrays; ProtocolError(1008) naming the first fault.

    Every size is checked against ``logical`` before any allocation: see the module docstring.
    """
    logical = tuple(logical)
    problems = encoded_mismatches(
        (TensorEntry(name=n, shape=tuple(a.shape), dtype=dtype_name(a.dtype)) for n, a in arrays.items()),
        logical,
        encoding,
    )
    if problems:
        raise ProtocolError(f"{what}: " + "; ".join(problems[:8]), CLOSE_POLICY_VIOLATION)
    base, zstd = _split(encoding)
    decompressor = zstandard.ZstdDecompressor() if zstd else None
    out: dict[str, np.ndarray] = {}
    for entry in logical:
        parts: dict[str, np.ndarray] = {}
        for packed in _packed(entry, base):
            array = arrays[packed.name]
            if decompressor is not None:
                array = _unzstd(decompressor, array, packed, what)
            parts[packed.name] = array
        out[entry.name] = _unpack(entry, parts, base, what)
    return out


def _unzstd(decompressor: zstandard.ZstdDecompressor, frame: np.ndarray, packed: TensorEntry, what: str) -> np.ndarray:
    """One zstd frame decompressed into exactly ``packed``'s bytes (its declared content size checked first)."""
    data = np.ascontiguousarray(frame).tobytes()
    where = f"{what}: packed tensor {packed.name!r}"
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise ProtocolError(f"{where}: not a zstd frame", CLOSE_POLICY_VIOLATION) from None
    if declared != packed.nbytes:
        size = "no content size" if declared < 0 else f"a content size of {declared} bytes"
        raise ProtocolError(
            f"{where}: the zstd frame declares {size}, the manifest implies {packed.nbytes}", CLOSE_POLICY_VIOLATION
        )
    try:
        raw = decompressor.decompress(data, max_output_size=packed.nbytes) if packed.nbytes else b""
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"{where}: corrupt zstd frame ({exc})", CLOSE_POLICY_VIOLATION) from None
    if len(raw) != packed.nbytes:
        raise ProtocolError(f"{where}: {len(raw)} bytes decompressed, expected {packed.nbytes}", CLOSE_POLICY_VIOLATION)
    return np.frombuffer(raw, dtype=numpy_dtype(packed.dtype)).reshape(packed.shape)


def _unpack(entry: TensorEntry, parts: Mapping[str, np.ndarray], base: str, what: str) -> np.ndarray:
    array = parts[entry.name]
    if entry.dtype != "F32" or base == "fp32":
        return np.array(array, copy=True)
    if base == "fp16":
        return array.astype(np.float32)
    scale = parts[entry.name + SCALE_SUFFIX]
    where = f"{what}: tensor {entry.name!r}"
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise ProtocolError(f"{where}: int8 scales must be finite and non-negative", CLOSE_POLICY_VIOLATION)
    if array.size and int(array.min()) < -_INT8_MAX:
        raise ProtocolError(f"{where}: int8 value -128 (the encoding uses -127..127)", CLOSE_POLICY_VIOLATION)
    values = _as_rows(array).astype(np.float32) * scale.astype(np.float32)[:, None]
    if not np.isfinite(values).all():
        raise ProtocolError(f"{where}: int8 values times their scales overflow float32", CLOSE_POLICY_VIOLATION)
    return values.reshape(entry.shape)
