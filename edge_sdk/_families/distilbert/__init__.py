"""DistilBERT: q_lin/k_lin/v_lin/out_lin and ffn.lin1/lin2; heads set through n_heads and dim."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._family import Family, LayerMap

if TYPE_CHECKING:
    from torch import nn


def _set_heads(attention: nn.Module, heads: int, head_dim: int) -> None:
    # MultiHeadSelfAttention computes dim_per_head = dim // n_heads (as its prune_heads does).
    module: Any = attention  # plain attributes on the module, not parameters
    module.n_heads = heads
    module.dim = heads * head_dim


DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    task_classes={"text-classification": "DistilBertForSequenceClassification"},
    layers_path={"text-classification": "distilbert.transformer.layer"},
    layer=LayerMap(
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        attention="attention",
    ),
    config_keys={"num_layers": "n_layers", "num_heads": "n_heads", "hidden": "dim", "ffn": "hidden_dim"},
    set_heads=_set_heads,
)
