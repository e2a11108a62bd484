"""What the status page shows: a read-only snapshot of one server's run, as JSON.

:class:`StatusBoard` is told what the engine does not keep (each device's last order, how long each
round took, whether deploys are going out) by three hook calls in the server
(:meth:`StatusBoard.orders_sent`, :meth:`StatusBoard.round_finished`, ``deploying``), and reads the
rest from the engine (round, phase, history, device registry), the live connections (connected,
busy, the task's reported steps, the Hello's device class) and the deploy records. Call
:meth:`StatusBoard.snapshot` on the event loop's thread (the connections are the loop's); the HTTP
server hands the call over to the loop (:mod:`~coordinator.serve._status_http`).

Everything a device sent that lands here is bounded (clipped text, checked numbers), and the
history is the last ``MAX_HISTORY`` rounds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from coordinator.federation import FederationEngine, RoundSummary, TrainOrder, clip
from coordinator.serve._connection import Connection
from coordinator.serve._deploys import DeployService
from coordinator.serve._metrics import RunMetrics

__all__ = ["MAX_HISTORY", "StatusBoard"]

MAX_HISTORY = 500  # rounds of accuracy and loss in a snapshot (the latest)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A device's last training order, as the page shows it."""

    round: int
    task_id: str
    width: str
    heads: str
    ffn: str
    params: int
    params_fraction: float
    levers: str
    predicted_bytes: int
    steps: int

    @classmethod
    def of(cls, order: TrainOrder) -> _Plan:
        spec = order.spec
        parent = spec.parent
        heads = sum(layer.heads for layer in spec.layers) / len(spec.layers)
        ffn = sum(layer.ffn for layer in spec.layers) / len(spec.layers)
        return cls(
            round=order.round,
            task_id=order.task_id,
            width=f"heads {heads:.1f}/{parent.num_heads} ffn {ffn:.0f}/{parent.ffn}",
            heads=f"{heads:.1f}/{parent.num_heads}",
            ffn=f"{ffn:.0f}/{parent.ffn}",
            params=order.params,
            params_fraction=order.params_fraction,
            levers=order.settings.levers.describe(),
            predicted_bytes=order.predicted_bytes,
            steps=order.settings.local_steps or 0,
        )


