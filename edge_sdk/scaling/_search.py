"""Budget search: the sub-network that keeps the most salience and fits a memory budget.

After reordering, each layer's heads and FFN neurons are sorted by salience, so shrinking a layer
drops its least salient head or neuron block, whose cost in bytes is what the memory model saves
without it; salience is made comparable across layers and kinds
by taking each score as a fraction of its group's total (one group per layer and kind). The search
maximises the sum over groups of log(fraction kept): the log makes each further cut in a group
dearer, so no layer is stripped to one head while another keeps all twelve. Starting from the full
model, it drops the unit that loses the least of that objective per byte saved until the prediction
fits; the sub-networks it returns for growing budgets are nested (the drop order does not depend on
the budget).

Levers before widths. Given a :class:`~edge_sdk.scaling._policy.LeverPolicy`, training is planned
in three tiers: the full model with the levers that cost no accuracy (micro-batches, checkpointing,
embedding rows, SDPA), then with those that cost a little (frozen embeddings, then LoRA, the largest
rank that fits), and only when no allowed lever set fits the full model, the width search above,
run on the least memory any allowed lever set needs for each candidate sub-network; the levers of
the sub-network it finds are then chosen again by the same order
(:mod:`~edge_sdk.scaling._lever_choice`). Without a policy, training is planned plain (no lever).

Inference is planned the same way with the inference memory model, never below the training
sub-network (a device can always serve what it trained).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from edge_sdk._errors import BudgetError
from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk._units import format_bytes
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._lever_choice import LeverChooser
from edge_sdk.scaling._memory import (
    INFERENCE_RUNTIME_BYTES,
    TRAINING_RUNTIME_BYTES,
    MemoryEstimate,
    Workload,
    inference_estimate,
    serving_estimate,
    training_estimate,
    workload_for,
)
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.scaling._reorder import group_order
from edge_sdk.scaling._salience import Salience

__all__ = ["Plan", "plan_inference", "plan_training"]

Estimator = Callable[[SubnetSpec, int], MemoryEstimate]


@dataclass(frozen=True)
class Plan:
    """A sub-network chosen for a budget, with what it costs and keeps.

    Training plans also carry the levers to train it with, what plain training of the same
    sub-network would need (``plain``: what the levers buy is ``plain.total - estimate.total``) and
    the step's predicted compute relative to plain training (``step_time``, 1.0 without levers).
    """

    spec: SubnetSpec
    params: int
    estimate: MemoryEstimate
    budget: int
    salience_kept: float  # mean over groups of the fraction of salience kept, in [0, 1]
    params_fraction: float  # params / params of the full model
    levers: Levers = field(default_factory=Levers)
    plain: MemoryEstimate | None = None  # training plans: plain training's estimate of the same spec
    step_time: float = 1.0  # training plans: step compute relative to plain training of the same spec


def _ffn_step(ffn: int) -> int:
    """FFN neurons move in blocks: about 48 per layer (32 for MiniLM's 1536, 64 for BERT-base's 3072)."""
    return max(1, ffn // 48)


def _fractions(scores: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Scores in reordered order -> each as a fraction of its row's total (uniform if all zero).

    The order is the reordering's: descending, or for heads in KV groups of ``group``, groups by
    their total and heads descending within each (:func:`~edge_sdk.scaling._reorder.group_order`).
    """
    s = scores.double().clamp_min(0)
    s = torch.stack([row[group_order(row, group)[1]] for row in s])
    total = s.sum(dim=1, keepdim=True)
    return torch.where(total > 0, s / total.clamp_min(1e-300), 1.0 / s.shape[1])


def _salience_kept(spec: SubnetSpec, heads: torch.Tensor, ffn: torch.Tensor) -> float:
    kept = {layer.index: layer for layer in spec.layers}
    values = []
    for i in range(spec.parent.num_layers):
        layer = kept.get(i)
        values.append(float(heads[i, : layer.heads].sum()) if layer else 0.0)
        values.append(float(ffn[i, : layer.ffn].sum()) if layer else 0.0)
    return sum(values) / len(values)


