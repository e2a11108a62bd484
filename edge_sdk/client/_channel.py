"""The data channel's sockets (asyncio): tensor chunks beside the websocket, read straight into place.

The protocol part (who offers it, the one-time token, which transfers travel on it, every check) is
``edge_sdk.protocol._channel`` and the connection state machines; this module moves the bytes:

- :class:`DataChannel` is an ``asyncio.BufferedProtocol``: while a transfer is read, ``get_buffer``
  hands the socket the state machine's :meth:`~edge_sdk.protocol.DeviceConnection.channel_target`
  (the rest of a chunk header, or the rest of a chunk's payload inside the receive buffer), so a
  payload byte is copied once, by the kernel (or once by TLS decryption). Each chunk's digest and value
  scan run in a worker thread as soon as it is in, while the next chunk is read (the reading costs the
  event loop one short callback per socket read). Between transfers the channel does not read at all
  (``pause_reading``): chunks that arrive before their announcement wait in the kernel.
- Sending writes each chunk's header and views of the tensors' memory (``transport.write``; what the
  socket does not take at once is buffered by asyncio up to its high-water mark, then the sender waits).
- :func:`open_data_channel` (device) and :func:`serve_data_channels` (coordinator) open it.

Everything is bounded: the coordinator reads exactly the 20-byte hello within ``HELLO_TIMEOUT_S``
(else closes), the device exactly the 4-byte ack; a transfer reads exactly what its manifest
announced, chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    CHANNEL_ACK,
    CHANNEL_HELLO_BYTES,
    ChannelSend,
    Event,
    channel_hello,
    channel_token,
)
from edge_sdk.protocol._machine import BaseConnection

__all__ = ["HELLO_TIMEOUT_S", "DataChannel", "device_channel", "open_data_channel", "serve_data_channels"]

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # the coordinator's wait for a new channel's hello; the device's wait for the ack
_WORK_BYTES = 8 << 20  # bytes read between two hand-offs of the chunks' checks to a worker thread
# Where bytes go that no transfer wants (read only to be refused, or to notice a closed socket): their
# content is never looked at, so every channel of the process shares one (an idle channel holds no buffer).
_SINK = memoryview(bytearray(1 << 16))

Accept = Callable[[bytes, "DataChannel"], bool]  # the coordinator's check of a token (True: bound)


class DataChannel(asyncio.BufferedProtocol):
    """One data channel's socket, either side; see the module docstring.

    ``accept`` (coordinator): called with the token of the channel's hello; True binds the channel
    (the ack is sent), False closes it. Without it (device), the channel waits for the ack.
    """

    def __init__(self, accept: Accept | None = None) -> None:
        self._accept = accept
        self._transport: asyncio.Transport | None = None
        self._handshake = bytearray(CHANNEL_HELLO_BYTES if accept is not None else len(CHANNEL_ACK))
        self._handshake_got = 0
        self._conn: BaseConnection | None = None  # the connection whose transfer is being read
        self._events: list[Event] = []
        self._loop = asyncio.get_running_loop()
        self._reading: asyncio.Future[None] | None = None
        self._work: asyncio.Future[None] | None = None  # a chunk's checks running in a worker thread
        self._writable: asyncio.Future[None] | None = None  # set while the transport asks to pause writing
        self.opened: asyncio.Future[None] = self._loop.create_future()  # the handshake is done
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.on_close: Callable[[], None] | None = None  # called once when the socket closes
        self._timer: asyncio.TimerHandle | None = None
        self.bytes_read = 0  # transfer bytes read so far (chunk headers and payloads)
        self._work_mark = 0  # bytes_read when the chunks' checks were last handed to a worker

    # ------------------------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._accept is not None:
            self._timer = self._loop.call_later(HELLO_TIMEOUT_S, self._refuse, "no hello in time")

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.opened.done():
            return memoryview(self._handshake)[self._handshake_got :]
        if self._conn is not None and self._conn.channel_receiving:
            view = self._conn.channel_target()
            if view:
                return view
        return _SINK

    def buffer_updated(self, nbytes: int) -> None:
        if not self.opened.done():
            self._handshake_got += nbytes
            if self._handshake_got == len(self._handshake):
                self._handshook()
            return
        conn = self._conn
        if conn is None or self._reading is None or self._reading.done():
            self._refuse("bytes no transfer announced")
            return
        self.bytes_read += nbytes
        events = conn.channel_wrote(nbytes)
        if events or not conn.channel_receiving or not conn.channel_target():
            self._events = events
            self._stop_reading()
            return
        if self.bytes_read - self._work_mark >= _WORK_BYTES:
            self._start_work()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.opened.done() and self._accept is not None:
            self.opened.cancel()  # nobody awaits a coordinator's side
        elif not self.opened.done():
            self.opened.set_exception(ConnectionError(f"the data channel closed during its handshake ({exc})"))
        if self._reading is not None and not self._reading.done() and self._conn is not None:
            self._events = self._conn.channel_broken(f"the socket closed during the transfer ({exc or 'EOF'})")
            self._reading.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
            if self.on_close is not None:
                self.on_close()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --------------------------------------------------------------------------------- public

    async def receive(self, conn: BaseConnection, *, unless: Awaitable[Any] | None = None) -> list[Event]:
        """Read the transfer ``conn`` announced on this channel (``conn.channel_receiving``) into place,
        each chunk checked in a worker thread as it completes; the events once it is done (or faulted).
        ``unless`` (e.g. the websocket's ``wait_closed()``): if it ends first, the channel is cut and the
        transfer fails (a half-open channel never outlives its websocket)."""
        assert self._transport is not None
        watcher = asyncio.ensure_future(unless) if unless is not None else None
        if self.closed.done():
            if watcher is not None:
                watcher.cancel()
            return conn.channel_broken("the socket is closed")
        self._conn, self._events = conn, []
        self._reading = self._loop.create_future()
        self._transport.resume_reading()
        if watcher is not None:
            watcher.add_done_callback(self._websocket_closed)
        try:
            await self._reading
            while self._work is not None:  # the last chunks' checks
                running = self._work
                await asyncio.wait({running})
                if self._work is running:  # its done callback has not run yet
                    self._work = None
        finally:
            if watcher is not None:
                watcher.cancel()
            self._stop_reading()
            self._conn = None
        if self._events or not conn.channel_receiving:
            return self._events
        work = conn.take_work()
        if work is not None:
            await asyncio.to_thread(work)
        return conn.channel_finish()

    async def send(self, transfer: ChannelSend) -> int:
        """Write a transfer's chunk frames (headers and views, no join); the bytes written."""
        transport = self._transport
        assert transport is not None
        sent = 0
        for pieces in transfer.chunks:
            for piece in pieces:
                if self.closed.done():
                    raise ConnectionError("the data channel closed while a transfer was sent")
                transport.write(piece)
                sent += len(piece)
                if self._writable is not None and not self._writable.done():
                    await self._writable  # below the transport's high-water mark again
        return sent

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -------------------------------------------------------------------------------- helpers

    def _handshook(self) -> None:
        assert self._transport is not None
        if self._timer is not None:
            self._timer.cancel()
        self._transport.pause_reading()
        if self._accept is None:  # device: the coordinator's ack
            if bytes(self._handshake) != CHANNEL_ACK:
                self._refuse(f"not a data channel ack: {bytes(self._handshake)!r}")
                return
            self.opened.set_result(None)
            return
        try:
            accepted = self._accept(channel_token(self._handshake), self)
        except ProtocolError as exc:
            self._refuse(str(exc))
            return
        if not accepted:
            self._refuse("unknown or spent token")
            return
        self._transport.write(CHANNEL_ACK)
        self.opened.set_result(None)

    def _websocket_closed(self, watcher: asyncio.Future[Any]) -> None:
        if not watcher.cancelled() and self._reading is not None and not self._reading.done():
            self._refuse("the websocket closed during the transfer")

    def _refuse(self, why: str) -> None:
        if self.closed.done():
            return
        logger.warning("data channel from %s closed: %s", self._peer(), why)
        if self._reading is not None and not self._reading.done():
            if self._conn is not None:
                self._events = self._conn.channel_broken(why)
            self._reading.set_result(None)
        if self._transport is not None:
            self._transport.abort()

    def _peer(self) -> str:
        address: Any = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)

    def _stop_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        if self._reading is not None and not self._reading.done():
            self._reading.set_result(None)

    def _start_work(self) -> None:
        """Run the chunks' checks waiting (if any) in a worker thread, unless a run is under way."""
        if self._work is not None or self._conn is None:
            return
        work = self._conn.take_work()
        if work is None:
            return
        self._work_mark = self.bytes_read
        self._work = asyncio.ensure_future(asyncio.to_thread(work))
        self._work.add_done_callback(self._work_done)

    def _work_done(self, future: asyncio.Future[None]) -> None:
        self._work = None
        if not future.cancelled() and future.exception() is not None:
            logger.error("data channel: a chunk's checks failed", exc_info=future.exception())


