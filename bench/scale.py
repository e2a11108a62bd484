"""Scale benchmark: a thousand devices on one coordinator, one round trained by a hundred of them.

    python bench/scale.py [--devices 1000] [--train 100] [--procs 4] [--idle-s 10] [--ping-every 2]
                          [--no-data-channel] [--json]

Three kinds of process, all on 127.0.0.1 (multiprocessing, spawn):

- **the coordinator**: the real daemon's parts (``load_config`` of a ``run.toml``, ``build_engine``,
  ``CoordinatorServer``) serving a tiny random BERT (2 layers, hidden 32, vocabulary 64) to
  ``--devices`` named devices; ``[server] max_connections`` is set above the device count, deploys
  are off, one round of ``fraction = train / devices``. It measures itself: its resident set (psutil)
  before any device connects and once all are connected and idle for ``--idle-s`` seconds, and its
  event loop's worst stall in each phase (the status port's lag probe, ``watch_loop_lag``, every
  20 ms). The round's times come from the engine's own calls, timestamped: orders made
  (``begin_round``), each task's bytes delivered (``record_traffic``), each update accepted
  (``accept_update``), the merge and checkpoint done (``finish_round``).
- **``--procs`` device processes**, the devices split between them: each device is a websocket
  (the ``websockets`` asyncio client) driven by the SDK's sans-I/O ``DeviceConnection``: Hello with
  a 4 GiB budget, then tasks. As the SDK client does by default, each device also opens the data channel
  the coordinator offers in its Welcome (a second TCP connection for tensor chunks, read straight into
  place), so an idle device costs the coordinator two sockets; ``--no-data-channel`` keeps every device
  on its websocket alone. A device given a task trains it for real with the SDK's ``TaskRunner``
  (two AdamW steps on synthetic token batches, one training thread per process) and answers with
  the Update the SDK would send. Every device pings the coordinator every ``--ping-every`` seconds
  (random phase) and times the pong: "late" above 1 s, "unanswered" after 20 s (the coordinator's
  own keepalive would then close the link). The device processes measure their own loop stalls too:
  a late pong counts both ends.
- **this process**, which writes the config, starts the others, and tells the coordinator to start
  the round once every device has its Welcome.

The run completes after its one round (the coordinator says goodbye to every device). Printed: RSS
per connected device (idle), time to connect everyone, to send all tasks, to receive all replies,
the worst stall per phase, the pings. Every wait is bounded (``TIMEOUT_S``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's packages, in this process and in the spawned ones

TIMEOUT_S = 600.0  # bound on every wait of the benchmark
PING_LATE_S = 1.0  # a pong later than this is late
PING_GIVE_UP_S = 20.0  # a ping without a pong this long is unanswered
LAG_INTERVAL_S = 0.02  # the lag probe's period (its sleep), in the coordinator and in the device processes
DEVICE_NICE = 10  # the device processes' niceness, relative to the coordinator's
USABLE_BYTES = 4 << 30  # the budget each device declares
SAMPLES = 16  # examples each device holds (declared in its Hello)
TINY_BERT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def token(name: str) -> str:
    return f"bench-token-of-{name}"


def write_run(folder: Path, devices: int, train: int) -> Path:
    """The run's ``run.toml``: ``devices`` named devices, one round on ``train`` of them."""
    fraction = train / devices
    while math.ceil(fraction * devices) > train:  # 0.1 x 1000 must not round up to 101
        fraction = math.nextafter(fraction, 0.0)
    names = "".join(f'd{i:05d} = "{token(f"d{i:05d}")}"\n' for i in range(devices))
    text = f"""
[model]
name = "{folder / "model"}"
[federation]
rounds = 1
fraction = {fraction!r}
min_devices = {train}
device_wait_s = {TIMEOUT_S}
round_deadline_s = {TIMEOUT_S}
[training]
local_steps = 2
batch_size = 4
seq_len = 16
lr = 1e-3
[server]
host = "127.0.0.1"
port = 0
max_connections = {devices + 64}
hello_timeout_s = 60
[devices]
{names}
[run]
dir = "run"
[deploy]
enabled = false
"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Stalls:
    """The lag probe's sink: per phase, the worst event-loop delay (``watch_loop_lag`` feeds it), the
    wall time and the process's CPU time (a loop starved of CPU stalls without being busy)."""

    def __init__(self) -> None:
        self.phase = "start"
        self.worst: dict[str, float] = {}
        self.busy: dict[str, float] = {}  # the loop thread's most CPU between two of the probe's wake-ups
        self.gc: dict[str, float] = {}  # the longest garbage collection (any thread)
        self._thread_cpu = time.thread_time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._since = (time.monotonic(), _cpu_s())
        self._gc_start = 0.0
        import gc

        gc.callbacks.append(self._collecting)

    def _collecting(self, stage: str, _info: dict[str, int]) -> None:
        if stage == "start":
            self._gc_start = time.monotonic()
        else:
            self.gc[self.phase] = max(self.gc.get(self.phase, 0.0), time.monotonic() - self._gc_start)

    def enter(self, phase: str) -> None:
        wall, cpu = time.monotonic(), _cpu_s()
        self.wall[self.phase] = self.wall.get(self.phase, 0.0) + wall - self._since[0]
        self.cpu[self.phase] = self.cpu.get(self.phase, 0.0) + cpu - self._since[1]
        self.phase, self._since = phase, (wall, cpu)

    def loop_lag(self, seconds: float) -> None:
        """Called by the probe in the loop's thread after each of its sleeps, ``seconds`` late."""
        cpu, self._thread_cpu = self._thread_cpu, time.thread_time()
        self.worst[self.phase] = max(self.worst.get(self.phase, 0.0), seconds)
        self.busy[self.phase] = max(self.busy.get(self.phase, 0.0), self._thread_cpu - cpu)

    def table(self) -> dict[str, dict[str, float]]:
        return {
            p: {
                "wall_s": self.wall[p],
                "cpu_s": self.cpu[p],
                "worst_stall_s": self.worst.get(p, 0.0),
                "worst_busy_s": self.busy.get(p, 0.0),
                "longest_gc_s": self.gc.get(p, 0.0),
            }
            for p in self.wall
        }


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def probe(sink: Stalls, interval_s: float = LAG_INTERVAL_S) -> None:
    """The coordinator's own probe when it has one (``watch_loop_lag``), else the same loop here."""
    try:
        from coordinator.serve._metrics import watch_loop_lag
    except ImportError:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval_s)
            sink.loop_lag(loop.time() - before - interval_s)
    else:
        await watch_loop_lag(sink, interval_s)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the coordinator


