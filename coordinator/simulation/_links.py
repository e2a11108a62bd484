"""Simulated devices as the coordinator sees them: who they are, and their end of the wire protocol.

A :class:`VirtualDevice` is a device class's budget (scaled) and a shard of the data. Its
:class:`Link` is the coordinator's :class:`~edge_sdk.protocol.CoordinatorConnection` to it, opened by
:func:`connect` as on a real connection (the device's Hello with its budget, the engine's admission,
the Welcome); :func:`send_task` turns an engine order into the TrainTask's frames and a
:class:`~coordinator.simulation._device.DeviceJob`, and :func:`receive` feeds the device's answer back to the
connection and the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.federation import FederationEngine, TrainOrder
from coordinator.simulation._config import SimulationConfig
from coordinator.simulation._data import SimData
from coordinator.simulation._device import DeviceJob, DeviceReport, frames_size, pack_frames, read_frames
from coordinator.simulation._executor import Executor
from coordinator.simulation._partition import partition
from edge_sdk import __version__, load_device_class
from edge_sdk._errors import BudgetError, ProfileError
from edge_sdk.protocol import (
    CoordinatorConnection,
    DeviceConnection,
    ErrorReceived,
    HelloReceived,
    ProtocolViolation,
    UpdateReceived,
    UpdateRejected,
    thaw_json,
)
from edge_sdk.scaling import MemoryBudget, budget_for_device_class

__all__ = ["Link", "VirtualDevice", "connect", "receive", "send_task", "virtual_devices"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VirtualDevice:
    """A simulated device: its class, its (scaled) training budget, and its shard of the data."""

    name: str
    device_class: str
    budget: MemoryBudget
    indices: np.ndarray

    def hello_profile(self) -> dict[str, Any]:
        return {
            "device": {"device_model": self.device_class, "machine": "simulated", "simulated": True},
            "budget": self.budget.to_dict(),
        }


def virtual_devices(config: SimulationConfig, labels: np.ndarray) -> list[VirtualDevice]:
    """The devices of ``config``: ``<class>-NN`` names, scaled class budgets, disjoint shards."""
    sim = config.simulation
    named: list[tuple[str, str, MemoryBudget]] = []
    for class_name, count in config.devices.items():
        base = budget_for_device_class(load_device_class(class_name), sim.runtime_footprint)
        budget = dataclasses.replace(
            base,
            usable=int(base.usable * sim.budget_scale),
            source=f"{base.source}" + (f" x {sim.budget_scale:g}" if sim.budget_scale != 1 else ""),
        )
        named += [(f"{class_name}-{i + 1:02d}", class_name, budget) for i in range(count)]
    shards = partition(
        labels,
        len(named),
        kind=config.data.partition,
        alpha=config.data.alpha,
        seed=config.model.seed,
        min_size=config.data.min_shard,
    )
    return [VirtualDevice(n, c, b, s) for (n, c, b), s in zip(named, shards, strict=True)]


@dataclasses.dataclass
class Link:
    """The coordinator's end of one simulated device's connection."""

    device: VirtualDevice
    conn: CoordinatorConnection
    welcome: bytes


def connect(engine: FederationEngine, device: VirtualDevice) -> Link | None:
    """Admission over the protocol: the device's Hello (its budget), the engine's decision, the Welcome."""
    hello_side = DeviceConnection()
    hello_side.send_hello(
        device_id=device.name, sdk_version=__version__, profile=device.hello_profile(), capabilities=("train",)
    )
    conn = CoordinatorConnection()
    events = [e for frame in hello_side.data_to_send() for e in conn.receive(frame)]
    hello = next(e.hello for e in events if isinstance(e, HelloReceived))
    try:
        engine.admit(device.name, thaw_json(hello.profile))
    except (BudgetError, ProfileError) as exc:
        logger.warning("device %s refused: %s", device.name, exc)
        return None
    conn.send_welcome(run_id=engine.run_id, round=engine.round, server_time=time.time(), device_id=device.name)
    return Link(device, conn, pack_frames(conn.data_to_send()))


def send_task(
    link: Link, order: TrainOrder, *, data: SimData, executor: Executor, wire: Path, threads: int
) -> tuple[DeviceJob, int]:
    order.send(link.conn)
    frames = link.conn.data_to_send()
    size = frames_size(frames)
    task: bytes | str
    result_path = None
    if executor.uses_files:
        path = wire / f"{order.task_id}.in"
        with path.open("wb") as fh:
            pack_frames(frames, fh)
        task, result_path = str(path), str(wire / f"{order.task_id}.out")
    else:
        task = pack_frames(frames)
    job = DeviceJob(
        link.device.name, order.task_id, data, link.device.indices, link.welcome, task, result_path, threads
    )
    return job, size


def receive(engine: FederationEngine, link: Link, report: DeviceReport, now: float) -> dict[str, Any]:
    """Feed the device's answer to its connection and the engine; what the Update said beyond that."""
    engine.record_traffic(link.device.name, bytes_in=report.bytes_up)
    extra: dict[str, Any] = {"baseline_rss_bytes": report.baseline_rss_bytes, "worker_pid": report.pid}
    for frame in read_frames(report.frames):
        for event in link.conn.receive(frame):
            if isinstance(event, UpdateReceived):
                update = event.update
                extra["train_time_s"] = update.train_time_s
                extra["host_peak_rss_bytes"] = update.peak_rss_bytes
                # The simulated device's peak: its class's runtime footprint plus what the task took
                # on this host beyond the worker's own runtime (the engine compares it to the budget).
                training = max(0, update.peak_rss_bytes - report.baseline_rss_bytes)
                engine.accept_update(
                    update.task_id,
                    event.tensors,
                    num_samples=update.num_samples,
                    now=now,
                    encoding=update.encoding,
                    metrics=update.metrics,
                    peak_rss_bytes=link.device.budget.runtime_footprint + training,
                    step_time_s=update.step_time_s,
                )
            elif isinstance(event, UpdateRejected):
                engine.task_failed(event.task_id, f"update rejected: {event.reason}")
            elif isinstance(event, ErrorReceived) and event.error.task_id:
                engine.task_failed(event.error.task_id, f"device error {event.error.code}: {event.error.message[:200]}")
            elif isinstance(event, ProtocolViolation):
                engine.task_failed(report.task_id, f"protocol violation: {event.reason[:200]}")
    link.conn.data_to_send()  # answers to a device that has gone (e.g. an Error for a bad update)
    return extra
