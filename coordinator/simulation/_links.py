"""Simulated devices as the coordinator sees them: who they are, and their end of the wire protocol.

A :class:`VirtualDevice` is a device class's budget (scaled) and a shard of the data. Its
:class:`Link` holds the coordinator's :class:`~coordinator.federation.DeviceSession` for it, the same
session a real device's websocket drives: :func:`connect` feeds it the device's Hello (its budget) and
keeps the Welcome; :func:`send_task` turns an engine order into the TrainTask's frames and a
:class:`~coordinator.simulation._device.DeviceJob`; :func:`receive` feeds the device's answer to the
session. Only the bytes' path differs from the daemon's: packed frames instead of a socket.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.federation import GO_ON, DeviceSession, FederationEngine, TrainOrder
from coordinator.simulation._attack import DeviceAttack
from coordinator.simulation._config import SimulationConfig
from coordinator.simulation._data import SimData
from coordinator.simulation._device import DeviceJob, DeviceReport, frames_size, pack_frames, read_frames
from coordinator.simulation._executor import Executor
from coordinator.simulation._partition import partition
from edge_sdk import __version__, load_device_class
from edge_sdk.protocol import CAPABILITY_ENCODINGS, DeviceConnection
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
    attack: DeviceAttack | None = None  # a simulated attacker ([attack] table)

    def hello_profile(self) -> dict[str, Any]:
        samples = len(self.indices)
        return {
            "device": {"device_model": self.device_class, "machine": "simulated", "simulated": True},
            "budget": self.budget.to_dict(),
            "data": {"num_samples": samples if self.attack is None else self.attack.declared_samples(samples)},
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
        skew=config.data.skew,
        head=config.data.skewed_devices,
        seed=config.model.seed,
        min_size=config.data.min_shard,
    )
    config.attack.check_devices([n for n, _, _ in named])
    return [
        VirtualDevice(n, c, b, s, config.attack.for_device(n, config.model.num_labels or 2))
        for (n, c, b), s in zip(named, shards, strict=True)
    ]


@dataclasses.dataclass
class Link:
    """The coordinator's end of one simulated device's connection."""

    device: VirtualDevice
    session: DeviceSession
    welcome: bytes  # the packed Welcome the worker replays to join


def connect(engine: FederationEngine, device: VirtualDevice, now: float) -> Link | None:
    """Admission over the protocol: the device's Hello (its budget) to its session; None if refused."""
    device_side = DeviceConnection()
    device_side.send_hello(
        device_id=device.name,
        sdk_version=__version__,
        profile=device.hello_profile(),
        capabilities=("train", CAPABILITY_ENCODINGS),
    )
    session = DeviceSession(engine, device.name)
    verdict = GO_ON
    for frame in device_side.data_to_send():
        verdict = verdict.then(session.receive(frame, now))
    welcome = session.conn.data_to_send()
    if not verdict.go_on or not session.admitted:
        return None
    return Link(device, session, pack_frames(welcome))


def send_task(
    link: Link, order: TrainOrder, *, data: SimData, executor: Executor, wire: Path, threads: int
) -> DeviceJob | None:
    """The worker job delivering ``order`` (None when it cannot be sent: the task failed)."""
    if not link.session.start_task(order):
        return None
    frames = link.session.conn.data_to_send()
    task: bytes | str
    result_path = None
    if executor.uses_files:
        path = wire / f"{order.task_id}.in"
        with path.open("wb") as fh:
            pack_frames(frames, fh)
        task, result_path = str(path), str(wire / f"{order.task_id}.out")
    else:
        task = pack_frames(frames)
    link.session.task_sent(order, frames_size(frames))
    return DeviceJob(
        link.device.name,
        order.task_id,
        data,
        link.device.indices,
        link.welcome,
        task,
        result_path,
        threads,
        link.device.attack,
    )


def receive(link: Link, report: DeviceReport, now: float) -> dict[str, Any]:
    """Feed the device's answer to its session; what the worker measured beyond the Update.

    The simulated device's peak is its class's runtime footprint plus what the task took on this host
    beyond the worker's own runtime (the engine compares it to the device's budget).
    """
    session = link.session
    runtime = link.device.budget.runtime_footprint

    def peak_of(host_peak: int) -> int:
        return runtime + max(0, host_peak - report.baseline_rss_bytes)

    for frame in read_frames(report.frames):
        verdict = session.receive(frame, now, peak_of=peak_of)
        if not verdict.go_on:
            session.lost(verdict.close_code, verdict.close_reason)
            break
    session.conn.data_to_send()  # answers to a device that has gone (e.g. an Error for a bad update)
    extra: dict[str, Any] = {"baseline_rss_bytes": report.baseline_rss_bytes, "worker_pid": report.pid}
    update = session.last_update
    if update is not None and update.task_id == report.task_id:
        extra["train_time_s"] = update.train_time_s
        extra["host_peak_rss_bytes"] = update.peak_rss_bytes
    return extra
