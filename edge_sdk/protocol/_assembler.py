"""Receiving side of a tensor transfer: collect chunk frames, verify, then decode into numpy arrays.

Checks run in an order that spends nothing on a bad transfer: the announced manifest against the
size limits and the *expected* tensors (construction, before a byte is buffered); every chunk's
transfer id, index and length (as it arrives); each chunk's xxh3_128 against the manifest's (as it is
verified; a corrupt chunk is refused by its index), or for a sha256 manifest the digest of the whole
blob (once complete); the safetensors header against the manifest and the expected tensors (before
any array is made); finally, optionally, finite values and a global L2-norm bound.

The costly part (copying each payload into the receive buffer, its digest, the finite-value and norm scan
of every tensor's elements as their bytes complete) is streamed: chunk by chunk as they arrive, in
:meth:`TensorAssembler.verify`. By default :meth:`~TensorAssembler.add_chunk` runs it at once; a
transport that sets ``deferred`` runs it itself in a worker thread between frames (see
``BaseConnection.take_work``), so an event loop only checks frame headers. At most
``MAX_BACKLOG_CHUNKS`` chunks wait: beyond that, and for the last chunk, the work runs inline.

Decoded arrays are writable views into the one receive buffer: no second copy of the weights.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable

import numpy as np
import xxhash

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._tensors import (
    CHUNK_HEADER_BYTES,
    DEFAULT_MAX_TRANSFER_BYTES,
    MAX_CHUNK_BYTES,
    TensorEntry,
    TensorManifest,
    decode_chunk,
    entry_mismatches,
    numpy_dtype,
    read_safetensors_header,
)
from edge_sdk.protocol._values import ValueScan
from edge_sdk.protocol._wire import CLOSE_MESSAGE_TOO_BIG, CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR

__all__ = ["MAX_BACKLOG_CHUNKS", "EntryCheck", "TensorAssembler", "decode_tensors"]

# What a receiver expects: exact entries, or a function listing every problem with the entries received.
EntryCheck = Callable[[Iterable[TensorEntry]], list[str]]

logger = logging.getLogger(__name__)

MAX_BACKLOG_CHUNKS = 2  # chunks' worth of bytes a deferred assembler holds unverified before it verifies inline


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
        _check_sizes(manifest, max_total_bytes, max_chunk_bytes, what)
        if self._expected is not None:
            self._raise_mismatches(manifest.entries, "announced manifest")
        # Allocated (uninitialized, so untouched pages cost no memory) when the first chunk arrives.
        self._buffer: np.ndarray | None = None
        self._hash = None if manifest.chunk_xxh3 else hashlib.sha256()
        self._fault: str | None = None  # the first corrupt chunk found by verify(), raised by the next call
        self._next = 0
        self._received_bytes = 0
        self.deferred = False  # True: the transport calls verify() itself (e.g. in a worker thread)
        # Pieces received, not verified yet: (position in the blob, chunk index, payload, ends its chunk);
        # payload None: a whole chunk already in place in the buffer (read there by a data channel).
        self._backlog: collections.deque[tuple[int, int, memoryview | None, bool]] = collections.deque()
        self._backlog_bytes = 0
        self._ended = 0  # chunks whose last piece waits in the backlog
        self._chunk: tuple[int, int] | None = None  # (index, payload bytes) of the chunk being received
        self._head = b""  # the chunk header's first bytes, when a piece ended inside it
        self._got = 0  # payload bytes of that chunk received so far
        self._chunk_hash = xxhash.xxh3_128()  # of the chunk being verified (per-chunk digests)
        self._lock = threading.Lock()  # verify() may run in a worker thread: one verify() at a time
        self._queue_lock = threading.Lock()  # the backlog: a data channel fills it while verify() runs
        self._head_slot, self._head_got, self._sealed = bytearray(CHUNK_HEADER_BYTES), 0, False  # target()
        self._scan = ValueScan()
        # Tensors in data order as announced (offsets known): scanned as their bytes complete.
        self._pending = collections.deque(
            sorted(
                (e for e in manifest.entries if e.offset is not None and numpy_dtype(e.dtype).kind == "f"),
                key=lambda e: e.offset or 0,
            )
        )
        self._streamed = all(e.offset is not None for e in manifest.entries)
        self._scanned = 0  # elements of the first pending tensor already scanned

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

    @property
    def fault(self) -> str | None:
        """Why a verified chunk was refused (its digest differs from the manifest's); None while all are good."""
        return self._fault

    def _raise_fault(self) -> None:
        if self._fault is not None:
            raise ProtocolError(self._fault, CLOSE_PROTOCOL_ERROR)

    def add_chunk(self, frame: bytes | bytearray | memoryview) -> bool:
        """Take the next chunk frame whole; return True once the last chunk is in. ProtocolError if wrong."""
        return self.add_fragment(frame, fin=True)

    def add_fragment(self, data: bytes | bytearray | memoryview, *, fin: bool) -> bool:
        """Take the next piece of a chunk frame as the websocket delivers it (``fin`` on the frame's
        last piece, which may be empty): no frame is joined, each piece is copied into place when
        verified. Return True once the transfer's last chunk is in; ProtocolError if wrong (a piece
        that would overrun its chunk is refused before it is kept)."""
        self._raise_fault()
        view = memoryview(data).cast("B")
        if self._chunk is None:  # the chunk header: usually whole in the first piece
            need = CHUNK_HEADER_BYTES - len(self._head)
            self._head += bytes(view[:need])
            view = view[need:]
            if len(self._head) < CHUNK_HEADER_BYTES and not fin:
                return False
            head, self._head = self._head, b""
            self._chunk = self._open_chunk(head)
        index, want = self._chunk
        got = self._got + len(view)
        if got > want or (fin and got < want):
            raise ProtocolError(
                f"{self._what}: chunk {index} of transfer {self._manifest.transfer_id} carries"
                f" {got if fin else f'more than {want}'} bytes, expected {want}"
                + (" (truncated)" if got < want else ""),
                CLOSE_PROTOCOL_ERROR,
            )
        if self._buffer is None:
            self._buffer = np.empty(self._manifest.total_bytes, dtype=np.uint8)
        if view or fin:
            with self._queue_lock:
                self._backlog.append((self._received_bytes + self._got, index, view, fin))
                self._backlog_bytes += len(view)
                self._ended += fin
        self._got = got
        if fin:
            self._chunk, self._got = None, 0
            self._next += 1
            self._received_bytes += want
        if not self.deferred or self._backlog_bytes > MAX_BACKLOG_CHUNKS * self._manifest.chunk_bytes or self.complete:
            self.verify()
            self._raise_fault()
        return self.complete

    def target(self) -> memoryview:
        """Where a data channel reads the transfer's next bytes (``recv_into``): the rest of the next
        chunk header (a 24-byte slot), or the rest of the chunk's payload *in the receive buffer itself*,
        so no byte is copied after the socket's. Never longer than what the transfer still expects:
        after the last chunk, the 24-byte end marker (a chunk header of index ``num_chunks``, so a
        sender's surplus bytes are caught within the transfer), then nothing."""
        if self._sealed:
            return memoryview(b"")
        if self._chunk is None:
            return memoryview(self._head_slot)[self._head_got :]
        if self._buffer is None:
            self._buffer = np.empty(self._manifest.total_bytes, dtype=np.uint8)
        start = self._received_bytes + self._got
        return self._buffer.data.cast("B")[start : start + self._chunk[1] - self._got]

    def wrote(self, count: int) -> bool:
        """``count`` bytes were read into :meth:`target` (1 to its length); a header is checked once
        whole, a chunk whose payload is in waits for :meth:`verify` (``work_waiting``). Return True once
        the transfer's last chunk is in; ProtocolError for a bad header or a corrupt chunk verified."""
        self._raise_fault()
        if self._chunk is None:
            if self._sealed or not 0 < count <= CHUNK_HEADER_BYTES - self._head_got:
                raise ProtocolError(f"{self._what}: wrote {count} bytes into a header slot")
            self._head_got += count
            if self._head_got < CHUNK_HEADER_BYTES:
                return False
            self._head_got = 0
            if self.complete:
                self._seal(bytes(self._head_slot))
                return True
            self._chunk = self._open_chunk(bytes(self._head_slot))
            return False
        index, want = self._chunk
        if not 0 < count <= want - self._got:
            raise ProtocolError(f"{self._what}: wrote {count} bytes into a chunk lacking {want - self._got}")
        self._got += count
        if self._got < want:
            return False
        with self._queue_lock:
            self._backlog.append((self._received_bytes, index, None, True))
            self._ended += 1
        self._chunk, self._got = None, 0
        self._next += 1
        self._received_bytes += want
        return False

    @property
    def sealed(self) -> bool:
        """A data channel transfer's end marker is in (see :meth:`target`): nothing more to read."""
        return self._sealed

    def _seal(self, head: bytes) -> None:
        tid = self._manifest.transfer_id
        transfer_id, index, _ = decode_chunk(head)
        if transfer_id != tid or index != self._manifest.num_chunks:
            raise ProtocolError(
                f"{self._what}: transfer {tid} should end with its end marker, got header {index} of {transfer_id}",
                CLOSE_PROTOCOL_ERROR,
            )
        self._sealed = True

    def _open_chunk(self, head: bytes) -> tuple[int, int]:
        """Check a chunk header (transfer, index in order); (index, payload bytes) of the chunk it opens."""
        manifest = self._manifest
        tid = manifest.transfer_id
        transfer_id, index, _ = decode_chunk(head)
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
        return index, manifest.chunk_length(index)

    @property
    def backlog(self) -> int:
        """Pieces received and not verified yet (see :meth:`verify`)."""
        return len(self._backlog)

    @property
    def work_waiting(self) -> bool:
        """A received chunk ended, or a chunk's worth of pieces waits: time for :meth:`verify`."""
        return self._ended > 0 or self._backlog_bytes >= self._manifest.chunk_bytes

    def verify(self) -> None:
        """Check every waiting piece: its chunk's digest (at the chunk's end), copied into the buffer,
        the tensor values it completes scanned.

        Never raises: a corrupt chunk is kept in :attr:`fault` (the rest of the backlog dropped) and
        raised by the next :meth:`add_fragment` or :meth:`finish`. Safe to call from a worker thread
        while no other thread feeds this assembler pieces, or while a data channel reads further chunks
        into place (:meth:`wrote`); payload views keep their frames alive until then.
        """
        with self._lock:
            buffer = self._buffer
            digests = self._manifest.chunk_xxh3
            while self._fault is None:
                with self._queue_lock:
                    if not self._backlog:
                        return
                    position, index, piece, ends = self._backlog.popleft()
                    self._backlog_bytes -= len(piece) if piece is not None else 0
                    self._ended -= ends
                assert buffer is not None
                in_place = piece is None
                payload = (
                    piece
                    if piece is not None
                    else buffer.data.cast("B")[position : position + self._manifest.chunk_length(index)]
                )
                (self._hash if self._hash is not None else self._chunk_hash).update(payload)
                if ends and self._hash is None:
                    got, self._chunk_hash = self._chunk_hash.hexdigest(), xxhash.xxh3_128()
                    if got != digests[index]:
                        self._fault = (
                            f"{self._what}: chunk {index} of transfer {self._manifest.transfer_id} is corrupt:"
                            f" xxh3_128 {got}, the manifest says {digests[index]}"
                        )
                        with self._queue_lock:
                            self._backlog.clear()
                        return
                end = position + len(payload)
                if not in_place:
                    buffer[position:end] = np.frombuffer(payload, dtype=np.uint8)
                if self._streamed:
                    self._scan_values(buffer, end)

    def _scan_values(self, buffer: np.ndarray, end: int) -> None:
        """Scan the elements of announced float tensors whose bytes lie within ``buffer[:end]``."""
        while self._pending:
            entry = self._pending[0]
            assert entry.offset is not None
            dtype = numpy_dtype(entry.dtype)
            count = entry.nbytes // dtype.itemsize
            ready = min(count, max(0, (end - entry.offset) // dtype.itemsize))
            if ready > self._scanned:
                start = entry.offset + self._scanned * dtype.itemsize
                values = np.frombuffer(buffer, dtype=dtype, count=ready - self._scanned, offset=start)
                self._scan.add(entry.name, values)
                self._scanned = ready
            if self._scanned < count:
                return
            self._pending.popleft()
            self._scanned = 0

    @property
    def values(self) -> ValueScan:
        """The finite-value and norm scan of the tensors (complete once :meth:`finish` returned)."""
        return self._scan

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
        self.verify()
        self._raise_fault()
        digest = self._hash.hexdigest() if self._hash is not None else manifest.sha256
        if digest != manifest.sha256:
            raise ProtocolError(
                f"{self._what}: sha256 mismatch for transfer {tid}: received {digest}, manifest says {manifest.sha256}",
                CLOSE_PROTOCOL_ERROR,
            )
        assert self._buffer is not None
        entries = read_safetensors_header(self._buffer.data)
        announced = entry_mismatches(entries, manifest.entries) + _offset_mismatches(entries, manifest.entries)
        if announced:
            raise ProtocolError(
                f"{self._what}: safetensors header of transfer {tid} does not match its manifest: "
                + "; ".join(announced),
                CLOSE_PROTOCOL_ERROR,
            )
        if self._expected is not None:
            self._raise_mismatches(entries, "safetensors header")
        tensors = self._decode(entries)
        if not self._streamed:  # the manifest gave no offsets: scan the decoded tensors now
            for name, array in tensors.items():
                self._scan.add(name, array)
        if self._check_values:
            self._scan.check(max_norm=self._max_norm, what=self._what)
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
        assert self._buffer is not None
        for entry in entries:
            assert entry.offset is not None
            dtype = numpy_dtype(entry.dtype)
            count = entry.nbytes // dtype.itemsize
            array = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=entry.offset)
            tensors[entry.name] = array.reshape(entry.shape)
        return tensors


def _check_sizes(manifest: TensorManifest, max_total_bytes: int, max_chunk_bytes: int, what: str) -> None:
    """ProtocolError (1009) for a transfer or its chunks above the receiver's limits."""
    if manifest.total_bytes > max_total_bytes:
        raise ProtocolError(
            f"{what}: transfer {manifest.transfer_id} of {manifest.total_bytes} bytes exceeds the limit of"
            f" {max_total_bytes}",
            CLOSE_MESSAGE_TOO_BIG,
        )
    if manifest.chunk_bytes > max_chunk_bytes:
        raise ProtocolError(
            f"{what}: chunks of {manifest.chunk_bytes} bytes exceed the limit of {max_chunk_bytes}",
            CLOSE_MESSAGE_TOO_BIG,
        )


def _offset_mismatches(actual: Iterable[TensorEntry], announced: Iterable[TensorEntry]) -> list[str]:
    """Tensors the manifest placed elsewhere than the safetensors header does (the values scanned as
    they arrived were read at the manifest's offsets)."""
    have = {entry.name: entry.offset for entry in actual}
    return [
        f"tensor {entry.name!r}: at byte {have[entry.name]}, the manifest says {entry.offset}"
        for entry in announced
        if entry.offset is not None and entry.name in have and have[entry.name] != entry.offset
    ]


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