class Marks:
    """Timestamps of the engine's calls during the round (the wrapped methods behave as before)."""

    def __init__(self, engine: Any, stalls: Stalls) -> None:
        self.admitted = 0
        self.begun = math.nan
        self.sent: list[float] = []
        self.accepted: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.finished = math.nan
        self.longest: dict[str, float] = {}  # the longest call of each method
        self._stalls = stalls
        self._hook(engine, "admit", lambda *_: setattr(self, "admitted", self.admitted + 1))
        self._hook(engine, "begin_round", lambda *_: setattr(self, "begun", time.monotonic()))
        self._hook(engine, "record_traffic", self._traffic)
        self._hook(engine, "accept_update", self._accepted)
        self._hook(engine, "finish_round", self._finished)

    def _hook(self, engine: Any, name: str, after: Callable[..., None]) -> None:
        original = getattr(engine, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            result = original(*args, **kwargs)
            self.longest[name] = max(self.longest.get(name, 0.0), time.monotonic() - start)
            after(result, *args, **kwargs)
            return result

        setattr(engine, name, wrapped)

    def _traffic(self, _result: None, _device: str, *, bytes_out: int = 0, bytes_in: int = 0) -> None:
        if bytes_out > 0:
            self.sent.append(time.monotonic())

    def _accepted(self, outcome: Any, *_: Any, **__: Any) -> None:
        if outcome.status == "ok":
            self.accepted.append(time.monotonic())

    def _finished(self, summary: Any, *_: Any) -> None:
        self.finished = time.monotonic()
        self._stalls.enter("goodbye")
        for outcome in summary.outcomes:
            self.outcomes[outcome.status] = self.outcomes.get(outcome.status, 0) + 1


def write_model(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=2, **TINY_BERT)
    transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)


