"""The device client: connects to a coordinator, runs its tasks, reconnects with backoff."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "Backoff": "edge_sdk.client._backoff",
    "DataChannel": "edge_sdk.client._channel",
    "DeviceOptions": "edge_sdk.client._client",
    "EdgeDevice": "edge_sdk.client._client",
    "open_data_channel": "edge_sdk.client._channel",
    "serve_data_channels": "edge_sdk.client._channel",
    "websocket_messages": "edge_sdk.client._stream",
}

__all__ = [
    "Backoff",
    "DataChannel",
    "DeviceOptions",
    "EdgeDevice",
    "open_data_channel",
    "serve_data_channels",
    "websocket_messages",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.client._backoff import Backoff
    from edge_sdk.client._channel import DataChannel, open_data_channel, serve_data_channels
    from edge_sdk.client._client import DeviceOptions, EdgeDevice
    from edge_sdk.client._stream import websocket_messages
