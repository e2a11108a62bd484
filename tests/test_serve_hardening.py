"""The daemon against a device (or a peer) that tries to hurt it: a second connection with a device's
token, a flood of Errors, doubled headers, half-open sockets, a slow admission, and signals in every
phase. Real coordinator, real websockets on 127.0.0.1, tiny models; the signal tests run
``edge-coordinator serve`` as a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from coordinator.federation import LogLimiter, clip
from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from edge_sdk.client._backoff import Backoff
from edge_sdk.client._client import DeviceOptions, EdgeDevice
from edge_sdk.protocol import DeployReceived, DeviceConnection, ErrorCode, WelcomeReceived
from edge_sdk.protocol._closecodes import CLOSE_REPLACED, CLOSE_RUN_COMPLETE
from edge_sdk.training._train import TrainConfig, TrainResult, train_local

from ._federation import Proc, read_port, write_config
from ._federation import coordinator as coordinator_process
from .models import tiny_vocab_bert_dir
from .test_client import RandomTokens, options
from .test_server import FULL, TIMEOUT, Device, coordinator, dial, run

# ------------------------------------------------------------------------ one connection per device


def test_a_second_connection_with_a_devices_token_gets_409_and_the_device_finishes_the_run(tmp_path: Path) -> None:
    training = threading.Event()  # the device is in its first task
    release = threading.Event()

    def held_training(model: Any, batches: Any, config: TrainConfig) -> TrainResult:
        training.set()
        release.wait(TIMEOUT)
        return train_local(model, batches, config)

    async def main() -> tuple[int, int]:
        async with coordinator(tmp_path, ["a"], rounds=2) as (srv, running):
            device = EdgeDevice(options(srv, "a"), RandomTokens(), train_fn=held_training)
            joined = asyncio.ensure_future(device.run_async())
            try:
                await asyncio.wait_for(asyncio.to_thread(training.wait, TIMEOUT), TIMEOUT)
                with pytest.raises(InvalidStatus) as caught:  # someone else with the device's token
                    async with dial(srv, "a"):
                        pass
                status = caught.value.response.status_code
            finally:
                release.set()
            done = await asyncio.wait_for(joined, TIMEOUT)
            await asyncio.wait_for(running, TIMEOUT)
            return status, done

    status, done = run(main())
    assert status == 409
    assert done == 2  # the real device kept its connection and trained both rounds
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert [(d["device_id"], d["status"]) for entry in state.history for d in entry["devices"]] == [
        ("a", "ok"),
        ("a", "ok"),
    ]


def test_the_sdk_retries_a_409_and_a_close_4001_and_stops_when_the_run_is_complete() -> None:
    """Nothing another connection causes makes a device give up: only the run's end (4000) does."""
    attempts: list[str] = []

    def refuse_first(connection: ServerConnection, request: Request) -> Response | None:
        attempts.append("request")
        if len(attempts) == 1:
            return connection.respond(409, "this device is already connected\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        conn = DeviceConnection()
        conn.receive(await ws.recv())  # its Hello
        code = CLOSE_REPLACED if len(attempts) == 2 else CLOSE_RUN_COMPLETE
        await ws.close(code, "replaced by a new connection" if code == CLOSE_REPLACED else "run complete")

    async def main() -> int:
        async with serve(handler, "127.0.0.1", 0, process_request=refuse_first) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            device = EdgeDevice(
                DeviceOptions(
                    url=f"ws://127.0.0.1:{port}",
                    token="t",
                    memory_budget="1GB",
                    probe=False,
                    threads=1,
                    backoff=Backoff(initial_s=0.05, max_s=0.1, give_up_s=30),
                ),
                RandomTokens(),
            )
            return await asyncio.wait_for(device.run_async(), TIMEOUT)

    assert run(main()) == 0
    assert len(attempts) == 3  # 409, then 4001, then 4000: it stopped only at the run's end


# --------------------------------------------------------------------------------- bounded logging


def test_a_flood_of_errors_from_a_device_writes_a_bounded_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    count, size = 1000, 20_000

    async def main() -> None:
        async with coordinator(tmp_path, ["flood"]) as (srv, _), dial(srv, "flood") as ws:
            device = Device(ws)
            await device.hello()
            for i in range(count):
                device.conn.send_error(code=ErrorCode.TASK_FAILED, message=f"{i} " + "x\n" * (size // 2))
                await device.flush()
            device.conn.send_bye(reason="done", code=1000)
            await device.flush()
            await device.closed()  # the server handled every frame before the close

    with caplog.at_level(logging.INFO, logger="coordinator"):
        run(main())
    lines = [r for r in caplog.records if r.name.startswith("coordinator")]
    text = "\n".join(r.getMessage() for r in lines)
    reports = [r for r in lines if "reports" in r.getMessage()]
    assert 1 <= len(reports) <= 40, len(reports)
    assert any("log lines suppressed" in r.getMessage() for r in lines)
    assert len(text.encode()) < 40_000, len(text.encode())
    assert all(len(r.getMessage()) < 1000 and "\n" not in r.getMessage() for r in lines)


def test_a_doubled_authorization_header_gets_400_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def request(port: int, headers: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
        writer.close()
        return answer

    async def main() -> list[bytes]:
        async with coordinator(tmp_path, ["a"]) as (srv, _):
            assert srv.port is not None
            doubled = b"Authorization: Bearer token-of-a\r\nAuthorization: Bearer token-of-a\r\n"
            answers = [await request(srv.port, doubled) for _ in range(20)]
            answers.append(await request(srv.port, b"Authorization: Bearer x\r\nAuthorization: Bearer y\r\n"))
            async with dial(srv, "a") as ws:  # and the device itself still gets in
                await Device(ws).hello()
            return answers

    with caplog.at_level(logging.DEBUG):
        answers = run(main())
    assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers), answers[0][:200]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    refusals = [r for r in caplog.records if "given twice" in r.getMessage()]
    assert 1 <= len(refusals) <= 21


def test_log_limiter_allows_a_burst_then_a_rate_and_says_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("tests.limiter"), rate=2.0, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.limiter"):
        written = [limiter.warning("dev", "line %d", i) for i in range(10)]
        assert written == [True] * 3 + [False] * 7
        now[0] += 0.5  # one line's worth of rate
        assert limiter.info("dev", "after") and not limiter.info("dev", "again")
        assert limiter.info("other", "another key has its own bucket")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "line 0",
        "line 1",
        "line 2",
        "dev: 7 log lines suppressed (more than 2 a second)",
        "after",
        "another key has its own bucket",
    ]
    assert clip("a\nb\x00\udcff") == "a\\x0ab\\x00\\udcff"
    assert clip("x" * 500) == "x" * 200 + "... (300 more characters)"


# ---------------------------------------------------------------------------------- half-open sockets


def test_half_open_sockets_count_towards_max_connections_and_are_not_held_long(tmp_path: Path) -> None:
    async def main() -> tuple[int, bool]:
        async with coordinator(tmp_path, ["a"], max_connections=2, hello_timeout_s=3.0) as (srv, _):
            assert srv.port is not None
            opened = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]  # no request
            with pytest.raises(InvalidStatus) as caught:
                async with dial(srv, "a"):
                    pass
            status = caught.value.response.status_code
            # Up to twice the limit a socket is held (for its request, answered 503); beyond, closed at once.
            opened += [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(100), TIMEOUT) == b""
            first_still_open = not opened[0][0].at_eof()
            writer.close()
            for half_open, _ in opened:  # the silent ones are closed after the handshake timeout
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(half_open.read(100), TIMEOUT) == b""
            for _, w in opened:
                w.close()
            async with dial(srv, "a") as ws:  # their places are free again
                await Device(ws).hello()
            return status, first_still_open

    status, first_still_open = run(main())
    assert status == 503
    assert first_still_open


# ------------------------------------------------------------------------------- admission off-loop


def test_a_slow_admission_does_not_hold_up_other_devices(tmp_path: Path) -> None:
    release = threading.Event()
    planned_in: list[threading.Thread] = []
    released: list[bool] = []

    async def main() -> None:
        async with coordinator(tmp_path, ["slow", "fast"]) as (srv, _):
            planner = srv.engine.registry.planner
            plan = planner.plan

            def slow_plan(device_id: str, *args: Any, **kwargs: Any) -> Any:
                if device_id == "slow" and not planned_in:
                    planned_in.append(threading.current_thread())
                    released.append(release.wait(20))  # True only if the test released it
                return plan(device_id, *args, **kwargs)

            planner.plan = slow_plan  # type: ignore[method-assign]
            async with dial(srv, "slow") as slow_ws, dial(srv, "fast") as fast_ws:
                slow = Device(slow_ws)
                slow.conn.send_hello(device_id="x", sdk_version="0", profile={"budget": {"usable": 10**10}})
                await slow.flush()
                while not planned_in:  # the slow admission is under way ...
                    await asyncio.sleep(0.01)
                await Device(fast_ws).hello()  # ... and another device joins meanwhile
                release.set()
                (event,) = await slow.events()
                assert isinstance(event, WelcomeReceived)

    try:
        run(main())
    finally:
        release.set()
    assert released == [True]
    assert planned_in[0] is not threading.main_thread()


# -------------------------------------------------------------------------------- signals, any phase

TOKEN = "token-aaaa-1111"
SIGNAL_BOUND_S = 5.0  # the bound: a signal stops the daemon within 5 s in every phase


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with MiniLM's vocabulary (the packaged tokenizer applies): fast to start and train."""
    return tiny_vocab_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


def start_daemon(folder: Path, model: Path | str, *, deploy: bool = False, **config: Any) -> tuple[Proc, int]:
    config = {"rounds": 1, "seq_len": 32, "device_wait_s": 120, "levers": False, **config}  # plain weights
    path = write_config(folder, devices={"a": TOKEN}, model=str(model), **config)
    if deploy:
        path.write_text(path.read_text(encoding="utf-8") + "\n[deploy]\nenabled = true\n", encoding="utf-8")
    proc = coordinator_process(path, folder / "coordinator.log")
    return proc, read_port(folder, proc)


def stop_with(proc: Proc, sig: signal.Signals) -> int:
    """Send ``sig``; the exit code, which must come within the bound."""
    proc.popen.send_signal(sig)
    return proc.wait(SIGNAL_BOUND_S)


def checkpoint_round(folder: Path) -> int:
    """The round of the run's last checkpoint, which loads (its files' sha256 checked)."""
    return load_checkpoint(latest_checkpoint(folder / "run")).round  # type: ignore[arg-type]


@contextlib.contextmanager
def comings_and_goings(port: int) -> Iterator[None]:
    """Devices connecting and leaving at once, over and over, and a silent half-open socket meanwhile."""
    stop = threading.Event()
    request = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )

    async def churn() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                await writer.drain()
                await asyncio.wait_for(reader.read(200), 5)
                writer.close()
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)

    async def main() -> None:
        silent = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(*(churn() for _ in range(3)))
        silent[1].close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(4))
