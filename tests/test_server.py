"""The coordinator's websocket server in-process, over real websockets on 127.0.0.1 (port 0), with a
tiny model and hand-driven devices: authentication, bad input of every kind, dropped devices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint, state_digest
from coordinator.federation._config import FederationConfig, ServerConfig
from coordinator.federation._engine import FederationEngine
from coordinator.serve._server import CoordinatorServer
from edge_sdk.protocol import (
    DeviceConnection,
    Error,
    Event,
    TaskReceived,
    TrainTask,
    Update,
    WelcomeReceived,
    decode_message,
    encode_message,
    encode_tensors,
)
from edge_sdk.protocol._closecodes import CLOSE_REJECTED, CLOSE_RUN_COMPLETE

from .test_engine import TRAINING, ranked_parent

FULL = 10**10
TIMEOUT = 60.0


def tokens(names: list[str]) -> dict[str, str]:
    return {name: f"token-of-{name}" for name in names}


@contextlib.asynccontextmanager
async def coordinator(
    tmp_path: Path,
    names: list[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    rounds: int = 1,
    deadline: float = 30.0,
    **server: Any,
) -> AsyncIterator[tuple[CoordinatorServer, asyncio.Future[None]]]:
    parent, salience = ranked_parent()
    federation = FederationConfig(rounds=rounds, min_devices=1, device_wait_s=30, round_deadline_s=deadline)
    engine = FederationEngine(parent, salience, federation, TRAINING, devices=names)  # type: ignore[arg-type]
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "hello_timeout_s": 5.0, **server})
    srv = CoordinatorServer(engine, config, tokens(names), run_dir=tmp_path, ssl_context=ssl_context)
    await srv.start()
    running = asyncio.ensure_future(srv.run())
    try:
        yield srv, running
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        await srv.stop()


def url(srv: CoordinatorServer, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{srv.port}"


def dial(srv: CoordinatorServer, name: str, **kwargs: Any) -> Any:
    return connect(
        url(srv),
        additional_headers={"Authorization": f"Bearer token-of-{name}"},
        compression=None,
        max_size=8 << 20,
        **kwargs,
    )


def one_task(events: list[Event]) -> TaskReceived:
    """The single event a stand-in device received, a training task."""
    (event,) = events
    assert isinstance(event, TaskReceived) and isinstance(event.task, TrainTask)
    return event


def honest_update(conn: DeviceConnection, received: TaskReceived) -> None:
    """Queue the task's Update: every weight moved by 0.01 (a small, honest-looking change)."""
    trained = {n: a + np.float32(0.01) if a.dtype.kind == "f" else a for n, a in received.tensors.items()}
    conn.send_update(
        task_id=received.task.task_id,
        tensors=trained,
        num_samples=4,
        metrics={"loss": 0.3},
        peak_rss_bytes=10,
        step_time_s=0.1,
        train_time_s=0.2,
        encoding="weights",
    )


