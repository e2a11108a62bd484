"""A websocket's messages as the protocol takes them: text whole, binary piece by piece."""

from __future__ import annotations

from collections.abc import AsyncIterator

from websockets.asyncio.connection import Connection

from edge_sdk.protocol import Fragment

__all__ = ["websocket_messages"]


async def websocket_messages(ws: Connection) -> AsyncIterator[str | Fragment]:
    """Each message of ``ws`` as it arrives: a text message whole (``str``), a binary one as its
    websocket frames, each a :class:`~edge_sdk.protocol.Fragment` (``fin`` on the last) for
    ``BaseConnection.receive``. A binary message is never joined: a chunk in flight holds a frame or
    two (the sender's fragments, e.g. 256 KiB), not a whole chunk frame, and costs no copy.

    Raises ``websockets.ConnectionClosed`` when the connection ends.
    """
    while True:
        texts: list[str] = []
        held: bytes | None = None  # the newest piece, passed on once it is known whether it is the last
        async for piece in ws.recv_streaming():
            if isinstance(piece, str):
                texts.append(piece)
                continue
            if held is not None:
                yield Fragment(held, fin=False)
            held = piece
        yield "".join(texts) if held is None else Fragment(held, fin=True)
