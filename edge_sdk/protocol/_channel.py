"""The data channel, sans-I/O: a plain TCP (or TLS) connection beside the websocket for tensor chunks.

A websocket library copies every byte several times in Python (read, buffer, frame, unmask); a chunk
read from a plain socket straight into the receive buffer is copied by the kernel only. So bulk tensor
bytes may travel on a second connection, the *data channel*, while every control message stays on
the websocket. How it opens:

1. The device's Hello announces :data:`FEATURE_DATA_CHANNEL` (its transport can open one).
2. The coordinator's Welcome grants it: ``features`` lists it, ``data_port`` is the port the
   coordinator's channel listener accepts on, ``data_token`` a fresh one-time token (32 hex digits,
   16 random bytes) bound to this websocket connection (:class:`ChannelTokens`).
3. The device connects to the websocket's host at ``data_port`` (with TLS through the same context
   for ``wss://``) and sends :func:`channel_hello` (``"EFD1"`` + the 16 token bytes: 20 bytes). The
   coordinator redeems the token (an unknown, used or revoked token is refused by closing the socket,
   nothing else is read) and answers :data:`CHANNEL_ACK`; each side then calls
   ``BaseConnection.channel_opened``.
4. From then on every transfer a side sends is announced with ``TensorManifest.channel == "tcp"`` and
   its chunk frames (the same 24-byte header and payload, the same digests and value checks) follow
   on the channel, in order, with no websocket framing; the receiver reads each payload into place
   (``TensorAssembler.target``/``wrote``: never more than the chunk still lacks), and the transfer
   ends with an end marker (:func:`end_marker`) read as part of it.

A device that cannot open the channel (a firewall, a proxy in front of the websocket, a timeout) logs
the reason and keeps the websocket for everything: nothing else changes. An older peer never
announces or grants the feature and never sees the new fields.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import Final, Generic, TypeVar

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._payload import ChunkPieces
from edge_sdk.protocol._tensors import TensorManifest, encode_chunk
from edge_sdk.protocol._wire import CLOSE_POLICY_VIOLATION

__all__ = [
    "CHANNEL_ACK",
    "CHANNEL_HELLO_BYTES",
    "CHANNEL_MAGIC",
    "FEATURE_DATA_CHANNEL",
    "ChannelSend",
    "ChannelTokens",
    "channel_hello",
    "channel_token",
    "end_marker",
]

T = TypeVar("T")

FEATURE_DATA_CHANNEL: Final = "channel:tcp"
CHANNEL_MAGIC: Final = b"EFD1"
TOKEN_BYTES: Final = 16
CHANNEL_HELLO_BYTES: Final = len(CHANNEL_MAGIC) + TOKEN_BYTES  # what a device sends first, exactly
CHANNEL_ACK: Final = b"EFDA"  # the coordinator's answer once the token is redeemed


@dataclasses.dataclass(frozen=True)
class ChannelSend:
    """A transfer's chunk frames to write on the data channel, in order (``frames_to_send`` yields it
    in place of websocket frames): each as (24-byte header, views of the tensors' memory...), then its
    end marker (:func:`end_marker`)."""

    transfer_id: str
    total_bytes: int
    chunks: Iterator[ChunkPieces]


def end_marker(manifest: TensorManifest) -> ChunkPieces:
    """What ends a transfer on the data channel: a chunk header of index ``num_chunks``, no payload. A
    receiver reads exactly this after the last chunk, so bytes a sender adds anywhere fail the transfer
    they belong to (instead of the next one)."""
    return (encode_chunk(manifest.transfer_id, manifest.num_chunks, b""),)


def channel_hello(token: str) -> bytes:
    """The first 20 bytes a device sends on a new data channel: the magic and the token's 16 bytes."""
    return CHANNEL_MAGIC + bytes.fromhex(token)


def channel_token(hello: bytes | bytearray | memoryview) -> bytes:
    """The token bytes of a data channel's first 20 bytes; ProtocolError if they are not a channel hello."""
    data = bytes(hello)
    if len(data) != CHANNEL_HELLO_BYTES or data[: len(CHANNEL_MAGIC)] != CHANNEL_MAGIC:
        raise ProtocolError(f"not a data channel hello: {data[:8]!r}...", CLOSE_POLICY_VIOLATION)
    return data[len(CHANNEL_MAGIC) :]


class ChannelTokens(Generic[T]):
    """One-time data channel tokens, each bound to an owner (a websocket connection): :meth:`issue` at
    Welcome, :meth:`redeem` once when the channel proves it (a second use finds nothing), :meth:`revoke`
    when the owner's websocket closes (128 random bits: not guessable)."""

    def __init__(self) -> None:
        self._owners: dict[bytes, T] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def issue(self, owner: T) -> str:
        """A fresh token for ``owner`` (32 hex digits), valid for one redemption."""
        token = secrets.token_bytes(TOKEN_BYTES)
        self._owners[token] = owner
        return token.hex()

    def redeem(self, token: bytes) -> T | None:
        """The owner of ``token``, which is spent; None for a token unknown, used or revoked."""
        return self._owners.pop(bytes(token), None)

    def revoke(self, owner: T) -> None:
        """Forget every token of ``owner`` (its websocket closed before its channel opened)."""
        for token in [token for token, held in self._owners.items() if held is owner]:
            del self._owners[token]
