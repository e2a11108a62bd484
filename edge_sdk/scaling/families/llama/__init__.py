"""Llama (SmolLM2, TinyLlama, Llama 2/3): grouped-query attention, a gated FFN, RMSNorm, rotary positions.

Per layer: ``self_attn.{q,k,v,o}_proj`` (q: ``a*d`` rows, k and v: ``g*d`` rows for ``g`` KV heads,
o: ``a*d`` columns) and ``mlp.{gate,up,down}_proj`` (SwiGLU: ``down(silu(gate x) * up x)``). The
RMSNorms (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``) have no bias and are
never sliced. ``attention_bias`` / ``mlp_bias`` configs give the projections biases, sliced with
their rows like every family's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk.scaling.families._family import Family, LayerMap

if TYPE_CHECKING:
    from torch import nn

_LAYER = LayerMap(
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    output="self_attn.o_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attention="self_attn",
    gate="mlp.gate_proj",
)


def _set_heads(attention: nn.Module, heads: int, head_dim: int) -> None:
    """Nothing to set: LlamaAttention reshapes with ``head_dim`` and ``-1`` heads, and repeats each KV
    head ``num_key_value_groups`` = a / g times, a ratio a sub-network of whole KV groups keeps."""


_CAUSAL, _CLASSIFY = "causal-lm", "text-classification"

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    task_classes={_CAUSAL: "LlamaForCausalLM", _CLASSIFY: "LlamaForSequenceClassification"},
    layers_path={_CAUSAL: "model.layers", _CLASSIFY: "model.layers"},
    layer=_LAYER,
    config_keys={
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "hidden": "hidden_size",
        "ffn": "intermediate_size",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
    },
    set_heads=_set_heads,
    modeling_module="transformers.models.llama.modeling_llama",
    buffers={"inv_freq": "rotary"},  # LlamaRotaryEmbedding, rebuilt from the config
    lora_targets=_LAYER.linears,  # all seven Linear modules of a layer
    word_embeddings={_CAUSAL: "model.embed_tokens.weight", _CLASSIFY: "model.embed_tokens.weight"},
    rotary=True,
    tied={_CAUSAL: {"lm_head.weight": "model.embed_tokens.weight"}},
)