@dataclasses.dataclass
class _Totals:
    """One device's sums over the rounds it took part in (from the engine's history)."""

    bytes_in: int = 0
    bytes_out: int = 0
    peak: int = 0  # the last peak it measured (0: none yet)
    last_status: str = ""


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class StatusBoard:
    """One server's run as the status page and ``/status.json`` show it (see the module docstring)."""

    def __init__(
        self,
        engine: FederationEngine,
        connections: Mapping[str, Connection],
        deploys: DeployService,
        metrics: RunMetrics,
        *,
        wall_clock: Any = time.time,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.deploying = False  # the server is sending the run's inference models
        self._connections = connections
        self._deploys = deploys
        self._wall_clock = wall_clock
        self._started = wall_clock()
        self._plans: dict[str, _Plan] = {}
        self._durations: dict[int, float] = {}
        self._round_started: float | None = None
        self._totals: dict[str, _Totals] = {}
        self._history_seen = 0
        history = engine.history
        if history:  # a resumed run: its last validation metrics stand until the next round
            metrics.validation(history[-1].get("metrics", {}))
        metrics.live(connected=0, busy=0, round_=engine.round)

    # ------------------------------------------------------------------------------ hooks

    def orders_sent(self, orders: Sequence[TrainOrder]) -> None:
        """A round began with these orders (the server calls this when it sends them)."""
        self._round_started = time.monotonic()
        for order in orders:
            self._plans[order.device_id] = _Plan.of(order)

    def round_finished(self, summary: RoundSummary) -> float | None:
        """A round was merged and checkpointed; returns its duration (None if its start was not seen)."""
        seconds = None if self._round_started is None else time.monotonic() - self._round_started
        if seconds is not None:
            self._durations[summary.round] = seconds
            if len(self._durations) > MAX_HISTORY:
                del self._durations[min(self._durations)]
        self._round_started = None
        self.metrics.round_finished(summary, seconds)
        return seconds

    # ----------------------------------------------------------------------------- snapshot

    def snapshot(self) -> dict[str, Any]:
        """The run now, as JSON (call on the event loop's thread)."""
        engine = self.engine
        self._take_history()
        devices = [self._device(name, record) for name, record in sorted(engine.devices().items())]
        connected = sum(1 for d in devices if d["connected"])
        busy = sum(1 for d in devices if d["busy"])
        self.metrics.live(connected=connected, busy=busy, round_=engine.round)
        return {
            "run": {
                "id": engine.run_id,
                "model": engine.model_name,
                "round": engine.round,
                "rounds": engine.federation.rounds,
                "phase": self._phase(),
                "finished": engine.finished,
                "started_at": self._started,
                "now": self._wall_clock(),
                "round_elapsed_s": None if self._round_started is None else time.monotonic() - self._round_started,
                "devices_connected": connected,
                "devices_busy": busy,
            },
            "devices": devices,
            "history": self._history(),
            "deployments": [d.to_json() for d in self._deploys.records[-MAX_HISTORY:]],
        }

    def _phase(self) -> str:
        if self.deploying or self._deploys.busy:
            return "deploying"
        if self.engine.finished and self.engine.phase == "waiting":
            return "finished"
        return self.engine.phase

    def _take_history(self) -> None:
        """Add the rounds finished since the last snapshot to each device's totals."""
        history = self.engine.history
        for entry in history[self._history_seen :]:
            for outcome in entry.get("devices", ()):
                totals = self._totals.setdefault(str(outcome.get("device_id", "?")), _Totals())
                totals.bytes_in += int(outcome.get("bytes_in", 0))
                totals.bytes_out += int(outcome.get("bytes_out", 0))
                totals.last_status = str(outcome.get("status", ""))
                if outcome.get("status") == "ok" and int(outcome.get("peak_rss_bytes", 0)) > 0:
                    totals.peak = int(outcome["peak_rss_bytes"])
        self._history_seen = len(history)

    def _history(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.engine.history[-MAX_HISTORY:]:
            metrics = entry.get("metrics", {})
            index = int(entry.get("round", 0))
            out.append(
                {
                    "round": index,
                    "accuracy": _finite(metrics.get("accuracy")),
                    "loss": _finite(metrics.get("loss")),
                    "aggregated": int(entry.get("aggregated", 0)),
                    "devices": len(entry.get("devices", ())),
                    "seconds": self._durations.get(index),
                }
            )
        return out

    def _device(self, name: str, record: Mapping[str, Any]) -> dict[str, Any]:
        connection = self._connections.get(name)
        session = connection.session if connection is not None else None
        task = session.conn.outstanding_task if session is not None else None
        progress = session.progress if session is not None else None
        steps = None
        if task is not None and progress is not None and progress.task_id == task.task_id:
            steps = {"done": progress.steps_done, "total": progress.steps_total}
        plan = self._plans.get(name)
        totals = self._totals.get(name, _Totals())
        summary = record.get("summary", {})
        return {
            "name": name,
            "status": record.get("status", "never_seen"),
            "connected": connection is not None,
            "busy": connection is not None and (not connection.idle or name in self._deploys.busy),
            "class": self._device_class(connection),
            "machine": clip(str(summary.get("device_model") or summary.get("machine") or ""), 80),
            "budget_bytes": int(record.get("usable_bytes", 0)),
            "runtime_bytes": int(record.get("runtime_bytes", 0)),
            "shrink_bytes": int(record.get("shrink_bytes", 0)),
            "plan": dataclasses.asdict(plan) if plan is not None else None,
            "task": None if task is None else {"id": task.task_id, "kind": type(task).__name__},
            "progress": steps,
            "peak_memory_bytes": totals.peak or None,
            "bytes_in": totals.bytes_in,
            "bytes_out": totals.bytes_out,
            "rounds_ok": int(record.get("rounds_ok", 0)),
            "rounds_failed": int(record.get("rounds_failed", 0)),
            "last_outcome": totals.last_status or None,
        }

    @staticmethod
    def _device_class(connection: Connection | None) -> str | None:
        """The device's class as its Hello's budget names it ("profile:<name>" -> name, or how it was
        found: "detected", "override"); clipped, it is the device's text."""
        hello = connection.session.conn.hello if connection is not None else None
        budget = hello.profile.get("budget") if hello is not None else None
        source = budget.get("source") if isinstance(budget, Mapping) else None
        if not isinstance(source, str) or not source:
            return None
        return clip(source.removeprefix("profile:"), 64)
