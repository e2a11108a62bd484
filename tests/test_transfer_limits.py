"""Transfers of a model over the protocol's default limit (512 MiB): SmolLM2-135M's fp32 weights are
538 MB. A device accepts what its budget can hold; the coordinator what its model can send back."""

from __future__ import annotations

import types

import torch

from coordinator.serve._server import transfer_limit
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
