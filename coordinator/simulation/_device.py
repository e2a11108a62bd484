"""One simulated device doing one task: the device side of the wire protocol, in a worker process.

What a real device runs when a task arrives (``edge_sdk.client._client``) is: a
:class:`~edge_sdk.protocol.DeviceConnection` turns the received frames into a ``TaskReceived``
event, :meth:`~edge_sdk.training._runner.TaskRunner.train` builds and trains the sub-network on the local
data, and ``send_update`` turns the trained weights into frames. :func:`run_device_job` runs exactly
that, with the frames read from a file or a bytes blob instead of a websocket: the coordinator's
:class:`~edge_sdk.protocol.CoordinatorConnection` wrote them, and reads the answer the same way.

The device's connection is re-established per task from the Welcome it received when it was admitted
(its Hello went to the coordinator then), as a device that reconnects would. Nothing but bytes and
small descriptions crosses the process boundary: tensors travel as the protocol's safetensors chunks.

Memory: a worker process serves many tasks, so before each task it resets the kernel's resident-set
high-water mark (``/proc/self/clear_refs``) and records the resident set as the task's baseline
(the runtime: Python, torch, the data); the measured training memory is ``peak - baseline``. Where
the reset is not available, every task runs in a fresh process (``fresh_process``). The *simulated*
budget is what the planner used; the host does not enforce it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.simulation._attack import DeviceAttack
from coordinator.simulation._data import SimData

__all__ = [
    "DeviceJob",
    "DeviceReport",
    "init_worker",
    "pack_frames",
    "read_frames",
    "run_device_job",
]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">cQ")  # kind (b"T" text, b"B" binary), length
_runtime_ready: list[int] = []


def pack_frames(frames: Iterable[str | bytes], out: io.BufferedIOBase | None = None) -> bytes:
    """Websocket messages as one blob (or written to ``out``): kind, length, payload, for each."""
    sink = out if out is not None else io.BytesIO()
    for frame in frames:
        data, kind = (frame.encode("utf-8"), b"T") if isinstance(frame, str) else (bytes(frame), b"B")
        sink.write(_HEADER.pack(kind, len(data)))
        sink.write(data)
    return sink.getvalue() if isinstance(sink, io.BytesIO) else b""


def read_frames(source: bytes | str | Path) -> Iterator[str | bytes]:
    """The messages of a blob, or of a file written by :func:`pack_frames` (streamed, one at a time)."""
    stream: io.BufferedIOBase
    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    with stream:
        while True:
            header = stream.read(_HEADER.size)
            if not header:
                return
            if len(header) != _HEADER.size:
                raise ValueError("truncated frame header")
            kind, length = _HEADER.unpack(header)
            data = stream.read(length)
            if len(data) != length:
                raise ValueError("truncated frame")
            yield data.decode("utf-8") if kind == b"T" else data


def frames_size(frames: Iterable[str | bytes]) -> int:
    """Bytes on the wire: the payload of every message (text as UTF-8)."""
    return sum(len(f.encode("utf-8")) if isinstance(f, str) else len(f) for f in frames)


@dataclass(frozen=True)
class DeviceJob:
    """Everything a worker needs for one device's task (small, picklable; tensors only as frames)."""

    device_id: str
    task_id: str
    data: SimData
    indices: np.ndarray  # the device's shard (row numbers of ``data``)
    welcome: bytes  # the packed Welcome frame(s) of the device's admission
    task: bytes | str  # the packed task frames, or the path of a file holding them
    result_path: str | None = None  # write the answer's frames there (else return them as bytes)
    threads: int = 1
    attack: DeviceAttack | None = None  # a simulated attacker: what it does to its data and its update


@dataclass(frozen=True)
class DeviceReport:
    """What a worker sends back: the answer's frames (or where they are) and what it measured."""

    device_id: str
    task_id: str
    frames: bytes | str  # packed Update (or Error) frames, or the path of the file holding them
    bytes_up: int
    baseline_rss_bytes: int  # resident set before the task arrived (runtime, data)
    wall_s: float
    pid: int


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def init_worker(threads: int = 1) -> None:
    """Load the device runtime once per process (imports, allocator, one warm-up step), as a device
    does before it joins: what is lazily allocated then belongs to the baseline, not to a task."""
    if _runtime_ready:
        return
    from edge_sdk import prepare_runtime

    logging.getLogger("transformers").setLevel(logging.ERROR)
    prepare_runtime(max(1, threads))
    _runtime_ready.append(os.getpid())


def run_device_job(job: DeviceJob) -> DeviceReport:
    """Receive the task's frames, train with the SDK's TaskRunner, answer with the Update's frames."""
    from edge_sdk import TaskRunner, __version__
    from edge_sdk._errors import ProtocolError
    from edge_sdk.protocol import (
        CAPABILITY_ENCODINGS,
        DeviceConnection,
        ErrorCode,
        TaskReceived,
        TrainTask,
        WelcomeReceived,
        task_error_message,
    )

    init_worker(job.threads)
    started = time.perf_counter()
    source = job.data.source(job.indices)
    runner = TaskRunner(source if job.attack is None else job.attack.data(source), threads=job.threads)
    conn = DeviceConnection()
    conn.send_hello(
        device_id=job.device_id, sdk_version=__version__, profile={}, capabilities=("train", CAPABILITY_ENCODINGS)
    )
    conn.data_to_send()  # this Hello was delivered when the device was admitted
    if not any(isinstance(e, WelcomeReceived) for f in read_frames(job.welcome) for e in conn.receive(f)):
        raise ProtocolError(f"{job.device_id}: the recorded admission holds no Welcome")

    gc.collect()
    baseline = _rss_bytes()
    _reset_peak()
    received: TaskReceived | None = None
    for frame in read_frames(job.task):
        for event in conn.receive(frame):
            if isinstance(event, TaskReceived):
                received = event
    if received is None or not isinstance(received.task, TrainTask):
        events = conn.data_to_send()  # e.g. the Error a malformed task produced
        return _report(job, events, baseline, started)
    task, tensors = received.task, dict(received.tensors)
    del received
    # training may update the received arrays in place: an attacker keeps what it was sent
    sent = {n: a.copy() for n, a in tensors.items()} if job.attack is not None else None
    try:
        output = runner.train(task, tensors, keep_received=conn.update_encoding is not None)
        if job.attack is not None and sent is not None:  # the lie goes out through the same DeviceConnection
            output = job.attack.tamper(output, sent)
        del tensors
        output.send(conn, task.task_id)
    except Exception as exc:  # any failure is an Error naming the task, as the SDK client sends
        message = task_error_message("train", task.task_id, exc)
        logger.exception("%s: %s", job.device_id, message)
        with contextlib.suppress(ProtocolError):
            conn.send_error(code=ErrorCode.TASK_FAILED, message=message, task_id=task.task_id)
    return _report(job, conn.data_to_send(), baseline, started)


def _report(job: DeviceJob, frames: list[str | bytes], baseline: int, started: float) -> DeviceReport:
    size = frames_size(frames)
    if job.result_path is not None:
        tmp = Path(f"{job.result_path}.tmp")
        with tmp.open("wb") as fh:
            pack_frames(frames, fh)
        os.replace(tmp, job.result_path)
        payload: bytes | str = job.result_path
    else:
        payload = pack_frames(frames)
    return DeviceReport(
        device_id=job.device_id,
        task_id=job.task_id,
        frames=payload,
        bytes_up=size,
        baseline_rss_bytes=baseline,
        wall_s=time.perf_counter() - started,
        pid=os.getpid(),
    )
