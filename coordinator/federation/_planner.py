"""What each device trains: a width policy (a value passed to the engine) and the planner applying it.

A :class:`WidthPolicy` says how a device's sub-network is chosen:

- ``"budget"`` (RaFFM, the default): the largest sub-network whose training fits the budget the
  device reports (:func:`edge_sdk.scaling.plan_training`), searched for the planning bytes

      planning bytes = usable - max(0, min_margin - margin)

  (``margin``: what a detected budget already set aside; ``min_margin``: the run's reserve for what
  the memory model does not count, ``[federation] min_margin``);
- ``"full"`` (FedAvg): every device trains the whole model, memory ignored;
- ``"static"`` (HeteroFL-style): fixed width ratios (``ratios``), dealt to the named devices after a
  seeded shuffle (``salt``), whatever their memory;
- ``"exclusive"``: the full model in plain training, and only for devices whose budget affords it;
  the others are refused (the federation of a peer that can only train the whole model).

Under ``"full"`` and ``"static"`` memory never refuses a device; the plans still carry the memory
model's prediction, so a report can show who was sent more than fits. Plans depend on the parent's
shapes only, never on its weights: the :class:`Planner` keeps a skeleton of the parent (meta
tensors), so it neither pins an old global model nor changes as rounds merge updates.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from coordinator.federation._tables import TrainingConfig
from edge_sdk import SubnetSpec, image_seq_len
from edge_sdk._errors import BudgetError, ConfigError
from edge_sdk._units import format_bytes
from edge_sdk.scaling import (
    LeverPolicy,
    ParentModel,
    Plan,
    Salience,
    Workload,
    param_count,
    plan_training,
    training_bytes,
    training_estimate,
    workload_for,
)

__all__ = ["BUDGET", "WIDTHS", "Planner", "WidthPolicy", "training_workload"]

WIDTHS = ("budget", "full", "static", "exclusive")
_CACHE_LIMIT = 1024  # distinct planning budgets remembered (a search costs milliseconds)


@dataclasses.dataclass(frozen=True)
class WidthPolicy:
    """How devices' widths are chosen: ``kind`` "budget", "full" or "static" (see the module docstring)."""

    kind: str = "budget"
    ratios: tuple[float, ...] = (1.0, 0.5, 0.25)  # "static": the width ratios dealt to the devices
    salt: str = ""  # "static": seeds the shuffle that deals the ratios

    def __post_init__(self) -> None:
        if self.kind not in WIDTHS:
            raise ConfigError(f"width policy must be one of {', '.join(map(repr, WIDTHS))}, got {self.kind!r}")
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise ConfigError(f"width ratios must be a non-empty list of numbers in (0, 1], got {self.ratios!r}")

    def levels(self, names: Sequence[str]) -> dict[str, float]:
        """Each named device's ratio under "static": the ratios dealt in turn after a seeded shuffle."""
        order = sorted(names)
        random.Random(zlib.crc32(f"{self.salt}/levels".encode())).shuffle(order)
        return {name: self.ratios[i % len(self.ratios)] for i, name in enumerate(order)}


BUDGET = WidthPolicy()


