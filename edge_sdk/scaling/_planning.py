"""What a device is planned: its training and inference sub-networks from the budget it reports.

One rule, used by the coordinator (admission, rounds, deployment) and by ``edge-sdk profile --model``,
so a device can see on its own what the coordinator will send it.

Training. A device reports ``usable`` (bytes for weights, gradients, optimizer state and activations,
its runtime footprint and its own safety margin already taken out). Planning keeps at least
``min_margin`` in reserve for what the memory model does not count; a detected budget's own margin
counts towards it, an override (``--memory-budget``, margin 0) gets all of it taken::

    training bytes  = usable - max(0, min_margin - margin)      (memory model with runtime = 0)

With a lever policy (:class:`~edge_sdk.scaling._policy.LeverPolicy`) the training plan chooses levers
before widths (:func:`~edge_sdk.scaling._search.plan_training`); without one it is plain training.

Inference. The served model runs in a process without torch (ONNX Runtime), so the runtime footprint
the device reported is free for it; the inference memory model counts ONNX Runtime's own::

    inference bytes = training bytes + runtime footprint        (memory model with its ORT runtime)

The device exports the served sub-network in its torch process (``edge_sdk.serving._install``), so that must
fit too: runtime footprint + ``export_estimate`` <= inference bytes, i.e. the export's own bytes
within the training bytes (``serving_estimate`` takes the larger moment). The inference sub-network is
never smaller than the training one; if not even that one's export fits (int8 export of a model whose
training barely fits a small budget), the training sub-network is served anyway and the plan says so
(``fits`` is False): a device can always serve what it trained, at the risk of its export's peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_sdk._errors import BudgetError
from edge_sdk._levers import Levers
from edge_sdk._spec import SubnetSpec
from edge_sdk._units import format_bytes
from edge_sdk.scaling._budget import DEFAULT_MIN_MARGIN_BYTES, inference_bytes, training_bytes
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory import (
    INFERENCE_RUNTIME_BYTES,
    MemoryEstimate,
    Workload,
    inference_estimate,
    serving_estimate,
    workload_for,
)
from edge_sdk.scaling._memory_lm import lm_serving_estimate
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.scaling._salience import Salience
from edge_sdk.scaling._search import Plan, _ffn_step, plan_inference, plan_training

__all__ = [
    "DevicePlans",
    "ServingPlan",
    "could_grow",
    "levers_line",
    "lm_serving_estimator",
    "plan_device",
    "plan_dict",
    "plan_serving",
    "plan_table",
]


@dataclass(frozen=True)
class ServingPlan:
    """The sub-network a device serves, and what its budget allowed."""

    plan: Plan
    budget: int  # inference bytes: what the served model's process (and its export) may hold
    could_grow: bool  # the budget holds more than the training sub-network
    fits: bool  # False: not even the training sub-network's serving fits; it is served anyway


def _grown(spec: SubnetSpec, index: int, *, heads: int = 0, ffn_to: int | None = None) -> SubnetSpec:
    layers = tuple(
        dataclasses.replace(layer, heads=layer.heads + heads, ffn=layer.ffn if ffn_to is None else ffn_to)
        if layer.index == index
        else layer
        for layer in spec.layers
    )
    return SubnetSpec(spec.parent, layers)


def could_grow(parent: ParentModel, floor: SubnetSpec, fits: Callable[[SubnetSpec], bool]) -> bool:
    """Whether one more head or FFN block (the search's units) on some kept layer of ``floor`` fits."""
    dims = parent.dims
    step = _ffn_step(dims.ffn)
    candidates: list[SubnetSpec] = []
    for layer in floor.layers:  # a dropped layer stays dropped: the search never adds layers back
        if layer.heads < dims.num_heads:
            candidates.append(_grown(floor, layer.index, heads=dims.group))  # one more KV group
        if layer.ffn < dims.ffn:
            candidates.append(_grown(floor, layer.index, ffn_to=min(dims.ffn, (layer.ffn // step + 1) * step)))
    return any(fits(spec) for spec in candidates)


def lm_serving_estimator(
    parent: ParentModel, work: Workload, *, runtime_footprint: int | None, quantize: bool
) -> Callable[[SubnetSpec, int], MemoryEstimate]:
    """A causal LM's serving model as an estimator (spec, params -> estimate): serving in ONNX Runtime
    with its KV cache at ``work``'s tokens and the table's second copy, or its export, the larger."""
    lm_work = workload_for(parent, work)

    def estimate(spec: SubnetSpec, params: int) -> MemoryEstimate:
        return lm_serving_estimate(spec, params, lm_work, runtime_footprint=runtime_footprint, quantize=quantize)

    return estimate


def plan_serving(
    parent: ParentModel,
    salience: Salience,
    training: Plan,
    *,
    budget: int,
    work: Workload,
    runtime_footprint: int | None,
    quantize: bool = False,
    estimator: Callable[[SubnetSpec, int], MemoryEstimate] | None = None,
) -> ServingPlan:
    """The inference sub-network for inference bytes ``budget``, never smaller than ``training``'s.

    ``runtime_footprint`` (the device's torch runtime) adds the export's constraint; None leaves it
    out (ONNX Runtime serving only, as ``edge-coordinator plan`` shows for a bare memory size).
    ``estimator`` (spec, params -> estimate) prices every sub-network instead; a causal LM's default is
    its own serving model (:func:`lm_serving_estimator`: the KV cache, ONNX Runtime's copy of the
    table, the LLM export), so every caller (a run's deploys, ``edge-sdk profile --model``) prices an
    LLM alike.
    """

    if estimator is None and parent.task == "causal-lm":
        estimator = lm_serving_estimator(parent, work, runtime_footprint=runtime_footprint, quantize=quantize)
    work = workload_for(parent, work)

    def estimate(spec: SubnetSpec, params: int) -> MemoryEstimate:
        if estimator is not None:
            return estimator(spec, params)
        if runtime_footprint is None:
            return inference_estimate(spec, params, work, INFERENCE_RUNTIME_BYTES)
        return serving_estimate(spec, params, work, runtime_footprint=runtime_footprint, quantize=quantize)

    try:
        plan = plan_inference(
            parent,
            salience,
            budget,
            work,
            floor=training.spec,
            export_footprint=runtime_footprint,
            quantize=quantize,
            estimator=estimator,
        )
    except BudgetError:
        served = dataclasses.replace(training, estimate=estimate(training.spec, training.params), budget=budget)
        return ServingPlan(served, budget, could_grow=False, fits=False)
    grow = not training.spec.is_full and could_grow(
        parent, training.spec, lambda spec: estimate(spec, param_count(parent, spec)).total <= budget
    )
    return ServingPlan(plan, budget, could_grow=grow, fits=True)


@dataclass(frozen=True)
class DevicePlans:
    """The sub-networks one device trains and serves."""

    training: Plan
    serving: ServingPlan

    @property
    def inference(self) -> Plan:
        return self.serving.plan


def plan_device(
    parent: ParentModel,
    salience: Salience,
    *,
    usable: int,
    margin: int = 0,
    runtime_footprint: int = 0,
    train: Workload,
    infer: Workload,
    quantize: bool = False,
    min_margin: int = DEFAULT_MIN_MARGIN_BYTES,
    policy: LeverPolicy | None = None,
) -> DevicePlans:
    """Both plans for a device's budget; BudgetError when not even the smallest sub-network trains.

    ``policy``: the levers training may use (None: plain training).
    """
    budget = training_bytes(usable, margin, min_margin)
    if budget <= 0:
        raise BudgetError(f"no sub-network fits: the budget is below the safety margin of {format_bytes(min_margin)}")
    training = plan_training(parent, salience, budget, train, runtime=0, policy=policy)
    serving = plan_serving(
        parent,
        salience,
        training,
        budget=inference_bytes(usable, margin, runtime_footprint, min_margin),
        work=infer,
        runtime_footprint=runtime_footprint,
        quantize=quantize,
    )
    return DevicePlans(training, serving)


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
    """A plan as JSON: spec, per-layer widths, parameters, predicted peak and its parts.

    A training plan adds its levers, what plain training of the same sub-network would need and
    what the levers save, and the step's predicted compute relative to plain training.
    """
    out = {
        "spec": plan.spec.to_dict(),
        "layers": [{"index": ly.index, "heads": ly.heads, "ffn": ly.ffn} for ly in plan.spec.layers],
        "params": plan.params,
        "params_fraction": plan.params_fraction,
        "salience_kept": plan.salience_kept,
        "budget_bytes": plan.budget,
        "predicted_peak_bytes": plan.estimate.total,
        "predicted": _estimate_dict(plan.estimate),
    }
    if plan.plain is not None:
        out |= {
            "levers": plan.levers.to_dict(),
            "levers_described": plan.levers.describe(),
            "plain_peak_bytes": plan.plain.total,
            "levers_save_bytes": plan.plain.total - plan.estimate.total,
            "relative_step_time": plan.step_time,
        }
    return out


def levers_line(plan: Plan) -> str | None:
    """One line on a training plan's levers and the memory they buy (None without levers)."""
    if plan.plain is None or plan.levers == Levers():
        return None
    return (
        f"levers: {plan.levers.describe()}: peak {format_bytes(plan.estimate.total)} where plain training of "
        f"this sub-network needs {format_bytes(plan.plain.total)} (saves "
        f"{format_bytes(plan.plain.total - plan.estimate.total)}); step compute x{plan.step_time:.2f} of plain"
    )


def plan_table(title: str, plan: Plan) -> list[str]:
    """A plan as table lines: a summary, one row per layer, its levers if any, the memory model's parts."""
    d = plan.spec.parent
    rows = [
        f"{title}: {plan.params:,} parameters ({plan.params_fraction:.0%} of the full model), "
        f"predicted peak {format_bytes(plan.estimate.total)} of {format_bytes(plan.budget)}, "
        f"salience kept {plan.salience_kept:.0%}",
        f"  {'layer':>5}  {'heads':>9}  {'ffn':>11}",
    ]
    rows += [f"  {ly.index:>5}  {ly.heads:>4} / {d.num_heads:<2}  {ly.ffn:>5} / {d.ffn:<5}" for ly in plan.spec.layers]
    e = plan.estimate
    line = levers_line(plan)
    if line is not None:
        rows.append(f"  {line}")
    rows.append(
        f"  memory: weights {format_bytes(e.weights)}, gradients {format_bytes(e.gradients)}, "
        f"optimizer {format_bytes(e.optimizer)}, activations {format_bytes(e.activations)}, "
        f"transient {format_bytes(e.transient)}, runtime {format_bytes(e.runtime)}"
    )
    return rows
