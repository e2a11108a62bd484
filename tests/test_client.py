"""The device SDK's Python API against the in-process coordinator: the user's own data and training
function, refusals that stop the device (token, budget), and a task abandoned when its connection drops."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from edge_sdk import BudgetError, ConfigError
from edge_sdk.client._backoff import Backoff
from edge_sdk.client._client import DeviceOptions, EdgeDevice
from edge_sdk.training._runner import TaskCancelledError, TaskRunner
from edge_sdk.training._train import TrainConfig, TrainResult, train_local

from .test_server import coordinator, run


class RandomTokens:
    """A user's own data set: random token ids for the tiny BERT (vocabulary 50, 3 labels)."""

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        while True:
            ids = rng.integers(3, 50, size=(batch_size, seq_len), dtype=np.int64)
            yield {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "labels": rng.integers(0, 3, batch_size),
            }


def options(srv: Any, name: str, **kwargs: Any) -> DeviceOptions:
    base: dict[str, Any] = {
        "url": f"ws://127.0.0.1:{srv.port}",
        "token": f"token-of-{name}",
        "memory_budget": "2GB",
        "probe": False,
        "threads": 1,
        "backoff": Backoff(initial_s=0.05, max_s=0.2, give_up_s=30),
    }
    return DeviceOptions(**{**base, **kwargs})


def test_a_device_trains_with_its_own_data_and_training_function(tmp_path: Path) -> None:
    calls: list[int] = []

    def my_training(model: Any, batches: Any, config: TrainConfig) -> TrainResult:
        calls.append(config.steps)
        return train_local(model, batches, config)

    async def main() -> int:
        async with coordinator(tmp_path, ["mine"], rounds=2) as (srv, running):
            device = EdgeDevice(options(srv, "mine"), RandomTokens(), train_fn=my_training)
            done = await asyncio.wait_for(device.run_async(), 60)
            await asyncio.wait_for(running, 30)
            return done

    assert run(main()) == 2
    assert calls == [2, 2]  # TRAINING.local_steps, once a round
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert [d["status"] for entry in state.history for d in entry["devices"]] == ["ok", "ok"]
    assert all(d["num_samples"] == 40 for entry in state.history for d in entry["devices"])


def test_a_refused_token_stops_the_device_without_retrying(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(tmp_path, ["a"]) as (srv, _):
            device = EdgeDevice(options(srv, "a", token="not-the-token"), RandomTokens())
            with pytest.raises(ConfigError, match="HTTP 401"):
                await asyncio.wait_for(device.run_async(), 30)

    run(main())


def test_a_budget_that_fits_nothing_stops_the_device(tmp_path: Path) -> None:
    async def main() -> None:
        async with coordinator(tmp_path, ["a"]) as (srv, _):
            device = EdgeDevice(options(srv, "a", memory_budget="1KB"), RandomTokens())
            with pytest.raises(BudgetError, match="refused this device"):
                await asyncio.wait_for(device.run_async(), 30)

    run(main())


def test_an_unreachable_coordinator_is_given_up_on_in_bounded_time() -> None:
    device = EdgeDevice(
        DeviceOptions(
            url="ws://127.0.0.1:9",
            token="whatever",
            memory_budget="1GB",
            probe=False,
            backoff=Backoff(initial_s=0.05, max_s=0.1, give_up_s=0.5),
        ),
        RandomTokens(),
    )
    with pytest.raises(Exception, match="giving up"):
        asyncio.run(asyncio.wait_for(device.run_async(), 30))


def test_a_cancelled_task_stops_at_its_next_batch() -> None:
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.protocol import TrainSettings, TrainTask, encode_tensors, torch_to_numpy
    from edge_sdk.scaling._extract import extract

    from .models import tiny_parent

    parent = tiny_parent("bert")
    spec = SubnetSpec.full(parent.dims)
    tensors = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(tensors)
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(parent.config, default=str)),
        settings=TrainSettings(local_steps=1000, lr=1e-3, batch_size=2, seq_len=8),
        weights=manifest,
    )
    cancel = threading.Event()
    seen: list[int] = []

    def stop_after_three(model: Any, batches: Any, config: TrainConfig) -> TrainResult:
        for i, _ in enumerate(batches):
            seen.append(i)
            if i == 2:
                cancel.set()
        raise AssertionError("unreachable")

    with pytest.raises(TaskCancelledError):
        TaskRunner(RandomTokens(), train_fn=stop_after_three).train(task, tensors, cancel)
    assert seen == [0, 1, 2]


def test_device_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        DeviceOptions(url="http://x", token="t")
    with pytest.raises(ConfigError, match="ca-file"):
        DeviceOptions(url="ws://x", token="t", ca_file=Path("ca.pem"))
    with pytest.raises(ConfigError, match="token"):
        DeviceOptions(url="ws://x", token="")


@pytest.mark.parametrize("take", [True, False])
def test_a_device_takes_the_data_channel_unless_told_not_to(tmp_path: Path, monkeypatch: Any, take: bool) -> None:
    """The SDK announces the data channel (the coordinator then offers it and the device opens it) by
    default; ``DeviceOptions(data_channel=False)`` (``edge-sdk join --no-data-channel``) never does, and
    its tasks and updates travel on the websocket. Either way the round is merged."""
    import edge_sdk.client._client as client

    opened: list[object] = []
    real = client.device_channel

    async def spy(*args: Any, **kwargs: Any) -> Any:  # records what the real function returns
        channel = await real(*args, **kwargs)
        opened.append(channel)
        return channel

    monkeypatch.setattr(client, "device_channel", spy)

    async def main() -> int:
        async with coordinator(tmp_path, ["mine"], rounds=1) as (srv, running):
            device = EdgeDevice(options(srv, "mine", data_channel=take), RandomTokens())
            done = await asyncio.wait_for(device.run_async(), 60)
            await asyncio.wait_for(running, 30)
            return done

    assert run(main()) == 1
    assert len(opened) == (1 if take else 0) and all(channel is not None for channel in opened)
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert [d["status"] for entry in state.history for d in entry["devices"]] == ["ok"]


def test_join_no_data_channel_flag() -> None:
    import argparse

    from edge_sdk.cli import _join

    parser = argparse.ArgumentParser()
    _join.add_parser(parser.add_subparsers())
    base = ["join", "ws://127.0.0.1:1", "--token", "t", "--data", "rows.csv", "--memory-budget", "1GB"]
    assert _join.device_options(parser.parse_args(base)).data_channel is True
    declined = _join.device_options(parser.parse_args([*base, "--no-data-channel"]))
    assert declined.data_channel is False and declined.memory_budget == 10**9
