"""The daemon's side of one device's websocket, and the small I/O helpers the serve room shares."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response
from websockets.protocol import State

from coordinator.federation import DeviceSession, Verdict
from edge_sdk import DataChannel
from edge_sdk.protocol import ChannelSend, EncodedTensors, Fragment, prepare_tensors

__all__ = [
    "CHANNEL_GRACE_S",
    "CLOSE_TIMEOUT_S",
    "CLOSE_TRY_AGAIN",
    "Changes",
    "Connection",
    "SharedEncodings",
    "close_quietly",
    "json_response",
    "peer",
    "start_thread",
    "write_atomic",
]

T = TypeVar("T")

CLOSE_TIMEOUT_S = 10.0
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": the device reconnects
CHANNEL_GRACE_S = 5.0  # how long a device offered a data channel is given to open it before a task goes


class Connection:
    """One device's live websocket and its :class:`DeviceSession` (the protocol and the engine)."""

    def __init__(self, ws: ServerConnection, session: DeviceSession) -> None:
        self.ws = ws
        self.session = session
        self.send_lock = asyncio.Lock()
        self.channel: DataChannel | None = None  # the device's data channel, once it opened one
        self.channel_due: float | None = None  # time.monotonic() until which a task waits for the channel
        session.conn.defer_checks = True  # received chunks are checked by receive(), in a worker thread

    @property
    def name(self) -> str:
        return self.session.device_id

    @property
    def idle(self) -> bool:
        """Admitted, no task outstanding, the websocket open, and the data channel offered open (or
        given up on: ``CHANNEL_GRACE_S`` after the Welcome, the task goes on the websocket)."""
        waiting = self.channel_due is not None and self.channel is None and time.monotonic() < self.channel_due
        return self.session.ready and self.ws.state is State.OPEN and not waiting

    async def flush(self) -> int:
        """Send everything the session queued, in order; returns the bytes sent.

        A transfer's chunks are made as the socket takes them, each sent as a fragmented message of
        the chunk header and views of the tensors' memory (pieces of at most 256 KiB): no copy of the
        tensors is queued, and a transfer in flight holds about a piece (websockets' frame and write
        buffer) beyond the tensors. A transfer announced on the device's data channel is written there
        (ConnectionError if the channel is gone: the device cannot get its task either).
        """
        sent = 0
        async with self.send_lock:
            for frame in self.session.conn.frames_to_send(fragments=True):
                if isinstance(frame, ChannelSend):
                    if self.channel is None:
                        raise ConnectionError("the data channel closed before a transfer was sent")
                    sent += await self.channel.send(frame)
                    continue
                await self.ws.send(frame)
                sent += len(frame) if isinstance(frame, (str, bytes)) else sum(len(piece) for piece in frame)
        return sent

    async def receive(self, frame: str | bytes | Fragment, now: float) -> Verdict:
        """Feed one message (or piece of one, see ``websocket_messages``) to the session; received chunks'
        checks (digest, copy, finite values, norm) run in a worker thread once a chunk is in, while the
        event loop serves the other devices."""
        session = self.session
        owned = session.owned()
        verdict = session.receive(frame, now)
        work = session.conn.take_work()
        if work is not None:
            await asyncio.to_thread(work)
        if session.conn.channel_receiving:  # the transfer this frame announced comes on the data channel
            channel = self.channel
            if channel is None:
                events = session.conn.channel_broken("closed before the transfer")
            else:
                before = channel.bytes_read
                events = await channel.receive(session.conn, unless=self.ws.wait_closed())
                session.bytes_in += channel.bytes_read - before
            verdict = verdict.then(session.handle_all(events, now, owned=owned))
        return verdict

    def channel_opened(self, channel: DataChannel) -> None:
        """The device proved this connection's token on ``channel``: its transfers go there from now on."""
        self.channel = channel
        self.session.conn.channel_opened()

        def closed() -> None:
            if self.channel is channel:
                self.channel = None
                self.session.conn.channel_closed()

        channel.on_close = closed

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()


class SharedEncodings:
    """A round's tensors laid out for the wire once per distinct set (one per sub-network shape), in a
    worker thread, and shared by every device that is sent the same set (see ``EncodedTensors``).

    Keyed by the identity of the tensors' mapping (the round's orders of one sub-network share it).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Mapping[str, np.ndarray], asyncio.Future[EncodedTensors]]] = {}
        self.prepared = 0  # how many encodings were made (each set once)

    async def get(self, tensors: Mapping[str, np.ndarray]) -> EncodedTensors:
        """The shared encoding of ``tensors`` (made now, off the loop, if it is the first ask)."""
        entry = self._entries.get(id(tensors))
        if entry is None or entry[0] is not tensors:
            future = asyncio.ensure_future(asyncio.to_thread(prepare_tensors, tensors))
            entry = self._entries[id(tensors)] = (tensors, future)
            self.prepared += 1
        return await asyncio.shield(entry[1])  # one sender cancelled never cancels the others' encoding

    def clear(self) -> None:
        """Forget every encoding (a new round's tensors are new)."""
        self._entries.clear()


class Changes:
    """Wakes whoever waits for something to change (a device joined, answered or left)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next :meth:`wake`, or ``timeout`` seconds.

        ``asyncio.wait``, not ``wait_for``: before Python 3.12, ``wait_for`` loses a cancellation that
        comes as the event is set, which let a stop go unheard while devices came and went.
        """
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, timeout))
        finally:
            waiter.cancel()


def start_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` in a new daemon thread; the future of its result (on the running loop).

    Unlike ``asyncio.to_thread`` (the loop's default executor, which ``asyncio.run`` and the
    interpreter join at exit, without bound), a daemon thread never holds up the process's exit: a
    stop may leave it behind (a checkpoint it was writing is atomic: the previous one stands).
    Cancelling the future does not stop the thread; await ``asyncio.shield(future)`` to keep it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it any more
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name=f"edge-fm-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return future


async def close_quietly(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a websocket (bounded by the close timeout); never raises."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_S + 1)


def peer(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def json_response(connection: ServerConnection, status: http.HTTPStatus, doc: Mapping[str, Any]) -> Response:
    response = connection.respond(status, json.dumps(doc, indent=1) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
