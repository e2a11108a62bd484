"""The coordinator's send path: one encoding per sub-network shared by its devices, made and checked
off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedOK

from coordinator.serve import _connection
from coordinator.serve._connection import Connection, SharedEncodings
from edge_sdk import websocket_messages
from edge_sdk.protocol import (
    FEATURE_CHUNK_XXH3,
    CoordinatorConnection,
    DeviceConnection,
    EncodedTensors,
    Fragment,
    TaskReceived,
    TrainSettings,
    UpdateReceived,
    WelcomeReceived,
    prepare_tensors,
)
from edge_sdk.protocol._assembler import TensorAssembler

from .test_server import Device, coordinator, dial, run


def test_shared_encodings_encode_each_set_of_tensors_once() -> None:
    one = {"w": np.ones((64, 64), np.float32)}
    other = {"w": np.zeros((64, 64), np.float32)}

    async def main() -> tuple[list[EncodedTensors], int]:
        shared = SharedEncodings()
        got = await asyncio.gather(shared.get(one), shared.get(one), shared.get(other), shared.get(one))
        return list(got), shared.prepared

    got, prepared = asyncio.run(main())
    assert got[0] is got[1] is got[3] and got[2] is not got[0]
    assert prepared == 2


def test_the_event_loop_runs_while_a_task_is_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoding waits for a coroutine to run: were it on the event loop, it would never finish."""
    other_ran = threading.Event()
    seen: list[bool] = []

    def slow_prepare(tensors: Any) -> EncodedTensors:
        seen.append(other_ran.wait(30))  # set by a coroutine while this encoding is under way
        return prepare_tensors(tensors)

    monkeypatch.setattr(_connection, "prepare_tensors", slow_prepare)

    async def main() -> EncodedTensors:
        async def other() -> None:
            await asyncio.sleep(0)
            other_ran.set()

        encoding = asyncio.ensure_future(SharedEncodings().get({"w": np.ones(1 << 20, np.float32)}))
        await other()
        return await encoding

    encoded = asyncio.run(main())
    assert seen == [True] and encoded.total_bytes > 4 << 20


def test_devices_of_one_sub_network_share_one_encoding(tmp_path: Path) -> None:
    names = ["a", "b", "c"]

    async def main() -> tuple[int, set[str], bool]:
        async with coordinator(tmp_path, names) as (srv, running), contextlib.AsyncExitStack() as stack:
            devices = [Device(await stack.enter_async_context(dial(srv, n))) for n in names]
            for device in devices:
                await device.hello()
            tasks = [await device.task() for device in devices]
            for device, task in zip(devices, tasks, strict=True):
                device.answer(task)
                await device.flush()
            await asyncio.wait_for(running, 60)
            ids = {t.task.weights.transfer_id for t in tasks}
            same = all(np.array_equal(tasks[0].tensors[n], t.tensors[n]) for t in tasks[1:] for n in tasks[0].tensors)
            return srv.encodings.prepared, ids, same

    prepared, ids, same = run(main())
    assert prepared == 1  # three devices, one sub-network: one encoding
    assert len(ids) == 3 and same  # each transfer its own id, the same bytes


class _Session:
    """Just what ``Connection.receive`` uses of a DeviceSession."""

    def __init__(self, conn: CoordinatorConnection) -> None:
        self.conn = conn
        self.events: list[Any] = []

    def receive(self, frame: str | bytes, now: float) -> None:
        self.events += self.conn.receive(frame)

    def owned(self) -> str | None:
        return None


