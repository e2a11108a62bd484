"""What a device is planned: its training and inference sub-networks from the budget it reports.

One rule, used by the coordinator (admission, rounds, deployment) and by ``edge-sdk profile --model``,
so a device can see on its own what the coordinator will send it.

Training. A device reports ``usable`` (bytes for weights, gradients, optimizer state and activations,
its runtime footprint and its own safety margin already taken out). Planning keeps at least
``min_margin`` in reserve for what the memory model does not count; a detected budget's own margin
counts towards it, an override (``--memory-budget``, margin 0) gets all of it taken::

    training bytes  = usable - max(0, min_margin - margin)      (memory model with runtime = 0)

Inference. The served model runs in a process without torch (ONNX Runtime), so the runtime footprint
the device reported is free for it; the inference memory model counts ONNX Runtime's own::

    inference bytes = training bytes + runtime footprint        (memory model with its ORT runtime)

and the inference sub-network is never smaller than the training one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._budget import DEFAULT_MIN_MARGIN_BYTES, inference_bytes, training_bytes
from ._errors import BudgetError
from ._memory import INFERENCE_RUNTIME_BYTES, MemoryEstimate, Workload
from ._parent import ParentModel
from ._salience import Salience
from ._search import Plan, plan_inference, plan_training
from ._units import format_bytes

__all__ = ["DevicePlans", "plan_device", "plan_dict", "plan_table"]

@dataclass(frozen=True)
class DevicePlans:
    """The sub-networks one device trains and serves."""

    training: Plan
    inference: Plan


def plan_device(
    parent: ParentModel,
    salience: Salience,
    *,
    usable: int,
    margin: int = 0,
    runtime_footprint: int = 0,
    train: Workload,
    infer: Workload,
    min_margin: int = DEFAULT_MIN_MARGIN_BYTES,
) -> DevicePlans:
    """Both plans for a device's budget; BudgetError when not even the smallest sub-network trains."""
    budget = training_bytes(usable, margin, min_margin)
    if budget <= 0:
        raise BudgetError(f"no sub-network fits: the budget is below the safety margin of {format_bytes(min_margin)}")
    training = plan_training(parent, salience, budget, train, runtime=0)
    inference = plan_inference(
        parent,
        salience,
        inference_bytes(usable, margin, runtime_footprint, min_margin),
        infer,
        floor=training.spec,
        runtime=INFERENCE_RUNTIME_BYTES,
    )
    return DevicePlans(training, inference)


# ----------------------------------------------------------------------------------------- reports


def _estimate_dict(est: MemoryEstimate) -> dict[str, int]:
    return {
        "total": est.total,
        "weights": est.weights,
        "gradients": est.gradients,
        "optimizer": est.optimizer,
        "activations": est.activations,
        "transient": est.transient,
        "runtime": est.runtime,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    """A plan as JSON: spec, per-layer widths, parameters, predicted peak and its parts."""
    return {
        "spec": plan.spec.to_dict(),
        "layers": [{"index": ly.index, "heads": ly.heads, "ffn": ly.ffn} for ly in plan.spec.layers],
        "params": plan.params,
        "params_fraction": plan.params_fraction,
        "salience_kept": plan.salience_kept,
        "budget_bytes": plan.budget,
        "predicted_peak_bytes": plan.estimate.total,
        "predicted": _estimate_dict(plan.estimate),
    }


def plan_table(title: str, plan: Plan) -> list[str]:
    """A plan as table lines: a summary, one row per layer, and the memory model's parts."""
    d = plan.spec.parent
    rows = [
        f"{title}: {plan.params:,} parameters ({plan.params_fraction:.0%} of the full model), "
        f"predicted peak {format_bytes(plan.estimate.total)} of {format_bytes(plan.budget)}, "
        f"salience kept {plan.salience_kept:.0%}",
        f"  {'layer':>5}  {'heads':>9}  {'ffn':>11}",
    ]
    rows += [
        f"  {ly.index:>5}  {ly.heads:>4} / {d.num_heads:<2}  {ly.ffn:>5} / {d.ffn:<5}" for ly in plan.spec.layers
    ]
    e = plan.estimate
    rows.append(
        f"  memory: weights {format_bytes(e.weights)}, gradients {format_bytes(e.gradients)}, "
        f"optimizer {format_bytes(e.optimizer)}, activations {format_bytes(e.activations)}, "
        f"transient {format_bytes(e.transient)}, runtime {format_bytes(e.runtime)}"
    )
    return rows
