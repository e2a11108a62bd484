"""The memory model against what autograd saves and against the peak RSS of real training runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.simulation._memcheck import measure_training
from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.scaling._build import build_model
from edge_sdk.scaling._extract import extract, param_count
from edge_sdk.scaling._memory import TRAINING_RUNTIME_BYTES, Workload, activation_bytes, training_estimate
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling._search import plan_training
from edge_sdk.training._levers import prepare
from edge_sdk.training._probe import run_probe

from .models import long_rows_tsv, minilm, minilm_dir


def saved_activation_bytes(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(batch, dtype=torch.long))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize(
    ("layers", "batch", "seq"),
    [
        ([(12, 1536)] * 6, 4, 64),
        ([(6, 768)] * 6, 8, 32),
        ([(3, 384), (12, 1536), (1, 32), (7, 1000), (12, 64), (2, 1536)], 2, 128),
    ],
)
def test_activation_bytes_within_5_percent_of_what_autograd_saves(layers, batch, seq) -> None:  # type: ignore[no-untyped-def]
    parent = minilm()
    spec = SubnetSpec(parent.dims, tuple(LayerSpec(i, h, f) for i, (h, f) in enumerate(layers)))
    model = build_model(spec, parent.config, extract(parent, spec))
    measured = saved_activation_bytes(model, batch, seq)
    predicted = activation_bytes(spec, Workload(batch, seq))
    print(f"predicted {predicted} measured {measured} ({(predicted - measured) / measured:+.1%})")
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


@pytest.mark.parametrize(
    ("levers", "dropout"),
    [
        (Levers(), 0.0),  # no dropout masks; the attention probabilities saved once
        (Levers(attention="sdpa"), 0.0),  # fused attention saves no probabilities
        (Levers(attention="sdpa"), None),  # with dropout, SDPA saves what eager attention does
        (Levers(lora_rank=8, embeddings="frozen"), None),  # LoRA adds a small b x s x r per linear
        (Levers(micro_batches=4), None),  # a micro-batch's share
    ],
    ids=lambda v: v.describe() if isinstance(v, Levers) else f"dropout {v}",
)
def test_activation_bytes_with_levers_within_5_percent_of_what_autograd_saves(
    levers: Levers, dropout: float | None
) -> None:
    parent = minilm()
    spec = SubnetSpec(parent.dims, tuple(LayerSpec(i, 12 - 2 * i, 1536 - 200 * i) for i in range(6)))
    model = build_model(spec, parent.config, extract(parent, spec), attn_implementation=levers.attention)
    prepare(model, levers, dropout=dropout)
    batch, seq = 8, 64
    measured = saved_activation_bytes(model, batch // levers.micro_batches, seq)
    work = Workload(batch, seq, dropout=dropout != 0.0, vocab=int(parent.config["vocab_size"]))
    predicted = activation_bytes(spec, work, levers)
    print(f"predicted {predicted} measured {measured} ({(predicted - measured) / measured:+.1%})")
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [1_300_000_000, 1_600_000_000, 1_850_000_000])
def test_training_peak_rss_is_predicted_and_within_budget(budget: int, tmp_path: Path) -> None:
    """A fresh process trains the sub-network the search picked for ``budget``."""
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    work = Workload(batch=32, seq=128)
    plan = plan_training(parent, salience, budget, work)
    assert not plan.spec.is_full  # the budget binds
    measured = measure_training(parent, plan.spec, work, data=long_rows_tsv(tmp_path), tokenizer_dir=minilm_dir())
    # the runtime footprint is the process's own, measured before training (a device reports it; its
    # size varies with the machine and even with how the libraries sit in the page cache)
    runtime = measured.runtime_rss_bytes
    predicted = training_estimate(plan.spec, param_count(parent, plan.spec), work, runtime=runtime).total
    print(f"budget {budget} predicted {predicted} measured {measured.peak_rss_bytes} (runtime {runtime})")
    assert measured.params == plan.params
    assert measured.peak_rss_bytes - runtime <= budget - TRAINING_RUNTIME_BYTES
    assert abs(predicted - measured.peak_rss_bytes) / measured.peak_rss_bytes <= 0.15


# (label, width ratio, levers, dropout): fresh processes training the real MiniLM classifier
LEVER_CASES = [
    ("plain", 1.0, Levers(), None),
    ("4 micro-batches", 1.0, Levers(micro_batches=4), None),
    ("frozen embeddings", 1.0, Levers(embeddings="frozen"), None),
    ("embedding rows", 1.0, Levers(embeddings="rows"), None),
    ("checkpointing", 1.0, Levers(checkpointing=True), None),
    ("frozen embeddings + checkpointing", 1.0, Levers(embeddings="frozen", checkpointing=True), None),
    ("LoRA r8, frozen embeddings", 1.0, Levers(lora_rank=8, embeddings="frozen"), None),
    ("half width, rows + ckpt, SDPA", 0.5, Levers(embeddings="rows", checkpointing=True, attention="sdpa"), 0.0),
]


@pytest.mark.slow
def test_training_peak_with_levers_is_at_or_under_the_prediction_and_within_15_percent(tmp_path: Path) -> None:
    """Batch 16 of 64 random tokens a row (the worst case of a 64-token max length), 3 AdamW steps."""
    parent = minilm()
    batch, seq, steps = 16, 64, 3
    vocab = int(parent.config["vocab_size"])
    measured: dict[str, int] = {}
    print(f"\n{'levers':<40} {'predicted':>10} {'measured':>10} {'error':>7}")
    for label, ratio, levers, dropout in LEVER_CASES:
        spec = SubnetSpec.from_ratio(parent.dims, ratio)
        folder = tmp_path / label.replace(" ", "_")
        folder.mkdir()
        (folder / "spec.json").write_text(spec.to_json())
        (folder / "config.json").write_text(json.dumps(dict(parent.config)))
        save_file(extract(parent, spec), folder / "weights.safetensors")
        result = run_probe(folder, batch=batch, seq=seq, steps=steps, levers=levers.to_dict(), dropout=dropout)
        work = Workload(batch, seq, steps=steps, vocab=vocab, dropout=dropout != 0.0)
        runtime = int(result["runtime_rss_bytes"])
        estimate = training_estimate(spec, param_count(parent, spec), work, runtime=runtime, levers=levers)
        peak, predicted = int(result["peak_rss_bytes"]), estimate.total
        measured[label] = peak - runtime  # what training added (the runtime varies by process and page cache)
        print(f"{label:<40} {predicted / 1e6:>8.0f}MB {peak / 1e6:>8.0f}MB {(predicted - peak) / peak:>+7.1%}")
        exact = levers.embeddings != "rows"  # rows: the model bounds the rows a task touches, b x s x steps
        assert result["trainable"] == estimate.params if exact else result["trainable"] <= estimate.params, label
        assert peak <= predicted <= 1.15 * peak, (label, predicted, peak)
    # the levers really save memory (at batch 16 x 64 the optimizer step sets the peak, so checkpointing
    # saves least: 46-54 MB measured)
    plain = measured["plain"]
    for label in ("frozen embeddings", "embedding rows", "checkpointing", "LoRA r8, frozen embeddings"):
        assert measured[label] < plain - 20_000_000, (label, measured[label], plain)