async def open_data_channel(
    host: str, port: int, token: str, *, ssl_context: ssl.SSLContext | None, timeout: float = HELLO_TIMEOUT_S
) -> DataChannel:
    """Connect a device's data channel (TLS when ``ssl_context``), prove ``token``, await the ack;
    raises OSError, ssl.SSLError or TimeoutError when it cannot open (the caller keeps the websocket)."""
    loop = asyncio.get_running_loop()
    _, channel = await asyncio.wait_for(
        loop.create_connection(
            DataChannel, host, port, ssl=ssl_context, server_hostname=host if ssl_context is not None else None
        ),
        timeout,
    )
    assert channel._transport is not None
    channel._transport.write(channel_hello(token))
    try:
        await asyncio.wait_for(asyncio.shield(channel.opened), timeout)
    except BaseException:
        channel.close()
        raise
    return channel


async def serve_data_channels(
    host: str, port: int, ssl_context: ssl.SSLContext | None, accept: Accept, *, max_pending: int = 256
) -> asyncio.Server:
    """Listen for data channels (the coordinator); ``accept`` binds a proven token to its connection.
    At most ``max_pending`` sockets may be waiting to send their hello: beyond, a new one is cut."""
    loop = asyncio.get_running_loop()
    pending: set[DataChannel] = set()

    def make() -> DataChannel:
        channel = DataChannel(accept)
        if len(pending) >= max_pending:
            loop.call_soon(channel.close)
            return channel
        pending.add(channel)
        channel.opened.add_done_callback(lambda _: pending.discard(channel))
        return channel

    return await loop.create_server(make, host, port, ssl=ssl_context)


async def device_channel(url: str, port: int, token: str, ssl_context: ssl.SSLContext | None) -> DataChannel | None:
    """A device's data channel to the coordinator of ``url`` (its host, the Welcome's port and token), or
    None when it cannot open: the reason is logged and every transfer stays on the websocket."""
    host = urllib.parse.urlsplit(url).hostname or "localhost"
    try:
        channel = await open_data_channel(host, port, token, ssl_context=ssl_context)
    except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
        logger.warning(
            "no data channel to %s:%d (%s: %s): tensors travel on the websocket", host, port, type(exc).__name__, exc
        )
        return None
    logger.info("data channel open to %s:%d", host, port)
    return channel