def coordinator_main(folder: str, options: Options, pipe: Connection) -> None:
    """The coordinator process: build the run of ``folder/run.toml``, serve it, report its figures."""
    import logging

    logging.basicConfig(
        filename=Path(folder) / "coordinator.log",
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message).300s",
    )
    from coordinator.federation import load_config
    from coordinator.serve import build_engine

    write_model(Path(folder) / "model")
    config = load_config(Path(folder) / "run.toml")
    engine = build_engine(config)
    if not options.profile:
        pipe.send(("done", asyncio.run(_coordinate(config, engine, options, pipe))))
        return
    import cProfile
    import pstats

    catcher = StallCatcher()
    with cProfile.Profile() as profiler:  # the event loop's thread only: what stalls it
        result = asyncio.run(_coordinate(config, engine, options, pipe, catcher))
    profiler.dump_stats(Path(folder) / "coordinator.prof")
    with (Path(folder) / "coordinator-profile.txt").open("w", encoding="utf-8") as out:
        catcher.report(out)
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
    pipe.send(("done", result))


class StallCatcher:
    """A thread that, while the event loop is late (no heartbeat for 200 ms), samples the loop thread's
    stack every 50 ms: where the stalls are spent (with ``--profile``)."""

    def __init__(self, late_s: float = 0.2) -> None:
        import collections
        import threading

        self.late_s = late_s
        self.beat = time.monotonic()
        self.samples: collections.Counter[str] = collections.Counter()
        self._loop_thread = threading.get_ident()
        threading.Thread(target=self._watch, daemon=True, name="stall-catcher").start()

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(0.02)

    def _watch(self) -> None:
        import traceback

        clock = time.pthread_getcpuclockid(self._loop_thread)
        cpu = time.clock_gettime(clock)
        while True:
            time.sleep(0.05)
            cpu, used = time.clock_gettime(clock), time.clock_gettime(clock) - cpu
            frame = sys._current_frames().get(self._loop_thread)
            if time.monotonic() - self.beat > self.late_s and frame is not None:
                state = "busy" if used > 0.025 else "waiting"  # the loop thread ran, or did not, since the last look
                stack = traceback.extract_stack(frame)[-14:]
                self.samples[f"{state}:\n" + "".join(traceback.format_list(stack))] += 1

    def report(self, out: Any) -> None:
        total = sum(self.samples.values())
        out.write(f"{total} samples (50 ms apart) of the event loop's stack while it was late\n")
        for stack, count in self.samples.most_common(16):
            out.write(f"\n---- {count} samples:\n{stack}")
        out.write("\n\n")