class Planner:
    """One device's training sub-network under a width policy (thread-safe; budget searches cached)."""

    def __init__(
        self,
        parent: ParentModel,
        salience: Salience,
        work: Workload,
        *,
        min_margin_bytes: int,
        policy: WidthPolicy = BUDGET,
        levers: LeverPolicy | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        skeleton = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in parent.state.items()}
        self._shapes = parent.with_state(skeleton)
        self.salience = salience
        self.work = workload_for(parent, work)  # a decoder's layout and logits (encoders: unchanged)
        self.policy = policy
        self.levers = LeverPolicy() if levers is None else levers
        self.min_margin_bytes = min_margin_bytes
        self._levels = policy.levels(devices) if policy.kind == "static" else {}
        self._full_params = param_count(self._shapes, SubnetSpec.full(self._shapes.dims))
        self._cache: dict[int, Plan] = {}
        self._lock = threading.Lock()

    def planning_bytes(self, usable_bytes: int, margin_bytes: int = 0) -> int:
        """What planning may spend of a device's usable budget.

        A device whose budget already set ``margin_bytes`` aside (a detected budget) loses nothing more;
        one that did not (``--memory-budget``: margin 0) keeps ``min_margin_bytes`` in reserve for what
        the memory model does not count.
        """
        return training_bytes(usable_bytes, margin_bytes, self.min_margin_bytes)

    def plan(self, device_id: str, usable_bytes: int, margin_bytes: int = 0) -> Plan:
        """The sub-network ``device_id`` trains with this budget (BudgetError when "budget" finds none)."""
        if self.policy.kind == "full":
            return self.fixed(1.0, usable_bytes)
        if self.policy.kind == "static":
            return self.fixed(self._levels.get(device_id, self.policy.ratios[0]), usable_bytes)
        if self.policy.kind == "exclusive":
            return self.exclusive(usable_bytes, margin_bytes)
        return self.search(usable_bytes, margin_bytes)

    def exclusive(self, usable_bytes: int, margin_bytes: int = 0) -> Plan:
        """The full model in plain training, for a device whose budget affords it; BudgetError otherwise
        (under "exclusive" only such devices take part: the federation a memory-blind peer would run)."""
        plan = self.fixed(1.0, usable_bytes)
        if plan.estimate.total > self.planning_bytes(usable_bytes, margin_bytes):
            raise BudgetError(
                f"exclusive: plain training of the full model needs {format_bytes(plan.estimate.total)},"
                f" more than this budget's {format_bytes(self.planning_bytes(usable_bytes, margin_bytes))}"
            )
        return plan

    def search(self, usable_bytes: int, margin_bytes: int = 0) -> Plan:
        """The largest sub-network whose training fits the planning bytes of this budget."""
        budget = self.planning_bytes(usable_bytes, margin_bytes)
        if budget <= 0:
            raise BudgetError(
                f"no sub-network fits: the budget is below the safety margin of {format_bytes(self.min_margin_bytes)}"
            )
        with self._lock:
            plan = self._cache.get(budget)
        if plan is None:
            plan = plan_training(self._shapes, self.salience, budget, self.work, runtime=0, policy=self.levers)
            with self._lock:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[budget] = plan
        return plan

    def fixed(self, ratio: float, budget: int) -> Plan:
        """The plan of a fixed width ratio (1: the full model), with its predicted training memory."""
        dims = self._shapes.dims
        spec = SubnetSpec.full(dims) if ratio >= 1 else SubnetSpec.from_ratio(dims, ratio)
        params = param_count(self._shapes, spec)
        estimate = training_estimate(spec, params, self.work, runtime=0)
        return Plan(spec, params, estimate, budget, float("nan"), params / self._full_params)


def _dropout_active(dropout: float | None, config: Mapping[str, Any]) -> bool:
    """Whether training keeps dropout masks: the task's dropout, or (None) the model's own (a ViT's is 0;
    a config naming no dropout probability counts as dropout, the larger prediction)."""
    if dropout is not None:
        return dropout != 0.0
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
    values = [config[k] for k in keys if isinstance(config.get(k), int | float)]
    return not values or any(v > 0 for v in values)


def training_workload(config: Mapping[str, Any], training: TrainingConfig, *, deltas: bool = False) -> Workload:
    """What one local training task of the run asks of a device: batch, sequence (a ViT's patches +
    [CLS], whatever ``seq_len`` says), dropout masks, steps and vocabulary. ``deltas``: updates travel
    as deltas (an update encoding is granted), so a device keeps a copy of what it trains in place."""
    return Workload(
        training.batch_size,
        image_seq_len(config) or training.seq_len,
        dropout=_dropout_active(training.dropout, config),
        steps=training.local_steps,
        vocab=int(config.get("vocab_size", 0) or 0),
        keeps_received=deltas,
    )
