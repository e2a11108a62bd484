"""Deployment planning: the inference sub-network each device is sent, and what became of it.

When a run finishes (and on demand) the coordinator sends every connected device the largest
sub-network whose *inference* fits its budget, as a ``Deploy``; the device exports it to ONNX, checks
it and installs it (``edge_sdk.serving._install``). This module is pure (no socket, no clock): the server
(``_server``) drives it.

The rule is :mod:`edge_sdk.scaling._planning`'s, so ``edge-sdk profile --model`` shows a device what it will
be sent: the served model runs without torch, so the runtime footprint the device reported is free
for it, and the inference memory model counts ONNX Runtime's own::

    inference bytes = training bytes + runtime footprint     (training bytes: usable less the reserve)

searched at ``[deploy] batch_size`` x ``seq_len``, never below the device's training sub-network (its
*floor*: what the engine's registry plans for its training). :attr:`DeployPlan.could_grow` says
whether the budget holds more than the floor: the floor is not the full model and one more head or
FFN block (the search's unit) on some layer still fits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from coordinator.federation._config import DeployConfig
from coordinator.federation._records import width_of
from edge_sdk._units import format_bytes
from edge_sdk.protocol import InferenceSettings, torch_to_numpy
from edge_sdk.scaling import (
    ParentModel,
    Plan,
    Salience,
    Workload,
    export_estimate,
    extract,
    plan_serving,
)

if TYPE_CHECKING:
    from coordinator.federation._engine import FederationEngine

__all__ = [
    "DeployOrder",
    "DeployOutcome",
    "DeployPlan",
    "DeployStatus",
    "make_order",
    "outcome",
    "plan_deployment",
    "plan_inference_for",
]

DeployStatus = Literal["ok", "failed", "timeout", "skipped"]


@dataclasses.dataclass(frozen=True)
class DeployPlan:
    """One device's inference sub-network, next to the training sub-network it is never smaller than."""

    device_id: str
    training: Plan
    inference: Plan
    budget_bytes: int  # what the served model's process may hold (ONNX Runtime's footprint included)
    could_grow: bool  # the budget holds more than the training sub-network
    fits: bool = True  # False: not even the training sub-network's serving (export) fits; not sent (skipped)
    optimize: bool = False  # the export's transformer fusion fits the budget too: the device fuses

    @property
    def larger(self) -> bool:
        return self.inference.params > self.training.params


@dataclasses.dataclass(frozen=True)
class DeployOrder:
    """What the transport sends one device: the Deploy's fields and the sub-network's weights."""

    task_id: str
    device_id: str
    round: int
    plan: DeployPlan
    settings: InferenceSettings
    model_config: Mapping[str, Any]
    tensors: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DeployOutcome:
    """What became of one device's deploy (a line of the run's ``deployments.json``)."""

    device_id: str
    task_id: str
    round: int
    status: DeployStatus
    reason: str = ""
    train_params: int = 0
    params: int = 0
    params_fraction: float = 0.0
    train_width: str = ""
    width: str = ""
    could_grow: bool = False
    fits: bool = True
    budget_bytes: int = 0
    predicted_bytes: int = 0
    quantize: bool = False
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # as the device reported them
    bytes_out: int = 0
    seconds: float = 0.0
    spec: Mapping[str, Any] | None = None  # the inference sub-network's spec (JSON)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["metrics"] = {k: v for k, v in self.metrics.items() if math.isfinite(v)}
        data["spec"] = None if self.spec is None else dict(self.spec)
        return data

    def log_line(self) -> str:
        head = f"deploy {self.task_id or '-'} to {self.device_id} (round {self.round})"
        if self.status == "skipped":
            return f"{head}: skipped ({self.reason})"
        sizes = (
            f"trains {self.train_params / 1e6:.2f}M params ({self.train_width}),"
            f" serves {self.params / 1e6:.2f}M ({self.params_fraction:.0%}, {self.width})"
        )
        if not self.fits:
            sizes += f" (its export is predicted above the budget of {format_bytes(self.budget_bytes)})"
        if self.status != "ok":
            return f"{head}: {self.status.upper()} ({self.reason}); {sizes}; {self.seconds:.1f} s"
        m = self.metrics
        parts = [sizes, f"parity {m.get('parity_max_abs_diff', float('nan')):.2e}"]
        if "onnx_bytes" in m:
            parts.append(f"model.onnx {format_bytes(int(m['onnx_bytes']))}")
        if "int8_bytes" in m:
            drift = f"int8 {format_bytes(int(m['int8_bytes']))}"
            if "drift_agreement" in m:
                drift += f" (agreement {m['drift_agreement']:.3f}"
                if "drift_accuracy_drop" in m:
                    drift += f", accuracy drop {m['drift_accuracy_drop']:+.4f}"
                drift += ")"
            parts.append(drift)
        if "tokens_per_s" in m:  # a causal LM: its generation speed on the device
            parts.append(f"generates {m['tokens_per_s']:.1f} tokens/s")
        if "export_s" in m:
            parts.append(f"export {m['export_s']:.1f} s")
        return f"{head}: ok; " + "; ".join(parts) + f"; {self.seconds:.1f} s in all"


