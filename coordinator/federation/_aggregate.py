"""Merging updates of different widths, coordinate by coordinate.

Client k trained the coordinates in its mask M_k, holds n_k samples and changed coordinate c by
d_k[c]; with weights w_k = n_k (see *shared tensors* below)::

    delta[c] = sum_k w_k M_k[c] d_k[c] / sum_k w_k M_k[c]    where some k covers c

Coordinates no client covered keep their value. The server optimizer turns ``delta`` into a step:
FedAvg (``x += server_lr * delta``) or FedAdam (moments updated only where covered).

What a client covers and its d_k depend on how it trained (``_updates``): a dense parameter covers
its prefix region (d_k = x_k - x); a row-trained embedding table covers only the rows it changed,
so each row is averaged over the devices that changed it (FedSubAvg); a LoRA-trained weight covers
its prefix region with d_k = B_k A_k, the product of the factors placed on the coordinates of its
sub-network, so devices of different widths and ranks average per coordinate in the space of the
product (averaging A and B separately would be biased); a frozen parameter covers nothing.

Federated LoRA of different ranks: merge into the weights every round. Device k, planned rank r_k
by its budget, receives the merged weights W and trains fresh adapters (A_k [r_k, in] random, B_k
[out, r_k] zero, so B_k A_k = 0 at the start) on its sub-network; it returns A_k and B_k (scaling
folded into B_k). The coordinator never keeps adapters: for every LoRA target (an encoder's six
linears; Llama's seven, q/k/v/o and gate/up/down) it forms the product and merges it like any
dense delta, coordinate by coordinate over the region P_k of the parent the sub-network covers::

    delta[c] = sum_k n_k [c in P_k] (B_k A_k)[c] / sum_k n_k [c in P_k],      W <- W + server_lr * delta

and the next round starts new adapters on the new W. Why this scheme, and not keeping adapters:

- it is exact in the space of the update: sum_k n_k B_k A_k is the weighted mean of the devices'
  changes, whatever their ranks, while averaging the factors gives (sum n_k B_k)(sum n_k A_k) / n^2,
  cross terms B_j A_k included (biased even at one rank);
- no rank-padding dilution: padding A_k, B_k with zeros to the largest rank and averaging (HetLoRA,
  FLoRA-by-padding) divides a high-rank device's extra directions by every device's weight, low-rank
  ones included, which contribute exactly zero there; the product has no "extra directions";
- no SVD redistribution: keeping a global adapter would need the merged product cut back to each
  device's rank every round (FlexLoRA's truncated SVD), which loses what lies outside the top r_k
  directions and can collapse ranks; here the merged change is applied in full;
- it composes with widths: B_k A_k lives in the sub-network's coordinates, the region P_k maps it
  onto the parent as every dense update is mapped, and a dense device's change averages in beside it.

The trade-off: the merged W is dense, so a round's global change is not low-rank (a device's
knowledge accumulates in W, not in an adapter that could be detached or shipped alone), each round
sends devices the full weights of their sub-network (they need W anyway to train on it), and the
adapters' optimizer state (AdamW moments) restarts every round, as a dense device's does here too.

Shared tensors -- those every width trains whole (embeddings, LayerNorms, biases of the layers'
outputs, pooler, classifier) -- may be protected from narrow updates (:class:`SharedProtection`):
averaged only over clients of at least a width fraction, or with w_k = n_k x width_k. The width of a
sub-network is the fraction of the parent's sliced linear weights it keeps::

    width = sum over kept layers (4 h d_a + 2 h d_ff) / (L (4 h H + 2 h F))

The default protects nothing (w_k = n_k for every tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from coordinator.federation._privacy import GaussianNoise, private_merge
from coordinator.federation._robust import AggregationRule, capped_weights, clip_scales, combine_sorted
from coordinator.federation._updates import ClientUpdate, Contribution, check_update, delta_norm
from edge_sdk import SubnetSpec
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ParentModel, regions

__all__ = [
    "SHARED_MODES",
    "AggregationRule",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "GaussianNoise",
    "Merge",
    "ServerOptimizer",
    "SharedProtection",
    "aggregate",
    "aggregate_round",
    "merge_deltas",
    "merge_round",
    "shared_tensors",
    "width_fraction",
]

SHARED_MODES = ("off", "min_width", "width_weighted")


@dataclass(frozen=True)
class SharedProtection:
    """How shared tensors are averaged: ``"off"`` (like every other tensor), ``"min_width"`` (only
    over clients of width >= ``min_width``; none such in a round: they keep their value), or
    ``"width_weighted"`` (each client weighted by samples x width)."""

    mode: str = "off"
    min_width: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in SHARED_MODES:
            raise ConfigError(f"shared-tensor protection must be one of {SHARED_MODES}, got {self.mode!r}")
        if not (isinstance(self.min_width, (int, float)) and 0.0 < self.min_width <= 1.0):
            raise ConfigError(f"shared-tensor protection: min_width must be in (0, 1], got {self.min_width!r}")

    def weight(self, samples: float, width: float) -> float:
        """A client's weight on a shared tensor."""
        if self.mode == "min_width":
            return float(samples) if width >= self.min_width - 1e-12 else 0.0
        if self.mode == "width_weighted":
            return samples * width
        return float(samples)


