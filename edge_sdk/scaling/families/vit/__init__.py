"""ViT (transformers 4.x): attention.attention.{query,key,value}, intermediate, output."""

from __future__ import annotations

from edge_sdk.scaling.families._family import Family, LayerMap, head_attributes

# ViTSelfAttention reshapes with these two attributes.
_set_heads = head_attributes("num_attention_heads", "all_head_size")

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
    modeling_module="transformers.models.vit.modeling_vit",
    # LoRA on all six Linear modules of a layer; no token-embedding table (patches are projected).
    lora_targets=(
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
)
