"""A live coordinator under fuzz: a real ``CoordinatorServer`` on 127.0.0.1 (port 0) with a small
random-weight BERT, fuzz devices sending mutated frames (``tests/_fuzz.py``) over real websockets,
and one well-behaved device (the keeper) so that rounds keep starting and tasks keep coming.

The contract each fuzzed connection is held to: the coordinator ends it with a close frame carrying a
documented code (:data:`DOCUMENTED_CODES`, or the code of a Bye the device sent), never 1011, never
without a close frame, never hung. A connection may stay open through every frame the device sent
only legitimately: each episode ends with a valid ``Bye(1000)``, which a connection still open
answers by closing with 1000 (its frames were all acceptable: a rejected update or an Error about
no task keep a connection open by design). Such a connection counts as ``open`` in the histogram.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from coordinator.federation._config import FederationConfig, ServerConfig
from coordinator.federation._engine import FederationEngine
from coordinator.serve._server import CoordinatorServer
from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    ROWS_SUFFIX,
    Bye,
    DeviceConnection,
    ProtocolViolation,
    TaskReceived,
    TrainTask,
    Update,
    WelcomeReceived,
    decode_message,
    encode_message,
    encode_tensors,
)
from edge_sdk.scaling._parent import ParentModel, parent_from_module
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1

from . import _fuzz as fz
from .test_engine import TRAINING

# What the coordinator may close a device's connection with: normal, going away, protocol error,
# unsupported data, policy violation, too big, try again, run complete, replaced, rejected.
DOCUMENTED_CODES = frozenset({1000, 1001, 1002, 1003, 1008, 1009, 1013, 4000, 4001, 4003})
BUDGET = 10**10
PROBE_REASON = "fuzz episode over"
PROBE = encode_message(Bye(reason=PROBE_REASON, code=1000))
WAIT_S = 20.0  # bound on any one wait for the coordinator (a welcome, a close)
TASK_WAIT_S = 4.0  # for a task: rounds start at least every 0.3 s + 1 s (wait + deadline) + merging
KINDS = ("pre_hello", "session", "update")


def small_parent() -> tuple[ParentModel, Any]:
    """A 2-layer BERT whose update (1.4 MB of float32) travels in two 1 MiB chunk frames."""
    torch_model = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=4500,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    parent = parent_from_module(torch_model.eval())
    parent, salience, _ = reorder(parent, weight_l1(parent))
    return parent, salience


@dataclasses.dataclass
class Stats:
    """What a fuzz run did and found."""

    frames: int = 0
    bytes: int = 0
    connections: int = 0
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kind_seconds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)  # broken contracts, one line each
    reasons: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # a few close reasons per code
    keeper_updates: int = 0
    keeper_connections: int = 0

    def summary(self, seconds: float) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.codes.items()))
        kinds = ", ".join(f"{k}: {n} ({self.kind_seconds[k] / n:.2f} s each)" for k, n in sorted(self.kinds.items()))
        return (
            f"{self.frames} frames ({self.bytes / 1e6:.1f} MB) in {self.connections} connections over {seconds:.0f} s"
            f" ({self.frames / max(seconds, 1e-9):.0f} frames/s); close codes {{{codes}}};"
            f" episodes {{{kinds}}}; keeper: {self.keeper_updates} updates,"
            f" {self.keeper_connections} connection(s); contract failures: {len(self.failures)}"
        )


@contextlib.asynccontextmanager
async def live_coordinator(run_dir: Path, names: list[str]) -> AsyncIterator[CoordinatorServer]:
    """A coordinator whose run never completes (a million rounds of at most 1 s), on port 0."""
    parent, salience = small_parent()
    federation = FederationConfig(
        rounds=10**6, min_devices=1, device_wait_s=0.3, round_deadline_s=1.0, min_margin_bytes=0
    )
    engine = FederationEngine(parent, salience, federation, TRAINING, devices=names)  # type: ignore[arg-type]
    config = ServerConfig(host="127.0.0.1", port=0, hello_timeout_s=5.0)
    srv = CoordinatorServer(engine, config, {n: f"token-of-{n}" for n in names}, run_dir=run_dir)
    await srv.start()
    running = asyncio.ensure_future(srv.run())
    srv.fuzz_running = running  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        await srv.stop()


def _dial(srv: CoordinatorServer, name: str) -> Any:
    return connect(
        f"ws://127.0.0.1:{srv.port}",
        additional_headers={"Authorization": f"Bearer token-of-{name}"},
        compression=None,
        max_size=16 << 20,
        open_timeout=WAIT_S,
        close_timeout=WAIT_S,
    )


PROFILE = {"budget": {"usable": BUDGET, "runtime_footprint": 1 << 28, "margin": 1 << 26}, "device": {"machine": "fuzz"}}


class Link:
    """One fuzzed connection: a reader feeding a real DeviceConnection, and counted sends."""

    def __init__(self, ws: ClientConnection, name: str, stats: Stats, *, replies: bool = False) -> None:
        self.ws, self.name, self.stats = ws, name, stats
        self.replies = replies  # send the device side's own replies (an Error for a task it rejects)
        self.conn = DeviceConnection()
        self.sane = True  # the DeviceConnection follows the conversation (until a frame confuses it)
        self.welcomed = asyncio.Event()
        self.tasks: asyncio.Queue[TaskReceived] = asyncio.Queue()
        self.reflected: list[str | bytes] = []  # a few of the coordinator's own frames, to send back
        self.bye_codes = {1000}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                if len(self.reflected) < 4:
                    self.reflected.append(frame)
                if not self.sane:
                    continue
                events = self.conn.receive(frame)
                for reply in self.conn.data_to_send():  # a fuzz device's episode decides what it sends
                    if self.replies:
                        await self.ws.send(reply)
                for event in events:
                    if isinstance(event, WelcomeReceived):
                        self.welcomed.set()
                    elif isinstance(event, TaskReceived):
                        self.tasks.put_nowait(event)
                    elif isinstance(event, ProtocolViolation):
                        self.sane = False

    async def send(self, frame: str | bytes) -> bool:
        """Send one frame; False once the coordinator has closed."""
        if self.reader.done():
            return False
        if isinstance(frame, str) and "bye" in frame:  # the coordinator closes with a Bye's code
            with contextlib.suppress(ProtocolError):
                message = decode_message(frame)
                if isinstance(message, Bye):
                    self.bye_codes.add(message.code)
        try:
            await self.ws.send(frame)
        except (ConnectionClosed, AttributeError):  # websockets 17.4 may raise AttributeError after a 1009
            return False
        self.stats.frames += 1
        self.stats.bytes += len(frame)
        return True

    async def hello(self) -> bool:
        """The real Hello; True once welcomed."""
        self.conn.send_hello(device_id=self.name, sdk_version="fuzz", profile=PROFILE)
        (frame,) = self.conn.data_to_send()
        if not await self.send(frame):
            return False
        waiter = asyncio.ensure_future(self.welcomed.wait())
        await asyncio.wait([waiter, self.reader], timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return self.welcomed.is_set() and not self.reader.done()

    async def task(self, wait_s: float) -> TaskReceived | None:
        """The next task the coordinator sends (None if none comes within ``wait_s`` or it closes)."""
        getter = asyncio.ensure_future(self.tasks.get())
        await asyncio.wait([getter, self.reader], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def finish(self) -> tuple[str, bool]:
        """Wait for the coordinator's close frame: (its close code, or "open" if it answered the probe,
        or "none" without a close frame; whether it came within WAIT_S). The TCP connection is then
        dropped: a coordinator with unread frames of ours may take its close timeout to end it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not self.reader.done() and self.ws.protocol.close_rcvd is None and loop.time() < deadline:
            await asyncio.wait([self.reader], timeout=0.02)
        done = self.reader.done() or self.ws.protocol.close_rcvd is not None
        if not self.reader.done():
            self.ws.transport.abort()
            await asyncio.wait([self.reader], timeout=WAIT_S)
        received = self.ws.protocol.close_rcvd
        if received is None:
            return "none", bool(done)
        examples = self.stats.reasons.setdefault(str(received.code), [])
        if len(examples) < 3 and received.reason != PROBE_REASON:
            examples.append(received.reason)
        if received.code == 1000 and received.reason == PROBE_REASON:
            return "open", bool(done)
        return str(received.code), bool(done)