def width_fraction(parent: ParentModel, spec: SubnetSpec, whole: frozenset[str] | None = None) -> float:
    """The fraction of the parent's sliced weights ``spec`` keeps (1.0 for the full model).

    Sliced weights are the tensors not every width trains whole (:func:`shared_tensors`' complement:
    attention and FFN projections and their biases); each counts by its elements, so under
    grouped-query attention the key/value projections (whole KV groups) and a gated FFN's three
    matrices weigh what they hold: sum over sliced tensors of kept elements / of parent elements.
    ``whole``: :func:`shared_tensors` of ``parent``, if the caller has it already.
    """
    shapes, whole = parent.shapes(), shared_tensors(parent) if whole is None else whole

    def elements(s: SubnetSpec) -> int:
        return sum(
            _numel(shapes[name], region) for name, (_, region) in regions(parent, s).items() if name not in whole
        )

    total = elements(SubnetSpec.full(parent.dims))
    return elements(spec) / total if total else 1.0


def _numel(shape: Sequence[int], region: Sequence[slice]) -> int:
    return math.prod(len(range(*s.indices(n))) for s, n in zip(region, shape, strict=True))


def shared_tensors(parent: ParentModel) -> frozenset[str]:
    """Parent tensors every width trains whole: what the narrowest sub-network keeps entirely."""
    narrowest = SubnetSpec.uniform(parent.dims, heads=parent.dims.group, ffn=1)  # one KV group
    shapes = parent.shapes()
    return frozenset(
        name
        for name, (_, region) in regions(parent, narrowest).items()
        if _numel(shapes[name], region) == math.prod(shapes[name])
    )


def _add(num: torch.Tensor, den: torch.Tensor, c: Contribution, weight: float, scale: float = 1.0) -> None:
    if c.rows is not None:
        num.index_add_(0, c.rows, (weight * scale) * c.delta)
        den.index_add_(0, c.rows, torch.full_like(c.delta, weight))
    else:
        assert c.region is not None
        num[c.region] += (weight * scale) * c.delta
        den[c.region] += weight


@dataclass(frozen=True)
class Merge:
    """One round merged: the delta and coverage per tensor, and what the rule did to each update."""

    delta: dict[str, torch.Tensor]
    coverage: dict[str, torch.Tensor]  # sum of covering weights (a count of devices under DP); 0: uncovered
    norms: tuple[float, ...] = ()  # per update: the L2 norm of its delta over what it covered
    scales: tuple[float, ...] = ()  # per update: the factor its delta was scaled by (1.0: untouched)
    weights: tuple[float, ...] = ()  # per update: its sample weight after the cap


