"""Nothing fails silently: any exception inside a device's task becomes an Error the coordinator records.

A real coordinator and a real SDK client over websockets: the device's task raises an exception type
the SDK does not know (IndexError, KeyError, a class of the user's); the coordinator records the
failure at once (not at the round's deadline, 600 s here), both sides log it, and the same device,
still connected, trains the next round. The simulator's virtual devices answer the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint
from coordinator.simulation._config import parse_simulation_config
from coordinator.simulation._device import DeviceJob, DeviceReport, run_device_job
from coordinator.simulation._run import run_simulation
from edge_sdk.client._client import EdgeDevice
from edge_sdk.protocol import MAX_ERROR_MESSAGE_BYTES, task_error_message
from edge_sdk.scaling._parent import parent_from_module
from edge_sdk.training._runner import TaskRunner
from edge_sdk.training._train import TrainConfig, TrainResult, train_local

from .test_client import RandomTokens, options
from .test_server import coordinator, run
from .test_simulation import tiny_config, tiny_module

RECORDED_WITHIN_S = 1.0


class UsersOwnError(Exception):
    """An exception class the SDK has never heard of."""


@pytest.mark.parametrize(
    "error",
    [IndexError("Target 4 is out of bounds"), KeyError("label"), UsersOwnError("my data loader broke")],
    ids=["IndexError", "KeyError", "custom"],
)
def test_an_unexpected_exception_in_a_task_is_reported_and_the_device_takes_the_next_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    raised, recorded = threading.Event(), threading.Event()
    calls: list[int] = []

    def flaky_training(model: Any, batches: Any, config: TrainConfig) -> TrainResult:
        calls.append(config.steps)
        if len(calls) == 1:
            raised.set()
            raise error
        return train_local(model, batches, config)

    async def main() -> EdgeDevice:
        async with coordinator(tmp_path, ["mine"], rounds=2, deadline=600.0) as (srv, running):
            engine = srv.engine
            task_failed = engine.task_failed

            def recording(*args: Any, **kwargs: Any) -> Any:
                outcome = task_failed(*args, **kwargs)
                if outcome is not None:
                    recorded.set()
                return outcome

            engine.task_failed = recording  # type: ignore[method-assign]
            device = EdgeDevice(options(srv, "mine"), RandomTokens(), train_fn=flaky_training)
            joined = asyncio.ensure_future(device.run_async())
            assert await asyncio.to_thread(raised.wait, 60)
            assert await asyncio.to_thread(recorded.wait, RECORDED_WITHIN_S), "no Error recorded for the task"
            await asyncio.wait_for(joined, 60)
            await asyncio.wait_for(running, 30)
            return device

    with caplog.at_level(logging.INFO):
        device = run(main())
    assert device.tasks_done == 1 and len(calls) == 2
    state = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    (first,), (second,) = (entry["devices"] for entry in state.history)
    assert first["status"] == "failed" and second["status"] == "ok"
    kind = type(error).__name__
    assert "task_failed" in first["reason"] and f"failed: {kind}: " in first["reason"]
    assert first["task_id"] in first["reason"]  # the Error names the task
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    device_side = [m for n, m in messages if n == "edge_sdk.client._client" and f"failed: {kind}" in m]
    coordinator_side = [m for n, m in messages if n.startswith("coordinator.") and f"failed: {kind}" in m]
    assert device_side and coordinator_side, messages
    assert not any("reconnecting" in m for _, m in messages)  # the same connection took the next task


def test_the_error_text_names_the_task_and_is_bounded() -> None:
    assert task_error_message("train", "t-1", KeyError("label")) == "train task t-1 failed: KeyError: 'label'"
    assert task_error_message("evaluate", "t-2", IndexError()) == "evaluate task t-2 failed: IndexError: (no message)"
    long = task_error_message("train", "t-3", ValueError("é" * 5000))
    assert len(long.encode("utf-8")) <= MAX_ERROR_MESSAGE_BYTES and long.endswith("...")


class InProcess:
    """An executor running each virtual device's job in this process (so a patched runner applies)."""

    uses_files = False

    def run(self, jobs: Sequence[DeviceJob], timeout_s: float) -> Iterator[tuple[DeviceJob, DeviceReport | Exception]]:
        for job in jobs:
            try:
                yield job, run_device_job(job)
            except Exception as exc:
                yield job, exc

    def close(self) -> None:
        pass


def test_an_exception_in_a_virtual_devices_task_reaches_the_round_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = TaskRunner.train
    calls: list[str] = []

    def failing_first(self: TaskRunner, task: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(task.task_id)
        if len(calls) == 1:
            raise UsersOwnError("boom")
        return train(self, task, *args, **kwargs)

    monkeypatch.setattr(TaskRunner, "train", failing_first)
    config = parse_simulation_config(
        tiny_config(
            tmp_path / "run",
            devices={"raspberry-pi-4-2gb": 2, "jetson-nano-4gb": 0, "raspberry-pi-5-8gb": 0},
            federation={"fraction": 1.0, "rounds": 2},
            training={"local_steps": 1},
        ),
        base=tmp_path,
    )
    config = dataclasses.replace(config, simulation=dataclasses.replace(config.simulation, max_workers=1))
    result = run_simulation(config, parent=parent_from_module(tiny_module()), executor=InProcess())  # type: ignore[arg-type]
    statuses = [[d["status"] for d in r["devices"]] for r in result.rounds]
    assert sorted(statuses[0]) == ["failed", "ok"] and statuses[1] == ["ok", "ok"]
    (failed,) = [d for d in result.rounds[0]["devices"] if d["status"] == "failed"]
    assert "task_failed" in failed["reason"] and "failed: UsersOwnError: boom" in failed["reason"]
