"""The device client: connects to a coordinator, runs its tasks, reconnects with backoff."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "Backoff": "edge_sdk.client._backoff",
    "DeviceOptions": "edge_sdk.client._client",
    "EdgeDevice": "edge_sdk.client._client",
    "websocket_messages": "edge_sdk.client._stream",
}

__all__ = [
    "Backoff",
    "DeviceOptions",
    "EdgeDevice",
    "websocket_messages",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.client._backoff import Backoff
    from edge_sdk.client._client import DeviceOptions, EdgeDevice
    from edge_sdk.client._stream import websocket_messages