def merge_round(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
    rule: AggregationRule | None = None,
    noise: GaussianNoise | None = None,
) -> Merge:
    """The round's updates merged per coordinate over the devices that covered them.

    ``rule`` (default :meth:`AggregationRule.plain`: FedAvg's weighted mean) clips, caps and
    combines (``_robust``); ``noise`` instead merges them as DP-FedAvg (``_privacy``: fixed clip,
    uniform weights, Gaussian noise on covered coordinates), and ``rule`` is not used. Every update
    is checked (:func:`~coordinator.federation._updates.check_update`, deltas bounded by ``max_abs``
    if given) before anything is merged.
    """
    floats = {n: t for n, t in parent.state.items() if t.is_floating_point()}
    checked = [check_update(parent, u, who=f"update {k}", max_abs=max_abs) for k, u in enumerate(updates)]
    protected = shared_tensors(parent) if shared.mode != "off" else frozenset()
    norms = [delta_norm(cs) for cs in checked]
    if noise is not None:
        included = [_weigher(shared, protected, u, 1.0, parent) for u in updates]
        delta, count, scales = private_merge(floats, checked, norms, included, noise)
        return Merge(delta, count, tuple(norms), tuple(scales), tuple(1.0 for _ in updates))
    rule = rule or AggregationRule.plain()
    scales = clip_scales(norms, rule)
    samples = capped_weights([u.num_samples for u in updates], rule)
    weighers = [_weigher(shared, protected, u, w, parent) for u, w in zip(updates, samples, strict=True)]
    if rule.rule == "mean" or (rule.rule == "trimmed_mean" and rule.trim == 0):
        delta, den = _weighted_mean(floats, checked, scales, weighers)
    else:
        delta, den = _robust_combine(floats, checked, scales, weighers, rule)
    return Merge(delta, den, tuple(norms), tuple(scales), tuple(samples))


def _weigher(
    shared: SharedProtection, protected: frozenset[str], update: ClientUpdate, samples: float, parent: ParentModel
) -> Callable[[str], float]:
    """A device's weight on a tensor: its (capped) samples, or the shared protection's weight."""
    shared_weight = shared.weight(samples, width_fraction(parent, update.spec, protected)) if protected else samples
    return lambda name: shared_weight if name in protected else samples


