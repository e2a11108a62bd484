"""The memory model and the planner on Llama: GQA, the gated FFN, RMSNorm and a causal LM's logits."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.scaling._build import build_model
from edge_sdk.scaling._extract import extract, param_count
from edge_sdk.scaling._memory import (
    TRAINING_RUNTIME_BYTES,
    Workload,
    activation_bytes,
    training_estimate,
    workload_for,
)
from edge_sdk.scaling._memory_decoder import small_bytes
from edge_sdk.scaling._parent import ParentModel, parent_from_module
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.scaling._salience import Salience
from edge_sdk.scaling._search import plan_training
from edge_sdk.training._probe import run_probe, write_probe_folder

# SmolLM2-135M's shape (the packaged model's config.json), built on the meta device: no weights
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
)  # fmt: skip


def _llama(**config: object) -> ParentModel:
    torch.manual_seed(0)
    return parent_from_module(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)))


def _small() -> ParentModel:
    """hidden 192, 6 heads of 32 in 2 KV groups, FFN 512, 3 layers, vocabulary 4096."""
    return _llama(
        vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=256,
    )  # fmt: skip


def _saved_bytes(model: torch.nn.Module, batch: int, seq: int, vocab: int, under: int = 1 << 62) -> int:
    """Bytes of the distinct storages autograd saves for backward (each under ``under`` bytes), parameters
    excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params and n < under)


@pytest.mark.parametrize(
    ("layers", "batch", "seq"),
    [([(6, 512)] * 3, 4, 64), ([(3, 100), (6, 512), (3, 300)], 2, 128)],
)
def test_activation_bytes_within_5_percent_of_what_autograd_saves(
    layers: list[tuple[int, int]], batch: int, seq: int
) -> None:
    parent = _small()
    spec = SubnetSpec(parent.dims, tuple(LayerSpec(i, h, f) for i, (h, f) in enumerate(layers)))
    model = build_model(spec, parent.config, extract(parent, spec))
    measured = _saved_bytes(model, batch, seq, 4096)
    predicted = activation_bytes(spec, workload_for(parent, Workload(batch, seq)))
    print(f"predicted {predicted} measured {measured} ({(predicted - measured) / measured:+.1%})")
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_a_causal_lm_saves_its_log_probabilities_and_briefly_holds_two_more() -> None:
    parent = _small()
    work = workload_for(parent, Workload(64, 128))  # large enough that the step moment is the peak
    classifier = replace(work, arch=replace(work.arch, token_logits=0))
    narrow = SubnetSpec.uniform(parent.dims, heads=3, ffn=64)
    logits = 4 * 64 * 128 * 4096  # one b x s x V fp32 tensor
    assert activation_bytes(narrow, work) - activation_bytes(narrow, classifier) == logits
    causal, other = (training_estimate(narrow, 10**6, w) for w in (work, classifier))
    assert causal.total - other.total > logits  # saved once, and two more briefly in backward


def test_tied_embeddings_are_counted_once() -> None:
    parent = _small()
    full = SubnetSpec.full(parent.dims)
    estimate = training_estimate(full, param_count(parent, full), workload_for(parent, Workload(2, 16)))
    model = build_model(full, parent.config, extract(parent, full))
    assert estimate.params == sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # a fresh process imports torch and transformers: ~20-30 s
def test_training_peak_of_a_fresh_process_is_at_or_under_the_prediction(tmp_path: Path) -> None:
    """Plain AdamW on a 5M-parameter Llama (vocabulary 8192, GQA), batch 8 of 128 random tokens."""
    parent = _llama(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
    )  # fmt: skip
    spec = SubnetSpec.full(parent.dims)
    result = run_probe(
        write_probe_folder(tmp_path, spec, parent.config, extract(parent, spec)), batch=8, seq=128, steps=3
    )
    runtime = int(result["runtime_rss_bytes"])
    work = workload_for(parent, Workload(8, 128, steps=3))
    estimate = training_estimate(spec, param_count(parent, spec), work, runtime=runtime)
    peak = int(result["peak_rss_bytes"])
    print(f"predicted {estimate.total} measured {peak} ({(estimate.total - peak) / peak:+.1%})")
    assert result["trainable"] == estimate.params
    assert peak <= estimate.total <= 1.15 * peak