async def _coordinate(
    config: Any, engine: Any, options: Options, pipe: Connection, catcher: StallCatcher | None = None
) -> dict[str, Any]:
    from coordinator.serve import CoordinatorServer
    from coordinator.serve._run import freeze_heap

    stalls = Stalls()
    marks = Marks(engine, stalls)
    lag = asyncio.ensure_future(probe(stalls))
    beats = None
    if catcher is not None:
        beats = asyncio.ensure_future(catcher.heartbeat())
    server = CoordinatorServer(engine, config.server, config.devices, run_dir=config.run.dir, deploy=config.deploy)
    if options.freeze:
        freeze_heap()  # as serve_async does
    port = await server.start()
    await asyncio.sleep(1.0)
    before = await _settled_rss(stalls)
    samples: list[tuple[int, int]] = []  # (devices admitted, RSS) while devices connect
    sampler = asyncio.ensure_future(_sample(marks, samples))
    stalls.enter("connect")
    pipe.send(("port", port))
    started = time.monotonic()
    await asyncio.to_thread(pipe.recv)  # "go": every device has its Welcome
    connected_s = time.monotonic() - started
    stalls.enter("idle")
    await asyncio.sleep(options.idle_s)
    idle = await _settled_rss(stalls)
    sampler.cancel()
    stalls.enter("round")
    peak = [idle]
    peaks = asyncio.ensure_future(_peak_rss(peak))
    await asyncio.wait_for(server.run(), TIMEOUT_S)  # the round, then goodbye to every device
    peaks.cancel()
    lag.cancel()
    stalls.enter("end")
    if beats is not None:
        beats.cancel()
    devices = len(config.devices)
    half = [rss for admitted, rss in samples if admitted >= devices // 2]
    return {
        "devices": devices,
        "rss_before": before,
        "rss_idle": idle,
        "rss_per_device": (idle - before) / devices,
        "rss_per_device_marginal": (idle - half[0]) / (devices - devices // 2) if half else math.nan,
        "rss_round_peak": peak[0],
        "connect_s": connected_s,
        "send_all_s": max(marks.sent) - marks.begun if marks.sent else math.nan,
        "tasks_sent": len(marks.sent),
        "receive_all_s": max(marks.accepted) - marks.begun if marks.accepted else math.nan,
        "merge_s": marks.finished - max(marks.accepted) if marks.accepted else math.nan,
        "outcomes": marks.outcomes,
        "longest_call_s": marks.longest,
        "phases": stalls.table(),
    }


async def _settled_rss(stalls: Stalls) -> int:
    """The resident set after a full collection (counted as phase "measure", not the next phase)."""
    import gc

    phase = stalls.phase
    stalls.enter("measure")
    gc.collect()
    rss = rss_bytes()
    await asyncio.sleep(3 * LAG_INTERVAL_S)  # the probe wakes up, and counts this stall here
    stalls.enter(phase)
    return rss


async def _sample(marks: Marks, samples: list[tuple[int, int]]) -> None:
    while True:
        samples.append((marks.admitted, rss_bytes()))
        await asyncio.sleep(0.25)


async def _peak_rss(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes())
        await asyncio.sleep(0.1)


# -------------------------------------------------------------------------------------- devices


class Tokens:
    """Synthetic token batches for the tiny BERT (ids 3..63, ragged rows, padding 0)."""

    def __len__(self) -> int:
        return SAMPLES

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, Any]]:
        import numpy as np

        rng = np.random.default_rng(seed)
        while True:
            lengths = rng.integers(2, seq_len + 1, size=batch_size)
            ids = np.zeros((batch_size, int(lengths.max())), dtype=np.int64)
            for i, n in enumerate(lengths):
                ids[i, :n] = rng.integers(3, TINY_BERT["vocab_size"], size=n)
            yield {
                "input_ids": ids,
                "attention_mask": (ids > 0).astype(np.int64),
                "labels": rng.integers(0, 2, batch_size),
            }


class DeviceStats:
    def __init__(self) -> None:
        self.welcomed = 0
        self.refused: list[str] = []  # devices that never got a Welcome, and why
        self.retries = 0
        self.tasks = 0
        self.updates = 0
        self.on_channel = 0  # transfers received on the data channel (tasks whose weights came there)
        self.pings = 0
        self.late = 0
        self.unanswered = 0
        self.worst_pong_s = 0.0
        self.closes: dict[str, int] = {}
        self.stalls = Stalls()


def devices_main(port: int, names: list[str], ping_every: float, data_channel: bool, pipe: Connection) -> None:
    """A device process: connect ``names``, report when all have a Welcome, serve tasks until closed.

    Niced (``DEVICE_NICE``): the devices stand for other machines, so they yield the CPU to the
    coordinator, whose stalls this measures.
    """
    os.nice(DEVICE_NICE)
    fleet = Fleet(port, len(names), ping_every, data_channel)
    asyncio.run(fleet.run(names, pipe))
    stats = fleet.stats
    report = {k: v for k, v in vars(stats).items() if k != "stalls"}
    pipe.send(("done", {**report, "stall_worst_s": max(stats.stalls.worst.values(), default=0.0)}))


