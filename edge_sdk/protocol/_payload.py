"""Sending side of a tensor transfer without copying the tensors: :class:`EncodedTensors`.

:func:`prepare_tensors` lays numpy arrays out as a safetensors blob *virtually*: the header is built
(a few KB) and every tensor's bytes stay where they are, as a memoryview over the array's own storage
(an array already C-contiguous and little-endian is not copied). The digests are computed over
those views, once per chunk size and kind, and kept: each chunk's xxh3_128 (at about 14 GB/s; made by
:func:`prepare_tensors` for its chunk size, so in the worker thread that prepares), or the sha256 of
the whole blob for a peer that did not negotiate chunk digests (on first use: about 1 GB/s). The same
:class:`EncodedTensors` then goes to any number of peers: each transfer
gets its own manifest (a fresh transfer id, the peer's chunk size) and its chunk frames are produced
one at a time as the socket takes them, each as pieces (the 24-byte chunk header, then views of the
tensors) that a websocket sends as one fragmented message: no byte of a tensor is copied before the
socket library's own frame buffer, and a transfer in flight holds no more than the chunk being sent.

The arrays must not change while an :class:`EncodedTensors` made from them is in use.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import xxhash

from edge_sdk._errors import ConfigError
from edge_sdk.protocol._tensors import (
    _CHUNK_HEADER,
    CHUNK_MAGIC,
    CHUNK_XXH3,
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
        self._lock = threading.Lock()  # digests may be asked for from several threads
        self._sha256 = ""
        self._chunk_xxh3: dict[int, tuple[str, ...]] = {}

    @property
    def sha256(self) -> str:
        """The sha256 of the whole blob (computed on first use, then kept)."""
        with self._lock:
            if not self._sha256:
                digest = hashlib.sha256()
                for segment in self._segments:
                    digest.update(segment)
                self._sha256 = digest.hexdigest()
            return self._sha256

    def chunk_xxh3(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[str, ...]:
        """The xxh3_128 of each chunk's payload for chunks of ``chunk_bytes`` (computed once, then kept)."""
        _check_chunk_bytes(chunk_bytes)
        with self._lock:
            digests = self._chunk_xxh3.get(chunk_bytes)
            if digests is None:
                digests = self._chunk_xxh3[chunk_bytes] = tuple(
                    _xxh3_of(pieces) for pieces in self._chunk_views(chunk_bytes, chunk_bytes)
                )
            return digests

    def manifest(
        self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, transfer_id: str | None = None, digest: str = CHUNK_XXH3
    ) -> TensorManifest:
        """The announcement of one transfer of these tensors (a fresh transfer id unless given), with each
        chunk's xxh3_128 (``digest=CHUNK_XXH3``, the default) or the blob's sha256 (``digest="sha256"``)."""
        _check_chunk_bytes(chunk_bytes)
        if digest not in ("sha256", CHUNK_XXH3):
            raise ConfigError(f"digest {digest!r} is neither 'sha256' nor {CHUNK_XXH3!r}")
        xxh3 = digest == CHUNK_XXH3
        return TensorManifest(
            transfer_id=transfer_id if transfer_id is not None else new_transfer_id(),
            entries=self.entries,
            total_bytes=self.total_bytes,
            chunk_bytes=chunk_bytes,
            num_chunks=-(-self.total_bytes // chunk_bytes),
            sha256="" if xxh3 else self.sha256,
            chunk_xxh3=self.chunk_xxh3(chunk_bytes) if xxh3 else (),
        )

    def _chunk_views(self, chunk_bytes: int, limit: int) -> Iterator[list[memoryview]]:
        """Each chunk's payload, in order, as views of the segments (each at most ``limit`` bytes)."""
        segments = iter(self._segments)
        current, position = next(segments), 0
        for index in range(-(-self.total_bytes // chunk_bytes)):
            views: list[memoryview] = []
            want = min(chunk_bytes, self.total_bytes - index * chunk_bytes)
            while want:
                if position == len(current):
                    current, position = next(segments), 0
                    continue
                take = min(want, len(current) - position, limit)
                views.append(current[position : position + take])
                position += take
                want -= take
            yield views

    def chunk_pieces(self, manifest: TensorManifest, *, max_piece_bytes: int | None = None) -> Iterator[ChunkPieces]:
        """Each chunk frame of ``manifest``'s transfer, in order, as (header, payload views...).

        ``max_piece_bytes``: cut views longer than this (a websocket sends each piece as one frame, and
        buffers about one frame: smaller pieces, less memory in flight).
        """
        limit = max_piece_bytes if max_piece_bytes is not None else manifest.chunk_bytes
        if manifest.total_bytes != self.total_bytes or (
            manifest.chunk_xxh3 != self.chunk_xxh3(manifest.chunk_bytes)
            if manifest.chunk_xxh3
            else manifest.sha256 != self.sha256
        ):
            raise ValueError("the manifest announces other tensors")
        raw_id = bytes.fromhex(manifest.transfer_id)
        for index, views in enumerate(self._chunk_views(manifest.chunk_bytes, limit)):
            yield (_CHUNK_HEADER.pack(CHUNK_MAGIC, raw_id, index), *views)

    def frames(self, manifest: TensorManifest) -> Iterator[bytes]:
        """Each chunk frame of ``manifest``'s transfer as one ``bytes`` (its pieces joined: one copy)."""
        for pieces in self.chunk_pieces(manifest):
            yield b"".join(pieces)


def prepare_tensors(tensors: Mapping[str, np.ndarray], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> EncodedTensors:
    """Lay numpy arrays out as safetensors without copying them (see the module docstring), with the
    xxh3_128 digests of its chunks of ``chunk_bytes`` (the usual chunk size: the default).

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
    encoded = EncodedTensors(len(text).to_bytes(8, "little") + text, prepared, entries)
    encoded.chunk_xxh3(chunk_bytes)
    return encoded


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES} (1 to 4 MiB recommended)")


def _xxh3_of(pieces: list[memoryview]) -> str:
    """The xxh3_128 of the concatenation of ``pieces`` (as :func:`~._tensors.chunk_xxh3` of the joined bytes)."""
    if len(pieces) == 1:
        return xxhash.xxh3_128_hexdigest(pieces[0])
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    return hasher.hexdigest()
