"""DistilBERT: q_lin/k_lin/v_lin/out_lin and ffn.lin1/lin2; heads set through n_heads and dim."""

from __future__ import annotations

from edge_sdk.scaling.families._family import Family, LayerMap, head_attributes

# MultiHeadSelfAttention computes dim_per_head = dim // n_heads (as its prune_heads does).
_set_heads = head_attributes("n_heads", "dim")

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
    modeling_module="transformers.models.distilbert.modeling_distilbert",
    buffers={"position_ids": "positions"},  # Embeddings registers it from max_position_embeddings
    # LoRA on all six Linear modules of a layer (attention projections and the FFN).
    lora_targets=("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"),
    word_embeddings={"text-classification": "distilbert.embeddings.word_embeddings.weight"},
)
