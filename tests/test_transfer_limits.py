"""Transfers of a model over the protocol's default limit (512 MiB): SmolLM2-135M's fp32 weights are
538 MB. A device accepts what its budget can hold; the coordinator what its model can send back."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from coordinator.serve._server import transfer_limit
from edge_sdk._levers import Levers
from edge_sdk.client._client import DeviceOptions, EdgeDevice
from edge_sdk.protocol import DEFAULT_MAX_TRANSFER_BYTES

from .models import tiny_parent


class _Data:
    def __len__(self) -> int:
        return 4


def test_a_device_accepts_transfers_as_large_as_its_budget() -> None:
    big = EdgeDevice(DeviceOptions(url="ws://127.0.0.1:1", token="t" * 16, memory_budget="2GiB", probe=False), _Data())  # type: ignore[arg-type]
    assert big.limits.max_transfer_bytes == DEFAULT_MAX_TRANSFER_BYTES  # before its budget is known
    big.hello_profile()
    assert big.limits.max_transfer_bytes == 2 << 30
    small = EdgeDevice(
        DeviceOptions(url="ws://127.0.0.1:1", token="t" * 16, memory_budget="100MiB", probe=False), _Data()
    )  # type: ignore[arg-type]
    small.hello_profile()
    assert small.limits.max_transfer_bytes == DEFAULT_MAX_TRANSFER_BYTES  # never below the default


def test_the_coordinator_accepts_a_dense_update_of_its_whole_model() -> None:
    parent = tiny_parent("bert")
    assert transfer_limit(types.SimpleNamespace(parent=parent)) == DEFAULT_MAX_TRANSFER_BYTES  # type: ignore[arg-type]
    big = parent.with_state({"w": torch.zeros(150_000_000, device="meta")})  # 600 MB of float32
    assert transfer_limit(types.SimpleNamespace(parent=big)) == 750_000_000  # type: ignore[arg-type]


@pytest.mark.parametrize("levers", [Levers(lora_rank=2, embeddings="frozen"), Levers(embeddings="rows"), Levers()])
def test_a_device_copies_only_what_training_changes_in_place(levers: Levers) -> None:
    """The reference deltas are taken against: a copy of each densely trained tensor, the received
    array itself for LoRA targets and a frozen or row-trained table (a LoRA device copied its whole
    model: SmolLM2's 538 MB, half a gigabyte over its plan)."""
    import json

    from edge_sdk._spec import SubnetSpec
    from edge_sdk.protocol import TrainSettings, TrainTask, encode_tensors, torch_to_numpy
    from edge_sdk.scaling._extract import extract
    from edge_sdk.training._runner import TaskRunner

    from .test_levers_roundtrip import Tokens

    parent = tiny_parent("bert")
    spec = SubnetSpec.full(parent.dims)
    sent = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(sent)
    settings = TrainSettings(local_steps=1, lr=1e-2, batch_size=4, seq_len=8, levers=levers)
    config = json.loads(json.dumps(parent.config))
    task = TrainTask(
        task_id="t", round=1, spec=spec.to_dict(), model_config=config, settings=settings, weights=manifest
    )
    before = {n: a.copy() for n, a in sent.items()}
    output = TaskRunner(Tokens(), threads=1).train(task, sent, keep_received=True)
    assert output.received is not None
    table = parent.family.word_embedding(parent.task)
    for name, array in output.received.items():
        np.testing.assert_array_equal(array, before[name])  # as received, whatever training did
        frozen = (levers.lora_rank and parent.family.lora_target(name, parent.task)) or (
            name == table and levers.embeddings != "train"
        )
        assert np.shares_memory(array, sent[name]) == bool(frozen), name