# ------------------------------------------------------------------------------------------ episodes


class FuzzDevice:
    """A device with a valid token that sends mutated frames, one connection (episode) at a time."""

    def __init__(self, srv: CoordinatorServer, name: str, rng: random.Random, stats: Stats) -> None:
        self.srv, self.name, self.rng, self.stats = srv, name, rng, stats

    async def run(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.episode()

    async def episode(self) -> None:
        kind = self.rng.choices(KINDS, weights=(3, 4, 3))[0]
        self.stats.kinds[kind] += 1
        start = time.monotonic()
        try:
            async with _dial(self.srv, self.name) as ws:
                link = Link(ws, self.name, self.stats)
                await getattr(self, f"_{kind}")(link)
                await link.send(PROBE)
                code, in_time = await link.finish()
        except (InvalidHandshake, OSError, asyncio.TimeoutError) as exc:  # refused (e.g. 503), or gone
            self.stats.failures.append(f"{self.name} {kind}: could not connect: {exc!r}")
            await asyncio.sleep(0.5)
            return
        self.stats.kind_seconds[kind] += time.monotonic() - start
        self.stats.connections += 1
        self.stats.codes[code] += 1
        problem = None
        if not in_time:
            problem = "no close within the wait (hung)"
        elif code == "none":
            problem = "closed without a close frame"
        elif code != "open" and int(code) not in DOCUMENTED_CODES | link.bye_codes:
            problem = f"undocumented close code {code}"
        if problem is not None:
            self.stats.failures.append(f"{self.name} {kind}: {problem}")

    async def _pre_hello(self, link: Link) -> None:
        """1-3 frames before (or instead of) a valid Hello: mostly a mutated Hello."""
        link.conn.send_hello(device_id=self.name, sdk_version="fuzz", profile=PROFILE)
        (hello,) = link.conn.data_to_send()
        assert isinstance(hello, str)
        for _ in range(self.rng.randint(1, 3)):
            roll = self.rng.random()
            if roll < 0.7:
                frame: str | bytes = fz.mutate_text(hello, self.rng)
            elif roll < 0.8:
                frame = fz.mutate_text(self.rng.choice(fz.device_messages(None, self.rng)), self.rng)
            elif roll < 0.9:
                frame = fz.mutate_binary(self.rng.randbytes(self.rng.choice((8, 24, 300))), self.rng)
            else:
                frame = hello
            if not await link.send(frame):
                return

    async def _session(self, link: Link) -> None:
        """A valid Hello, then 2-30 frames: mostly harmless Errors, some mutated or out-of-order ones."""
        if not await link.hello():
            return
        link.sane = False  # a task sent meanwhile is left unread (and unanswered): no need to decode it
        for _ in range(self.rng.randint(2, 30)):
            roll = self.rng.random()
            if roll < 0.8:
                frame: str | bytes = fz.harmless_message(self.rng)
            elif roll < 0.92:
                frame = fz.mutate_text(self.rng.choice(fz.device_messages(None, self.rng)), self.rng)
            elif roll < 0.96 and link.reflected:
                frame = self.rng.choice(link.reflected)  # the coordinator's own Welcome or task, sent back
            else:
                frame = fz.mutate_binary(self.rng.randbytes(self.rng.choice((24, 1000))), self.rng)
            if not await link.send(frame):
                return

    async def _update(self, link: Link) -> None:
        """A valid Hello, then for up to 3 tasks: an Update (poisoned, mutated or clean) and its chunks."""
        if not await link.hello():
            return
        for _ in range(self.rng.randint(1, 3)):
            received = await link.task(TASK_WAIT_S)
            if received is None:
                return
            frames = self._update_frames(received)
            if self.rng.random() < 0.1:  # a reply about the task instead (or before) the update
                frames.insert(
                    0, fz.mutate_text(self.rng.choice(fz.device_messages(received.task.task_id, self.rng)), self.rng)
                )
            for frame in frames:
                if not await link.send(frame):
                    return

    def _update_frames(self, received: TaskReceived) -> list[str | bytes]:
        rng, tensors = self.rng, answer_tensors(received)
        if rng.random() < 0.4:
            fz.poison_tensors(tensors, rng)
        for name, array in tensors.items():
            if array.dtype.kind == "f" and rng.random() < 0.5:
                tensors[name] = array + np.float32(0.001)
        manifest, chunks = encode_tensors(tensors)
        update = Update(
            task_id=received.task.task_id,
            num_samples=rng.choice((1, 4, 64)),
            metrics={"loss": rng.random()},
            peak_rss_bytes=rng.choice((1, 1 << 20, 1 << 30)),
            step_time_s=rng.random(),
            train_time_s=rng.random() * 10,
            weights=manifest,
            encoding=rng.choice(("weights", "delta")),
        )
        frames: list[str | bytes] = [encode_message(update), *chunks]
        return fz.mutate_transfer(frames, rng) if rng.random() < 0.6 else frames


def answer_tensors(received: TaskReceived) -> dict[str, np.ndarray]:
    """The tensors a device returns untrained, shaped as the task's levers ask: a row-trained word
    embedding table comes back with all its rows (``NAME@rows``), a frozen one not at all."""
    task = received.task
    assert isinstance(task, TrainTask)
    tensors = {name: np.array(array) for name, array in received.tensors.items()}
    embeddings = task.settings.levers.embeddings
    for name in [n for n in tensors if n.endswith("word_embeddings.weight")]:
        if embeddings == "rows":
            tensors[name + ROWS_SUFFIX] = np.arange(tensors[name].shape[0], dtype=np.int64)
        elif embeddings == "frozen":
            del tensors[name]
    return tensors


async def keeper(srv: CoordinatorServer, name: str, stats: Stats, done: Callable[[], bool]) -> None:
    """A well-behaved device: answers each task with its tensors unchanged, so rounds keep going."""
    while not done():
        stats.keeper_connections += 1
        with contextlib.suppress(InvalidHandshake, OSError, asyncio.TimeoutError):
            await _keep(srv, name, stats, done)
        await asyncio.sleep(0.5)


async def _keep(srv: CoordinatorServer, name: str, stats: Stats, done: Callable[[], bool]) -> None:
    """One connection of the keeper (until ``done`` or the coordinator closes it)."""
    async with _dial(srv, name) as ws:
        link = Link(ws, name, Stats(), replies=True)
        if not await link.hello():
            return
        while not done():
            received = await link.task(1.0)
            if link.reader.done():
                break
            if received is None:
                continue
            link.conn.send_update(
                task_id=received.task.task_id,
                tensors=answer_tensors(received),
                num_samples=8,
                metrics={"loss": 0.5},
                peak_rss_bytes=1 << 20,
                step_time_s=0.01,
                train_time_s=0.02,
                encoding="weights",
            )
            for frame in link.conn.data_to_send():
                await link.send(frame)
            stats.keeper_updates += 1


async def fuzz(
    srv: CoordinatorServer, names: list[str], seed: int, stats: Stats, *, frames: int | None, seconds: float | None
) -> None:
    """Fuzz ``srv`` with one device per name (the first is the keeper) until ``frames`` are sent or
    ``seconds`` have passed, whichever is given (both: the first reached)."""
    start = time.monotonic()

    def done() -> bool:
        if srv.fuzz_running.done():  # type: ignore[attr-defined]  # the run ended: a failure, reported
            return True
        return (frames is not None and stats.frames >= frames) or (
            seconds is not None and time.monotonic() - start >= seconds
        )

    finished = asyncio.Event()
    keep = asyncio.ensure_future(keeper(srv, names[0], stats, finished.is_set))
    devices = [FuzzDevice(srv, name, random.Random(f"{seed}/{name}"), stats) for name in names[1:]]
    try:
        await asyncio.gather(*(device.run(done) for device in devices))
    finally:
        finished.set()  # the keeper stays to the end: without it the run would stop for want of devices
        await keep
