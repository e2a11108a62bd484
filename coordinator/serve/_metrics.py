"""The coordinator's Prometheus metrics: one :class:`RunMetrics` per server, on its own registry.

Its own ``CollectorRegistry`` (never the process-wide default): two servers in one process (tests, a
simulator next to a daemon) never share or collide on a metric. Rendered by ``GET /metrics`` on the
status port (:mod:`~coordinator.serve._status_http`) with ``prometheus_client.generate_latest``.

Names (all prefixed ``edge_fm_``; see docs/operating.md): ``rounds_completed_total``,
``round_duration_seconds`` (histogram), ``round``, ``devices_connected``, ``devices_busy``,
``updates_total{outcome}`` (merged, rejected, failed, late, missing), ``bytes_total{direction}``
(in, out: the rounds' task traffic), ``validation_accuracy``, ``validation_loss``,
``device_peak_memory_bytes{device}`` (the last peak each device measured; at most
``MAX_DEVICE_SERIES`` devices), ``event_loop_lag_seconds`` (gauge, the last measure) and
``event_loop_lag_max_seconds`` (the largest since start).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.federation import RoundSummary

__all__ = ["CONTENT_TYPE", "LAG_INTERVAL_S", "MAX_DEVICE_SERIES", "OUTCOMES", "RunMetrics", "watch_loop_lag"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_DEVICE_SERIES = 1024  # device label values: configured device names only, and at most this many
LAG_INTERVAL_S = 0.5  # how often the event loop's scheduling delay is measured
OUTCOMES = {"ok": "merged", "rejected": "rejected", "failed": "failed", "late": "late", "missing": "missing"}
_ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, math.inf)


class RunMetrics:
    """The metrics of one run, updated by the server as rounds finish and sampled at each scrape."""

    def __init__(self, device_names: Mapping[str, object] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._allowed = set(device_names or ())
        self._labelled: set[str] = set()
        self._lag_max = 0.0
        self.rounds_completed = Counter(
            "edge_fm_rounds_completed", "Federated rounds merged and checkpointed", registry=r
        )
        self.round_duration = Histogram(
            "edge_fm_round_duration_seconds",
            "Wall time of a round, from sending its tasks to its checkpoint",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.round = Gauge("edge_fm_round", "Rounds completed so far in this run (resumed runs included)", registry=r)
        self.connected = Gauge("edge_fm_devices_connected", "Devices with an open, admitted connection", registry=r)
        self.busy = Gauge("edge_fm_devices_busy", "Connected devices with a task outstanding", registry=r)
        self.updates = Counter(
            "edge_fm_updates", "Training tasks by outcome: merged or why not", ["outcome"], registry=r
        )
        for outcome in OUTCOMES.values():
            self.updates.labels(outcome)  # every series exists from the start (a rate of 0 is a fact)
        self.bytes = Counter(
            "edge_fm_bytes",
            "Bytes of round traffic: out (tasks sent), in (updates received)",
            ["direction"],
            registry=r,
        )
        self.bytes.labels("in")
        self.bytes.labels("out")
        self.accuracy = Gauge("edge_fm_validation_accuracy", "Validation accuracy of the global model", registry=r)
        self.loss = Gauge("edge_fm_validation_loss", "Validation loss of the global model", registry=r)
        self.peak = Gauge(
            "edge_fm_device_peak_memory_bytes",
            "Peak resident memory a device measured in its last training task",
            ["device"],
            registry=r,
        )
        self.lag = Gauge("edge_fm_event_loop_lag_seconds", "Last measured event-loop scheduling delay", registry=r)
        self.lag_max = Gauge("edge_fm_event_loop_lag_max_seconds", "Largest event-loop delay since start", registry=r)
        self.accuracy.set(math.nan)
        self.loss.set(math.nan)

    def round_finished(self, summary: RoundSummary, seconds: float | None) -> None:
        """Count a finished round: its outcomes, traffic, validation metrics and device peaks."""
        self.rounds_completed.inc()
        self.round.set(summary.round)
        if seconds is not None and seconds >= 0:
            self.round_duration.observe(seconds)
        for outcome in summary.outcomes:
            self.updates.labels(OUTCOMES.get(outcome.status, "failed")).inc()
            if outcome.status == "ok" and outcome.peak_rss_bytes > 0 and self._may_label(outcome.device_id):
                self.peak.labels(outcome.device_id).set(outcome.peak_rss_bytes)
        self.bytes.labels("out").inc(summary.bytes_out)
        self.bytes.labels("in").inc(summary.bytes_in)
        self.validation(summary.metrics)

    def validation(self, metrics: Mapping[str, float]) -> None:
        """The global model's latest validation metrics (absent ones are left as they were)."""
        if "accuracy" in metrics:
            self.accuracy.set(float(metrics["accuracy"]))
        if "loss" in metrics:
            self.loss.set(float(metrics["loss"]))

    def live(self, *, connected: int, busy: int, round_: int) -> None:
        """The gauges sampled at a scrape: devices connected and busy, rounds done."""
        self.connected.set(connected)
        self.busy.set(busy)
        self.round.set(round_)

    def loop_lag(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.lag.set(seconds)
        if seconds > self._lag_max:
            self._lag_max = seconds
            self.lag_max.set(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of this run's registry."""
        return generate_latest(self.registry)

    def _may_label(self, device_id: str) -> bool:
        """Bounded cardinality: only named devices, and at most ``MAX_DEVICE_SERIES`` of them."""
        if device_id in self._labelled:
            return True
        if (self._allowed and device_id not in self._allowed) or len(self._labelled) >= MAX_DEVICE_SERIES:
            return False
        self._labelled.add(device_id)
        return True


async def watch_loop_lag(metrics: RunMetrics, interval_s: float = LAG_INTERVAL_S) -> None:
    """Measure, forever, how late the event loop runs a sleep of ``interval_s`` (its scheduling delay)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval_s)
        metrics.loop_lag(loop.time() - before - interval_s)
