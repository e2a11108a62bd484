"""Connection state machines, sans-I/O: websocket messages in, events and outgoing messages out.

This module holds what both sides share; ``CoordinatorConnection`` (``_coordinator``) and
``DeviceConnection`` (``_device``) build on :class:`BaseConnection`.

Modelled on the ``websockets`` library's protocol objects. Nothing here touches a socket, a loop,
a thread or a clock. The caller's loop is::

    events = conn.receive(message)          # str for a text frame, bytes for a binary frame
    for outgoing in conn.data_to_send():    # str -> send as text, bytes -> send as binary
        await ws.send(outgoing)
    ...                                     # act on events; on ProtocolViolation close the websocket
                                            # with event.close_code, event.close_reason

``send_*`` methods queue messages (a JSON text frame, then a tensor transfer's binary chunk frames)
for :meth:`data_to_send` and return the message they built. A socket transport takes them with
:meth:`frames_to_send` instead: a transfer's chunk frames are then made one at a time as the socket
takes them, from views of the tensors' own memory (``_payload``), optionally as the pieces of a
fragmented websocket message, so no copy of the tensors is queued. Received chunks are checked
(digests, finite values, norm) as they arrive; with ``defer_checks`` the transport runs that work
itself between frames, in a worker thread (:meth:`take_work`). They raise ProtocolError when called in
the wrong state or when the message would exceed the peer's limits: that is a bug on this side and
nothing is queued. :meth:`receive` never raises: a peer's fault queues an ``Error`` for the peer
(naming the task when there is one), moves the machine to CLOSED and returns a
:class:`ProtocolViolation` with the websocket close code to use.

One task at a time per connection: the coordinator sends a task, the device answers it (Update,
EvalResult, DeployResult, or an Error naming it) before the next task may be sent.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import numpy as np

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._assembler import EntryCheck, TensorAssembler
from edge_sdk.protocol._channel import ChannelSend, end_marker
from edge_sdk.protocol._events import ByeReceived, ConnectionLost, Event, ProtocolViolation
from edge_sdk.protocol._messages import (
    MAX_TEXT_BYTES,
    Bye,
    Deploy,
    DeployResult,
    Error,
    ErrorCode,
    EvalResult,
    EvaluateTask,
    Hello,
    Message,
    Progress,
    TrainTask,
    Update,
    Welcome,
    WireLimits,
    check_version,
    encode_message,
    message_from_json,
    parse_text_frame,
)
from edge_sdk.protocol._payload import ChunkPieces, EncodedTensors, prepare_tensors
from edge_sdk.protocol._tensors import (
    CHUNK_HEADER_BYTES,
    CHUNK_XXH3,
    MIN_CHUNK_BYTES,
    TensorEntry,
    TensorManifest,
    decode_chunk,
)
from edge_sdk.protocol._values import ValueScan
from edge_sdk.protocol._wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
)

__all__ = [
    "MAX_ERROR_TEXT",
    "BaseConnection",
    "ConnectionState",
    "Fragment",
    "OutgoingFrame",
    "TaskMessage",
    "Tensors",
    "error_code_for",
    "kind_of",
]

logger = logging.getLogger(__name__)

TaskMessage = TrainTask | EvaluateTask | Deploy
Tensors = Mapping[str, np.ndarray] | EncodedTensors  # what a send_* method takes: arrays, or already prepared
# text, binary, a binary frame's pieces (a fragmented message), or a transfer for the data channel
OutgoingFrame = str | bytes | ChunkPieces | ChannelSend
MAX_ERROR_TEXT = 2000  # characters of a fault's description sent back in an Error
FRAGMENT_BYTES = 256 << 10  # the longest piece of a fragmented chunk frame (frames_to_send(fragments=True))
_TO_DEVICE = (Welcome, TrainTask, EvaluateTask, Deploy)
_TO_COORDINATOR = (Hello, Update, EvalResult, DeployResult, Progress)


@dataclasses.dataclass(frozen=True)
class Fragment:
    """A piece of a binary websocket message as it arrives, ``fin`` on the message's last piece (which
    may be empty). A transport that reads messages piece by piece (``websockets``: ``recv_streaming``)
    feeds each to :meth:`BaseConnection.receive`: no message is joined, and a chunk held in flight is
    a piece, not a whole chunk frame."""

    data: bytes | bytearray | memoryview
    fin: bool

    def __len__(self) -> int:
        return len(self.data)


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"  # device: Hello not sent yet
    AWAITING_HELLO = "awaiting_hello"  # coordinator: nothing received yet
    HELLO_RECEIVED = "hello_received"  # coordinator: the application must send_welcome (or refuse)
    AWAITING_WELCOME = "awaiting_welcome"  # device: Hello sent
    READY = "ready"  # idle: the coordinator may send a task
    AWAITING_RESULT = "awaiting_result"  # coordinator: a task is out, its result is not in yet
    RECEIVING = "receiving"  # the chunks of an announced tensor transfer are arriving
    WORKING = "working"  # device: a task was handed to the application, its result not sent yet
    CLOSED = "closed"


def error_code_for(close_code: int, default: str) -> str:
    return {
        CLOSE_MESSAGE_TOO_BIG: ErrorCode.TOO_LARGE,
        CLOSE_UNSUPPORTED_DATA: ErrorCode.UNSUPPORTED,
        CLOSE_INTERNAL_ERROR: ErrorCode.INTERNAL,
    }.get(close_code, default)


def kind_of(message: Message) -> str:
    return type(message).__name__


class BaseConnection:
    """What both sides share: framing, limits, the outgoing queue, violations, Bye."""

    _side: ClassVar[str] = "?"
    _transfer_error_code: ClassVar[str] = ErrorCode.BAD_MESSAGE

    def __init__(self, limits: WireLimits | None, state: ConnectionState) -> None:
        self._limits = limits if limits is not None else WireLimits()
        self._peer_limits: WireLimits | None = None
        self._state = state
        self._outgoing: collections.deque[str | bytes | tuple[EncodedTensors, TensorManifest]] = collections.deque()
        self._assembler: TensorAssembler | None = None
        self.defer_checks = False  # True: the transport runs received chunks' checks itself (take_work)
        self._chunk_xxh3 = False  # the handshake agreed on per-chunk xxh3_128 digests (FEATURE_CHUNK_XXH3)
        self._channel = False  # a data channel is open beside the websocket (``_channel``)

    # ------------------------------------------------------------------------------------ public

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def limits(self) -> WireLimits:
        """What this side accepts, announced to the peer (websocket ``max_size``: ``websocket_max_size``)."""
        return self._limits

    @property
    def chunk_xxh3(self) -> bool:
        """The handshake agreed on per-chunk xxh3_128 digests (else transfers carry the blob's sha256)."""
        return self._chunk_xxh3

    @property
    def peer_limits(self) -> WireLimits | None:
        """What the peer accepts, once its Hello/Welcome arrived."""
        return self._peer_limits

    @property
    def channel_open(self) -> bool:
        """A data channel is open: transfers this side sends travel on it (``_channel``)."""
        return self._channel

    def channel_opened(self) -> None:
        """The data channel opened (coordinator: its token redeemed; device: the ack received)."""
        self._channel = True

    def channel_closed(self) -> None:
        """The data channel closed: transfers sent from now on travel on the websocket."""
        self._channel = False

    @property
    def channel_receiving(self) -> bool:
        """An announced transfer's chunks are to be read from the data channel (:meth:`channel_target`)."""
        return self._assembler is not None and bool(self._assembler.manifest.channel)

    def channel_target(self) -> memoryview:
        """Where the data channel reads next (see ``TensorAssembler.target``); only while
        :attr:`channel_receiving` (else empty)."""
        return self._assembler.target() if self._assembler is not None else memoryview(b"")

    def channel_wrote(self, count: int) -> list[Event]:
        """``count`` bytes were read into :meth:`channel_target`: no event while the transfer goes on
        (once it is complete, run :meth:`take_work`, then :meth:`channel_finish`); a fault (a bad header,
        a corrupt chunk) is a :class:`ProtocolViolation`, as on the websocket. Never raises."""
        assembler = self._assembler
        if assembler is None or self._state is ConnectionState.CLOSED:
            return []
        try:
            assembler.wrote(count)
        except ProtocolError as exc:
            code = self._transfer_error_code if assembler.fault is not None else ErrorCode.BAD_MESSAGE
            return self._violation(str(exc), exc.close_code, error_code_for(exc.close_code, code))
        return []

    def channel_finish(self) -> list[Event]:
        """The channel transfer's last chunk is in and its work done: its events. Never raises."""
        assembler = self._assembler
        if assembler is None or not assembler.sealed or self._state is ConnectionState.CLOSED:
            return []
        self._assembler = None
        return self._complete(assembler)

    def channel_broken(self, reason: str) -> list[Event]:
        """The data channel failed while a transfer was being read from it: a violation, never raises."""
        self._channel = False
        if not self.channel_receiving or self._state is ConnectionState.CLOSED:
            return []
        return self._violation(f"data channel: {reason}", CLOSE_PROTOCOL_ERROR, self._transfer_error_code)

    def data_to_send(self) -> list[str | bytes]:
        """Take the queued outgoing messages, in order: ``str`` as text frames, ``bytes`` as binary frames
        (every chunk frame made here, a copy of the tensors: a socket transport uses :meth:`frames_to_send`)."""
        frames: list[str | bytes] = []
        for frame in self.frames_to_send():
            if isinstance(frame, ChannelSend):
                raise ProtocolError("a transfer for the data channel: take it with frames_to_send")
            frames.append(frame if isinstance(frame, (str, bytes)) else b"".join(frame))
        return frames

    def frames_to_send(self, *, fragments: bool = False) -> Iterator[OutgoingFrame]:
        """Take the queued outgoing messages one at a time, in order, as the caller sends them.

        A transfer's chunk frames are made only as they are taken: ``bytes`` (the chunk's pieces joined),
        or with ``fragments`` a tuple of pieces (the chunk header, then views of the tensors' memory, each
        at most ``FRAGMENT_BYTES``) to send as one fragmented websocket message (``websockets``:
        ``await ws.send(pieces)``). Messages queued meanwhile follow in order. Stop taking only to drop the connection.
        """
        while self._outgoing:
            item = self._outgoing.popleft()
            if isinstance(item, (str, bytes)):
                yield item
                continue
            encoded, manifest = item
            if manifest.channel:
                chunks = encoded.chunk_pieces(manifest, max_piece_bytes=FRAGMENT_BYTES)
                pieces = itertools.chain(chunks, [end_marker(manifest)])
                yield ChannelSend(manifest.transfer_id, manifest.total_bytes, pieces)
            elif fragments:
                yield from encoded.chunk_pieces(manifest, max_piece_bytes=FRAGMENT_BYTES)
            else:
                yield from encoded.frames(manifest)

    def take_work(self) -> Callable[[], None] | None:
        """The received chunks' checks waiting to run (with ``defer_checks``): run it (in a worker
        thread) before feeding the next frame; None when nothing waits."""
        assembler = self._assembler
        if assembler is None or not assembler.work_waiting:
            return None
        return assembler.verify

    def receive(self, message: str | bytes | Fragment) -> list[Event]:
        """Handle one received websocket message, or the next piece of a binary one (:class:`Fragment`);
        never raises (faults become ProtocolViolation)."""
        if self._state is ConnectionState.CLOSED:
            logger.debug("%s: ignoring a frame received after close", self._side)
            return []
        try:
            if isinstance(message, str):
                return self._receive_text(message)
            if isinstance(message, (bytes, bytearray, memoryview)):
                return self._receive_binary(message)
            if isinstance(message, Fragment):
                return self._receive_binary(message.data, fin=message.fin, whole=False)
            raise ProtocolError(f"unsupported frame of type {type(message).__name__}", CLOSE_UNSUPPORTED_DATA)
        except ProtocolError as exc:
            return self._violation(str(exc), exc.close_code, error_code_for(exc.close_code, ErrorCode.BAD_MESSAGE))
        except Exception as exc:  # a bug here must not take the server down with it
            logger.exception("%s: internal error while handling a received frame", self._side)
            return self._violation(
                f"internal error: {type(exc).__name__}: {exc}", CLOSE_INTERNAL_ERROR, ErrorCode.INTERNAL
            )

    def receive_close(self, code: int | None = None, reason: str = "") -> list[Event]:
        """The websocket closed; reports ConnectionLost unless a Bye or a violation already ended it."""
        if self._state is ConnectionState.CLOSED:
            return []
        event = ConnectionLost(
            code=code,
            reason=reason,
            pending_task_id=self._pending_task_id(),
            transfer_incomplete=self._assembler is not None,
        )
        logger.info(
            "%s: connection lost (code %s %r), pending task %s",
            self._side,
            code,
            reason,
            event.pending_task_id,
        )
        self._close()
        return [event]

    def send_error(self, *, code: str, message: str, task_id: str | None = None) -> Error:
        """Queue an Error for the peer (e.g. ``task_failed`` for a task, ``rejected`` after a Hello)."""
        self._require_open("send_error")
        error = Error(task_id=task_id, code=code, message=message)
        self._queue(error)
        return error

    def send_bye(self, *, reason: str = "", code: int = 1000) -> Bye:
        """Queue a Bye and close; then close the websocket with the same code and reason."""
        self._require_open("send_bye")
        bye = Bye(reason=reason, code=code)
        self._queue(bye)
        self._close()
        return bye

    # ------------------------------------------------------------------------------- subclasses

    def _on_message(self, message: Message) -> list[Event]:
        raise NotImplementedError

    def _on_transfer_complete(self, tensors: dict[str, np.ndarray], values: ValueScan) -> list[Event]:
        raise NotImplementedError

    def _pending_task_id(self) -> str | None:
        raise NotImplementedError

    def _forget_task(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- framing

    def _receive_text(self, text: str) -> list[Event]:
        if self._assembler is not None:
            assembler = self._assembler
            return self._violation(
                f"text frame while chunk {assembler.received_chunks} of {assembler.manifest.num_chunks}"
                f" of transfer {assembler.manifest.transfer_id} was expected (transfer truncated)",
                CLOSE_UNSUPPORTED_DATA,
                ErrorCode.UNSUPPORTED,
            )
        obj = parse_text_frame(text, max_bytes=self._limits.max_text_bytes)
        try:
            check_version(obj)
        except ProtocolError as exc:
            return self._violation(str(exc), exc.close_code, ErrorCode.VERSION)
        message = message_from_json(obj)
        logger.debug("%s: received %s in state %s", self._side, kind_of(message), self._state.name)
        if isinstance(message, Bye):
            pending = self._pending_task_id()
            self._close()
            return [ByeReceived(bye=message, pending_task_id=pending)]
        return self._on_message(message)

    def _receive_binary(
        self, frame: bytes | bytearray | memoryview, fin: bool = True, whole: bool = True
    ) -> list[Event]:
        """A binary message (``whole``), or the next piece of one (the assembler bounds its length)."""
        limit = self._limits.max_chunk_bytes + CHUNK_HEADER_BYTES
        if whole and len(frame) > limit:
            raise ProtocolError(
                f"binary frame of {len(frame)} bytes exceeds the limit of {limit}", CLOSE_MESSAGE_TOO_BIG
            )
        if self._assembler is not None and self._assembler.manifest.channel:
            raise ProtocolError(
                f"binary frame on the websocket while transfer {self._assembler.manifest.transfer_id}"
                " travels on the data channel",
                CLOSE_UNSUPPORTED_DATA,
            )
        if self._assembler is None:
            try:
                transfer_id, index, _ = decode_chunk(frame)
                what = f"chunk {index} of transfer {transfer_id}"
            except ProtocolError:
                what = "binary frame"
            raise ProtocolError(
                f"{what} arrived with no transfer open (state {self._state.name})", CLOSE_UNSUPPORTED_DATA
            )
        assembler = self._assembler
        try:
            if not assembler.add_fragment(frame, fin=fin):
                return []
        except ProtocolError as exc:
            if assembler.fault is None:  # a framing fault (foreign, out of order, wrong length)
                raise
            code = error_code_for(exc.close_code, self._transfer_error_code)  # corrupt data: a bad task/update
            return self._violation(str(exc), exc.close_code, code)
        self._assembler = None
        return self._complete(assembler)

    def _complete(self, assembler: TensorAssembler) -> list[Event]:
        """A transfer's last chunk is in: finish it (digests, header, decode) and hand it on."""
        try:
            tensors = assembler.finish()
        except ProtocolError as exc:
            return self._violation(str(exc), exc.close_code, error_code_for(exc.close_code, self._transfer_error_code))
        return self._on_transfer_complete(tensors, assembler.values)

    def _open_transfer(
        self, manifest: TensorManifest, expected: tuple[TensorEntry, ...] | EntryCheck | None, what: str
    ) -> None:
        """Start receiving an announced transfer (limits and expected tensors are checked here)."""
        if manifest.num_chunks > 1 and manifest.chunk_bytes < MIN_CHUNK_BYTES:
            raise ProtocolError(
                f"{what}: chunks of {manifest.chunk_bytes} bytes are below the minimum of {MIN_CHUNK_BYTES}",
                CLOSE_POLICY_VIOLATION,
            )
        if manifest.channel and not self._channel:
            raise ProtocolError(f"{what}: announced on a data channel that is not open", CLOSE_PROTOCOL_ERROR)
        self._assembler = TensorAssembler(
            manifest,
            expected=expected,
            max_total_bytes=self._limits.max_transfer_bytes,
            max_chunk_bytes=self._limits.max_chunk_bytes,
            check_values=False,  # values are checked by the side's handler: a bad value is not fatal
            what=what,
        )
        self._assembler.deferred = self.defer_checks

    # ---------------------------------------------------------------------------------- helpers

    def _violation(self, reason: str, close_code: int, code: str, task_id: str | None = None) -> list[Event]:
        """The peer broke the protocol: queue an Error for it, close, report the close code."""
        if task_id is None:
            task_id = self._pending_task_id()
        logger.warning("%s: protocol violation (close code %d, %s): %s", self._side, close_code, code, reason)
        try:
            self._queue(Error(task_id=task_id, code=code, message=reason[:MAX_ERROR_TEXT]))
        except ProtocolError:  # cannot happen with a well-formed reason; never let it escape receive
            logger.exception("%s: could not queue the Error reply", self._side)
        self._close()
        return [ProtocolViolation(close_code=close_code, reason=reason, task_id=task_id)]

    def _unexpected(self, message: Message) -> list[Event]:
        if isinstance(message, _TO_DEVICE if self._side == "coordinator" else _TO_COORDINATOR):
            problem = f"{kind_of(message)} is not a message a {self._side} receives"
        else:
            problem = f"unexpected {kind_of(message)} in state {self._state.name}"
        task_id = getattr(message, "task_id", None)
        return self._violation(problem, CLOSE_PROTOCOL_ERROR, ErrorCode.UNEXPECTED, task_id)

    def _queue(self, message: Message) -> None:
        peer_text = self._peer_limits.max_text_bytes if self._peer_limits is not None else MAX_TEXT_BYTES
        self._outgoing.append(encode_message(message, max_bytes=peer_text))
        logger.debug("%s: queued %s", self._side, kind_of(message))

    def _encode_for_peer(self, tensors: Tensors, what: str) -> tuple[TensorManifest, EncodedTensors]:
        """The manifest of a new transfer of ``tensors`` (prepared here unless they already are)."""
        peer = self._peer_limits
        assert peer is not None, "tensors are only sent after the handshake"
        chunk_bytes = min(self._limits.max_chunk_bytes, peer.max_chunk_bytes)
        encoded = tensors if isinstance(tensors, EncodedTensors) else prepare_tensors(tensors, chunk_bytes=chunk_bytes)
        manifest = encoded.manifest(chunk_bytes=chunk_bytes, digest=CHUNK_XXH3 if self._chunk_xxh3 else "sha256")
        if self._channel:
            manifest = dataclasses.replace(manifest, channel="tcp")
        if manifest.total_bytes > peer.max_transfer_bytes:
            raise ProtocolError(
                f"{what}: {manifest.total_bytes} bytes of tensors exceed the peer's transfer limit of"
                f" {peer.max_transfer_bytes}",
                CLOSE_MESSAGE_TOO_BIG,
            )
        return manifest, encoded

    def _queue_transfer(self, encoded: EncodedTensors, manifest: TensorManifest) -> None:
        """Queue a transfer's chunk frames (made when taken, see :meth:`frames_to_send`)."""
        self._outgoing.append((encoded, manifest))

    def _require_open(self, action: str) -> None:
        if self._state is ConnectionState.CLOSED:
            raise ProtocolError(f"cannot {action}: the connection is closed")

    def _require_state(self, action: str, *states: ConnectionState) -> None:
        if self._state not in states:
            allowed = " or ".join(state.name for state in states)
            raise ProtocolError(f"cannot {action} in state {self._state.name} (needs {allowed})")

    def _close(self) -> None:
        self._state = ConnectionState.CLOSED
        self._assembler = None
        self._forget_task()