def _weighted_mean(
    floats: Mapping[str, torch.Tensor],
    checked: Sequence[Sequence[Contribution]],
    scales: Sequence[float],
    weighers: Sequence[Callable[[str], float]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    num = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    den = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    for contributions, scale, weight_of in zip(checked, scales, weighers, strict=True):
        for c in contributions:
            weight = weight_of(c.name)
            if weight > 0 and c.name in floats:
                _add(num[c.name], den[c.name], c, weight, scale)
    delta = {n: torch.where(den[n] > 0, num[n] / den[n].clamp_min(1e-30), 0.0) for n in floats}
    return delta, den


def _robust_combine(
    floats: Mapping[str, torch.Tensor],
    checked: Sequence[Sequence[Contribution]],
    scales: Sequence[float],
    weighers: Sequence[Callable[[str], float]],
    rule: AggregationRule,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trimmed mean or median, one tensor at a time over the stacked values of its covering devices."""
    by_name: dict[str, list[tuple[int, Contribution]]] = {}
    for k, contributions in enumerate(checked):
        for c in contributions:
            if c.name in floats and weighers[k](c.name) > 0:
                by_name.setdefault(c.name, []).append((k, c))
    delta = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    den = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    for name, items in by_name.items():
        values = torch.full((len(items), *floats[name].shape), math.nan, dtype=torch.float32)
        weights = torch.tensor([weighers[k](name) for k, _ in items], dtype=torch.float32)
        for i, (k, c) in enumerate(items):
            if c.rows is not None:
                values[i][c.rows] = scales[k] * c.delta
            else:
                assert c.region is not None
                values[i][c.region] = scales[k] * c.delta
            den[name] += torch.where(torch.isnan(values[i]), 0.0, weights[i])
        merged = combine_sorted(values.reshape(len(items), -1), weights, rule.rule, rule.trim)
        delta[name] = merged.reshape(floats[name].shape)
    return delta, den


def merge_deltas(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
    rule: AggregationRule | None = None,
    noise: GaussianNoise | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The merged delta per coordinate over the clients that covered it, and the coverage.

    Returns ``(delta, coverage)`` for every floating-point parent tensor; ``coverage`` is the sum of
    client weights over covering clients (0 where none trained the coordinate, and there ``delta``
    is 0). With the default ``rule``, the sample-weighted mean of the module docstring; see
    :func:`merge_round` for ``rule`` and ``noise``.
    """
    merged = merge_round(parent, updates, shared=shared, max_abs=max_abs, rule=rule, noise=noise)
    return merged.delta, merged.coverage


class ServerOptimizer(Protocol):
    """Turns the merged delta into new global weights; its state must survive a checkpoint."""

    name: str

    def step(
        self,
        weights: Mapping[str, torch.Tensor],
        delta: Mapping[str, torch.Tensor],
        coverage: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@dataclass
class FedAvg:
    """x <- x + server_lr * delta where covered (server_lr = 1 is plain FedAvg)."""

    server_lr: float = 1.0
    name: str = "fedavg"

    def step(
        self,
        weights: Mapping[str, torch.Tensor],
        delta: Mapping[str, torch.Tensor],
        coverage: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = dict(weights)
        for n, d in delta.items():
            out[n] = (weights[n].float() + self.server_lr * d).to(weights[n].dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        return None


@dataclass
class FedAdam:
    """Adam on the pseudo-gradient ``-delta`` (Reddi et al. 2021); moments move only where covered."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def step(
        self,
        weights: Mapping[str, torch.Tensor],
        delta: Mapping[str, torch.Tensor],
        coverage: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = dict(weights)
        for n, d in delta.items():
            covered = coverage[n] > 0
            m = self.m.setdefault(n, torch.zeros_like(d))
            v = self.v.setdefault(n, torch.zeros_like(d))
            m.copy_(torch.where(covered, self.beta1 * m + (1 - self.beta1) * d, m))
            v.copy_(torch.where(covered, self.beta2 * v + (1 - self.beta2) * d * d, v))
            stepped = weights[n].float() + self.lr * m / (v.sqrt() + self.tau)
            out[n] = torch.where(covered, stepped, weights[n].float()).to(weights[n].dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"m/{n}": t for n, t in self.m.items()}, **{f"v/{n}": t for n, t in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: t.clone() for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.clone() for k, t in state.items() if k.startswith("v/")}


def aggregate_round(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    optimizer: ServerOptimizer | None = None,
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
    rule: AggregationRule | None = None,
    noise: GaussianNoise | None = None,
) -> tuple[ParentModel, Merge]:
    """The parent after one round (see :func:`aggregate`), and the :class:`Merge` it stepped with."""
    merged = merge_round(parent, updates, shared=shared, max_abs=max_abs, rule=rule, noise=noise)
    return parent.with_state((optimizer or FedAvg()).step(parent.state, merged.delta, merged.coverage)), merged


def aggregate(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    optimizer: ServerOptimizer | None = None,
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
    rule: AggregationRule | None = None,
    noise: GaussianNoise | None = None,
) -> ParentModel:
    """The parent after one round: ``updates`` merged per coordinate, stepped by ``optimizer``.

    ``rule``: how updates are clipped, weighted and combined (default: FedAvg's weighted mean, no
    defence); ``noise``: merge as DP-FedAvg instead (see :func:`merge_round`).
    """
    if not updates:
        return parent
    return aggregate_round(parent, updates, optimizer, shared=shared, max_abs=max_abs, rule=rule, noise=noise)[0]