def _smollm2_shape() -> tuple[ParentModel, Salience]:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2))
    parent = parent_from_module(model)
    d = parent.dims
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(d.num_layers, d.num_heads, generator=g).sort(dim=1, descending=True).values
    ffn = torch.rand(d.num_layers, d.ffn, generator=g).sort(dim=1, descending=True).values
    salience = Salience(heads, ffn, "random")
    return parent, salience


def test_smollm2_full_fine_tuning_needs_over_2_gb_before_activations() -> None:
    parent, _ = _smollm2_shape()
    full = SubnetSpec.full(parent.dims)
    params = param_count(parent, full)
    assert params == 134_515_008
    estimate = training_estimate(full, params, workload_for(parent, Workload(1, 1)), runtime=0)
    assert estimate.weights + estimate.gradients + estimate.optimizer > 2_000_000_000


@pytest.mark.parametrize(
    "device",
    [pytest.param(1_000_000_000, marks=pytest.mark.slow), 2_000_000_000],  # 1 GB: a 30-layer width search, ~30 s
)
def test_smollm2_budgets_are_planned_with_lora_and_whole_kv_groups(device: int) -> None:
    """A 1 GB and a 2 GB device (the training runtime's footprint taken out first)."""
    parent, salience = _smollm2_shape()
    work = Workload(8, 64, steps=3)
    budget = device - TRAINING_RUNTIME_BYTES
    plan = plan_training(parent, salience, budget, work, runtime=0, policy=LeverPolicy())
    assert plan.estimate.total <= budget
    assert plan.levers.lora_rank > 0  # full fine-tuning does not fit, LoRA comes before width
    assert plan.levers.embeddings != "rows"  # the tied table is read whole by the output projection
    assert all(layer.heads % parent.dims.group == 0 for layer in plan.spec.layers)
    if device < 2_000_000_000:
        assert not plan.spec.is_full  # LoRA alone does not fit 1 GB: the sub-network is narrower too
        return
    plain = plan_training(parent, salience, budget, work, runtime=0)  # no levers: a narrower network
    assert not plain.spec.is_full and plain.estimate.total <= budget
    assert all(layer.heads % parent.dims.group == 0 for layer in plain.spec.layers)


def test_lora_adapts_all_seven_linears_of_a_layer() -> None:
    parent = _small()
    spec = SubnetSpec.full(parent.dims)
    work = workload_for(parent, Workload(2, 16))
    plain = training_estimate(spec, param_count(parent, spec), work, levers=Levers()).params
    lora = training_estimate(spec, param_count(parent, spec), work, levers=Levers(lora_rank=4, embeddings="frozen"))
    h, d, f = 192, 32, 512
    adapters = 3 * 4 * ((h + 6 * d) + 2 * (h + 2 * d) + (6 * d + h) + 3 * (h + f))
    assert lora.params == adapters + 3 * 2 * h + h  # adapters and the RMSNorms
    assert plain > lora.params


# Peaks above the runtime footprint (MiB) of the real SmolLM2-135M trained in fresh processes (3-7 AdamW steps on
# random full-length rows, the highest step; bench/llm.py --section training and the phase measurements in
# edge_sdk/scaling/_memory_decoder.py's docstring): batch, levers, measured.
SMOLLM2_MEASURED = [
    (4, Levers(), 2645),  # the end of backward: the tied table's gradient three times, the heap's small activations
    (4, Levers(checkpointing=True, embeddings="frozen"), 1921),
    (4, Levers(micro_batches=4, embeddings="frozen", lora_rank=16), 932),  # the next micro-batch on the retained heap
    (8, Levers(), 2686),  # the start of backward: every activation saved, the logits' gradients
    (4, Levers(lora_rank=16), 1762),  # LoRA's forward temporaries churn the heap
    (4, Levers(checkpointing=True, embeddings="frozen", lora_rank=16), 1050),  # ... checkpointing or not
    (4, Levers(micro_batches=4, checkpointing=True, embeddings="frozen", lora_rank=16), 798),  # 900 MB's plan
]


