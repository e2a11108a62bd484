"""A lever-shaped update from the real trainer passes the wire check and merges on the coordinator."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from coordinator.federation._aggregate import ClientUpdate, aggregate, merge_deltas
from edge_sdk._levers import Levers
from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.protocol import (
    TrainSettings,
    TrainTask,
    describe_tensors,
    encode_tensors,
    numpy_to_torch,
    torch_to_numpy,
    update_entry_mismatches,
)
from edge_sdk.scaling._extract import extract
from edge_sdk.training._runner import TaskRunner

from .models import tiny_parent

TABLE = "bert.embeddings.word_embeddings.weight"
Q0 = "bert.encoder.layer.0.attention.self.query.weight"


class Tokens:
    """Deterministic ragged batches of token ids for the tiny BERT (ids 3..29, padding 0)."""

    def __len__(self) -> int:
        return 16

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        step = 0
        while True:
            rng = np.random.default_rng(seed * 1000 + step)
            step += 1
            lengths = rng.integers(2, seq_len + 1, size=batch_size)
            ids = np.zeros((batch_size, int(lengths.max())), dtype=np.int64)
            for i, n in enumerate(lengths):
                ids[i, :n] = rng.integers(3, 30, size=n)
            yield {
                "input_ids": ids,
                "attention_mask": (ids > 0).astype(np.int64),
                "labels": rng.integers(0, 3, batch_size),
            }


@pytest.mark.parametrize(
    "levers",
    [Levers(), Levers(embeddings="rows", micro_batches=2), Levers(embeddings="frozen", checkpointing=True),
     Levers(lora_rank=3), Levers(lora_rank=2, embeddings="rows")],
    ids=lambda lv: lv.describe(),
)  # fmt: skip
def test_trained_update_passes_the_wire_and_the_aggregation_checks(levers: Levers) -> None:
    parent = tiny_parent("bert")
    spec = SubnetSpec(parent.dims, (LayerSpec(0, 2, 24), LayerSpec(1, 4, 48), LayerSpec(2, 1, 10)))
    sent = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(sent)
    settings = TrainSettings(local_steps=2, lr=1e-2, batch_size=4, seq_len=8, levers=levers)
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(parent.config)),
        settings=settings,
        weights=manifest,
    )
    out = TaskRunner(Tokens(), threads=1).train(task, sent).tensors  # the levers come from the settings
    assert update_entry_mismatches(describe_tensors(out), manifest.entries, levers) == []
    update = ClientUpdate(spec, numpy_to_torch(out), 4, levers)
    delta, coverage = merge_deltas(parent, [update])
    merged = aggregate(parent, [update])
    assert all(bool(torch.isfinite(t).all()) for t in merged.state.values() if t.is_floating_point())
    assert (coverage[Q0][:16] > 0).all() and (coverage[Q0][16:] == 0).all()  # two heads of 8 rows
    if levers.lora_rank:
        a, b = out[Q0 + "@lora_A"], out[Q0 + "@lora_B"]
        torch.testing.assert_close(delta[Q0][:16], torch.from_numpy(b @ a))
    if levers.embeddings == "rows":
        rows = torch.from_numpy(out[TABLE + "@rows"])
        covered = (coverage[TABLE][:, 0] > 0).nonzero().flatten()
        assert torch.equal(covered, rows)
    if levers.embeddings == "frozen":
        assert (coverage[TABLE] == 0).all() and torch.equal(merged.state[TABLE], parent.state[TABLE])
