"""Function-preserving reordering: most salient heads, head dims and FFN neurons first.

Per layer (``W[out, in]`` as Hugging Face stores it; a = query heads, g = key/value heads, d = head
dim, f = FFN width, group = a / g query heads per KV head):

- whole KV groups: a group's K and V rows move together with the Q rows of its ``group`` query
  heads and their O columns; groups are ranked by the sum of their query heads' salience. Query head
  i uses KV head i // group, and both orders are built group-major, so that stays true;
- whole query heads, ranked by salience *within* their own KV group (Q rows and O columns move);
  without grouped-query attention (g = a) each group is one head and this is the usual head order;
- inside each head (only for g = a and families without rotary embeddings): one permutation of Q
  and K rows (ranked by the mean of their L1 norms) leaves QK^T unchanged; V rows and O columns
  share a second one (ranked by V-row plus O-column L1). Rotary embeddings rotate dimension pairs
  (j, j + d/2) by their own frequency, so no dimension inside a head ever moves there;
- FFN neurons: up-projection rows (and the gate's, for a gated FFN) and down-projection columns.

After reordering every sub-network of whole groups is a prefix. Each permutation is composed into
one row index per tensor and applied with a single ``index_select``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._salience import Salience

__all__ = ["LayerOrder", "Reordering", "apply_reordering", "plan_reordering", "reorder"]


@dataclass(frozen=True)
class LayerOrder:
    """One layer's permutations, as indices into the original layout."""

    q: torch.Tensor  # [a*d] source rows of Q, head-major
    k: torch.Tensor  # [g*d] source rows of K
    v: torch.Tensor  # [g*d] source rows of V
    o: torch.Tensor  # [a*d] source columns of O
    ffn: torch.Tensor  # [f] source neurons (rows of up and gate, columns of down)
    heads: torch.Tensor  # [a] source query heads, in their new order


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


def _whole_heads(head_order: torch.Tensor, d: int) -> torch.Tensor:
    """[n] source heads -> [n*d] source rows, each head's dims in their own order."""
    return (head_order.unsqueeze(1) * d + torch.arange(d)).reshape(-1)


def group_order(scores: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-head scores [a] -> (source KV groups [g], source query heads [a]).

    Groups sort by the sum of their heads' scores; heads sort inside their own group, and the
    query-head order is group-major: new head i belongs to new group i // group.
    """
    per_group = scores.reshape(-1, group)  # [g, group]
    groups = per_group.sum(dim=1).argsort(descending=True, stable=True)  # [g]
    inside = per_group.argsort(dim=1, descending=True, stable=True)  # [g, group]
    heads = (groups.unsqueeze(1) * group + inside[groups]).reshape(-1)  # [a]
    return groups, heads


def _layer_order(parent: ParentModel, salience: Salience, i: int) -> LayerOrder:
    dims, family = parent.dims, parent.family
    lm = family.layer
    a, d = dims.num_heads, dims.head_dim
    groups, heads = group_order(salience.heads[i], dims.group)
    ffn = salience.ffn[i].argsort(descending=True, stable=True)
    if family.rotary or dims.group > 1:  # whole heads only
        q, kv = _whole_heads(heads, d), _whole_heads(groups, d)
        return LayerOrder(q=q, k=kv, v=kv, o=q, ffn=ffn, heads=heads)

    def w(module: str) -> torch.Tensor:
        return parent.layer_tensor(i, module).float()

    qk_score = (w(lm.query).abs().sum(dim=1) + w(lm.key).abs().sum(dim=1)) / 2  # [a*d]
    vo_score = w(lm.value).abs().sum(dim=1) + w(lm.output).abs().sum(dim=0)  # [a*d]
    qk, vo = _within_head(qk_score, heads, a, d), _within_head(vo_score, heads, a, d)
    return LayerOrder(q=qk, k=qk, v=vo, o=vo, ffn=ffn, heads=heads)


def plan_reordering(parent: ParentModel, salience: Salience) -> Reordering:
    """The permutations that sort groups, heads and neurons by ``salience`` (dims inside heads by
    weight L1, where the family allows it)."""
    return Reordering(tuple(_layer_order(parent, salience, i) for i in range(parent.dims.num_layers)))


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
            lm.query: (order.q, 0),
            lm.key: (order.k, 0),
            lm.value: (order.v, 0),
            lm.output: (order.o, 1),
            lm.up: (order.ffn, 0),
            lm.down: (order.ffn, 1),
        }
        if lm.gate:
            moves[lm.gate] = (order.ffn, 0)
        for module, (index, axis) in moves.items():
            weight = prefix + module + ".weight"
            out[weight] = source[weight].index_select(axis, index)
            bias = prefix + module + ".bias"
            if axis == 0 and bias in source:  # output/down biases live on the hidden axis: unchanged
                out[bias] = source[bias].index_select(0, index)
    return out


def reordered_salience(salience: Salience, reordering: Reordering) -> Salience:
    """``salience`` in the parent's new order (descending within each KV group, groups descending)."""
    heads = torch.stack([salience.heads[i][order.heads] for i, order in enumerate(reordering.layers)])
    ffn = torch.stack([salience.ffn[i][order.ffn] for i, order in enumerate(reordering.layers)])
    return Salience(heads, ffn, salience.method)


def reorder(parent: ParentModel, salience: Salience) -> tuple[ParentModel, Salience, Reordering]:
    """Reorder the parent by ``salience``: returns the reordered parent, its salience in the new
    order (sorted, for encoders), the plan."""
    plan = plan_reordering(parent, salience)
    return parent.with_state(apply_reordering(parent, plan)), reordered_salience(salience, plan), plan
