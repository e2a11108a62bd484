"""Differential privacy: DP-FedAvg's merge on sub-networks, its accountant, and the engine's epsilon."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from coordinator.federation import PrivacyAccountant, PrivacyConfig, parse_config
from coordinator.federation._aggregate import ClientUpdate, merge_round
from coordinator.federation._config import FederationConfig
from coordinator.federation._engine import FederationEngine
from coordinator.federation._privacy import GaussianNoise
from coordinator.simulation._config import parse_simulation_config
from edge_sdk import ConfigError, ProtocolError
from edge_sdk._spec import SubnetSpec
from edge_sdk.protocol import TrainSettings, TrainTask, encode_tensors
from edge_sdk.scaling import LeverPolicy, Levers
from edge_sdk.scaling._extract import extract
from edge_sdk.training._privacy import privatize
from edge_sdk.training._runner import TaskRunner

from .test_aggregate import filled, zero_parent
from .test_engine import TRAINING, admit_all, hello, ranked_parent, trained
from .test_levers_roundtrip import Tokens
from .test_run_config import BASE

Q = "bert.encoder.layer.0.attention.self.query.weight"  # [32, 32]: rows are 4 heads x 8 dims
EMB = "bert.embeddings.word_embeddings.weight"  # [50, 32]


def test_noise_lands_only_on_covered_coordinates_with_std_z_c_over_n_c() -> None:
    parent = zero_parent()
    half, quarter = SubnetSpec.from_ratio(parent.dims, 0.5), SubnetSpec.from_ratio(parent.dims, 0.25)
    # Q: head 0 covered by 3 devices, head 1 by the two halves, heads 2-3 by none
    updates = [filled(parent, half, 0.0, 1), filled(parent, half, 0.0, 7), filled(parent, quarter, 0.0, 1)]
    merged = merge_round(parent, updates, noise=GaussianNoise(clip_norm=0.5, noise_multiplier=4.0, seed=11))
    assert merged.coverage[Q][0, 0] == 3 and merged.coverage[Q][8, 0] == 2 and merged.coverage[Q][16, 0] == 0
    by_count: dict[int, list[torch.Tensor]] = {0: [], 2: [], 3: []}
    for name, delta in merged.delta.items():
        count = merged.coverage[name]
        for n, found in by_count.items():
            found.append(delta[count == n].flatten())
    assert set(torch.cat([c.flatten() for c in merged.coverage.values()]).unique().tolist()) == {0.0, 2.0, 3.0}
    uncovered, double, triple = (torch.cat(by_count[n]) for n in (0, 2, 3))
    assert uncovered.numel() > 1000 and bool((uncovered == 0).all())  # no noise where nobody trained
    # z C = 2: std 2 / n_c, whatever the sample counts (devices weigh the same)
    for values, n_c in ((double, 2), (triple, 3)):
        assert values.numel() > 2000
        assert float(values.std()) == pytest.approx(2.0 / n_c, rel=0.05)
        assert abs(float(values.mean())) < 4 * (2.0 / n_c) / math.sqrt(values.numel())


def test_each_device_is_clipped_to_clip_norm_over_what_it_covered_and_weighs_the_same() -> None:
    parent = zero_parent()
    full = SubnetSpec.full(parent.dims)
    n_full = sum(t.numel() for t in extract(parent, full).values() if t.is_floating_point())
    updates = [filled(parent, full, 1.0, 1), filled(parent, full, 0.001, 100)]
    merged = merge_round(parent, updates, noise=GaussianNoise(clip_norm=2.0, noise_multiplier=0.0, seed=0))
    small = 0.001 * math.sqrt(n_full)  # below C: untouched
    assert merged.norms == pytest.approx([math.sqrt(n_full), small])
    assert merged.scales == pytest.approx([2.0 / math.sqrt(n_full), 1.0])
    # uniform weights: (2 / sqrt(N) + 0.001) / 2 on every coordinate, the 100 samples ignored
    assert merged.delta[Q][5, 5] == pytest.approx((2.0 / math.sqrt(n_full) + 0.001) / 2, rel=1e-5)
    assert merged.coverage[Q][5, 5] == 2.0


def test_embedding_rows_cover_the_whole_table_under_dp() -> None:
    parent = zero_parent()
    full = SubnetSpec.full(parent.dims)
    weights = {k: torch.zeros_like(t) if t.is_floating_point() else t for k, t in extract(parent, full).items()}
    weights[EMB] = torch.full((2, 32), 0.1)
    weights[EMB + "@rows"] = torch.tensor([3, 9])
    update = ClientUpdate(full, weights, 1, Levers(embeddings="rows"))
    merged = merge_round(parent, [update], noise=GaussianNoise(clip_norm=100.0, noise_multiplier=1.0, seed=3))
    assert bool((merged.coverage[EMB] == 1).all())  # the rows a device touched are not revealed
    assert bool((merged.delta[EMB][0] != 0).all())  # noise on rows nobody sent too


def test_the_noise_replays_from_its_seed() -> None:
    parent = zero_parent()
    updates = [filled(parent, SubnetSpec.full(parent.dims), 0.0, 1)]
    config = PrivacyConfig(mode="central", clip_norm=1.0, noise_multiplier=1.0, reproducible=True)
    first = merge_round(parent, updates, noise=config.noise(seed=5, round_index=2)).delta[Q]
    again = merge_round(parent, updates, noise=config.noise(seed=5, round_index=2)).delta[Q]
    other = merge_round(parent, updates, noise=config.noise(seed=5, round_index=3)).delta[Q]
    assert torch.equal(first, again) and not torch.equal(first, other)
    secure = PrivacyConfig(mode="central")  # served runs: the OS's entropy, not the run's seed
    assert secure.noise(5, 2).seed != secure.noise(5, 2).seed


def direct_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return float(accountant.get_epsilon(delta))


def test_the_accountant_matches_dp_accounting_and_grows_with_rounds() -> None:
    accountant = PrivacyAccountant(delta=1e-5)
    assert accountant.epsilon() == 0.0
    epsilons = []
    for rounds in range(1, 6):
        accountant.compose(0.4, 1.1)
        epsilons.append(accountant.epsilon())
        assert epsilons[-1] == pytest.approx(direct_epsilon(0.4, 1.1, rounds, 1e-5), rel=1e-9)
    assert all(a < b for a, b in itertools.pairwise(epsilons))
    history = [{"privacy": {"composed": True, "q": 0.4, "noise_multiplier": 1.1}}] * 5 + [
        {"privacy": {"composed": False, "q": 0.4, "noise_multiplier": 1.1}},  # merged nothing: released nothing
        {"round": 7},  # a round of a run without DP
    ]
    assert PrivacyAccountant.from_history(1e-5, history).epsilon() == pytest.approx(epsilons[-1])
    more_noise = PrivacyAccountant(1e-5)
    more_noise.compose(0.4, 3.0)
    assert more_noise.epsilon() < epsilons[0]


def dp_engine(names: list[str], rounds: int = 3) -> FederationEngine:
    parent, salience = ranked_parent()
    privacy = PrivacyConfig(mode="central", clip_norm=0.5, noise_multiplier=1.2, reproducible=True)
    fed = FederationConfig(
        rounds=rounds, min_devices=1, fraction=0.5, min_margin_bytes=0, max_update_norm_ratio=1e3, privacy=privacy
    )
    return FederationEngine(parent, salience, fed, TRAINING, devices=names, seed=7)


def run_round(engine: FederationEngine, names: list[str]) -> dict:  # type: ignore[type-arg]
    for order in engine.begin_round(names, now=0.0):
        engine.accept_update(order.task_id, trained(order, 0.01), num_samples=4, now=1.0)
    engine.close_round(now=2.0)
    summary = engine.finish_round()
    assert "DP central epsilon" in summary.log_line()
    return summary.to_json()


def test_the_engine_reports_epsilon_per_round_and_continues_it_after_a_restore() -> None:
    names = ["a", "b", "c", "d"]
    engine = dp_engine(names)
    admit_all(engine, dict.fromkeys(names, 10**10))
    first = run_round(engine, names)
    # 2 of 4 devices per round (fraction 0.5): q = 0.5
    assert first["privacy"]["q"] == 0.5 and first["privacy"]["noise_multiplier"] == 1.2
    assert first["epsilon"] == pytest.approx(direct_epsilon(0.5, 1.2, 1, 1e-5))
    assert first["merge"]["rule"] == "dp-fedavg"
    restored = FederationEngine.restore(engine.snapshot(), engine.federation, TRAINING, devices=names, seed=7)
    for name in names:
        restored.admit(name, hello(10**10))
    second = run_round(restored, names)
    assert second["epsilon"] == pytest.approx(direct_epsilon(0.5, 1.2, 2, 1e-5))
    assert second["epsilon"] > first["epsilon"]


def test_the_privacy_table_in_run_and_simulation_configs(tmp_path: Path) -> None:
    assert parse_config(BASE).federation.privacy == PrivacyConfig()
    data = copy.deepcopy(BASE)
    data["privacy"] = {"mode": "central", "clip_norm": 0.1, "noise_multiplier": 0.8, "delta": 1e-6}
    assert parse_config(data).federation.privacy == PrivacyConfig("central", 0.1, 0.8, 1e-6, reproducible=False)
    with pytest.raises(ConfigError, match=r"\[aggregation\]: does not apply with \[privacy\] mode = 'central'"):
        parse_config({**data, "aggregation": {"rule": "median"}})
    local = {**BASE, "privacy": {"mode": "local"}, "aggregation": {"rule": "median"}}
    assert parse_config(local).federation.aggregation.rule == "median"  # local noise: any rule is post-processing
    for privacy, message in [
        ({"mode": "laplace"}, r"\[privacy\] mode: must be one of"),
        ({"mode": "central", "clip_norm": 0}, r"\[privacy\] clip_norm: must be > 0"),
        ({"mode": "central", "delta": 0.5}, r"\[privacy\] delta: must be <= 0.1"),
        ({"clip_norm": 1.0}, r"\[privacy\] clip_norm: only applies with mode"),
        ({"mode": "central", "epsilon": 1}, r"\[privacy\]: unknown key\(s\) epsilon"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, "privacy": privacy})
    from .test_simulation import tiny_config

    sim = parse_simulation_config(tiny_config(tmp_path, privacy={"mode": "central"}), base=tmp_path)
    assert sim.federation.privacy == PrivacyConfig(mode="central", reproducible=True)  # simulations replay


# ------------------------------------------------------------------------------------------ local DP


def test_the_device_clips_its_delta_and_adds_noise_of_std_z_c() -> None:
    sent = {"w": np.zeros((100, 100), dtype=np.float32), "ids": np.arange(4)}
    trained = {"w": np.full((100, 100), 0.5, dtype=np.float32), "ids": np.arange(4)}  # norm 50
    clipped = privatize(trained, sent, clip_norm=2.0, noise_multiplier=0.0)
    np.testing.assert_allclose(clipped["w"], 0.02, rtol=1e-6)  # 0.5 x 2 / 50
    assert clipped["ids"] is trained["ids"]
    noisy = privatize(trained, sent, clip_norm=2.0, noise_multiplier=1.5, rng=np.random.default_rng(0))
    noise = noisy["w"].astype(np.float64) - 0.02
    assert noisy["w"].dtype == np.float32
    assert float(noise.std()) == pytest.approx(3.0, rel=0.03) and abs(float(noise.mean())) < 0.15
    with pytest.raises(ConfigError, match="needs dense updates"):
        privatize({**trained, "q@lora_A": np.zeros((1, 2), dtype=np.float32)}, sent, 1.0, 1.0)


def test_local_dp_settings_travel_on_the_wire_and_are_checked() -> None:
    settings = TrainSettings(local_steps=1, lr=0.1, batch_size=2, seq_len=4, dp_clip_norm=0.5, dp_noise_multiplier=2.0)
    assert TrainSettings.from_json(settings.to_json()) == settings
    plain = TrainSettings(local_steps=1, lr=0.1, batch_size=2, seq_len=4)
    assert "dp_clip_norm" not in plain.to_json()  # optional on the wire: older devices still get plain tasks
    with pytest.raises(ProtocolError, match="dp_noise_multiplier"):
        TrainSettings(local_steps=1, lr=0.1, batch_size=2, seq_len=4, dp_noise_multiplier=1.0)


def test_local_mode_orders_ask_for_noise_forbid_factored_levers_and_account_per_device() -> None:
    parent, salience = ranked_parent()
    privacy = PrivacyConfig(mode="local", clip_norm=0.01, noise_multiplier=0.5)
    fed = FederationConfig(rounds=2, min_devices=1, min_margin_bytes=0, max_update_norm_ratio=1e3, privacy=privacy)
    engine = FederationEngine(parent, salience, fed, TRAINING, devices=["a", "b"], seed=7)
    assert {"lora", "embedding_rows"} <= engine.planner.levers.forbid
    admit_all(engine, {"a": 10**10, "b": 10**10})
    orders = engine.begin_round(["a", "b"], now=0.0)
    for order in orders:
        assert order.settings.dp_clip_norm == 0.01 and order.settings.dp_noise_multiplier == 0.5
        task = TrainTask(
            task_id=order.task_id,
            round=1,
            spec=order.spec.to_dict(),
            model_config=order.model_config,
            settings=order.settings,
            weights=encode_tensors(order.tensors)[0],
        )
        out = TaskRunner(Tokens(), threads=1).train(task, order.tensors).tensors  # the device's own trainer
        noise = np.concatenate([(out[n] - a).ravel() for n, a in order.tensors.items() if a.dtype.kind == "f"])
        assert float(noise.std()) == pytest.approx(0.005, rel=0.05)  # z C; the clipped delta is <= 0.01 in norm
        assert float(np.sqrt(np.square(out_norm(out)).sum())) <= order.max_update_norm
        engine.accept_update(order.task_id, out, num_samples=16, now=1.0)
    engine.close_round(now=2.0)
    record = engine.finish_round().to_json()
    # per device, against the coordinator: no amplification by sampling, replace-one sensitivity 2C
    assert record["privacy"]["q"] == 1.0 and record["privacy"]["noise_multiplier"] == 0.25
    single = RdpAccountant()
    single.compose(dp_accounting.GaussianDpEvent(0.25))
    assert record["epsilon"] == pytest.approx(float(single.get_epsilon(1e-5)))


def out_norm(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel().astype(np.float64) for a in tensors.values() if a.dtype.kind == "f"])


def test_local_mode_refuses_pinned_factored_levers() -> None:
    parent, salience = ranked_parent()
    fed = FederationConfig(privacy=PrivacyConfig(mode="local"))
    with pytest.raises(ConfigError, match="needs dense updates"):
        FederationEngine(parent, salience, fed, TRAINING, levers=LeverPolicy(pin={"lora_rank": 4}))


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_simulation_reports_epsilon_per_round_and_in_its_summary(tmp_path: Path, mode: str) -> None:
    from coordinator.simulation._executor import LocalExecutor
    from coordinator.simulation._report import markdown_table, summarize
    from coordinator.simulation._run import run_simulation
    from edge_sdk.scaling._parent import parent_from_module

    from .test_simulation import tiny_config, tiny_module

    privacy = {"mode": mode, "clip_norm": 0.05, "noise_multiplier": 1.0}
    config = parse_simulation_config(
        tiny_config(
            tmp_path / "unused",
            devices={"raspberry-pi-4-2gb": 3, "jetson-nano-4gb": 1, "raspberry-pi-5-8gb": 0},
            federation={"rounds": 2, "fraction": 0.5},
            privacy=privacy,
        ),
        base=tmp_path,
    )
    executor = LocalExecutor(max_workers=2, threads=1)
    try:
        result = run_simulation(config, parent=parent_from_module(tiny_module()), executor=executor, run_dir=tmp_path)
    finally:
        executor.close()
    epsilons = [r["epsilon"] for r in result.rounds]
    assert all(r["aggregated"] == 2 for r in result.rounds)
    q, z = (0.5, 1.0) if mode == "central" else (1.0, 0.5)
    event = dp_accounting.GaussianDpEvent(z)
    for rounds, eps in enumerate(epsilons, start=1):
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, event) if q < 1 else event, rounds)
        assert eps == pytest.approx(float(accountant.get_epsilon(1e-5)))
    assert f"(DP epsilon {epsilons[-1]:.3g})" in markdown_table([summarize(result)])


def test_local_dp_clips_the_change_from_what_was_received_not_from_the_trained_arrays() -> None:
    """Training updates the received arrays in place (the model is built on them): local DP must clip
    against a copy taken before training. It clipped against the trained arrays, so the delta it saw
    was zero and the whole unclipped update went out (a change of ~3 with clip_norm 1e-6)."""
    import json

    from tests.models import tiny_parent

    parent = tiny_parent("bert")
    spec = SubnetSpec.full(parent.dims)
    sent = {n: t.numpy() for n, t in extract(parent, spec).items()}
    before = {n: a.copy() for n, a in sent.items()}
    manifest, _ = encode_tensors(sent)
    settings = TrainSettings(
        local_steps=3, lr=1e-2, batch_size=4, seq_len=8, dp_clip_norm=1e-6, dp_noise_multiplier=0.0
    )
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(parent.config)),
        settings=settings,
        weights=manifest,
    )
    out = TaskRunner(Tokens(), threads=1).train(task, sent).tensors
    floats = [n for n in out if out[n].dtype.kind == "f"]
    change = math.sqrt(sum(float(np.square(out[n].astype(np.float64) - before[n]).sum()) for n in floats))
    assert change <= 1e-5  # clip 1e-6, plus float32 rounding of the weights
