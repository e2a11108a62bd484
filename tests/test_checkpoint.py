"""Checkpoints: a full round-trip of the engine's state, atomic replacement, corruption detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.federation import _checkpoint
from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, state_digest
from coordinator.federation._config import FederationConfig, TrainingConfig
from coordinator.federation._engine import FederationEngine
from edge_sdk import ConfigError, EdgeFMError

from .test_engine import FULL_BUDGET, TRAINING, hello, make_engine, trained


def run_round(engine: FederationEngine, shift: float) -> None:
    orders = engine.begin_round(sorted(engine.registry.expected()), now=0.0)
    for i, order in enumerate(orders):
        engine.accept_update(order.task_id, trained(order, shift * (i + 1)), num_samples=3 + i, now=0.0)
    engine.close_round(0.0)
    engine.finish_round()


def test_a_checkpoint_restores_weights_moments_registry_and_history(tmp_path: Path) -> None:
    fed = {"strategy": "fedadam", "server_lr": 0.01, "rounds": 5}
    engine = make_engine(["a", "b"], **fed)
    engine.admit("a", hello(FULL_BUDGET))
    engine.admit("b", hello(FULL_BUDGET, runtime=123))
    run_round(engine, 0.5)
    engine.registry.disconnected("b")
    path = save_checkpoint(tmp_path, engine.snapshot())
    assert latest_checkpoint(tmp_path) == path and path.name == "round-000001"

    state = load_checkpoint(path)
    restored = FederationEngine.restore(
        state,
        engine.federation,
        TRAINING,
        devices=["a", "b"],
        seed=7,
    )
    assert restored.round == 1 and restored.run_id == engine.run_id
    assert restored.weights_digest() == engine.weights_digest() == state_digest(state.weights)
    moments, again = engine._optimizer.state_dict(), restored._optimizer.state_dict()
    assert moments.keys() == again.keys() and moments
    for name, tensor in moments.items():
        assert torch.equal(tensor, again[name]), name
    assert torch.equal(restored.salience.heads, engine.salience.heads)
    assert restored.devices() == engine.devices()
    assert restored.devices()["b"]["status"] == "disconnected" and restored.registry.expected() == ["a"]
    assert restored.history == engine.history and restored.history[0]["round"] == 1
    # The restored run goes on exactly as the original would.
    engine.admit("b", hello(FULL_BUDGET, runtime=123))
    restored.admit("b", hello(FULL_BUDGET, runtime=123))
    run_round(engine, 0.25)
    run_round(restored, 0.25)
    assert restored.weights_digest() == engine.weights_digest()


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(["a"])
    engine.admit("a", hello(FULL_BUDGET))
    first = save_checkpoint(tmp_path, engine.snapshot())
    digest = engine.weights_digest()
    run_round(engine, 1.0)

    real_write = _checkpoint._write_file
    calls = {"n": 0}

    def crash_on_second_file(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # weights written, server state half-written: the process "dies" here
            path.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash")
        real_write(path, data)

    monkeypatch.setattr(_checkpoint, "_write_file", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, engine.snapshot())
    monkeypatch.setattr(_checkpoint, "_write_file", real_write)

    assert latest_checkpoint(tmp_path) == first
    assert state_digest(load_checkpoint(first).weights) == digest
    assert not (tmp_path / "checkpoints" / "round-000001").exists()

    # A crash after the folder is in place but before LATEST moves: LATEST still names round 0.
    real_replace = _checkpoint.os.replace

    def crash_before_latest(src: object, dst: object) -> None:
        if str(dst).endswith("LATEST"):
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(_checkpoint.os, "replace", crash_before_latest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, engine.snapshot())
    monkeypatch.setattr(_checkpoint.os, "replace", real_replace)
    assert latest_checkpoint(tmp_path) == first

    # The next save cleans up and moves LATEST; the newest checkpoint then loads.
    second = save_checkpoint(tmp_path, engine.snapshot())
    assert latest_checkpoint(tmp_path) == second
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert state_digest(load_checkpoint(second).weights) == engine.weights_digest() != digest


def test_a_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    engine = make_engine(["a"])
    path = save_checkpoint(tmp_path, engine.snapshot())
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(path)


def test_old_checkpoints_are_pruned_and_files_are_plain_json_and_safetensors(tmp_path: Path) -> None:
    engine = make_engine(["a"], rounds=4)
    engine.admit("a", hello(FULL_BUDGET))
    for _ in range(4):
        run_round(engine, 0.1)
        save_checkpoint(tmp_path, engine.snapshot(), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*"))
    assert names == ["round-000003", "round-000004"]
    meta = json.loads((tmp_path / "checkpoints" / "round-000004" / "state.json").read_text())
    assert meta["round"] == 4 and len(meta["history"]) == 4 and meta["strategy"] == "fedavg"
    assert meta["weights_digest"] == engine.weights_digest()
    assert all(p.suffix in {".json", ".safetensors"} for p in (tmp_path / "checkpoints" / "round-000004").iterdir())


def test_restore_refuses_another_strategy(tmp_path: Path) -> None:
    engine = make_engine(["a"])
    state = load_checkpoint(save_checkpoint(tmp_path, engine.snapshot()))
    with pytest.raises(ConfigError, match="strategy"):
        FederationEngine.restore(state, FederationConfig(strategy="fedadam"), TrainingConfig())


def test_snapshot_only_between_rounds() -> None:
    engine = make_engine(["a"])
    engine.admit("a", hello(FULL_BUDGET))
    engine.begin_round(["a"], now=0.0)
    with pytest.raises(EdgeFMError, match="between rounds"):
        engine.snapshot()


def test_state_digest_sees_every_byte_name_and_dtype() -> None:
    base = {"a": torch.zeros(3), "b": torch.arange(4)}
    digest = state_digest(base)
    assert state_digest({"b": torch.arange(4), "a": torch.zeros(3)}) == digest  # order does not matter
    assert state_digest({**base, "a": torch.tensor([0.0, 0.0, 1e-30])}) != digest
    assert state_digest({"a": torch.zeros(3, dtype=torch.float64), "b": torch.arange(4)}) != digest
    assert state_digest({"c": torch.zeros(3), "b": torch.arange(4)}) != digest
    assert np.asarray(bytes.fromhex(digest)).size == 1


def test_a_crash_while_pruning_leaves_every_round_folder_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed halfway through deleting an old checkpoint: no ``round-*`` folder lacks its files."""
    engine = make_engine(["a"], rounds=4)
    engine.admit("a", hello(FULL_BUDGET))
    save_checkpoint(tmp_path, engine.snapshot(), keep=2)
    run_round(engine, 0.1)
    save_checkpoint(tmp_path, engine.snapshot(), keep=2)
    run_round(engine, 0.1)

    def die_halfway(path: Path, ignore_errors: bool = False) -> None:
        files = sorted(Path(path).iterdir()) if Path(path).exists() else []
        if not files:
            return
        (Path(path) / "state.json").unlink()  # the first file gone, then the process "dies"
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(_checkpoint.shutil, "rmtree", die_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, engine.snapshot(), keep=2)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.glob("round-*"))
    assert names == ["round-000001", "round-000002"]
    for name in names:
        load_checkpoint(root / name)  # every one whole: its digests check
    assert latest_checkpoint(tmp_path) == root / "round-000002"
    run_round(engine, 0.1)
    save_checkpoint(tmp_path, engine.snapshot(), keep=2)  # the next save removes the half-deleted leftover
    assert not list(root.glob(".tmp-*"))
    assert sorted(p.name for p in root.glob("round-*")) == ["round-000002", "round-000003"]


def test_without_a_valid_latest_the_newest_complete_folder_is_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run directory with whole checkpoints never looks empty: a new run would write over them."""
    assert latest_checkpoint(tmp_path) is None  # no folder at all
    engine = make_engine(["a"], rounds=4)
    engine.admit("a", hello(FULL_BUDGET))
    save_checkpoint(tmp_path, engine.snapshot())
    run_round(engine, 0.1)
    newest = save_checkpoint(tmp_path, engine.snapshot())
    root = tmp_path / "checkpoints"
    (root / "round-000009").mkdir()  # an incomplete folder is never taken
    for latest_text in (None, b"\xff\xfe", b"round-000042\n", b"round-000001/../../x\n"):
        if latest_text is None:
            (root / "LATEST").unlink()
        else:
            (root / "LATEST").write_bytes(latest_text)
        caplog.clear()
        assert latest_checkpoint(tmp_path) == newest
        assert "names no complete checkpoint" in caplog.text
    assert load_checkpoint(newest).round == 1
