"""Function-preserving reordering: most salient heads, head dims and FFN neurons first.

Per layer (``W[out, in]`` as Hugging Face stores it; a = heads, d = head dim, f = FFN width):

- whole heads: head blocks of Q, K, V rows (and biases) and the matching O columns move together;
- inside each head: one permutation of Q and K rows (ranked by the mean of their L1 norms) leaves
  QK^T unchanged; V rows and O columns share a second one (ranked by V-row plus O-column L1);
- FFN neurons: up-projection rows (and bias) and down-projection columns move together.

After reordering every sub-network is a prefix. Each permutation is composed into one row index per
tensor and applied with a single ``index_select``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._salience import Salience

__all__ = ["LayerOrder", "Reordering", "apply_reordering", "plan_reordering", "reorder"]


@dataclass(frozen=True)
class LayerOrder:
    """One layer's permutations, as indices into the original layout."""

    qk: torch.Tensor  # [a*d] source rows of Q and K, head-major
    vo: torch.Tensor  # [a*d] source rows of V = source columns of O
    ffn: torch.Tensor  # [f] source neurons


@dataclass(frozen=True)
class Reordering:
    """The permutation of every layer (index = parent layer)."""

    layers: tuple[LayerOrder, ...]


def _within_head(score: torch.Tensor, head_order: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """score [a*d] -> source row indices [a*d]: heads in ``head_order``, dims by score inside each."""
    per_head = score.reshape(heads, d)
    dim_order = per_head.argsort(dim=1, descending=True, stable=True)  # [a, d]
    base = (torch.arange(heads) * d).unsqueeze(1)  # [a, 1]
    return (base + dim_order)[head_order].reshape(-1)


def _weight(parent: ParentModel, layer: int, module: str) -> torch.Tensor:
    return parent.layer_tensor(layer, module).float()


def plan_reordering(parent: ParentModel, salience: Salience) -> Reordering:
    """The permutations that sort heads and neurons by ``salience`` (dims inside heads by weight L1)."""
    dims, lm = parent.dims, parent.family.layer
    a, d = dims.num_heads, dims.head_dim
    layers = []
    for i in range(dims.num_layers):
        w = functools.partial(_weight, parent, i)
        head_order = salience.heads[i].argsort(descending=True, stable=True)  # [a]
        qk_score = (w(lm.query).abs().sum(dim=1) + w(lm.key).abs().sum(dim=1)) / 2  # [a*d]
        vo_score = w(lm.value).abs().sum(dim=1) + w(lm.output).abs().sum(dim=0)  # [a*d]
        layers.append(
            LayerOrder(
                qk=_within_head(qk_score, head_order, a, d),
                vo=_within_head(vo_score, head_order, a, d),
                ffn=salience.ffn[i].argsort(descending=True, stable=True),
            )
        )
    return Reordering(tuple(layers))


def apply_reordering(
    parent: ParentModel, reordering: Reordering, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Permute a parent-shaped state dict (the weights by default; optimizer moments likewise)."""
    source = parent.state if state is None else state
    lm = parent.family.layer
    out = dict(source)
    for i, order in enumerate(reordering.layers):
        prefix = f"{parent.layers_path}.{i}."
        moves = {  # module -> (index, axis of the weight it permutes)
            lm.query: (order.qk, 0),
            lm.key: (order.qk, 0),
            lm.value: (order.vo, 0),
            lm.output: (order.vo, 1),
            lm.up: (order.ffn, 0),
            lm.down: (order.ffn, 1),
        }
        for module, (index, axis) in moves.items():
            weight = prefix + module + ".weight"
            out[weight] = source[weight].index_select(axis, index)
            bias = prefix + module + ".bias"
            if axis == 0 and bias in source:  # output/down biases live on the hidden axis: unchanged
                out[bias] = source[bias].index_select(0, index)
    return out


def reorder(parent: ParentModel, salience: Salience) -> tuple[ParentModel, Salience, Reordering]:
    """Reorder the parent by ``salience``: returns the reordered parent, its (sorted) salience, the plan."""
    plan = plan_reordering(parent, salience)
    return parent.with_state(apply_reordering(parent, plan)), salience.sorted(), plan
