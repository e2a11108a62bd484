"""A keepalive ping between the fragments of a full chunk frame must not close the connection.

``websockets`` counts every frame, control frames too, against what is left of a message's
``max_size``; a 4-byte keepalive ping that lands after the last piece of a chunk frame of exactly
``max_frame_bytes`` and before its empty final fragment closed real connections with 1009 ("frame with
4 bytes after reading 1048600 bytes exceeds limit of 1048600 bytes"). Both sides now set the library's
``max_size`` to ``WireLimits.websocket_max_size`` (room for one control frame).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from edge_sdk.protocol import WireLimits

LIMITS = WireLimits()


async def _full_chunk_with_a_ping(ws: ClientConnection) -> AsyncIterator[bytes]:
    """A binary message of exactly ``max_frame_bytes`` in 256 KiB pieces, with a ping sent after the
    last piece (before ``websockets`` sends the empty final fragment)."""
    left = LIMITS.max_frame_bytes
    while left:
        piece = min(left, 256 << 10)
        yield b"\x00" * piece
        left -= piece
    await ws.ping(b"keep")  # 4 bytes, as websockets' keepalive


async def _send_and_receive(max_size: int) -> int | str:
    got: asyncio.Future[int | str] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        try:
            message = await ws.recv()
            got.set_result(len(message))
        except ConnectionClosed as exc:
            got.set_result(f"closed {exc.sent.code if exc.sent else None}")

    async with serve(handler, "127.0.0.1", 0, max_size=max_size, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            with contextlib.suppress(ConnectionClosed):  # the server closes when it refuses
                await ws.send(_full_chunk_with_a_ping(ws))
            return await asyncio.wait_for(got, 30)


def test_a_ping_between_the_fragments_of_a_full_chunk_frame_is_taken() -> None:
    assert asyncio.run(_send_and_receive(LIMITS.websocket_max_size)) == LIMITS.max_frame_bytes


def test_without_room_for_the_ping_the_library_closes_with_1009() -> None:
    """The cause, shown: at ``max_size = max_frame_bytes`` the same message closes the connection."""
    assert asyncio.run(_send_and_receive(LIMITS.max_frame_bytes)) == "closed 1009"