def test_a_signal_while_waiting_for_devices_stops_the_daemon_within_5_s(
    tmp_path: Path, tiny_model: Path, attempt: int
) -> None:
    sig = signal.SIGTERM if attempt % 2 == 0 else signal.SIGINT
    proc, port = start_daemon(tmp_path, tiny_model)
    try:
        proc.wait_for("waiting for devices")
        with comings_and_goings(port):
            time.sleep(0.5)
            assert stop_with(proc, sig) == 130, proc.text()[-3000:]
    finally:
        proc.kill()
    assert checkpoint_round(tmp_path) == 0


async def joined(port: int, *, deploy: bool = False) -> tuple[Device, Any]:
    """A hand-driven device, admitted, with its first task."""
    ws = await connect(
        f"ws://127.0.0.1:{port}",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        compression=None,
        max_size=8 << 20,
    )
    device = Device(ws)
    capabilities = ("train", "evaluate", "deploy") if deploy else ("train", "evaluate")
    device.conn.send_hello(
        device_id="x", sdk_version="0", profile={"budget": {"usable": FULL}}, capabilities=capabilities
    )
    await device.flush()
    (welcome,) = await device.events()
    assert isinstance(welcome, WelcomeReceived)
    return device, await device.task()


@pytest.mark.slow
def test_a_signal_mid_round_stops_the_daemon_within_5_s(tmp_path: Path, tiny_model: Path) -> None:
    proc, port = start_daemon(tmp_path, tiny_model)

    async def main() -> int:
        device, _ = await joined(port)  # ... and the task is never answered
        code = await asyncio.to_thread(stop_with, proc, signal.SIGINT)
        await device.ws.close()
        return code

    try:
        assert run(main()) == 130, proc.text()[-3000:]
    finally:
        proc.kill()
    assert checkpoint_round(tmp_path) == 0


