"""Salience of heads and FFN neurons: which parts of each layer a sub-network should keep first.

Two scores (``docs/method.md`` compares them on MiniLM):

- ``weight_l1``: data-free, the paper's. A head scores the L1 norm of its Q, K, V rows and of its
  O columns (with grouped-query attention, its KV head's K and V rows divided among the group's
  ``group`` query heads); a neuron the L1 norm of its up-projection row (and gate row, for a gated
  FFN) and down-projection column.
- ``activation_aware``: from a few calibration inputs. A head scores the mean L2 norm of its
  contribution to the attention output (its context vectors times its O columns); a neuron the mean
  absolute value of its activation (the down-projection's input: ``silu(gate x) * up x`` for a
  gated FFN) times the L2 norm of its down-projection column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edge_sdk.scaling._build import hf_config
from edge_sdk.scaling._parent import ParentModel

__all__ = ["Salience", "activation_aware", "weight_l1"]


@dataclass(frozen=True)
class Salience:
    """Scores per layer: ``heads`` is [layers, heads], ``ffn`` is [layers, ffn]; higher keeps first."""

    heads: torch.Tensor
    ffn: torch.Tensor
    method: str

    def sorted(self) -> Salience:
        """The scores in descending order within each layer (as they stand after reordering)."""
        return Salience(
            self.heads.sort(dim=1, descending=True).values,
            self.ffn.sort(dim=1, descending=True).values,
            self.method,
        )


def _head_blocks(w: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """[heads*d, in] rows (dim=0) or [out, heads*d] columns (dim=1) -> per-head L1, shape [heads]."""
    if dim == 0:
        return w.abs().reshape(heads, -1).sum(dim=1)
    return w.abs().reshape(w.shape[0], heads, -1).sum(dim=(0, 2))


def weight_l1(parent: ParentModel) -> Salience:
    """Data-free salience from weight magnitudes."""
    dims, lm = parent.dims, parent.family.layer
    head_scores, ffn_scores = [], []
    for i in range(dims.num_layers):

        def w(module: str, i: int = i) -> torch.Tensor:
            return parent.layer_tensor(i, module).float()

        kv = _head_blocks(w(lm.key), dims.kv_heads, 0) + _head_blocks(w(lm.value), dims.kv_heads, 0)  # [g]
        heads = _head_blocks(w(lm.query), dims.num_heads, 0) + _head_blocks(w(lm.output), dims.num_heads, 1)
        heads = heads + kv.repeat_interleave(dims.group) / dims.group  # a KV head shared by its group
        head_scores.append(heads)
        ffn = w(lm.up).abs().sum(dim=1) + w(lm.down).abs().sum(dim=0)
        ffn_scores.append(ffn + w(lm.gate).abs().sum(dim=1) if lm.gate else ffn)
    return Salience(torch.stack(head_scores), torch.stack(ffn_scores), "weight_l1")


def _rebuild(parent: ParentModel) -> nn.Module:
    class_name = parent.family.task_classes[parent.task]
    cfg = hf_config(parent.config)
    cfg._attn_implementation = "eager"
    import transformers  # only activation-aware salience builds a model

    model: nn.Module = getattr(transformers, class_name)(cfg)
    tied = parent.family.tied_aliases(parent.config, parent.task)  # the parent holds a tied weight once
    model.load_state_dict({**parent.state, **{a: parent.state[s] for a, s in tied.items()}}, strict=True)
    return model.eval()


@torch.no_grad()
def activation_aware(parent: ParentModel, batches: Iterable[Mapping[str, Any]]) -> Salience:
    """Salience from activations on calibration ``batches`` (dicts of model inputs).

    Padding is excluded when a batch carries an ``attention_mask``.
    """
    dims, lm = parent.dims, parent.family.layer
    model = _rebuild(parent)
    layers = model.get_submodule(parent.layers_path)
    assert isinstance(layers, nn.ModuleList)
    head_sum = torch.zeros(dims.num_layers, dims.num_heads, dtype=torch.float64)
    ffn_sum = torch.zeros(dims.num_layers, dims.ffn, dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    mask: list[torch.Tensor | None] = [None]

    def keep(x: torch.Tensor) -> torch.Tensor:  # [b, s, n] -> [tokens, n], padding dropped
        m = mask[0]
        return x[m.bool()] if m is not None and m.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])

    hooks = []
    for i in range(dims.num_layers):
        w_o = parent.layer_tensor(i, lm.output).float()  # [hidden, heads*d]
        w_down_norm = parent.layer_tensor(i, lm.down).float().norm(dim=0)  # [ffn]

        def on_output(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i, w_o: torch.Tensor = w_o) -> None:
            ctx = keep(args[0]).reshape(-1, dims.num_heads, dims.head_dim)  # [t, heads, d]
            w = w_o.reshape(w_o.shape[0], dims.num_heads, dims.head_dim)  # [hidden, heads, d]
            contrib = torch.einsum("thd,ohd->tho", ctx, w)  # [t, heads, hidden]
            head_sum[i] += contrib.norm(dim=2).sum(dim=0).double()

        def on_down(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i, n: torch.Tensor = w_down_norm) -> None:
            act = keep(args[0])  # [t, ffn]
            ffn_sum[i] += (act.abs().sum(dim=0) * n).double()
            if i == 0:
                tokens.add_(act.shape[0])

        layer = layers[i]
        hooks.append(layer.get_submodule(lm.output).register_forward_pre_hook(on_output))
        hooks.append(layer.get_submodule(lm.down).register_forward_pre_hook(on_down))
    try:
        for batch in batches:
            m = batch.get("attention_mask")
            mask[0] = m if isinstance(m, torch.Tensor) else None
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if tokens.item() == 0:
        raise ValueError("activation-aware salience needs at least one calibration batch")
    return Salience((head_sum / tokens).float(), (ffn_sum / tokens).float(), "activation")