class Fleet:
    """One device process's devices: each a websocket and a ``DeviceConnection``, sharing one trainer."""

    def __init__(self, port: int, count: int, ping_every: float, data_channel: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from edge_sdk import TaskRunner

        self.port = port
        self.count = count
        self.ping_every = ping_every
        self.data_channel = data_channel
        self.stats = DeviceStats()
        self.runner = TaskRunner(Tokens(), threads=1)  # type: ignore[arg-type]
        self.trainer = ThreadPoolExecutor(1, thread_name_prefix="train")  # one training at a time
        self.ready = asyncio.Event()
        self.opening = asyncio.Semaphore(32)  # handshakes under way at once (the listen backlog is 100)

    async def run(self, names: list[str], pipe: Connection) -> None:
        lag = asyncio.ensure_future(probe(self.stats.stalls))
        devices = [asyncio.ensure_future(self.device(name)) for name in names]
        await asyncio.wait_for(self.ready.wait(), TIMEOUT_S)
        pipe.send(("welcomed", self.stats.welcomed, self.stats.refused[:5]))
        await asyncio.wait(devices, timeout=TIMEOUT_S)  # until the coordinator says goodbye
        lag.cancel()
        self.trainer.shutdown(wait=False)

    def _answered(self) -> None:
        if self.stats.welcomed + len(self.stats.refused) == self.count:
            self.ready.set()

    async def device(self, name: str) -> None:
        """Connect as ``name``, say Hello, then train every task until the coordinator closes."""
        from websockets.exceptions import ConnectionClosed

        from edge_sdk import __version__
        from edge_sdk.client import open_data_channel
        from edge_sdk.protocol import FEATURE_DATA_CHANNEL, DeviceConnection, TaskReceived, WelcomeReceived, WireLimits

        stats, limits = self.stats, WireLimits()
        conn = DeviceConnection(limits=limits)
        channel = None
        try:
            async with self.opening:
                ws = await _open(self.port, name, limits, stats)
                profile = {"budget": {"usable": USABLE_BYTES}, "data": {"num_samples": SAMPLES}}
                features = (FEATURE_DATA_CHANNEL,) if self.data_channel else ()
                conn.send_hello(device_id=name, sdk_version=__version__, profile=profile, capabilities=features)
                await _flush(ws, conn, None)
                events = conn.receive(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                welcome = next((e.welcome for e in events if isinstance(e, WelcomeReceived)), None)
                if welcome is None:
                    raise RuntimeError(f"no Welcome: {events}")
                if welcome.data_token:  # as the SDK client does
                    channel = await open_data_channel(
                        "127.0.0.1", welcome.data_port, welcome.data_token, ssl_context=None
                    )
                    conn.channel_opened()
        except Exception as exc:  # reported, not raised: the other devices go on
            stats.refused.append(f"{name}: {exc!r}"[:300])
            self._answered()
            return
        stats.welcomed += 1
        self._answered()
        pinger = asyncio.ensure_future(_pings(ws, self.ping_every, stats))
        loop = asyncio.get_running_loop()
        try:
            async for frame in ws:
                events = conn.receive(frame)
                if conn.channel_receiving:  # the transfer this message announced comes on the data channel
                    stats.on_channel += 1
                    events += await channel.receive(conn) if channel is not None else conn.channel_broken("none")
                for event in events:
                    if isinstance(event, TaskReceived):
                        stats.tasks += 1
                        out = await loop.run_in_executor(self.trainer, self.runner.train, event.task, event.tensors)
                        out.send(conn, event.task.task_id)
                        stats.updates += 1
                await _flush(ws, conn, channel)
        except ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            if channel is not None:
                channel.close()
            code = str(ws.close_code)
            stats.closes[code] = stats.closes.get(code, 0) + 1


async def _open(port: int, name: str, limits: Any, stats: DeviceStats) -> Any:
    """Connect as ``name`` (a refused or dropped attempt is retried, at most 20 times)."""
    from websockets.asyncio.client import connect

    for attempt in range(20):
        try:
            return await connect(
                f"ws://127.0.0.1:{port}",
                additional_headers={"Authorization": f"Bearer {token(name)}"},
                max_size=limits.max_frame_bytes,
                compression=None,
                open_timeout=60,
                ping_interval=None,  # this bench pings itself, and times the pongs
                close_timeout=10,
            )
        except Exception:  # refused (503, reset) or slow: try again
            if attempt == 19:
                raise
            stats.retries += 1
            await asyncio.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


async def _flush(ws: Any, conn: Any, channel: Any) -> None:
    """Everything ``conn`` queued: messages on the websocket, a transfer announced on the data channel there."""
    from edge_sdk.protocol import ChannelSend

    for frame in conn.frames_to_send(fragments=True):
        if isinstance(frame, ChannelSend):
            await channel.send(frame)
        else:
            await ws.send(frame)


async def _pings(ws: Any, every: float, stats: DeviceStats) -> None:
    from websockets.exceptions import ConnectionClosed

    await asyncio.sleep(random.uniform(0.0, every))
    while True:
        sent = time.monotonic()
        try:
            pong = await ws.ping()
        except ConnectionClosed:
            return
        done, _ = await asyncio.wait({pong}, timeout=PING_GIVE_UP_S)
        if not done or pong.exception() is not None:  # unanswered, or the connection went meanwhile
            if ws.close_code is None:
                stats.unanswered += 1
            return
        stats.pings += 1
        latency = time.monotonic() - sent
        stats.worst_pong_s = max(stats.worst_pong_s, latency)
        stats.late += latency > PING_LATE_S
        await asyncio.sleep(every)


# ----------------------------------------------------------------------------------------- main


def _recv(pipe: Connection, what: str) -> Any:
    if not pipe.poll(TIMEOUT_S):
        raise RuntimeError(f"no {what} within {TIMEOUT_S:.0f} s")
    return pipe.recv()


@dataclass(frozen=True)
class Options:
    devices: int = 1000
    train: int = 100  # devices in the round
    procs: int = 4  # device processes
    idle_s: float = 10.0  # all connected and idle this long before the round
    ping_every: float = 2.0  # seconds between a device's pings
    profile: bool = False  # cProfile the coordinator's event loop (folder/coordinator-profile.txt)
    freeze: bool = True  # freeze the startup heap out of garbage collection, as serve_async does
    data_channel: bool = True  # devices take the data channel the coordinator offers (the SDK's default)


def run(options: Options, folder: Path) -> dict[str, Any]:
    """Run the benchmark in ``folder``; the figures (see the module's docstring)."""
    devices, procs = options.devices, options.procs
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # children inherit the limit
    want = min(hard, max(soft, 3 * devices + 256))  # a websocket and a data channel per device
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_run(folder, devices, options.train)
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    coordinator = spawn.Process(target=coordinator_main, args=(str(folder), options, theirs), daemon=True)
    coordinator.start()
    children = [coordinator]
    try:
        _, port = _recv(ours, "port")
        names = [f"d{i:05d}" for i in range(devices)]
        pipes = []
        for k in range(procs):
            mine, child = spawn.Pipe()
            proc = spawn.Process(
                target=devices_main,
                args=(port, names[k::procs], options.ping_every, options.data_channel, child),
                daemon=True,
            )
            proc.start()
            children.append(proc)
            pipes.append(mine)
        welcomed = [_recv(p, "Welcome count") for p in pipes]
        ours.send("go")
        _, coordinated = _recv(ours, "the coordinator's figures")
        reports = [_recv(p, "a device process's figures")[1] for p in pipes]
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    return _summary(options, coordinated, welcomed, reports)


def _summary(options: Options, coordinated: dict[str, Any], welcomed: list[Any], reports: list[Any]) -> dict[str, Any]:
    total = {
        key: sum(r[key] for r in reports)
        for key in ("welcomed", "retries", "tasks", "updates", "on_channel", "pings", "late", "unanswered")
    }
    closes: dict[str, int] = {}
    for r in reports:
        for code, n in r["closes"].items():
            closes[code] = closes.get(code, 0) + n
    return {
        "devices": options.devices,
        "train": options.train,
        "procs": options.procs,
        "data_channel": options.data_channel,
        "coordinator": coordinated,
        "devices_side": {
            **total,
            "refused": [x for _, _, refused in welcomed for x in refused],
            "worst_pong_s": max(r["worst_pong_s"] for r in reports),
            "closes": closes,
            "stall_worst_s": max(r["stall_worst_s"] for r in reports),
        },
    }


def text(result: dict[str, Any]) -> str:
    c, d = result["coordinator"], result["devices_side"]
    stalls = ", ".join(
        f"{phase} {p['worst_stall_s'] * 1000:.0f} ms (busy {p['worst_busy_s'] * 1000:.0f} ms,"
        f" gc {p['longest_gc_s'] * 1000:.0f} ms;"
        f" {p['cpu_s']:.1f} s CPU in {p['wall_s']:.1f} s)"
        for phase, p in c["phases"].items()
        if phase not in ("start", "measure")
    )
    merged = c["outcomes"].get("ok", 0)
    return "\n".join(
        [
            f"{result['devices']} devices in {result['procs']} processes, {d['welcomed']} welcomed"
            f" ({d['retries']} retried connects), one round on {result['train']} (tiny BERT, 2 AdamW steps each);"
            f" {'a websocket and a data channel' if result.get('data_channel') else 'a websocket alone'} per device",
            f"coordinator RSS: {c['rss_before'] / 2**20:.1f} MiB before, {c['rss_idle'] / 2**20:.1f} MiB with all"
            f" connected and idle: {c['rss_per_device'] / 1024:.1f} KiB per device"
            f" (second half alone: {c['rss_per_device_marginal'] / 1024:.1f} KiB); peak in the round"
            f" {c['rss_round_peak'] / 2**20:.1f} MiB",
            f"all connected and welcomed in {c['connect_s']:.1f} s",
            f"round: {c['tasks_sent']} tasks sent in {c['send_all_s']:.2f} s, {merged} replies received in"
            f" {c['receive_all_s']:.2f} s, merged and checkpointed {c['merge_s']:.2f} s later;"
            f" outcomes {c['outcomes']}",
            f"coordinator event loop, worst stall: {stalls}",
            f"pings: {d['pings']} answered, worst {d['worst_pong_s'] * 1000:.0f} ms, {d['late']} later than"
            f" {PING_LATE_S:.0f} s, {d['unanswered']} unanswered (device processes' own worst stall"
            f" {d['stall_worst_s'] * 1000:.0f} ms)",
            f"device tasks: {d['tasks']} received ({d['on_channel']} on the data channel), {d['updates']} answered;"
            f" close codes {d['closes']}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--train", type=int, default=100, help="devices in the round")
    parser.add_argument("--procs", type=int, default=4, help="device processes")
    parser.add_argument("--idle-s", type=float, default=10.0, help="all connected and idle this long before the round")
    parser.add_argument("--ping-every", type=float, default=2.0, help="seconds between a device's pings")
    parser.add_argument("--profile", action="store_true", help="cProfile the coordinator's event loop (with --keep)")
    parser.add_argument("--no-freeze", action="store_true", help="leave the startup heap to the collector")
    parser.add_argument("--no-data-channel", action="store_true", help="devices keep their websocket alone")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="run in this folder (kept: the coordinator's log)")
    args = parser.parse_args()
    if not 0 < args.train <= args.devices:
        parser.error("--train must be in 1..--devices")
    with tempfile.TemporaryDirectory(prefix="edge-fm-scale-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        options = Options(
            args.devices,
            args.train,
            args.procs,
            args.idle_s,
            args.ping_every,
            args.profile,
            not args.no_freeze,
            not args.no_data_channel,
        )
        result = run(options, folder)
    print(json.dumps(result, indent=1) if args.json else text(result))


if __name__ == "__main__":
    main()
