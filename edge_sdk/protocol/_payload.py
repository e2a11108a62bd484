"""Sending side of a tensor transfer without copying the tensors: :class:`EncodedTensors`.

:func:`prepare_tensors` lays numpy arrays out as a safetensors blob *virtually*: the header is built
(a few KB) and every tensor's bytes stay where they are, as a memoryview over the array's own storage
(an array already C-contiguous and little-endian is not copied). The sha256 of the whole blob is
computed once over those views (hashlib releases the GIL, so a worker thread can do it while the event
loop serves others). The same :class:`EncodedTensors` then goes to any number of peers: each transfer
gets its own manifest (a fresh transfer id, the peer's chunk size) and its chunk frames are produced
one at a time as the socket takes them, each as pieces (the 24-byte chunk header, then views of the
tensors) that a websocket sends as one fragmented message: no byte of a tensor is copied before the
socket library's own frame buffer, and a transfer in flight holds no more than the chunk being sent.

The arrays must not change while an :class:`EncodedTensors` made from them is in use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping

import numpy as np

from edge_sdk._errors import ConfigError
from edge_sdk.protocol._tensors import (
    _CHUNK_HEADER,
    CHUNK_MAGIC,
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    TensorEntry,
    TensorManifest,
    dtype_name,
    new_transfer_id,
    wire_arrays,
)

__all__ = ["ChunkPieces", "EncodedTensors", "prepare_tensors"]

# One chunk frame as the pieces a websocket sends as one fragmented message (header first).
ChunkPieces = tuple[bytes | memoryview, ...]


class EncodedTensors:
    """Tensors laid out as a safetensors blob (header + views of the arrays): see the module docstring."""

    def __init__(self, header: bytes, arrays: Mapping[str, np.ndarray], entries: tuple[TensorEntry, ...]) -> None:
        self._arrays = dict(arrays)  # keeps the storage the views point into alive
        self.entries = entries
        views = (arrays[entry.name].reshape(-1).view(np.uint8).data for entry in entries)
        self._segments: tuple[memoryview, ...] = (memoryview(header), *views)
        self.total_bytes = sum(len(segment) for segment in self._segments)
        digest = hashlib.sha256()
        for segment in self._segments:
            digest.update(segment)
        self.sha256 = digest.hexdigest()

    def manifest(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, transfer_id: str | None = None) -> TensorManifest:
        """The announcement of one transfer of these tensors (a fresh transfer id unless given)."""
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES} (1 to 4 MiB recommended)")
        return TensorManifest(
            transfer_id=transfer_id if transfer_id is not None else new_transfer_id(),
            entries=self.entries,
            total_bytes=self.total_bytes,
            chunk_bytes=chunk_bytes,
            num_chunks=-(-self.total_bytes // chunk_bytes),
            sha256=self.sha256,
        )

    def chunk_pieces(self, manifest: TensorManifest, *, max_piece_bytes: int | None = None) -> Iterator[ChunkPieces]:
        """Each chunk frame of ``manifest``'s transfer, in order, as (header, payload views...).

        ``max_piece_bytes``: cut views longer than this (a websocket sends each piece as one frame, and
        buffers about one frame: smaller pieces, less memory in flight).
        """
        limit = max_piece_bytes if max_piece_bytes is not None else manifest.chunk_bytes
        if manifest.total_bytes != self.total_bytes or manifest.sha256 != self.sha256:
            raise ValueError("the manifest announces other tensors")
        raw_id = bytes.fromhex(manifest.transfer_id)
        segments = iter(self._segments)
        current, position = next(segments), 0
        for index in range(manifest.num_chunks):
            pieces: list[bytes | memoryview] = [_CHUNK_HEADER.pack(CHUNK_MAGIC, raw_id, index)]
            want = manifest.chunk_length(index)
            while want:
                if position == len(current):
                    current, position = next(segments), 0
                    continue
                take = min(want, len(current) - position, limit)
                pieces.append(current[position : position + take])
                position += take
                want -= take
            yield tuple(pieces)

    def frames(self, manifest: TensorManifest) -> Iterator[bytes]:
        """Each chunk frame of ``manifest``'s transfer as one ``bytes`` (its pieces joined: one copy)."""
        for pieces in self.chunk_pieces(manifest):
            yield b"".join(pieces)


def prepare_tensors(tensors: Mapping[str, np.ndarray]) -> EncodedTensors:
    """Lay numpy arrays out as safetensors without copying them (see the module docstring).

    Arrays are made C-contiguous and little-endian first (a copy only for those that are not).
    Tensors are ordered by element size (largest first), then name, so each starts aligned to its
    element size (the header is padded to 8 bytes, as safetensors does). The blob is byte for byte a
    valid safetensors file.
    """
    prepared = wire_arrays(tensors)
    order = sorted(prepared, key=lambda name: (-prepared[name].dtype.itemsize, name))
    header: dict[str, dict[str, object]] = {}
    begins: list[int] = []
    offset = 0
    for name in order:
        array = prepared[name]
        header[name] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        begins.append(offset)
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    data_start = 8 + len(text)
    entries = tuple(
        TensorEntry(
            name=name,
            shape=tuple(prepared[name].shape),
            dtype=dtype_name(prepared[name].dtype),
            offset=data_start + begin,
            length=prepared[name].nbytes,
        )
        for name, begin in zip(order, begins, strict=True)
    )
    return EncodedTensors(len(text).to_bytes(8, "little") + text, prepared, entries)
