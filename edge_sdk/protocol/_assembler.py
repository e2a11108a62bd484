"""Receiving side of a tensor transfer: collect chunk frames, verify, then decode into numpy arrays.

Checks run in an order that spends nothing on a bad transfer: the announced manifest against the
size limits and the *expected* tensors (construction, before a byte is buffered); every chunk's
transfer id, index and length (as it arrives); total bytes and sha256; the safetensors header
against the manifest and the expected tensors (before any array is made); finally, optionally,
finite values and a global L2-norm bound.

Decoded arrays are writable views into the one receive buffer: no second copy of the weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

import numpy as np

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._tensors import (
    DEFAULT_MAX_TRANSFER_BYTES,
    MAX_CHUNK_BYTES,
    TensorEntry,
    TensorManifest,
    check_tensor_values,
    decode_chunk,
    entry_mismatches,
    numpy_dtype,
    read_safetensors_header,
)
from edge_sdk.protocol._wire import CLOSE_MESSAGE_TOO_BIG, CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR

__all__ = ["EntryCheck", "TensorAssembler", "decode_tensors"]

# What a receiver expects: exact entries, or a function listing every problem with the entries received.
EntryCheck = Callable[[Iterable[TensorEntry]], list[str]]

logger = logging.getLogger(__name__)


class TensorAssembler:
    """Rebuild the tensors of one announced transfer from its chunk frames.

    ``expected``: the tensors the receiver asked for (for the coordinator, what it sent): names, shapes
    and dtypes must match exactly, every mismatch is reported in one ProtocolError (1008). It may also
    be a function of the received entries returning every problem (an update shaped by training levers).
    ``check_values``: run :func:`check_tensor_values` (finite values, ``max_norm``) in :meth:`finish`.
    """

    def __init__(
        self,
        manifest: TensorManifest,
        *,
        expected: Iterable[TensorEntry] | EntryCheck | None = None,
        max_total_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        check_values: bool = True,
        max_norm: float | None = None,
        what: str = "transfer",
    ) -> None:
        self._manifest = manifest
        self._what = what
        self._expected: EntryCheck | None = None
        if callable(expected):
            self._expected = expected
        elif expected is not None:
            wanted = tuple(expected)
            self._expected = lambda entries: entry_mismatches(entries, wanted)
        self._check_values = check_values
        self._max_norm = max_norm
        tid = manifest.transfer_id
        if manifest.total_bytes > max_total_bytes:
            raise ProtocolError(
                f"{what}: transfer {tid} of {manifest.total_bytes} bytes exceeds the limit of {max_total_bytes}",
                CLOSE_MESSAGE_TOO_BIG,
            )
        if manifest.chunk_bytes > max_chunk_bytes:
            raise ProtocolError(
                f"{what}: chunks of {manifest.chunk_bytes} bytes exceed the limit of {max_chunk_bytes}",
                CLOSE_MESSAGE_TOO_BIG,
            )
        if self._expected is not None:
            self._raise_mismatches(manifest.entries, "announced manifest")
        self._buffer = bytearray()  # grows as chunks arrive: an announcement alone costs no memory
        self._hash = hashlib.sha256()
        self._next = 0
        self._received_bytes = 0

    @property
    def manifest(self) -> TensorManifest:
        return self._manifest

    @property
    def received_chunks(self) -> int:
        return self._next

    @property
    def received_bytes(self) -> int:
        return self._received_bytes

    @property
    def complete(self) -> bool:
        return self._next == self._manifest.num_chunks

    def add_chunk(self, frame: bytes | bytearray | memoryview) -> bool:
        """Take the next chunk frame; return True once the last chunk is in. ProtocolError if wrong."""
        manifest = self._manifest
        tid = manifest.transfer_id
        transfer_id, index, payload = decode_chunk(frame)
        if transfer_id != tid:
            raise ProtocolError(
                f"{self._what}: chunk {index} belongs to foreign transfer {transfer_id}, open transfer is {tid}",
                CLOSE_PROTOCOL_ERROR,
            )
        if self.complete:
            raise ProtocolError(f"{self._what}: chunk {index} after transfer {tid} was complete", CLOSE_PROTOCOL_ERROR)
        if index >= manifest.num_chunks:
            raise ProtocolError(
                f"{self._what}: chunk index {index} out of range, transfer {tid} has {manifest.num_chunks} chunks",
                CLOSE_PROTOCOL_ERROR,
            )
        if index < self._next:
            raise ProtocolError(f"{self._what}: duplicate chunk {index} of transfer {tid}", CLOSE_PROTOCOL_ERROR)
        if index > self._next:
            raise ProtocolError(
                f"{self._what}: chunk {index} of transfer {tid} arrived out of order, expected chunk {self._next}",
                CLOSE_PROTOCOL_ERROR,
            )
        want = manifest.chunk_length(index)
        if len(payload) != want:
            raise ProtocolError(
                f"{self._what}: chunk {index} of transfer {tid} carries {len(payload)} bytes, expected {want}"
                + (" (truncated)" if len(payload) < want else ""),
                CLOSE_PROTOCOL_ERROR,
            )
        self._buffer += payload
        self._hash.update(payload)
        self._next += 1
        self._received_bytes += want
        return self.complete

    def finish(self) -> dict[str, np.ndarray]:
        """Verify the whole transfer and decode it; ProtocolError if incomplete, corrupt or unexpected."""
        manifest = self._manifest
        tid = manifest.transfer_id
        if not self.complete:
            raise ProtocolError(
                f"{self._what}: transfer {tid} truncated: {self._next} of {manifest.num_chunks} chunks"
                f" ({self._received_bytes} of {manifest.total_bytes} bytes) received",
                CLOSE_PROTOCOL_ERROR,
            )
        digest = self._hash.hexdigest()
        if digest != manifest.sha256:
            raise ProtocolError(
                f"{self._what}: sha256 mismatch for transfer {tid}: received {digest}, manifest says {manifest.sha256}",
                CLOSE_PROTOCOL_ERROR,
            )
        entries = read_safetensors_header(self._buffer)
        announced = entry_mismatches(entries, manifest.entries)
        if announced:
            raise ProtocolError(
                f"{self._what}: safetensors header of transfer {tid} does not match its manifest: "
                + "; ".join(announced),
                CLOSE_PROTOCOL_ERROR,
            )
        if self._expected is not None:
            self._raise_mismatches(entries, "safetensors header")
        tensors = self._decode(entries)
        if self._check_values:
            check_tensor_values(tensors, max_norm=self._max_norm, what=self._what)
        logger.debug("transfer %s: %d tensors, %d bytes verified", tid, len(tensors), manifest.total_bytes)
        return tensors

    def _raise_mismatches(self, entries: Iterable[TensorEntry], source: str) -> None:
        assert self._expected is not None
        problems = self._expected(entries)
        if problems:
            raise ProtocolError(
                f"{self._what}: {source} does not match the expected tensors: " + "; ".join(problems),
                CLOSE_POLICY_VIOLATION,
            )

    def _decode(self, entries: Iterable[TensorEntry]) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        for entry in entries:
            assert entry.offset is not None
            dtype = numpy_dtype(entry.dtype)
            count = entry.nbytes // dtype.itemsize
            array = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=entry.offset)
            tensors[entry.name] = array.reshape(entry.shape)
        return tensors


def decode_tensors(
    manifest: TensorManifest,
    frames: Iterable[bytes | bytearray | memoryview],
    *,
    expected: Iterable[TensorEntry] | None = None,
    max_total_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
    check_values: bool = True,
    max_norm: float | None = None,
) -> dict[str, np.ndarray]:
    """Feed every frame of a transfer to a :class:`TensorAssembler` and finish it (all checks apply)."""
    assembler = TensorAssembler(
        manifest,
        expected=expected,
        max_total_bytes=max_total_bytes,
        check_values=check_values,
        max_norm=max_norm,
    )
    for frame in frames:
        assembler.add_chunk(frame)
    return assembler.finish()
