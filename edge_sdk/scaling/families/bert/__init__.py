"""BERT and RoBERTa: the same layer layout under different backbone names."""

from __future__ import annotations

from edge_sdk.scaling.families._family import Family, LayerMap, head_attributes

_LAYER = LayerMap(
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    output="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    attention="attention.self",
)
_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
}

# LoRA on all six Linear modules of a layer (attention projections and the FFN).
_LORA_TARGETS = (_LAYER.query, _LAYER.key, _LAYER.value, _LAYER.output, _LAYER.up, _LAYER.down)

# BertSelfAttention / RobertaSelfAttention reshape with these two attributes.
_set_heads = head_attributes("num_attention_heads", "all_head_size")
# BertEmbeddings / RobertaEmbeddings register these two from max_position_embeddings.
_BUFFERS = {"position_ids": "positions", "token_type_ids": "zeros"}

BERT = Family(
    name="bert",
    model_types=("bert",),
    task_classes={"text-classification": "BertForSequenceClassification"},
    layers_path={"text-classification": "bert.encoder.layer"},
    layer=_LAYER,
    config_keys=_KEYS,
    set_heads=_set_heads,
    modeling_module="transformers.models.bert.modeling_bert",
    buffers=_BUFFERS,
    lora_targets=_LORA_TARGETS,
    word_embeddings={"text-classification": "bert.embeddings.word_embeddings.weight"},
)

ROBERTA = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    task_classes={"text-classification": "RobertaForSequenceClassification"},
    layers_path={"text-classification": "roberta.encoder.layer"},
    layer=_LAYER,
    config_keys=_KEYS,
    set_heads=_set_heads,
    modeling_module="transformers.models.roberta.modeling_roberta",
    buffers=_BUFFERS,
    lora_targets=_LORA_TARGETS,
    word_embeddings={"text-classification": "roberta.embeddings.word_embeddings.weight"},
)
