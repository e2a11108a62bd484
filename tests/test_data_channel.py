"""The data channel beside the websocket (``edge_sdk.protocol._channel``, ``edge_sdk.client._channel``):
a real coordinator in-process and hand-driven devices over real sockets on 127.0.0.1 (port 0).

Tasks and updates travel on it end to end (ws:// and wss://); a device that cannot open it keeps
the websocket; a wrong or replayed token is refused; a device that sends more bytes than announced
or a corrupt chunk on it loses only its own round.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from edge_sdk.client._channel import DataChannel, device_channel, open_data_channel
from edge_sdk.protocol import (
    FEATURE_DATA_CHANNEL,
    ChannelSend,
    DeviceConnection,
    Event,
    TaskReceived,
    WelcomeReceived,
)

from ._federation import free_port, self_signed_certificate
from .test_server import TIMEOUT, coordinator, dial, honest_update, one_task, run


class ChannelDevice:
    """A hand-driven device that announces the data channel and opens it when offered (unless told not
    to, or pointed at ``port`` instead of the offered one)."""

    def __init__(self, ws: ClientConnection, *, url: str, context: ssl.SSLContext | None = None) -> None:
        self.ws = ws
        self.url = url
        self.context = context
        self.conn = DeviceConnection()
        self.channel: DataChannel | None = None
        self.token = ""
        self.binary_frames = 0  # binary websocket frames received (chunks that did not use the channel)

    async def flush(self, edit: Any = None) -> None:
        """Send what the connection queued; ``edit`` may rewrite a channel transfer's chunks."""
        for frame in self.conn.frames_to_send(fragments=True):
            if isinstance(frame, ChannelSend):
                assert self.channel is not None
                chunks = [tuple(bytes(piece) for piece in pieces) for pieces in frame.chunks]
                if edit is not None:
                    chunks = edit(chunks)
                await self.channel.send(ChannelSend(frame.transfer_id, frame.total_bytes, iter(chunks)))
            else:
                await self.ws.send(frame)

    async def events(self) -> list[Event]:
        while True:
            message = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
            self.binary_frames += isinstance(message, bytes)
            events = self.conn.receive(message)
            if self.conn.channel_receiving:
                assert self.channel is not None
                events += await self.channel.receive(self.conn)
            await self.flush()
            if events:
                return events

    async def hello(self, *, port: int | None = None) -> None:
        self.conn.send_hello(
            device_id="test",
            sdk_version="0",
            profile={"budget": {"usable": 10**10}},
            capabilities=(FEATURE_DATA_CHANNEL,),
        )
        await self.flush()
        (event,) = await self.events()
        assert isinstance(event, WelcomeReceived) and event.welcome.data_token
        self.token = event.welcome.data_token
        self.channel = await device_channel(
            self.url, port or event.welcome.data_port, self.token, ssl_context=self.context
        )
        if self.channel is not None:
            self.conn.channel_opened()

    async def task(self) -> TaskReceived:
        return one_task(await self.events())

    def answer(self, received: TaskReceived) -> None:
        honest_update(self.conn, received)

    async def close_code(self) -> int | None:
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            while True:
                await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        return self.ws.close_code


def outcomes(tmp_path: Path) -> dict[str, tuple[str, str]]:
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    return {d["device_id"]: (d["status"], d["reason"]) for d in state.history[0]["devices"]}


async def _round_trip(tmp_path: Path, names: list[str], **options: Any) -> dict[str, Any]:
    """Each device opens its channel, receives its task and answers it; the round's result."""
    scheme = "wss" if options.get("ssl_context") else "ws"
    client_context = options.pop("client_context", None)
    async with coordinator(tmp_path, names, ssl_context=options.get("ssl_context")) as (srv, running):
        before = srv.engine.weights_digest()
        async with contextlib.AsyncExitStack() as stack:
            devices = {}
            for name in names:
                ws = await stack.enter_async_context(
                    connect(
                        f"{scheme}://127.0.0.1:{srv.port}",
                        additional_headers={"Authorization": f"Bearer token-of-{name}"},
                        compression=None,
                        max_size=8 << 20,
                        ssl=client_context,
                    )
                )
                devices[name] = ChannelDevice(ws, url=f"{scheme}://127.0.0.1:{srv.port}", context=client_context)
                await devices[name].hello()
            tasks = {name: await device.task() for name, device in devices.items()}
            for name, device in devices.items():
                device.answer(tasks[name])
                await device.flush()
            await asyncio.wait_for(running, TIMEOUT)
        return {
            "changed": srv.engine.weights_digest() != before,
            "channels": [task.task.weights.channel for task in tasks.values()],
            "binary_frames": sum(device.binary_frames for device in devices.values()),
        }


def test_tasks_and_updates_travel_on_the_data_channel(tmp_path: Path) -> None:
    result = run(_round_trip(tmp_path, ["a", "b"]))
    assert result["channels"] == ["tcp", "tcp"]  # announced on the channel...
    assert result["binary_frames"] == 0  # ...and no chunk came on the websocket
    assert result["changed"]
    assert outcomes(tmp_path) == {"a": ("ok", ""), "b": ("ok", "")}


def test_tasks_and_updates_travel_on_the_data_channel_over_tls(tmp_path: Path) -> None:
    pair = self_signed_certificate(tmp_path)
    if pair is None:
        pytest.skip("no way to make a certificate")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pair[0]), str(pair[1]))
    client = ssl.create_default_context(cafile=str(pair[0]))
    result = run(_round_trip(tmp_path, ["a"], ssl_context=server, client_context=client))
    assert result["channels"] == ["tcp"] and result["binary_frames"] == 0 and result["changed"]
    assert outcomes(tmp_path) == {"a": ("ok", "")}


