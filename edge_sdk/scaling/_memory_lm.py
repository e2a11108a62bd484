"""Serving a causal LM on a device: what :mod:`edge_sdk.scaling._memory`'s serving model leaves out.

A decoder is served by ``edge-sdk generate`` (ONNX Runtime, a key/value cache) after the device exports
it with its cache (``edge_sdk.serving._export_lm``). Measured on SmolLM2-135M (134.5M parameters,
fresh processes, peaks above the imports; docs/serving.md), three things differ from an encoder's:

- **The export** peaks at 10.1 B/param fp32 and 22.2 B/param with the int8 model (1.36 GB, 2.98 GB;
  ``python bench/lm_export_memory.py [--quantize]``): the graph is traced without its weights and
  ``model.onnx`` written one tensor at a time from the module's memory, the checks' ONNX Runtime session
  reads the weights from that file (``edge_sdk.serving._export_lm_graph``), so the peak is the module's
  weights plus one session, not the torch exporter's five copies (19.8 and 27.3 B/param before). Here
  :data:`LM_EXPORT_PER_PARAM` (11 and 23 B/param) with the encoder fit's fixed bytes.
- **The key/value cache** of ``b x s`` tokens: ``2 x layers x kv_heads x head_dim x 4`` bytes a token
  (46 KB for SmolLM2: 30 layers x 3 KV heads x 64). The export pads every layer to the widest layer's
  KV heads, so ``kv_heads`` is the spec's largest.
- **ONNX Runtime's second copy of the embedding table** at session load (the tied table is stored once,
  read by the gather and, transposed, by the LM head): ``V x h x 4`` bytes (+113 MB for SmolLM2).

(The prefill's ``b x s x V`` logits are already in :func:`~edge_sdk.scaling._memory.inference_estimate`
through ``Workload.arch.token_logits``.) :func:`lm_serving_estimate` is the serving estimate of one
sub-network; the deploy search prices every candidate with it
(:func:`~edge_sdk.scaling._planning.lm_serving_estimator`).
"""

from __future__ import annotations

from dataclasses import replace

from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._memory import (
    _EXPORT_FIXED,
    MemoryEstimate,
    Workload,
    inference_estimate,
    larger_moment,
)

__all__ = ["LM_EXPORT_PER_PARAM", "lm_export_estimate", "lm_serving_estimate"]

LM_EXPORT_PER_PARAM = {False: 11, True: 23}  # quantize -> bytes per parameter of a causal LM's export


def lm_export_estimate(params: int, *, quantize: bool) -> int:
    """Peak bytes above the runtime footprint of exporting a ``params``-parameter causal LM with its cache."""
    return LM_EXPORT_PER_PARAM[quantize] * params + _EXPORT_FIXED[quantize, False]


def kv_cache_bytes(spec: SubnetSpec, work: Workload) -> int:
    """``2 x layers x kv_heads x head_dim x bytes x b x s``: the cache of ``work``'s tokens, every layer
    padded to the widest layer's KV heads (as exported)."""
    dims = spec.parent
    kv = max((dims.kv_kept(layer.heads) for layer in spec.layers), default=0)
    return 2 * len(spec.layers) * kv * dims.head_dim * work.bytes_per_elem * work.batch * work.seq


def embedding_copy_bytes(spec: SubnetSpec, work: Workload) -> int:
    """``V x h x 4``: ONNX Runtime's second copy of the (tied) embedding table at session load."""
    return work.vocab * spec.parent.hidden * work.bytes_per_elem


def lm_serving_estimate(
    spec: SubnetSpec, params: int, work: Workload, *, runtime_footprint: int | None, quantize: bool
) -> MemoryEstimate:
    """The larger of serving ``spec`` in ONNX Runtime (:func:`inference_estimate` + the KV cache + the
    table's second copy) and exporting it (``runtime_footprint`` + :func:`lm_export_estimate`; left out
    when None). ``work`` must carry the vocabulary (:func:`~edge_sdk.scaling._memory.workload_for`)."""
    served = inference_estimate(spec, params, work)
    extra = kv_cache_bytes(spec, work) + embedding_copy_bytes(spec, work)
    served = replace(served, transient=served.transient + extra)
    if runtime_footprint is None:
        return served
    return larger_moment(served, params, lm_export_estimate(params, quantize=quantize), runtime_footprint)
