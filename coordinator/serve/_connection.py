"""The daemon's side of one device's websocket, and the small I/O helpers the serve room shares."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response
from websockets.protocol import State

from coordinator.federation import DeviceSession

__all__ = [
    "CLOSE_TIMEOUT_S",
    "CLOSE_TRY_AGAIN",
    "Changes",
    "Connection",
    "close_quietly",
    "json_response",
    "peer",
    "write_atomic",
]

CLOSE_TIMEOUT_S = 10.0
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": the device reconnects


class Connection:
    """One device's live websocket and its :class:`DeviceSession` (the protocol and the engine)."""

    def __init__(self, ws: ServerConnection, session: DeviceSession) -> None:
        self.ws = ws
        self.session = session
        self.send_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.session.device_id

    @property
    def idle(self) -> bool:
        """Admitted, no task outstanding, and the websocket open."""
        return self.session.ready and self.ws.state is State.OPEN

    async def flush(self) -> int:
        """Send everything the session queued, in order; returns the bytes sent."""
        sent = 0
        async with self.send_lock:
            for frame in self.session.conn.data_to_send():
                await self.ws.send(frame)
                sent += len(frame)
        return sent


class Changes:
    """Wakes whoever waits for something to change (a device joined, answered or left)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next :meth:`wake`, or ``timeout`` seconds."""
        event = self._event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))


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
