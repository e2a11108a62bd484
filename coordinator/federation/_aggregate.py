"""Merging updates of different widths, coordinate by coordinate (``../shared/design.md`` section 2).

Client k trained the coordinates in its mask M_k (its prefix), holds n_k samples and returns x_k::

    delta[c] = sum_k n_k M_k[c] (x_k[c] - x[c]) / sum_k n_k M_k[c]    where some k covers c

Coordinates no client covered keep their value. The server optimizer turns ``delta`` into a step:
FedAvg (``x += server_lr * delta``) or FedAdam (moments updated only where covered).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edge_sdk import SubnetSpec
from edge_sdk._errors import AggregationError
from edge_sdk.scaling import ParentModel, regions

__all__ = ["ClientUpdate", "FedAdam", "FedAvg", "ServerOptimizer", "aggregate", "merge_deltas"]


@dataclass(frozen=True)
class ClientUpdate:
    """What one device returned: the weights of its sub-network after local training."""

    spec: SubnetSpec
    weights: Mapping[str, torch.Tensor]
    num_samples: int


def _check(update: ClientUpdate, expected: Mapping[str, tuple[int, ...]], who: str) -> None:
    if update.num_samples <= 0:
        raise AggregationError(f"{who}: num_samples must be positive, got {update.num_samples}")
    problems = [f"missing {n}" for n in expected if n not in update.weights]
    problems += [f"unexpected {n}" for n in update.weights if n not in expected]
    for name, tensor in update.weights.items():
        if name in expected:
            if tuple(tensor.shape) != expected[name]:
                problems.append(f"{name}: shape {list(tensor.shape)} != {list(expected[name])}")
            elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                problems.append(f"{name}: non-finite values")
    if problems:
        raise AggregationError(f"{who}: " + "; ".join(problems[:8]))


def merge_deltas(
    parent: ParentModel, updates: Sequence[ClientUpdate]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sample-weighted mean delta per coordinate over the clients that covered it, and the coverage.

    Returns ``(delta, coverage)`` for every floating-point parent tensor; ``coverage`` is the sum of
    n_k over covering clients (0 where none trained the coordinate, and there ``delta`` is 0).
    """
    floats = {n: t for n, t in parent.state.items() if t.is_floating_point()}
    num = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    den = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    for k, update in enumerate(updates):
        kept = regions(parent, update.spec)
        expected = {child: tuple(parent.state[name][region].shape) for name, (child, region) in kept.items()}
        _check(update, expected, f"update {k}")
        for name, (child, region) in kept.items():
            if name not in floats:
                continue
            n = float(update.num_samples)
            num[name][region] += n * (update.weights[child].float() - floats[name][region].float())
            den[name][region] += n
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
    parent: ParentModel, updates: Sequence[ClientUpdate], optimizer: ServerOptimizer | None = None
) -> ParentModel:
    """The parent after one round: ``updates`` merged per coordinate, stepped by ``optimizer``."""
    if not updates:
        return parent
    delta, coverage = merge_deltas(parent, updates)
    return parent.with_state((optimizer or FedAvg()).step(parent.state, delta, coverage))