@pytest.mark.slow
def test_a_signal_during_the_merge_and_checkpoint_stops_the_daemon_within_5_s(tmp_path: Path) -> None:
    # The real MiniLM, evaluated on 300 examples after the merge: the round's end takes seconds.
    proc, port = start_daemon(tmp_path, "all-MiniLM-L6-v2", seq_len=64, validation_rows=300)

    async def main() -> int:
        device, received = await joined(port)
        device.answer(received)
        await device.flush()
        await asyncio.sleep(1.0)  # received and checked: the merge and the evaluation are under way
        code = await asyncio.to_thread(stop_with, proc, signal.SIGTERM)
        await device.ws.close()
        return code

    try:
        assert run(main()) == 130, proc.text()[-3000:]
    finally:
        proc.kill()
    assert checkpoint_round(tmp_path) in (0, 1)  # round 1's if its checkpoint was written in time


@pytest.mark.slow
def test_a_signal_during_deploys_stops_the_daemon_within_5_s(tmp_path: Path, tiny_model: Path) -> None:
    proc, port = start_daemon(tmp_path, tiny_model, deploy=True)

    async def main() -> int:
        device, received = await joined(port, deploy=True)
        device.answer(received)
        await device.flush()
        (event,) = await device.events()  # the inference model: never answered
        assert isinstance(event, DeployReceived)
        code = await asyncio.to_thread(stop_with, proc, signal.SIGTERM)
        await device.ws.close()
        return code

    try:
        assert run(main()) == 130, proc.text()[-3000:]
    finally:
        proc.kill()
    assert checkpoint_round(tmp_path) == 1


def test_a_flood_that_ends_over_the_rate_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    """The suppressed count is written when the peer is gone (settle), not only before its next line."""
    from coordinator.federation._ratelimit import LogLimiter

    clock = [0.0]
    limiter = LogLimiter(logging.getLogger("coordinator.test"), rate=1.0, burst=2, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="coordinator"):
        for i in range(10):
            limiter.warning("dev", "line %d", i)
        assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1"]
        assert limiter.settle("dev") == 8 and limiter.settle("dev") == 0 and limiter.settle("unknown") == 0
    assert caplog.records[-1].getMessage() == "dev: 8 log lines suppressed (more than 1 a second)"