def test_received_chunks_are_checked_in_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    verify = TensorAssembler.verify

    def recording_verify(self: TensorAssembler) -> None:
        if self.backlog:  # a call with chunks to check (finish() calls it once more, to wait for a worker)
            threads.append(threading.current_thread().name)
        verify(self)

    monkeypatch.setattr(TensorAssembler, "verify", recording_verify)
    tensors = {"w": np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)}  # 4 MiB: 5 chunks
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0", profile={})
    coord.receive(dev.data_to_send()[0])
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    dev.receive(coord.data_to_send()[0])
    settings = TrainSettings(local_steps=1, lr=0.1, batch_size=1, seq_len=8)
    coord.send_train_task(task_id="t", round=0, spec={}, model_config={}, settings=settings, tensors=tensors)
    (received,) = [e for frame in coord.data_to_send() for e in dev.receive(frame)]
    assert isinstance(received, TaskReceived)
    dev.send_update(
        task_id="t",
        tensors=received.tensors,
        num_samples=1,
        metrics={},
        peak_rss_bytes=0,
        step_time_s=0.0,
        train_time_s=0.0,
        encoding="weights",
    )
    session = _Session(coord)
    connection = Connection(None, session)  # type: ignore[arg-type]  # receive() touches no socket

    threads.clear()  # the device's checks of the task ran inline: only the coordinator's count

    async def main() -> None:
        for frame in dev.data_to_send():
            await connection.receive(frame, 0.0)

    asyncio.run(main())
    assert any(isinstance(e, UpdateReceived) for e in session.events)
    main_thread = threading.main_thread().name
    assert len(threads) >= 4 and threads[-1] == main_thread  # the last chunk inline, at most one chunk
    assert all(name != main_thread for name in threads[:-1]), threads  # every other chunk in a worker


def test_websocket_messages_yield_text_whole_and_binary_piece_by_piece() -> None:
    """Over a real websocket: a fragmented binary message arrives as its frames, never joined."""

    async def main() -> list[str | Fragment]:
        async def handler(ws: ServerConnection) -> None:
            await ws.send(["{", '"a": 1}'])  # a fragmented text message: whole
            await ws.send([b"head", memoryview(b"x" * 1000), b"tail"])
            await ws.send(b"one")
            await ws.close()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            got: list[str | Fragment] = []
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                with contextlib.suppress(ConnectionClosedOK):
                    async for message in websocket_messages(ws):
                        got.append(message)
            return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got[0] == '{"a": 1}'
    fragments = [f for f in got[1:] if isinstance(f, Fragment)]
    assert len(fragments) == len(got) - 1
    ends = [i for i, f in enumerate(fragments) if f.fin]
    first, second = fragments[: ends[0] + 1], fragments[ends[0] + 1 :]
    assert len(ends) == 2 and ends[1] == len(fragments) - 1
    # websockets ends a fragmented message with an empty final frame: the pieces are the frames sent
    assert [bytes(f.data) for f in first if f.data] == [b"head", b"x" * 1000, b"tail"]
    assert [bytes(f.data) for f in second] == [b"one"]


def test_an_older_device_gets_sha256_and_a_newer_one_chunk_digests_in_the_same_round(tmp_path: Path) -> None:
    names = ["new", "old"]

    async def main() -> list[TaskReceived]:
        async with coordinator(tmp_path, names) as (srv, running), contextlib.AsyncExitStack() as stack:
            new, old = [Device(await stack.enter_async_context(dial(srv, n))) for n in names]
            await new.hello()
            old.conn.send_hello(device_id="old", sdk_version="0", profile={"budget": {"usable": 1 << 34}})
            (hello,) = old.conn.data_to_send()
            assert isinstance(hello, str) and FEATURE_CHUNK_XXH3 in hello
            older = json.loads(hello)
            older["capabilities"].remove(FEATURE_CHUNK_XXH3)  # as an SDK without the feature says it
            await old.ws.send(json.dumps(older))
            (welcomed,) = await old.events()
            assert isinstance(welcomed, WelcomeReceived)
            assert not old.conn.chunk_xxh3
            tasks = [await device.task() for device in (new, old)]
            for device, task in zip((new, old), tasks, strict=True):
                device.answer(task)
                await device.flush()
            await asyncio.wait_for(running, 60)
            return tasks

    new_task, old_task = run(main())
    assert new_task.task.weights.chunk_xxh3 and not new_task.task.weights.sha256
    assert len(old_task.task.weights.sha256) == 64 and not old_task.task.weights.chunk_xxh3
