"""One round's state: the orders it sent, the answers, the accepted updates, the traffic.

:func:`train_orders` builds a round's :class:`TrainOrder` per chosen device (its sub-network of the
global model, its training settings and seed, and the bound on the norm of what it may return:
``max_update_norm_ratio`` x the norm of what was sent, plus 1, and on the norm of the change they make:
``max_delta_norm_ratio`` x the norm of what was sent). An :class:`OpenRound` then records
one outcome per task (ok, rejected, failed, late, missing); the engine holds it under its lock.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator.federation._aggregate import ClientUpdate
from coordinator.federation._records import DeviceOutcome, Status, TrainOrder, width_of
from coordinator.federation._registry import DeviceRecord
from coordinator.federation._tables import TrainingConfig
from edge_sdk import SubnetSpec
from edge_sdk.protocol import TrainSettings, check_tensor_values, torch_to_numpy
from edge_sdk.scaling import Levers, ParentModel, Plan, extract

__all__ = ["OpenRound", "train_orders", "train_settings"]

logger = logging.getLogger(__name__)


def train_settings(
    training: TrainingConfig, *, seed: int, round_index: int, device_id: str, levers: Levers | None = None
) -> TrainSettings:
    """What a device's local training runs with: the run's ``[training]``, the levers planned for it,
    and a seed of its own (from ``[training] seed``, else the run's seed)."""
    base = seed if training.seed is None else training.seed
    return TrainSettings(
        local_steps=training.local_steps,
        lr=training.lr,
        batch_size=training.batch_size,
        seq_len=training.seq_len,
        prox_mu=training.prox_mu,
        seed=zlib.crc32(f"{base}/train/{round_index}/{device_id}".encode()),
        levers=Levers() if levers is None else levers,
        max_grad_norm=training.max_grad_norm,
        dropout=training.dropout,
    )


def train_orders(
    parent: ParentModel,
    plans: Mapping[str, Plan],
    *,
    round_index: int,
    training: TrainingConfig,
    seed: int,
    model_config: Mapping[str, Any],
    max_update_norm_ratio: float,
    max_delta_norm_ratio: float | None = None,
) -> dict[str, TrainOrder]:
    """One order per device of ``plans`` (task id -> order); devices of one width share the tensors."""
    orders: dict[str, TrainOrder] = {}
    sliced: dict[SubnetSpec, tuple[dict[str, np.ndarray], float]] = {}
    for device_id, plan in plans.items():
        if plan.spec not in sliced:
            tensors = torch_to_numpy(extract(parent, plan.spec))
            sliced[plan.spec] = (tensors, check_tensor_values(tensors, what="global sub-network"))
        tensors, norm = sliced[plan.spec]
        order = TrainOrder(
            task_id=f"r{round_index}-{device_id}-{uuid.uuid4().hex[:8]}",
            device_id=device_id,
            round=round_index,
            spec=plan.spec,
            params=plan.params,
            params_fraction=plan.params_fraction,
            predicted_bytes=plan.estimate.total,
            settings=train_settings(
                training, seed=seed, round_index=round_index, device_id=device_id, levers=plan.levers
            ),
            model_config=model_config,
            tensors=tensors,
            max_update_norm=max_update_norm_ratio * norm + 1.0,
            max_delta_norm=None if max_delta_norm_ratio is None else max_delta_norm_ratio * norm,
        )
        orders[order.task_id] = order
    return orders


@dataclasses.dataclass
class OpenRound:
    """The round in progress (not thread-safe: the engine holds it under its lock)."""

    index: int
    deadline: float
    orders: dict[str, TrainOrder]
    outcomes: dict[str, DeviceOutcome] = dataclasses.field(default_factory=dict)
    updates: dict[str, ClientUpdate] = dataclasses.field(default_factory=dict)
    traffic: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # device -> [out, in]
    closed: bool = False

    def pending(self) -> list[str]:
        """Task ids with no answer yet."""
        return [t for t in self.orders if t not in self.outcomes]

    def settled(self, now: float) -> bool:
        """Every task answered, or the deadline passed."""
        return not self.pending() or now >= self.deadline

    def count_traffic(self, device_id: str, bytes_out: int, bytes_in: int) -> None:
        entry = self.traffic.setdefault(device_id, [0, 0])
        entry[0] += bytes_out
        entry[1] += bytes_in

    def answer(
        self, task_id: str, status: Status, reason: str, record: DeviceRecord | None, **fields: Any
    ) -> DeviceOutcome:
        """Record (and log) what became of a task; ``record``: its device's budget, when known."""
        order = self.orders[task_id]
        outcome = DeviceOutcome(
            device_id=order.device_id,
            task_id=task_id,
            status=status,
            reason=reason,
            params=order.params,
            params_fraction=order.params_fraction,
            width=width_of(order.spec),
            levers=order.settings.levers.describe(),
            predicted_bytes=order.predicted_bytes,
            usable_bytes=record.usable_bytes if record else 0,
            runtime_bytes=record.runtime_bytes if record else 0,
            **fields,
        )
        self.outcomes[task_id] = outcome
        logger.log(
            logging.INFO if status == "ok" else logging.WARNING,
            "round %d: %s from %s%s",
            self.index,
            status,
            order.device_id,
            f" ({reason})" if reason else "",
        )
        return outcome

    def accepted(self) -> list[ClientUpdate]:
        """The updates to merge, in the order the tasks were sent."""
        return [self.updates[t] for t in self.orders if t in self.updates]

    def final_outcomes(self) -> tuple[DeviceOutcome, ...]:
        """Every task's outcome with its device's traffic (after the round closed)."""
        out = []
        for task_id, order in self.orders.items():
            sent, received = self.traffic.get(order.device_id, [0, 0])
            out.append(dataclasses.replace(self.outcomes[task_id], bytes_out=sent, bytes_in=received))
        return tuple(out)
