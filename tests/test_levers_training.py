"""The trainer's memory levers on real (tiny, sliced) torch models: exact gradient accumulation,
row-only embedding training equal to dense AdamW on those rows, frozen tables, LoRA via peft."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from edge_sdk._errors import ConfigError, SpecError
from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.protocol import TrainSettings, TrainTask, encode_tensors, torch_to_numpy
from edge_sdk.scaling._build import build_model
from edge_sdk.scaling._extract import extract
from edge_sdk.training._levers import RowEmbedding, install_rows, prepare, trained_tensors
from edge_sdk.training._runner import TaskRunner
from edge_sdk.training._train import TrainConfig, _step_loss, train_local

from .models import tiny_inputs, tiny_parent

TABLE = "bert.embeddings.word_embeddings.weight"
LAYERS = (LayerSpec(0, 2, 24), LayerSpec(1, 4, 48), LayerSpec(2, 1, 10))  # per-layer widths, sliced


def sub_bert(attention: str = "eager") -> tuple[SubnetSpec, dict[str, torch.Tensor], torch.nn.Module]:
    parent = tiny_parent("bert")
    spec = SubnetSpec(parent.dims, LAYERS)
    weights = extract(parent, spec)
    return spec, weights, build_model(spec, parent.config, weights, attn_implementation=attention)


def ragged_batch(rows: int = 6, seed: int = 0, vocab: tuple[int, int] = (3, 30)) -> dict[str, np.ndarray]:
    """Rows of different lengths, right-padded with id 0 (BERT's padding row)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 12, size=rows)
    ids = np.zeros((rows, int(lengths.max())), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(*vocab, size=n)
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "labels": rng.integers(0, 3, rows)}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("micro_batches", "checkpointing", "attention"),
    [(3, False, "eager"), (6, False, "eager"), (2, True, "eager"), (4, False, "sdpa")],
)
def test_accumulated_gradient_is_the_whole_batch_gradient(
    micro_batches: int, checkpointing: bool, attention: str
) -> None:
    batch = ragged_batch()
    _, _, whole = sub_bert()
    prepare(whole, Levers(), dropout=0.0)
    whole.train()
    whole(**{k: torch.as_tensor(v) for k, v in batch.items()}).loss.backward()
    _, _, split = sub_bert(attention)
    prepare(split, Levers(micro_batches=micro_batches, checkpointing=checkpointing, attention=attention), dropout=0.0)
    split.train()
    _, rows = _step_loss(split, batch, micro_batches, None)
    expected, got = grads(whole), grads(split)
    assert rows == 6 and expected.keys() == got.keys() and len(got) == len(list(split.parameters()))
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=0, msg=name)


def _train(levers: Levers, batches: list[dict[str, np.ndarray]], **kw: Any) -> torch.nn.Module:
    _, _, model = sub_bert()
    config = TrainConfig(steps=len(batches), lr=1e-2, levers=levers, tune_allocator=False, **kw)
    train_local(model, iter(batches), config)
    return model


def test_row_training_is_dense_adamw_on_those_rows() -> None:
    """Same batches, same seed, dropout on: the touched rows and every other parameter train alike."""
    batches = [ragged_batch(seed=s, vocab=(3, 20)) for s in range(4)]  # ids 3..19 of 50 (and padding 0)
    dense = _train(Levers(), batches, prox_mu=0.1)
    rowwise = _train(Levers(embeddings="rows"), batches, prox_mu=0.1)
    out = trained_tensors(rowwise, [n for n, _ in dense.named_parameters()])
    rows = out[TABLE + "@rows"]
    tokens = {0, *np.concatenate([b["input_ids"].ravel() for b in batches]).tolist()}
    assert rows.dtype == torch.int64 and rows.tolist() == sorted(tokens)
    torch.testing.assert_close(out[TABLE], dense.get_parameter(TABLE).detach()[rows], atol=1e-6, rtol=0)
    others = {n: p for n, p in dense.named_parameters() if n != TABLE}
    assert others.keys() <= out.keys()
    for name, p in others.items():
        torch.testing.assert_close(out[name], p.detach(), atol=1e-6, rtol=0, msg=name)
    table = rowwise.get_input_embeddings()
    assert isinstance(table, RowEmbedding) and not table.weight.requires_grad
    # AdamW state for the touched rows only: 18 of 50 rows
    trainable = sum(p.numel() for p in rowwise.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in dense.parameters()) - (50 - len(rows)) * 32