def plan_inference_for(
    parent: ParentModel,
    salience: Salience,
    training: Plan,
    *,
    device_id: str,
    budget_bytes: int,
    work: Workload,
    runtime_footprint: int | None = None,
    quantize: bool = False,
) -> DeployPlan:
    """The inference plan for a device whose training plan is ``training`` and inference bytes ``budget_bytes``.

    With ``runtime_footprint`` (what the device reported), its export must fit too (int8 with
    ``quantize``). If not even the training sub-network fits, the plan says so (``fits`` False) and the
    deploy service skips the device with the reason (its export would exceed its memory). The rule is
    :func:`edge_sdk.scaling._planning.plan_serving`, with the unfused export's bytes: the largest
    sub-network first. The export is then fused (``optimize``: faster int8 serving of short inputs) only
    if the fused export of that sub-network fits the budget too; else the device exports the plain
    graph, which ONNX Runtime still fuses partly when it loads it. A causal LM is priced by
    :func:`edge_sdk.scaling.lm_serving_estimate` (its KV cache at ``work``'s tokens, ONNX Runtime's copy
    of the embedding table, its larger export) and never fused.
    """
    serving = plan_serving(
        parent,
        salience,
        training,
        budget=budget_bytes,
        work=work,
        runtime_footprint=runtime_footprint,
        quantize=quantize,
    )
    params = serving.plan.params
    optimize = (  # a causal LM's export has no transformer fusion
        parent.task != "causal-lm"
        and serving.fits
        and runtime_footprint is not None
        and runtime_footprint + export_estimate(params, quantize=quantize, optimize=True) <= budget_bytes
    )
    return DeployPlan(
        device_id,
        training,
        serving.plan,
        budget_bytes,
        could_grow=serving.could_grow,
        fits=serving.fits,
        optimize=optimize,
    )


def plan_deployment(engine: FederationEngine, device_id: str, config: DeployConfig) -> DeployPlan:
    """The inference plan of an admitted device (KeyError if it never joined; BudgetError if nothing fits).

    Its budgets come from the engine's registry (:meth:`DeviceRegistry.training_plan` and
    :meth:`DeviceRegistry.serving_bytes`: the device's record, its measured peaks included).
    """
    registry = engine.registry
    record = registry.record(device_id)
    return plan_inference_for(
        engine.parent,
        engine.salience,
        registry.training_plan(device_id),
        device_id=device_id,
        budget_bytes=registry.serving_bytes(device_id),
        work=Workload(config.batch_size, config.seq_len),
        runtime_footprint=record.runtime_bytes,
        quantize=config.quantize,
    )


def make_order(engine: FederationEngine, device_id: str, config: DeployConfig, task_id: str) -> DeployOrder:
    """The Deploy for one device: its inference plan and the current global model's weights for it."""
    plan = plan_deployment(engine, device_id, config)
    parent = engine.parent  # the reference is swapped whole at the end of a round: this one stays consistent
    return DeployOrder(
        task_id=task_id,
        device_id=device_id,
        round=engine.round,
        plan=plan,
        settings=InferenceSettings(
            batch_size=config.batch_size, seq_len=config.seq_len, quantize=config.quantize, optimize=plan.optimize
        ),
        model_config=dict(engine.model_config),  # with the run's label map (id2label)
        tensors=torch_to_numpy(extract(parent, plan.inference.spec)),
    )


def outcome(
    order: DeployOrder,
    status: DeployStatus,
    reason: str = "",
    *,
    metrics: Mapping[str, float] | None = None,
    bytes_out: int = 0,
    seconds: float = 0.0,
) -> DeployOutcome:
    """The record of a deploy that was planned (sent or not)."""
    plan = order.plan
    return DeployOutcome(
        device_id=order.device_id,
        task_id=order.task_id,
        round=order.round,
        status=status,
        reason=reason,
        train_params=plan.training.params,
        params=plan.inference.params,
        params_fraction=plan.inference.params_fraction,
        train_width=width_of(plan.training.spec),
        width=width_of(plan.inference.spec),
        could_grow=plan.could_grow,
        fits=plan.fits,
        budget_bytes=plan.budget_bytes,
        predicted_bytes=plan.inference.estimate.total,
        quantize=order.settings.quantize,
        metrics=dict(metrics or {}),
        bytes_out=bytes_out,
        seconds=seconds,
        spec=plan.inference.spec.to_dict(),
    )