@pytest.mark.parametrize(("batch", "levers", "measured_mib"), SMOLLM2_MEASURED)
def test_smollm2_measured_peaks_are_predicted_within_1_percent_under_and_5_percent_over(
    batch: int, levers: Levers, measured_mib: int
) -> None:
    parent, _ = _smollm2_shape()
    full = SubnetSpec.full(parent.dims)
    runtime = 399 << 20  # the runtime footprint those processes measured
    work = workload_for(parent, Workload(batch, 64, steps=3))
    predicted = training_estimate(full, param_count(parent, full), work, runtime=runtime, levers=levers).total
    measured = runtime + (measured_mib << 20)
    print(f"predicted {predicted >> 20} MiB measured {measured >> 20} MiB ({(predicted - measured) / measured:+.1%})")
    assert 0.99 * measured <= predicted <= 1.05 * measured  # at most 12 MiB under: min_margin (192 MiB) covers it


def test_small_activations_are_the_saved_tensors_under_the_mmap_threshold() -> None:
    """A_small (the heap's share of what a layer saves) against autograd's saved tensors under 1 MiB: at
    batch 4 x 64 every layer tensor of the small Llama is under it; at 32 x 64 only the KV-sized are."""
    parent = _small()
    spec = SubnetSpec.full(parent.dims)
    model = build_model(spec, parent.config, extract(parent, spec))
    at_4 = small_bytes(spec.layers, 192, 32, workload_for(parent, Workload(4, 64)), Levers(), probabilities=True)
    measured = _saved_bytes(model, 4, 64, 4096, under=1 << 20)
    print(f"batch 4: predicted {at_4} measured {measured}")
    assert 0.85 * measured <= at_4 <= measured  # the rest: the final norm's, the norms' variances, the rotary tables
    at_32 = small_bytes(spec.layers, 192, 32, workload_for(parent, Workload(32, 64)), Levers(), probabilities=True)
    assert at_32 == 0  # b x s x h is 1.5 MiB: mmapped
    assert _saved_bytes(model, 32, 64, 4096, under=1 << 20) < 0.01 * _saved_bytes(model, 32, 64, 4096)
    ckpt = small_bytes(
        spec.layers, 192, 32, workload_for(parent, Workload(4, 64)), Levers(checkpointing=True), probabilities=True
    )
    layer = small_bytes(spec.layers[:1], 192, 32, workload_for(parent, Workload(4, 64)), Levers(), probabilities=True)
    assert ckpt == 3 * 4 * 4 * 64 * 192 + layer  # the three layers' inputs, one layer rebuilt


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets VmHWM: Linux only")
def test_a_tied_tables_gradient_is_held_three_times_at_the_end_of_backward() -> None:
    """The output projection's gradient of a tied table waits for the embedding's; their sum is copied into
    the parameter's layout: three V x h tensors at once (32 MiB each here, mmapped: exact in RSS)."""
    peaks = {}
    for tied in (True, False):
        torch.manual_seed(0)
        emb, head = torch.nn.Embedding(32768, 256), torch.nn.Linear(256, 32768, bias=False)
        if tied:
            head.weight = emb.weight
        ids = torch.randint(0, 32768, (2, 8))
        loss = torch.nn.functional.cross_entropy(head(emb(ids) * 1.0).view(-1, 32768), ids.view(-1))
        base = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        loss.backward()
        peaks[tied] = _rss("VmHWM") - base
        del emb, head, loss
    table = 32768 * 256 * 4
    print({k: v / table for k, v in peaks.items()})
    assert 2.9 * table <= peaks[True] <= 3.2 * table  # one stays as .grad: the model's G and 2 x 4Vh more
    assert 1.9 * table <= peaks[False] <= 2.2 * table  # untied: two gradients, both in G


def _rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)
