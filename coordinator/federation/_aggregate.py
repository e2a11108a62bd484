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

Shared tensors -- those every width trains whole (embeddings, LayerNorms, biases of the layers'
outputs, pooler, classifier) -- may be protected from narrow updates (:class:`SharedProtection`):
averaged only over clients of at least a width fraction, or with w_k = n_k x width_k. The width of a
sub-network is the fraction of the parent's sliced linear weights it keeps::

    width = sum over kept layers (4 h d_a + 2 h d_ff) / (L (4 h H + 2 h F))

The default protects nothing (w_k = n_k for every tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from coordinator.federation._updates import ClientUpdate, Contribution, check_update
from edge_sdk import SubnetSpec
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ParentModel, regions

__all__ = [
    "SHARED_MODES",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "ServerOptimizer",
    "SharedProtection",
    "aggregate",
    "merge_deltas",
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

    def weight(self, samples: int, width: float) -> float:
        """A client's weight on a shared tensor."""
        if self.mode == "min_width":
            return float(samples) if width >= self.min_width - 1e-12 else 0.0
        if self.mode == "width_weighted":
            return samples * width
        return float(samples)


def width_fraction(spec: SubnetSpec) -> float:
    """The fraction of the parent's sliced linear weights ``spec`` keeps (1.0 for the full model)."""
    d = spec.parent
    per_layer = 4 * d.hidden * d.num_heads * d.head_dim + 2 * d.hidden * d.ffn
    kept = sum(4 * d.hidden * ly.heads * d.head_dim + 2 * d.hidden * ly.ffn for ly in spec.layers)
    return kept / (d.num_layers * per_layer)


def shared_tensors(parent: ParentModel) -> frozenset[str]:
    """Parent tensors every width trains whole: what the narrowest sub-network keeps entirely."""
    narrowest = SubnetSpec.uniform(parent.dims, heads=1, ffn=1)
    shapes = parent.shapes()
    return frozenset(
        name
        for name, (_, region) in regions(parent, narrowest).items()
        if all(len(range(*s.indices(n))) == n for s, n in zip(region, shapes[name], strict=True))
    )


def _add(num: torch.Tensor, den: torch.Tensor, c: Contribution, weight: float) -> None:
    if c.rows is not None:
        num.index_add_(0, c.rows, weight * c.delta)
        den.index_add_(0, c.rows, torch.full_like(c.delta, weight))
    else:
        assert c.region is not None
        num[c.region] += weight * c.delta
        den[c.region] += weight


def merge_deltas(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weighted mean delta per coordinate over the clients that covered it, and the coverage.

    Returns ``(delta, coverage)`` for every floating-point parent tensor; ``coverage`` is the sum of
    client weights over covering clients (0 where none trained the coordinate, and there ``delta``
    is 0). Every update is checked (:func:`~coordinator.federation._updates.check_update`, deltas
    bounded by ``max_abs`` if given) before anything is merged.
    """
    floats = {n: t for n, t in parent.state.items() if t.is_floating_point()}
    checked = [check_update(parent, u, who=f"update {k}", max_abs=max_abs) for k, u in enumerate(updates)]
    protected = shared_tensors(parent) if shared.mode != "off" else frozenset()
    num = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    den = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    for update, contributions in zip(updates, checked, strict=True):
        samples = update.num_samples
        shared_weight = shared.weight(samples, width_fraction(update.spec)) if protected else samples
        for c in contributions:
            weight = shared_weight if c.name in protected else float(samples)
            if weight > 0 and c.name in floats:
                _add(num[c.name], den[c.name], c, weight)
    delta = {n: torch.where(den[n] > 0, num[n] / den[n].clamp_min(1e-30), 0.0) for n in floats}
    return delta, den


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


def aggregate(
    parent: ParentModel,
    updates: Sequence[ClientUpdate],
    optimizer: ServerOptimizer | None = None,
    *,
    shared: SharedProtection = SharedProtection(),
    max_abs: float | None = None,
) -> ParentModel:
    """The parent after one round: ``updates`` merged per coordinate, stepped by ``optimizer``."""
    if not updates:
        return parent
    delta, coverage = merge_deltas(parent, updates, shared=shared, max_abs=max_abs)
    return parent.with_state((optimizer or FedAvg()).step(parent.state, delta, coverage))
