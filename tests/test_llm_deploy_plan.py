"""Planning a causal LM's deploy: the KV cache, ONNX Runtime's second copy of the embedding table and the
LLM export's measured bytes per parameter are counted (edge_sdk/scaling/_memory_lm.py), so a deploy the
encoder serving model would call within budget is not planned over it."""

from __future__ import annotations

from pathlib import Path

from coordinator.federation._deploy_plan import plan_inference_for
from edge_sdk._spec import ParentDims, SubnetSpec
from edge_sdk.scaling import Workload, lm_serving_estimate, ranked_parent, serving_estimate, workload_for
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory_lm import embedding_copy_bytes, kv_cache_bytes, lm_export_estimate
from edge_sdk.scaling._search import plan_training

from ._llm import tiny_llama_dir

RUNTIME = 400_000_000


def test_smollm2s_kv_cache_is_46_kb_a_token_and_its_table_copy_113_mb() -> None:
    """SmolLM2-135M: 30 layers, 9 query heads in 3 KV groups of 64 dims, hidden 576, 49,152 tokens:
    2 x 30 x 3 x 64 x 4 = 46,080 bytes a token; 49,152 x 576 x 4 = 113,246,208 bytes."""
    dims = ParentDims("llama", num_layers=30, num_heads=9, head_dim=64, ffn=1536, hidden=576, kv_heads=3)
    work = Workload(1, 1, vocab=49_152)
    full = SubnetSpec.full(dims)
    assert kv_cache_bytes(full, work) == 46_080
    assert kv_cache_bytes(full, Workload(2, 128, vocab=49_152)) == 46_080 * 256
    assert embedding_copy_bytes(full, work) == 113_246_208
    # a layer keeping one KV group of three is padded to the widest layer's: the cache does not shrink
    narrow = SubnetSpec.from_dict({**full.to_dict(), "layers": [[0, 3, 1536]] + [[i, 9, 1536] for i in range(1, 30)]})
    assert kv_cache_bytes(narrow, work) == 46_080
    # the export: 11 B/param fp32, 23 int8, above what SmolLM2's export measured (10.1 and 22.2:
    # `python bench/lm_export_memory.py [--quantize]`) and within 15 % of it
    for quantize, measured in ((False, 10.1), (True, 22.2)):
        predicted = lm_export_estimate(134_515_008, quantize=quantize)
        assert measured * 134_515_008 < predicted < 1.15 * measured * 134_515_008


def test_a_causal_lm_deploy_is_priced_by_the_llm_serving_model(tmp_path: Path) -> None:
    parent, salience = ranked_parent(tiny_llama_dir(tmp_path / "m"), task="causal-lm")
    work = Workload(1, 128)
    full = SubnetSpec.full(parent.dims)
    params = param_count(parent, full)
    training = plan_training(parent, salience, 10**10, workload_for(parent, Workload(4, 48)), runtime=0)
    assert training.spec == full
    encoder = serving_estimate(full, params, workload_for(parent, work), runtime_footprint=RUNTIME, quantize=False)
    llm = lm_serving_estimate(full, params, workload_for(parent, work), runtime_footprint=RUNTIME, quantize=False)
    # the KV cache and the table's copy cost more, but the export needs fewer bytes a parameter than
    # the encoder fit counts (11 vs 17): the search prices every candidate with the LLM model itself
    assert llm.total < encoder.total

    def plan(budget: int):  # type: ignore[no-untyped-def]
        return plan_inference_for(
            parent, salience, training, device_id="d", budget_bytes=budget, work=work, runtime_footprint=RUNTIME
        )

    roomy = plan(llm.total)  # below the encoder model's bytes: it fits all the same
    assert roomy.fits and roomy.inference.spec == full and roomy.inference.estimate.total == llm.total
    short = plan(llm.total - 1)
    assert not short.fits and not short.optimize