def test_a_row_outside_the_trained_ones_reads_the_frozen_table() -> None:
    _, _, model = sub_bert()
    table = model.get_input_embeddings().weight.detach().clone()
    install_rows(model, np.array([3, 5]))
    with torch.no_grad():
        model.get_input_embeddings().rows_weight.add_(1.0)
        out = model.get_input_embeddings()(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(out[0], torch.stack([table[3] + 1, table[4], table[5] + 1]))


def test_frozen_embeddings_are_not_trained_nor_returned() -> None:
    batches = [ragged_batch(seed=s) for s in range(2)]
    _, weights, _ = sub_bert()
    model = _train(Levers(embeddings="frozen"), batches)
    out = trained_tensors(model, weights)
    assert TABLE not in out and out.keys() == weights.keys() - {TABLE}
    torch.testing.assert_close(model.get_parameter(TABLE).detach(), weights[TABLE], atol=0, rtol=0)
    assert not torch.equal(out["classifier.weight"], weights["classifier.weight"])


LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")  # fmt: skip


def test_lora_trains_adapters_layernorms_and_head_and_b_a_is_the_weight_change() -> None:
    from peft.tuners.lora import LoraLayer

    batches = [ragged_batch(seed=s) for s in range(3)]
    _, weights, _ = sub_bert()
    model = _train(Levers(lora_rank=2, embeddings="frozen"), batches, max_grad_norm=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    dense = {n for n in trainable if "lora_" not in n}
    assert dense == {n for n in weights if "LayerNorm" in n or n.startswith(("bert.pooler.", "classifier."))}
    assert len(trainable - dense) == 2 * len(LINEARS) * len(LAYERS)

    out = trained_tensors(model, weights)
    linear = {f"bert.encoder.layer.{i}.{path}.weight" for i in range(len(LAYERS)) for path in LINEARS}
    expected = dense | {n + "@lora_A" for n in linear} | {n + "@lora_B" for n in linear}
    assert set(out) == expected  # biases, embeddings and the linear weights themselves: absent
    for name in linear:
        a, b = out[name + "@lora_A"], out[name + "@lora_B"]
        assert a.shape == (2, weights[name].shape[1]) and b.shape == (weights[name].shape[0], 2)
        assert b.abs().sum() > 0  # trained (B starts at zero)

    inputs = {k: torch.as_tensor(v) for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()  # peft's own merge: W + s B A
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    for name in linear:
        module = model.get_submodule(name.removesuffix(".weight"))
        delta = module.base_layer.weight.detach() - weights[name]
        torch.testing.assert_close(out[name + "@lora_B"] @ out[name + "@lora_A"], delta, atol=1e-6, rtol=0, msg=name)


def test_lever_misuse_is_a_clear_error() -> None:
    _, _, model = sub_bert()
    with pytest.raises(ConfigError, match="built with eager attention"):
        prepare(model, Levers(attention="sdpa"))
    with pytest.raises(ConfigError, match="needs the rows"):
        prepare(model, Levers(embeddings="rows"))
    parent = tiny_parent("vit")
    vit = build_model(SubnetSpec.full(parent.dims), parent.config, parent.state)
    with pytest.raises(SpecError, match="token-embedding table"):
        prepare(vit, Levers(embeddings="frozen"))
    prepare(vit, Levers(lora_rank=2))  # LoRA applies to every family with a layer map
    assert any("lora_A" in n for n, _ in vit.named_parameters())
    vit(**tiny_inputs("vit"))
    with pytest.raises(ConfigError, match="max_grad_norm"):
        TrainConfig(steps=1, max_grad_norm=-1.0)
    with pytest.raises(ConfigError, match="dropout"):
        TrainConfig(steps=1, dropout=1.0)


class RaggedTokens:
    """A device's data: ragged rows of token ids (deterministic per seed), for the tiny BERT."""

    def __len__(self) -> int:
        return 24

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        step = 0
        while True:
            batch = ragged_batch(batch_size, seed=seed * 1000 + step)
            step += 1
            yield {k: v[:, :seq_len] if v.ndim == 2 else v for k, v in batch.items()}


@pytest.mark.parametrize(
    "levers",
    [Levers(), Levers(embeddings="rows", micro_batches=2), Levers(lora_rank=3, embeddings="frozen", checkpointing=True),
     Levers(attention="sdpa", embeddings="frozen")],
    ids=lambda lv: lv.describe(),
)  # fmt: skip
def test_the_runner_returns_what_the_levers_trained(levers: Levers) -> None:
    parent = tiny_parent("bert")
    spec = SubnetSpec(parent.dims, LAYERS)
    tensors = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(tensors)
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(parent.config, default=str)),
        settings=TrainSettings(local_steps=2, lr=1e-3, batch_size=4, seq_len=8, levers=levers, max_grad_norm=1.0),
        weights=manifest,
    )
    out = TaskRunner(RaggedTokens(), threads=1).train(task, tensors).tensors
    assert all(a.dtype == (np.int64 if n.endswith("@rows") else np.float32) for n, a in out.items())
    if levers.embeddings == "train" and not levers.lora_rank:
        assert out.keys() == tensors.keys()
        assert all(out[n].shape == a.shape for n, a in tensors.items())
    else:
        assert TABLE not in out or TABLE + "@rows" in out
    if levers.embeddings == "rows":
        rows = out[TABLE + "@rows"]
        assert out[TABLE].shape == (len(rows), 32) and (np.diff(rows) > 0).all()
        touched = np.concatenate([b["input_ids"][:, :8].ravel() for b in _first(RaggedTokens(), 2)])
        assert set(rows.tolist()) == set(touched.tolist())
    if levers.lora_rank:
        assert any(n.endswith("@lora_A") for n in out) and "classifier.weight" in out


def _first(data: RaggedTokens, n: int) -> list[dict[str, np.ndarray]]:
    it = data.batches(4, 8, 0)
    return [next(it) for _ in range(n)]