def test_a_channel_that_cannot_connect_falls_back_to_the_websocket(tmp_path: Path, caplog: Any) -> None:
    async def main() -> tuple[TaskReceived, int]:
        async with coordinator(tmp_path, ["a"]) as (srv, running), dial(srv, "a") as ws:
            device = ChannelDevice(ws, url=f"ws://127.0.0.1:{srv.port}")
            await device.hello(port=free_port())  # nothing listens there: the connection is refused
            assert device.channel is None and not device.conn.channel_open
            received = await device.task()
            device.answer(received)
            await device.flush()
            await asyncio.wait_for(running, TIMEOUT)
            return received, device.binary_frames

    received, binary_frames = run(main())
    assert received.task.weights.channel == "" and binary_frames > 0  # the task came on the websocket
    assert "no data channel to 127.0.0.1" in caplog.text and "travel on the websocket" in caplog.text
    assert outcomes(tmp_path) == {"a": ("ok", "")}


def test_a_wrong_or_replayed_token_is_refused(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with coordinator(tmp_path, ["a"]) as (srv, running), dial(srv, "a") as ws:
            device = ChannelDevice(ws, url=f"ws://127.0.0.1:{srv.port}")
            await device.hello()
            assert device.channel is not None and srv.data_port is not None
            for what, token in (("wrong", secrets.token_hex(16)), ("replayed", device.token)):
                try:
                    await open_data_channel("127.0.0.1", srv.data_port, token, ssl_context=None, timeout=5)
                    results[what] = "opened"
                except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                    results[what] = type(exc).__name__
            received = await device.task()  # the real channel still carries the task
            results["channel"] = received.task.weights.channel
            device.answer(received)
            await device.flush()
            await asyncio.wait_for(running, TIMEOUT)
        return results

    results = run(main())
    assert results["wrong"] == "ConnectionError" and results["replayed"] == "ConnectionError"
    assert results["channel"] == "tcp"
    assert outcomes(tmp_path) == {"a": ("ok", "")}


async def _joined(stack: contextlib.AsyncExitStack, srv: Any, names: list[str]) -> dict[str, ChannelDevice]:
    """One ChannelDevice per name, dialled and past its Hello (the channel open)."""
    devices = {}
    for name in names:
        ws = await stack.enter_async_context(dial(srv, name))
        devices[name] = ChannelDevice(ws, url=f"ws://127.0.0.1:{srv.port}")
        await devices[name].hello()
    return devices


def _longer_first_chunk(chunks: list[tuple[bytes, ...]]) -> list[tuple[bytes, ...]]:
    head, *payload = chunks[0]
    return [(head, *payload, b"\x00" * 100), *chunks[1:]]


def _corrupt_last_chunk(chunks: list[tuple[bytes, ...]]) -> list[tuple[bytes, ...]]:
    head, *payload = chunks[-2]  # the last is the end marker
    data = bytearray(b"".join(payload))
    data[len(data) // 2] ^= 0xFF
    return [*chunks[:-2], (head, bytes(data)), chunks[-1]]


def test_more_bytes_than_announced_or_a_corrupt_chunk_cost_only_that_device_its_round(tmp_path: Path) -> None:
    names = ["good", "long", "corrupt"]
    edits = {"long": _longer_first_chunk, "corrupt": _corrupt_last_chunk}

    async def main() -> dict[str, Any]:
        codes: dict[str, Any] = {}
        async with coordinator(tmp_path, names) as (srv, running), contextlib.AsyncExitStack() as stack:
            devices = await _joined(stack, srv, names)
            tasks = {name: await device.task() for name, device in devices.items()}
            for name, device in devices.items():
                device.answer(tasks[name])
                await device.flush(edits.get(name))
            for name in edits:
                codes[name] = await devices[name].close_code()
            await asyncio.wait_for(running, TIMEOUT)
        return codes

    codes = run(main())
    assert codes == {"long": 1002, "corrupt": 1002}
    outcome = outcomes(tmp_path)
    assert outcome["good"] == ("ok", "")
    assert outcome["long"][0] == "failed" and "not a chunk frame" in outcome["long"][1]
    assert outcome["corrupt"][0] == "failed" and "is corrupt" in outcome["corrupt"][1]


def test_a_device_whose_websocket_closes_mid_transfer_loses_only_its_round(tmp_path: Path) -> None:
    """The update is announced on the channel, no chunk follows and the websocket closes: the
    coordinator cuts the channel (it never waits on a channel its websocket outlived)."""
    names = ["good", "stalled"]

    async def main() -> None:
        async with coordinator(tmp_path, names) as (srv, running), contextlib.AsyncExitStack() as stack:
            devices = await _joined(stack, srv, names)
            tasks = {name: await device.task() for name, device in devices.items()}
            devices["stalled"].answer(tasks["stalled"])
            await devices["stalled"].flush(lambda chunks: [])  # the Update, then nothing on the channel
            await devices["stalled"].ws.close()
            devices["good"].answer(tasks["good"])
            await devices["good"].flush()
            await asyncio.wait_for(running, TIMEOUT)

    run(main())
    outcome = outcomes(tmp_path)
    assert outcome["good"] == ("ok", "")
    assert outcome["stalled"] == (
        "failed",
        "protocol violation: data channel: the websocket closed during the transfer",
    )
