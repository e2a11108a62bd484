"""ViT (transformers 4.x): attention.attention.{query,key,value}, intermediate, output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._family import Family, LayerMap

if TYPE_CHECKING:
    from torch import nn


def _set_heads(attention: nn.Module, heads: int, head_dim: int) -> None:
    module: Any = attention  # plain attributes on the module, not parameters
    module.num_attention_heads = heads
    module.all_head_size = heads * head_dim


VIT = Family(
    name="vit",
    model_types=("vit",),
    task_classes={"image-classification": "ViTForImageClassification"},
    layers_path={"image-classification": "vit.encoder.layer"},
    layer=LayerMap(
        query="attention.attention.query",
        key="attention.attention.key",
        value="attention.attention.value",
        output="attention.output.dense",
        up="intermediate.dense",
        down="output.dense",
        attention="attention.attention",
    ),
    config_keys={
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "hidden": "hidden_size",
        "ffn": "intermediate_size",
    },
    set_heads=_set_heads,
)