class Device:
    """A device driven by hand: the real DeviceConnection, or raw frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.conn = DeviceConnection()

    async def flush(self) -> None:
        for frame in self.conn.data_to_send():
            await self.ws.send(frame)

    async def events(self) -> list[Event]:
        while True:
            events = self.conn.receive(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            await self.flush()
            if events:
                return events

    async def hello(self, usable: int = FULL) -> None:
        self.conn.send_hello(device_id="test", sdk_version="0", profile={"budget": {"usable": usable}})
        await self.flush()
        (event,) = await self.events()
        assert isinstance(event, WelcomeReceived)

    async def task(self) -> TaskReceived:
        return one_task(await self.events())

    def answer(self, received: TaskReceived) -> None:
        honest_update(self.conn, received)

    async def closed(self) -> tuple[int | None, list[Error]]:
        """Read until the coordinator closes: its close code and the Errors it sent first."""
        errors: list[Error] = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
                if isinstance(frame, str):
                    message = decode_message(frame)
                    if isinstance(message, Error):
                        errors.append(message)
        return self.ws.close_code, errors


def update_frames(task: TrainTask, tensors: Mapping[str, np.ndarray]) -> list[str | bytes]:
    """An Update for ``task`` carrying ``tensors`` as is, bypassing the device-side checks."""
    manifest, frames = encode_tensors(tensors)
    update = Update(
        task_id=task.task_id,
        num_samples=5,
        metrics={"loss": 0.5},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=0.2,
        weights=manifest,
        encoding="weights",
    )
    return [encode_message(update), *frames]


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT * 2):
            return await coro

    return asyncio.run(bounded())


# ---------------------------------------------------------------------------------- authentication


def test_a_wrong_or_missing_token_gets_401_before_any_model_byte(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(tmp_path, ["a"]) as (srv, _):
            with pytest.raises(InvalidStatus) as caught:
                async with connect(url(srv), additional_headers={"Authorization": "Bearer wrong-token"}):
                    pass
            assert caught.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as caught:
                async with connect(url(srv)):
                    pass
            assert caught.value.response.status_code == 401
            # The raw HTTP answer: a short 401, nothing else on the wire.
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Authorization: Bearer token-of-b\r\n\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(1 << 20), TIMEOUT)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer" in answer
            assert len(answer) < 1024 and b"EFC1" not in answer
            assert srv.engine.devices()["a"]["status"] == "never_seen"

    run(main())


def test_connections_above_the_limit_get_503_and_a_second_connection_of_a_device_409(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(tmp_path, ["a", "b"], max_connections=1) as (srv, _), dial(srv, "a") as first:
            device = Device(first)
            await device.hello()
            with pytest.raises(InvalidStatus) as caught:
                async with dial(srv, "b"):
                    pass
            assert caught.value.response.status_code == 503
        async with coordinator(tmp_path / "2", ["a", "b"]) as (srv, _), dial(srv, "a") as first:
            await Device(first).hello()
            with pytest.raises(InvalidStatus) as caught:
                async with dial(srv, "a"):
                    pass
            assert caught.value.response.status_code == 409  # the connected device keeps its place
            await first.ping()
            await first.close()  # once its connection is closed, the device connects again
            async with dial(srv, "a") as again:
                await Device(again).hello()

    run(main())


# ---------------------------------------------------------------------------------------- bad input


BAD_FRAMES: dict[str, tuple[str | bytes, int, str | None]] = {
    # name: (frame sent first, expected close code, expected Error code or None)
    "malformed": ("{not json", 1002, "bad_message"),
    "truncated": ('{"type": "hello", "v": 1, "device_id": "x"', 1002, "bad_message"),
    "unknown_type": ('{"type": "gossip", "v": 1}', 1003, "unsupported"),
    "wrong_version": ('{"type": "hello", "v": 99, "device_id": "x"}', 1002, "version"),
    "stray_chunk": (b"EFC1" + bytes(20) + b"payload", 1003, "unsupported"),
    "short_binary": (b"EF", 1003, "unsupported"),
    "bye_first": ('{"type": "bye", "v": 1, "reason": "", "code": 1000}', 1000, None),
    "oversized": ("x" * (2 << 20), 1009, None),
}


def test_bad_frames_get_an_error_and_a_close_code_and_the_others_are_still_served(tmp_path: Path) -> None:
    names = ["good", *BAD_FRAMES, "no_budget"]

    async def main() -> None:
        async with coordinator(tmp_path, names) as (srv, running):
            for name, (frame, close_code, error_code) in BAD_FRAMES.items():
                async with dial(srv, name) as ws:
                    # websockets 17.4: a client whose too-large message the server rejects may raise
                    # AttributeError instead of a clean close
                    with contextlib.suppress(ConnectionClosed, AttributeError):
                        await ws.send(frame)
                    code, errors = await Device(ws).closed()
                assert code == close_code, name
                if error_code is not None:
                    assert [e.code for e in errors] == [error_code], name
                    assert errors[0].message
            async with dial(srv, "no_budget") as ws:
                device = Device(ws)
                device.conn.send_hello(device_id="x", sdk_version="0", profile={"device": {}})
                await device.flush()
                code, errors = await device.closed()
            assert code == CLOSE_REJECTED and errors[0].code == "rejected" and "budget" in errors[0].message
            # After all that, a good device still joins and the run completes with it.
            async with dial(srv, "good") as ws:
                device = Device(ws)
                await device.hello()
                device.answer(await device.task())
                await device.flush()
                code, _ = await device.closed()
                assert code == CLOSE_RUN_COMPLETE
            await asyncio.wait_for(running, TIMEOUT)
        history = load_checkpoint(latest_checkpoint(tmp_path)).history  # type: ignore[arg-type]
        assert [(d["device_id"], d["status"]) for d in history[0]["devices"]] == [("good", "ok")]

    run(main())


def test_bad_updates_and_a_dropped_device_fail_only_their_own_task(tmp_path: Path) -> None:
    names = ["good", "shapes", "nan", "dropped"]

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with coordinator(tmp_path, names) as (srv, running):
            before = srv.engine.weights_digest()
            async with contextlib.AsyncExitStack() as stack:
                devices = {n: Device(await stack.enter_async_context(dial(srv, n))) for n in names}
                for device in devices.values():
                    await device.hello()
                tasks = {n: await d.task() for n, d in devices.items()}

                # wrong shapes: refused on the announced manifest, before any chunk is buffered
                wrong = {n: np.asarray(a) for n, a in tasks["shapes"].tensors.items()}
                first = next(n for n, a in wrong.items() if a.ndim == 2)
                wrong[first] = wrong[first][:, :-1].copy()
                for frame in update_frames(tasks["shapes"].task, wrong):
                    with contextlib.suppress(ConnectionClosed):
                        await devices["shapes"].ws.send(frame)
                results["shapes"] = await devices["shapes"].closed()

                # NaN: the transfer is intact, its values are not; the device gets an Error and stays
                poisoned = {n: np.array(a) for n, a in tasks["nan"].tensors.items()}
                poisoned[first].flat[0] = np.nan
                for frame in update_frames(tasks["nan"].task, poisoned):
                    await devices["nan"].ws.send(frame)
                reply = decode_message(await asyncio.wait_for(devices["nan"].ws.recv(), TIMEOUT))
                results["nan"] = reply

                # a device that disconnects mid-round
                await devices["dropped"].ws.close()

                good = tasks["good"]
                trained = {n: a + np.float32(0.01) if a.dtype.kind == "f" else a for n, a in good.tensors.items()}
                devices["good"].conn.send_update(
                    task_id=good.task.task_id,
                    tensors=trained,
                    num_samples=4,
                    metrics={},
                    peak_rss_bytes=1,
                    step_time_s=0.1,
                    train_time_s=0.1,
                    encoding="weights",
                )
                await devices["good"].flush()
                await asyncio.wait_for(running, TIMEOUT)
                results["nan_close"] = await devices["nan"].closed()
            results["changed"] = srv.engine.weights_digest() != before
        return results

    results = run(main())
    code, errors = results["shapes"]
    assert code == 1008 and errors[0].code == "bad_update" and "shape" in errors[0].message
    reply = results["nan"]
    assert isinstance(reply, Error) and reply.code == "bad_update" and "non-finite" in reply.message
    assert results["nan_close"][0] == CLOSE_RUN_COMPLETE  # the connection outlived the bad update
    assert results["changed"]
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    outcome = {d["device_id"]: (d["status"], d["reason"]) for d in state.history[0]["devices"]}
    assert outcome["good"] == ("ok", "")
    assert outcome["shapes"][0] == "failed" and "protocol violation" in outcome["shapes"][1]
    assert outcome["nan"][0] == "failed" and "update rejected" in outcome["nan"][1]
    assert outcome["dropped"][0] == "failed" and "disconnected" in outcome["dropped"][1]
    assert state.round == 1 and state_digest(state.weights) == state.history[0]["weights_digest"]
    assert json.dumps(state.history)  # plain JSON


def test_a_device_that_sends_no_hello_is_closed_in_bounded_time(tmp_path: Path) -> None:
    async def main() -> int | None:
        async with coordinator(tmp_path, ["a"], hello_timeout_s=0.5) as (srv, _), dial(srv, "a") as ws:
            code, _ = await Device(ws).closed()
            return code

    assert run(main()) == 1008


def test_the_port_file_names_the_bound_port(tmp_path: Path) -> None:
    async def main() -> tuple[int | None, str]:
        async with coordinator(tmp_path, ["a"], port_file=tmp_path / "port") as (srv, _):
            return srv.port, (tmp_path / "port").read_text()

    port, text = run(main())
    assert port is not None and int(text) == port
    with socket.socket() as probe:  # the server is gone: the port is free again
        probe.bind(("127.0.0.1", port))


def test_a_device_that_does_not_answer_in_time_is_left_out_of_the_round(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            coordinator(tmp_path, ["slow", "fast"], deadline=1.0) as (srv, running),
            dial(srv, "slow") as slow_ws,
            dial(srv, "fast") as fast_ws,
        ):
            slow, fast = Device(slow_ws), Device(fast_ws)
            await slow.hello()
            await fast.hello()
            await slow.task()  # ... and never answers
            received = await fast.task()
            fast.conn.send_update(
                task_id=received.task.task_id,
                tensors=dict(received.tensors),
                num_samples=2,
                metrics={},
                peak_rss_bytes=1,
                step_time_s=0.1,
                train_time_s=0.1,
                encoding="weights",
            )
            await fast.flush()
            await asyncio.wait_for(running, TIMEOUT)

    run(main())
    (entry,) = load_checkpoint(latest_checkpoint(tmp_path)).history  # type: ignore[arg-type]
    outcome = {d["device_id"]: (d["status"], d["reason"]) for d in entry["devices"]}
    assert outcome == {"fast": ("ok", ""), "slow": ("missing", "deadline passed")}
