"""Simulated attackers ([attack] table): each lie is what it says, and goes through the wire protocol.

The unit tests check the lies' arithmetic; the simulations (a tiny random BERT, five devices, one
round, plain FedAvg) check that an attacking device is admitted, sends its lie as an Update through the
SDK's DeviceConnection to its coordinator session, and that the lie is what reaches the global model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from coordinator.simulation._attack import DeviceAttack, FlippedLabels
from coordinator.simulation._config import MethodConfig, SimulationConfig, parse_simulation_config
from coordinator.simulation._data import SyntheticData
from coordinator.simulation._executor import LocalExecutor
from coordinator.simulation._links import virtual_devices
from coordinator.simulation._run import SimulationResult, run_simulation
from edge_sdk._errors import ConfigError
from edge_sdk.scaling._parent import ParentModel, parent_from_module
from edge_sdk.training._runner import TrainOutput

from .test_simulation import TINY

ATTACKER = "raspberry-pi-5-8gb-03"


def config(tmp_path: Path, attack: dict[str, Any] | None = None) -> SimulationConfig:
    data: dict[str, Any] = {
        "model": {"name": "tiny", "seed": 3},
        "data": {"kind": "synthetic", "size": 400, "dev_size": 64, "vocab_size": 64, "seq_len": 16},
        "devices": {"raspberry-pi-5-8gb": 5},
        "federation": {"rounds": 1, "fraction": 1.0, "min_devices": 1},
        "training": {"local_steps": 3, "batch_size": 8, "seq_len": 16, "lr": 3e-3},
        "levers": {"enabled": False},
        "aggregation": {"rule": "mean", "clip": "off", "weight_cap": 0},  # plain FedAvg: the lies arrive whole
        "simulation": {"engine": "local", "max_workers": 2, "threads": 1},
        "run": {"dir": str(tmp_path / "unused")},
    }
    if attack is not None:
        data["attack"] = attack
    cfg = parse_simulation_config(data, base=tmp_path)
    return dataclasses.replace(cfg, method=MethodConfig(name="fedavg", width="full", reorder=False))


def output(tensors: dict[str, np.ndarray], samples: int = 40) -> TrainOutput:
    return TrainOutput(tensors, samples, {"loss": 0.5}, 1, 0.1, 0.3)


def norm(arrays: Any) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays))


def test_scaled_negated_sends_the_negated_delta_at_the_asked_fraction_of_the_sent_norm() -> None:
    rng = np.random.default_rng(0)
    sent = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    delta = {n: (0.01 * rng.normal(size=a.shape)).astype(np.float32) for n, a in sent.items()}
    trained = output({n: sent[n] + delta[n] for n in sent})

    lie = DeviceAttack("scaled_negated", norm_fraction=0.45).tamper(trained, sent)
    moved = {n: lie.tensors[n].astype(np.float64) - sent[n] for n in sent}
    assert norm(moved.values()) == pytest.approx(0.45 * norm(sent.values()), rel=1e-5)
    scale = norm(moved.values()) / norm(delta.values())
    for n in sent:  # the same direction as the trained delta, reversed
        np.testing.assert_allclose(moved[n], -scale * delta[n], rtol=1e-3, atol=1e-5)
        assert lie.tensors[n].dtype == np.float32
    assert lie.num_samples == 40

    fixed = DeviceAttack("scaled_negated", scale=3.0).tamper(trained, sent)  # norm_fraction 0: the scale itself
    for n, weights in sent.items():
        np.testing.assert_allclose(fixed.tensors[n], weights - 3.0 * delta[n], rtol=1e-5, atol=1e-6)


def test_huge_samples_negates_and_claims_a_huge_count_and_label_flip_sends_honest_training() -> None:
    sent = {"w": np.ones((2, 2), dtype=np.float32)}
    trained = output({"w": np.full((2, 2), 1.5, dtype=np.float32)})
    lie = DeviceAttack("huge_samples", num_samples=10**6).tamper(trained, sent)
    np.testing.assert_allclose(lie.tensors["w"], 0.5)  # sent - (trained - sent)
    assert lie.num_samples == 10**6
    assert DeviceAttack("huge_samples").declared_samples(300) == 10**6
    assert DeviceAttack("label_flip").declared_samples(300) == 300
    assert DeviceAttack("label_flip").tamper(trained, sent) is trained
    with pytest.raises(ConfigError, match="plain task"):  # lever-form updates (LoRA factors) are not faked
        DeviceAttack("scaled_negated").tamper(output({"w@lora_A": np.ones((1, 2), np.float32)}), sent)


def test_label_flip_trains_on_the_other_label() -> None:
    source = SyntheticData(64, 64, 16, seed=1).source(np.arange(64))
    flipped = FlippedLabels(source, num_labels=2)
    assert len(flipped) == 64
    for honest, lie in zip(source.batches(8, 16, 5), flipped.batches(8, 16, 5), strict=False):
        np.testing.assert_array_equal(lie["input_ids"], honest["input_ids"])
        np.testing.assert_array_equal(lie["labels"], 1 - np.asarray(honest["labels"]))
        break
    else:
        pytest.fail("no batch")


def test_attack_table_names_devices_and_modes(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"devices": [ATTACKER], "mode": "huge_samples", "num_samples": 10**6})
    devices = virtual_devices(cfg, np.zeros(400, dtype=np.int64))
    profiles = {d.name: d.hello_profile()["data"]["num_samples"] for d in devices}
    assert profiles[ATTACKER] == 10**6  # the lie is declared in its Hello
    assert all(profiles[d.name] == len(d.indices) for d in devices if d.name != ATTACKER)
    assert [d.name for d in devices if d.attack is not None] == [ATTACKER]
    with pytest.raises(ConfigError, match=r"\[attack\] devices: no simulated device named dev-3"):
        virtual_devices(config(tmp_path, {"devices": ["dev-3"]}), np.zeros(400, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"\[attack\] mode"):
        config(tmp_path, {"devices": [ATTACKER], "mode": "nan_bomb"})
    assert config(tmp_path).attack.devices == ()  # no table: nobody attacks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ParentModel, dict[str, SimulationResult]]]:
    """One round of the same five-device federation, without and with each attacker (same draws)."""
    tmp = tmp_path_factory.mktemp("attack")
    torch.manual_seed(0)
    parent = parent_from_module(transformers.BertForSequenceClassification(transformers.BertConfig(**TINY)))
    attacks: dict[str, dict[str, Any] | None] = {
        "clean": None,
        "negated": {"devices": [ATTACKER], "mode": "scaled_negated", "norm_fraction": 0.45},
        "huge1": {"devices": [ATTACKER], "mode": "huge_samples", "scale": 1.0},
        "huge2": {"devices": [ATTACKER], "mode": "huge_samples", "scale": 2.0},
        "flip": {"devices": [ATTACKER], "mode": "label_flip"},
    }
    executor = LocalExecutor(max_workers=2, threads=1)
    try:
        results = {
            name: run_simulation(config(tmp, attack), parent=parent, executor=executor, run_dir=tmp / name)
            for name, attack in attacks.items()
        }
    finally:
        executor.close()
    yield parent, results


def global_delta(parent: ParentModel, result: SimulationResult) -> dict[str, np.ndarray]:
    final = load_file(str(result.run_dir / "final.safetensors"))
    return {n: (final[n].double() - parent.state[n].double()).numpy() for n in final if final[n].is_floating_point()}


def devices_of(result: SimulationResult) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in result.rounds[0]["devices"]}


def test_every_attacker_is_admitted_and_its_update_merged(
    runs: tuple[ParentModel, dict[str, SimulationResult]],
) -> None:
    _, results = runs
    for name, result in results.items():
        rows = devices_of(result)
        assert len(rows) == 5 and all(r["status"] == "ok" for r in rows.values()), (name, rows)
        assert result.rounds[0]["aggregated"] == 5, name
    digests = {r.weights_digest for r in results.values()}
    assert len(digests) == len(results)  # every lie changed the global model
    clean, flip = devices_of(results["clean"]), devices_of(results["flip"])
    for device, row in clean.items():  # same draws, same model: only the attacker trained differently
        assert (flip[device]["train_loss"] == row["train_loss"]) == (device != ATTACKER)


def test_scaled_negated_moves_the_model_by_its_share_of_the_norm_fraction(
    runs: tuple[ParentModel, dict[str, SimulationResult]],
) -> None:
    parent, results = runs
    clean, negated = global_delta(parent, results["clean"]), global_delta(parent, results["negated"])
    rows = devices_of(results["clean"])
    share = rows[ATTACKER]["num_samples"] / sum(r["num_samples"] for r in rows.values())
    # FedAvg: the two runs differ by share x (lie - honest update) = share x -(s + 1) d, whose norm is
    # share x (0.45 ||sent|| + ||d||): a little above share x 0.45 ||sent||
    moved = norm(negated[n] - clean[n] for n in clean) / share
    sent = norm(parent.state[n].double().numpy() for n in clean)
    assert 0.45 * sent < moved < 1.2 * 0.45 * sent


def test_huge_samples_takes_over_the_merge(runs: tuple[ParentModel, dict[str, SimulationResult]]) -> None:
    parent, results = runs
    assert devices_of(results["huge1"])[ATTACKER]["num_samples"] == 10**6  # what the coordinator received
    one, two = global_delta(parent, results["huge1"]), global_delta(parent, results["huge2"])
    # the global moves by ~ -d (weight 10^6 / (10^6 + the others' ~320)), and by ~ -2 d at scale 2
    gap = norm(two[n] - 2 * one[n] for n in one)
    assert gap < 0.01 * norm(one.values())