def _with_layer(spec: SubnetSpec, index: int, **change: int) -> SubnetSpec:
    layers = tuple(replace(layer, **change) if layer.index == index else layer for layer in spec.layers)
    return SubnetSpec(spec.parent, layers)


def _search(
    parent: ParentModel,
    salience: Salience,
    budget: int,
    estimate: Estimator,
    *,
    floor: SubnetSpec | None,
    what: str,
) -> Plan:
    dims = parent.dims
    full = SubnetSpec.full(dims)
    heads_f, ffn_f = _fractions(salience.heads, dims.group), _fractions(salience.ffn)
    step, group = _ffn_step(dims.ffn), dims.group  # heads go a KV group (group query heads) at a time
    low = {layer.index: layer for layer in floor.layers} if floor else {}
    min_heads = [low[i].heads if i in low else group for i in range(dims.num_layers)]
    min_ffn = [low[i].ffn if i in low else step for i in range(dims.num_layers)]

    # Parameters are linear in each layer's widths: count them once, then add up.
    full_params = param_count(parent, full)
    per_head = (full_params - param_count(parent, _with_layer(full, 0, heads=dims.num_heads - group))) / group
    per_neuron = (full_params - param_count(parent, _with_layer(full, 0, ffn=dims.ffn - step))) / step

    heads = [dims.num_heads] * dims.num_layers
    ffn = [dims.ffn] * dims.num_layers

    def shape(h: list[int], f: list[int]) -> SubnetSpec:
        return SubnetSpec(dims, tuple(LayerSpec(i, h[i], f[i]) for i in range(dims.num_layers)))

    def total(h: list[int], f: list[int]) -> int:
        params = full_params - round(per_head * sum(dims.num_heads - x for x in h))
        params -= round(per_neuron * sum(dims.ffn - x for x in f))
        return estimate(shape(h, f), params).total

    def loss(fractions: torch.Tensor, keep_now: int, keep_after: int) -> float:
        before = float(fractions[:keep_now].sum())
        after = float(fractions[:keep_after].sum())
        return math.log(max(before, 1e-12)) - math.log(max(after, 1e-12))

    # Greedy: drop the unit that loses the least salience per byte it saves. Bytes are recomputed
    # at every step (the memory model is the larger of two moments of a step, so a unit's cost
    # depends on the rest); there are only 2 candidates per layer, the tail head and FFN block.
    current = total(heads, ffn)
    while current > budget:
        best: tuple[float, list[int], list[int], int] | None = None
        for i in range(dims.num_layers):
            if heads[i] > min_heads[i]:
                h = heads.copy()
                h[i] -= group
                after = total(h, ffn)
                ratio = loss(heads_f[i], heads[i], h[i]) / max(current - after, 1)
                if best is None or ratio < best[0]:
                    best = (ratio, h, ffn, after)
            if ffn[i] > min_ffn[i]:
                f = ffn.copy()
                f[i] = max(min_ffn[i], (ffn[i] - 1) // step * step)
                after = total(heads, f)
                ratio = loss(ffn_f[i], ffn[i], f[i]) / max(current - after, 1)
                if best is None or ratio < best[0]:
                    best = (ratio, heads, f, after)
        if best is None:
            break  # nothing left to drop
        _, heads, ffn, current = best

    spec = shape(heads, ffn)
    params = param_count(parent, spec)
    est = estimate(spec, params)
    if est.total > budget:
        smallest = "the training sub-network" if floor else "the smallest sub-network (1 head, 1 FFN block a layer)"
        raise BudgetError(
            f"no {what} sub-network of {dims.family} fits {format_bytes(budget)}: {smallest} needs "
            f"{format_bytes(est.total)} ({format_bytes(est.runtime)} of it the runtime itself)"
        )
    return Plan(
        spec=spec,
        params=params,
        estimate=est,
        budget=budget,
        salience_kept=_salience_kept(spec, heads_f, ffn_f),
        params_fraction=params / param_count(parent, full),
    )


def plan_training(
    parent: ParentModel,
    salience: Salience,
    budget: int,
    work: Workload,
    *,
    runtime: int = TRAINING_RUNTIME_BYTES,
    policy: LeverPolicy | None = None,
) -> Plan:
    """The sub-network whose training (AdamW, fp32) fits ``budget`` bytes and keeps the most salience.

    With ``policy``, levers come before widths (see the module docstring) and the plan carries the
    chosen :class:`~edge_sdk._levers.Levers`; without one, training is plain (no lever), as a
    coordinator that does not send levers must plan it.
    """
    if policy is not None:
        return _plan_with_levers(parent, salience, budget, work, runtime=runtime, policy=policy)
    work = workload_for(parent, work)
    plan = _search(
        parent,
        salience,
        budget,
        lambda spec, p: training_estimate(spec, p, work, runtime),
        floor=None,
        what="trainable",
    )
    return replace(plan, plain=plan.estimate)


def _plan_with_levers(
    parent: ParentModel, salience: Salience, budget: int, work: Workload, *, runtime: int, policy: LeverPolicy
) -> Plan:
    chooser = LeverChooser(parent, work, runtime, policy)
    full = SubnetSpec.full(parent.dims)
    full_params = param_count(parent, full)
    choice = chooser.best(full, full_params, budget)
    if choice is not None:
        spec, params, kept = full, full_params, 1.0
    else:
        try:
            cut = _search(
                parent, salience, budget, lambda s, p: chooser.cheapest(s, p).estimate, floor=None, what="trainable"
            )
        except BudgetError:
            raise _lever_budget_error(parent, budget, chooser) from None
        spec, params, kept = cut.spec, cut.params, cut.salience_kept
        choice = chooser.best(spec, params, budget)
        assert choice is not None, "the width search returned a sub-network no lever set fits"
    plain = chooser.price(spec, params, Levers())
    return Plan(
        spec=spec,
        params=params,
        estimate=choice.estimate,
        budget=budget,
        salience_kept=kept,
        params_fraction=params / full_params,
        levers=choice.levers,
        plain=plain.estimate,
        step_time=choice.macs / plain.macs,
    )


def _lever_budget_error(parent: ParentModel, budget: int, chooser: LeverChooser) -> BudgetError:
    dims = parent.dims
    smallest = SubnetSpec.uniform(dims, heads=dims.group, ffn=_ffn_step(dims.ffn))
    least = chooser.cheapest(smallest, param_count(parent, smallest))
    return BudgetError(
        f"no trainable sub-network of {dims.family} fits {format_bytes(budget)}, not even with every lever "
        f"the policy allows: the smallest sub-network (1 head, 1 FFN block a layer) with "
        f"{least.levers.describe()} needs {format_bytes(least.estimate.total)} "
        f"({format_bytes(least.estimate.runtime)} of it the runtime itself)"
    )


def plan_inference(
    parent: ParentModel,
    salience: Salience,
    budget: int,
    work: Workload,
    *,
    floor: SubnetSpec | None = None,
    runtime: int = INFERENCE_RUNTIME_BYTES,
    export_footprint: int | None = None,
    quantize: bool = False,
    estimator: Estimator | None = None,
) -> Plan:
    """The largest sub-network whose inference fits ``budget``, never smaller than ``floor``.

    With ``export_footprint`` (the device's torch runtime footprint), its export on the device must
    fit too (:func:`~edge_sdk.scaling._memory.serving_estimate`, int8 with ``quantize``). ``estimator``
    (spec, params -> estimate) prices sub-networks instead (a causal LM's serving model).
    """
    work = workload_for(parent, work)
    price: Estimator
    if estimator is not None:
        price = estimator
    elif export_footprint is None:
        price = lambda spec, p: inference_estimate(spec, p, work, runtime)  # noqa: E731
    else:
        footprint = export_footprint
        price = lambda spec, p: serving_estimate(  # noqa: E731
            spec, p, work, runtime_footprint=footprint, quantize=quantize
        )
    return _search(parent, salience, budget, price, floor=floor, what="servable")
