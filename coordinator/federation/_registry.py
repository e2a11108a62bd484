"""The devices of a run: admission, connection status, measured peaks, and each one's budgets.

A device is admitted from its Hello profile (``{"budget": {"usable": ..., "runtime_footprint": ...,
"margin": ...}, "device": {...}}``); its record keeps the budget it reported, whether it is
connected, what it measured, and the rounds it took part in (JSON, checkpointed with the run).

All of one device's budget arithmetic is here, next to its record:

- training: the :class:`~coordinator.federation._planner.Planner`'s plan for ``usable - shrink``
  (``shrink``: what came off after the device measured a peak above its allowance, see
  :meth:`DeviceRegistry.note_peak`), less the safety margin the budget did not already set aside;
- serving: the served model runs without torch, so the device's runtime footprint is free for it::

      inference bytes = training bytes + runtime footprint

``usable`` already excludes the device's runtime footprint (Python, torch, the data), so training
plans count weights, gradients, optimizer state, activations and transients only (``runtime=0``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from coordinator.federation._planner import Planner
from coordinator.federation._records import DeviceOutcome, width_of
from edge_sdk._errors import BudgetError, ProfileError
from edge_sdk._units import format_bytes
from edge_sdk.scaling import Plan, inference_bytes

__all__ = ["DeviceRecord", "DeviceRegistry"]

logger = logging.getLogger(__name__)

_SUMMARY_KEYS = ("machine", "system", "device_model", "cpu_logical_cores", "memory_total", "torch_version")


@dataclasses.dataclass
class DeviceRecord:
    """One device as the run knows it (its JSON is a checkpoint's registry entry)."""

    name: str
    status: str = "never_seen"  # never_seen | connected | disconnected
    usable_bytes: int = 0
    runtime_bytes: int = 0
    margin_bytes: int = 0
    shrink_bytes: int = 0  # taken off the budget after the device measured a peak above it
    declared_samples: int = 0  # the shard size its Hello declared (``data.num_samples``; 0: none)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    rounds_ok: int = 0
    rounds_failed: int = 0
    last_round: int = 0


# Budget figures above this are refused (usable) or ignored (the others): 8 PiB is beyond any device,
# and the budget arithmetic (planning, logs) stays within exact floats.
_MAX_BUDGET_BYTES = 2**53


def _count(value: Any) -> int:
    """A byte count from a received JSON value (0 when absent, malformed or out of range)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BUDGET_BYTES
    return value if ok else 0


class DeviceRegistry:
    """The run's devices by name (thread-safe): named at start, or seen since."""

    def __init__(self, planner: Planner, names: Iterable[str] = ()) -> None:
        self.planner = planner
        self._records: dict[str, DeviceRecord] = {name: DeviceRecord(name) for name in names}
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------- admission

    def admit(self, device_id: str, profile: Mapping[str, Any]) -> Plan:
        """Register a device from its Hello profile; returns the plan it will train.

        ProfileError if the profile has no positive ``budget.usable``; BudgetError if no sub-network
        fits it. Admission marks the device connected.
        """
        budget = profile.get("budget") if isinstance(profile, Mapping) else None
        usable = budget.get("usable") if isinstance(budget, Mapping) else None
        if isinstance(usable, bool) or not isinstance(usable, int) or not 0 < usable <= _MAX_BUDGET_BYTES:
            raise ProfileError(f"device {device_id!r}: the Hello profile has no budget.usable in 1..2**53 bytes")
        assert isinstance(budget, Mapping)
        runtime, margin = (_count(budget.get(key)) for key in ("runtime_footprint", "margin"))
        plan = self.planner.plan(device_id, usable, margin)
        info = profile.get("device")
        summary = {k: info[k] for k in _SUMMARY_KEYS if k in info} if isinstance(info, Mapping) else {}
        data = profile.get("data")
        declared = _count(data.get("num_samples")) if isinstance(data, Mapping) else 0
        with self._lock:
            record = self._records.setdefault(device_id, DeviceRecord(device_id))
            record.usable_bytes, record.runtime_bytes, record.margin_bytes = usable, runtime, margin
            record.summary, record.declared_samples = summary, declared
            record.status = "connected"
        logger.info(
            "device %s admitted: budget %s usable (runtime %s), will train %.2fM params (%s)",
            device_id,
            format_bytes(usable),
            format_bytes(runtime),
            plan.params / 1e6,
            width_of(plan.spec),
        )
        return plan

    def connected(self, device_id: str) -> None:
        with self._lock:
            self._records.setdefault(device_id, DeviceRecord(device_id)).status = "connected"

    def disconnected(self, device_id: str) -> None:
        with self._lock:
            if device_id in self._records:
                self._records[device_id].status = "disconnected"

    def expected(self) -> list[str]:
        """Devices a round may count on: named or seen, and not seen to disconnect."""
        with self._lock:
            return sorted(name for name, d in self._records.items() if d.status != "disconnected")

    def admitted(self, device_id: str) -> bool:
        """The device reported a budget (it may be sent tasks)."""
        with self._lock:
            record = self._records.get(device_id)
            return record is not None and record.usable_bytes > 0

    def record(self, device_id: str) -> DeviceRecord:
        """A copy of the device's record (KeyError if it was never named nor seen)."""
        with self._lock:
            return dataclasses.replace(self._records[device_id])

    # ---------------------------------------------------------------------------------- budgets

    def training_plan(self, device_id: str) -> Plan:
        """The sub-network an admitted device trains: the policy's plan for its budget, less any shrink."""
        record = self.record(device_id)
        return self.planner.plan(device_id, record.usable_bytes - record.shrink_bytes, record.margin_bytes)

    def round_plans(self, chosen: Sequence[str], index: int) -> dict[str, Plan]:
        """Each chosen device's training plan; a device none fits sits round ``index`` out (never
        stopping the round: a budget that came from a checkpoint may have been shrunk too far)."""
        plans = {}
        for device_id in chosen:
            try:
                plans[device_id] = self.training_plan(device_id)
            except BudgetError as exc:
                logger.warning("round %d: %s sits this round out: %s", index, device_id, exc)
        return plans

    def serving_bytes(self, device_id: str) -> int:
        """What the device's served model may hold: its training bytes plus its runtime footprint."""
        record = self.record(device_id)
        return inference_bytes(
            record.usable_bytes - record.shrink_bytes,
            record.margin_bytes,
            record.runtime_bytes,
            self.planner.min_margin_bytes,
        )

    def note_peak(self, device_id: str, peak_rss_bytes: int) -> None:
        """A device measured more than its budget allows: its next sub-network is planned smaller.

        The allowance is what the training process may hold: the usable budget plus the runtime
        footprint the device reported. The overshoot, and 2 % of the budget more, come off the budget
        the planner sees for this device from now on (kept in the checkpointed registry) -- unless no
        sub-network would fit what is left: a shrink that would make planning fail is never kept (the
        device keeps its plan and, if it really cannot train it, loses its rounds, not the run).
        """
        with self._lock:
            record = self._records.get(device_id)
            if record is None or peak_rss_bytes <= 0 or record.usable_bytes <= 0:
                return
            allowance = record.usable_bytes + record.runtime_bytes
            if peak_rss_bytes <= allowance:
                return
            shrink = record.shrink_bytes + peak_rss_bytes - allowance + record.usable_bytes // 50
            usable, margin = record.usable_bytes, record.margin_bytes
        try:
            self.planner.plan(device_id, usable - shrink, margin)
        except BudgetError as exc:
            logger.warning(
                "device %s peaked at %s, above its allowance of %s, but no sub-network fits %s less (%s):"
                " its plan stays",
                device_id,
                format_bytes(peak_rss_bytes),
                format_bytes(allowance),
                format_bytes(shrink),
                exc,
            )
            return
        with self._lock:
            record.shrink_bytes = max(record.shrink_bytes, shrink)
        logger.warning(
            "device %s peaked at %s, above its allowance of %s: planning its next sub-network for %s less",
            device_id,
            format_bytes(peak_rss_bytes),
            format_bytes(allowance),
            format_bytes(shrink),
        )

    def note_round(self, index: int, outcomes: Iterable[DeviceOutcome]) -> None:
        """Count a finished round's outcomes in each device's record."""
        with self._lock:
            for o in outcomes:
                record = self._records.setdefault(o.device_id, DeviceRecord(o.device_id))
                record.last_round = index
                if o.status == "ok":
                    record.rounds_ok += 1
                else:
                    record.rounds_failed += 1

    # ------------------------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The registry as JSON: status, budget, rounds taken part in."""
        with self._lock:
            return {name: dataclasses.asdict(d) for name, d in self._records.items()}

    def load(self, data: Mapping[str, Mapping[str, Any]], keep: Sequence[str] = ()) -> None:
        """Take records from a checkpoint's registry (only those in ``keep``, when given)."""
        known = {f.name for f in dataclasses.fields(DeviceRecord)}
        with self._lock:
            for name, fields in data.items():
                if keep and name not in keep:
                    continue  # no longer named in the configuration
                self._records[name] = DeviceRecord(**{k: v for k, v in fields.items() if k in known})
