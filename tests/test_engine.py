"""The federation engine without any transport: selection, planning, rounds, deadlines, bad updates."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from coordinator.federation._aggregate import ClientUpdate, FedAdam, aggregate
from coordinator.federation._config import FederationConfig, TrainingConfig
from coordinator.federation._engine import FederationEngine, TrainOrder
from coordinator.federation._planner import BUDGET, WidthPolicy
from edge_sdk import BudgetError, EdgeFMError, ProfileError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory import training_estimate
from edge_sdk.scaling._parent import ParentModel
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling._search import plan_training

from .models import tiny_parent

TRAINING = TrainingConfig(local_steps=2, lr=1e-3, batch_size=4, seq_len=16)


def ranked_parent() -> tuple[ParentModel, object]:
    parent = tiny_parent("bert")
    parent, salience, _ = reorder(parent, weight_l1(parent))
    return parent, salience


def make_engine(
    names: list[str], levers: LeverPolicy | None = None, width: WidthPolicy = BUDGET, **federation: object
) -> FederationEngine:
    """An engine on a tiny BERT; width-only planning (plain training) unless ``levers`` says otherwise."""
    parent, salience = ranked_parent()
    defaults = {"rounds": 3, "min_devices": 1, "min_margin_bytes": 0, "max_update_norm_ratio": 1e3}
    defaults["max_delta_norm_ratio"] = 1e3  # the tests move weights by hand, far more than training would
    fed = FederationConfig(**{**defaults, **federation})  # type: ignore[arg-type]
    policy = LeverPolicy.plain() if levers is None else levers
    return FederationEngine(
        parent,
        salience,
        fed,
        TRAINING,
        devices=names,
        seed=7,
        levers=policy,
        width=width,  # type: ignore[arg-type]
    )


def budget_for(engine: FederationEngine, spec: SubnetSpec) -> int:
    """The usable bytes that exactly fit training ``spec`` (runtime excluded, as devices report)."""
    return training_estimate(spec, param_count(engine.parent, spec), engine.planner.work, runtime=0).total


def hello(usable: int, runtime: int = 400_000_000) -> dict[str, object]:
    return {"budget": {"usable": usable, "runtime_footprint": runtime}, "device": {"machine": "x86_64"}}


FULL_BUDGET = 10**10


def admit_all(engine: FederationEngine, budgets: Mapping[str, int]) -> None:
    for name, usable in budgets.items():
        engine.admit(name, hello(usable))


def trained(order: TrainOrder, shift: float) -> dict[str, np.ndarray]:
    """What a device returns: the sent weights moved by ``shift`` (integer tensors unchanged)."""
    return {
        n: (a + np.float32(shift)).astype(a.dtype) if a.dtype.kind == "f" else a.copy()
        for n, a in order.tensors.items()
    }


# ---------------------------------------------------------------------------------------- selection


def test_round_size_is_the_fraction_of_expected_devices_but_at_least_min_devices() -> None:
    names = [f"d{i}" for i in range(10)]
    engine = make_engine(names, fraction=0.3, min_devices=2)
    assert engine.selection.wait_target() == 3
    assert engine.selection.round_size(10) == 3
    assert engine.selection.round_size(2) == 2  # never more than are idle
    assert not engine.selection.can_start(1)
    assert engine.selection.can_start(2)
    chosen = engine.selection.select(names, engine.round + 1)
    assert len(chosen) == 3 and set(chosen) <= set(names)
    assert engine.selection.select(names, engine.round + 1) == chosen  # seeded: the same draw for the same round


def test_devices_seen_to_disconnect_are_not_waited_for() -> None:
    engine = make_engine(["a", "b", "c"], min_devices=1)
    assert engine.selection.wait_target() == 3  # named devices are expected until seen to go
    engine.registry.disconnected("c")
    assert engine.registry.expected() == ["a", "b"] and engine.selection.wait_target() == 2
    engine.registry.connected("c")
    assert engine.selection.wait_target() == 3


def test_begin_round_refuses_fewer_than_min_devices_and_unadmitted_devices() -> None:
    engine = make_engine(["a", "b"], min_devices=2)
    engine.admit("a", hello(FULL_BUDGET))
    with pytest.raises(EdgeFMError, match="needs 2 device"):
        engine.begin_round(["a", "b"], now=0.0)  # b never sent a Hello: it has no budget
    engine.admit("b", hello(FULL_BUDGET))
    assert len(engine.begin_round(["a", "b"], now=0.0)) == 2
    with pytest.raises(EdgeFMError, match="still open"):
        engine.begin_round(["a", "b"], now=0.0)


# ----------------------------------------------------------------------------------------- planning


def test_each_device_gets_the_largest_sub_network_its_budget_trains() -> None:
    engine = make_engine(["small", "medium", "large"])
    dims = engine.parent.dims
    small = budget_for(engine, SubnetSpec.uniform(dims, heads=1, ffn=dims.ffn // 2))
    medium = budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn))
    budgets = {"small": small, "medium": medium, "large": FULL_BUDGET}
    admit_all(engine, budgets)
    orders = {o.device_id: o for o in engine.begin_round(list(budgets), now=0.0)}
    assert orders["small"].params < orders["medium"].params < orders["large"].params
    assert orders["large"].spec.is_full
    for name, order in orders.items():
        assert order.predicted_bytes <= budgets[name]  # what the memory model counts fits the budget
        plan = plan_training(engine.parent, engine.salience, budgets[name], engine.planner.work, runtime=0)
        assert order.spec == plan.spec
        assert order.settings.local_steps == TRAINING.local_steps
        assert order.settings.batch_size == 4 and order.settings.seq_len == 16
        assert set(order.tensors) <= set(engine.parent.state)


def test_planning_keeps_a_margin_unless_the_device_already_did() -> None:
    engine = make_engine(["override", "detected"], min_margin_bytes=100_000_000)
    dims = engine.parent.dims
    usable = budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn)) + 100_000_000
    assert engine.planner.planning_bytes(usable, 0) == usable - 100_000_000  # --memory-budget: no margin taken yet
    assert engine.planner.planning_bytes(usable, 150_000_000) == usable  # a detected budget already set it aside
    assert engine.planner.planning_bytes(usable, 30_000_000) == usable - 70_000_000
    override = engine.admit("override", hello(usable))
    detected = engine.admit("detected", {"budget": {"usable": usable, "margin": 150_000_000}})
    assert override.estimate.total <= usable - 100_000_000 < detected.estimate.total <= usable
    with pytest.raises(BudgetError, match="safety margin"):
        engine.admit("override", hello(50_000_000))


def test_a_device_that_measured_a_peak_above_its_budget_gets_a_smaller_sub_network_next() -> None:
    parent, salience = ranked_parent()
    big = TrainingConfig(local_steps=1, lr=1e-3, batch_size=64, seq_len=128)  # activations matter
    fed = FederationConfig(rounds=3, min_devices=1, min_margin_bytes=0, max_update_norm_ratio=1e3)
    engine = FederationEngine(
        parent,
        salience,
        fed,
        big,
        devices=["pi", "ok"],
        seed=7,
        levers=LeverPolicy.plain(),  # type: ignore[arg-type]
    )
    dims = engine.parent.dims
    full = SubnetSpec.full(dims)
    usable = training_estimate(full, param_count(parent, full), engine.planner.work, runtime=0).total
    runtime = 400_000_000
    engine.admit("pi", hello(usable, runtime))
    engine.admit("ok", hello(usable, runtime))
    first = {o.device_id: o for o in engine.begin_round(["pi", "ok"], now=0.0)}
    overshoot = 1_000_000
    peaks = {"pi": usable + runtime + overshoot, "ok": usable + runtime}  # "ok" exactly at its allowance
    for name, order in first.items():
        engine.accept_update(order.task_id, trained(order, 0.0), num_samples=4, now=1.0, peak_rss_bytes=peaks[name])
    engine.close_round(1.0)
    engine.finish_round()
    assert engine.devices()["pi"]["shrink_bytes"] == overshoot + usable // 50
    assert engine.devices()["ok"]["shrink_bytes"] == 0
    second = {o.device_id: o for o in engine.begin_round(["pi", "ok"], now=2.0)}
    assert second["pi"].params < first["pi"].params
    assert second["pi"].predicted_bytes <= usable - overshoot - usable // 50
    assert second["ok"].spec == first["ok"].spec


def test_a_budget_that_fits_nothing_or_no_budget_refuses_the_device() -> None:
    engine = make_engine(["a"])
    with pytest.raises(BudgetError):
        engine.admit("a", hello(1_000))
    with pytest.raises(ProfileError, match=r"budget\.usable"):
        engine.admit("a", {"device": {}})
    with pytest.raises(ProfileError):
        engine.admit("a", {"budget": {"usable": True}})


# --------------------------------------------------------------------------------------- aggregation


def test_a_round_merges_updates_per_coordinate_weighted_by_samples() -> None:
    engine = make_engine(["half", "full"])
    dims = engine.parent.dims
    half_budget = budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn // 2))
    admit_all(engine, {"half": half_budget, "full": FULL_BUDGET})
    before = engine.parent
    orders = {o.device_id: o for o in engine.begin_round(["half", "full"], now=0.0)}
    returned = {"half": trained(orders["half"], 1.0), "full": trained(orders["full"], -0.5)}
    samples = {"half": 30, "full": 10}
    for name, order in orders.items():
        outcome = engine.accept_update(
            order.task_id,
            returned[name],
            num_samples=samples[name],
            now=1.0,
            metrics={"loss": 0.5},
            peak_rss_bytes=123,
            step_time_s=0.1,
        )
        assert outcome.status == "ok" and outcome.peak_rss_bytes == 123
    assert engine.settled(1.0)
    engine.close_round(1.0)
    summary = engine.finish_round()
    expected = aggregate(
        before,
        [
            ClientUpdate(orders[n].spec, {k: torch.from_numpy(v) for k, v in returned[n].items()}, samples[n])
            for n in ("half", "full")
        ],
    )
    for name, tensor in expected.state.items():
        torch.testing.assert_close(engine.parent.state[name], tensor, msg=name)
    # A coordinate only "full" trained moved by its -0.5; one both trained by (30*1 - 10*0.5)/40.
    q = "bert.encoder.layer.0.attention.self.query.weight"
    kept_rows = orders["half"].spec.layers[0].heads * dims.head_dim
    delta = engine.parent.state[q] - before.state[q]
    torch.testing.assert_close(delta[:kept_rows], torch.full_like(delta[:kept_rows], 25 / 40))
    torch.testing.assert_close(delta[kept_rows:], torch.full_like(delta[kept_rows:], -0.5))
    assert summary.aggregated == 2 and summary.round == 1 and engine.round == 1
    assert summary.weights_digest == engine.weights_digest() != ""
    assert engine.history[-1]["round"] == 1
    assert "round 1/3: 2/2 updates merged" in summary.log_line()


def test_results_after_the_deadline_are_late_and_unanswered_tasks_missing() -> None:
    engine = make_engine(["a", "b", "c"], round_deadline_s=10.0)
    admit_all(engine, {n: FULL_BUDGET for n in "abc"})
    before = engine.weights_digest()
    orders = {o.device_id: o for o in engine.begin_round(["a", "b", "c"], now=100.0)}
    assert engine.deadline == 110.0
    assert engine.accept_update(orders["a"].task_id, trained(orders["a"], 0.1), num_samples=5, now=105.0).status == "ok"
    assert not engine.settled(109.9)  # b and c still owe their results, and time remains
    assert engine.settled(110.0)  # the deadline passed
    late = engine.accept_update(orders["b"].task_id, trained(orders["b"], 9.0), num_samples=5, now=110.5)
    assert late.status == "late"
    engine.close_round(110.5)
    after_close = engine.accept_update(orders["c"].task_id, trained(orders["c"], 9.0), num_samples=5, now=110.6)
    assert after_close.status == "late"
    summary = engine.finish_round()
    status = {o.device_id: (o.status, o.reason) for o in summary.outcomes}
    assert status == {
        "a": ("ok", ""),
        "b": ("missing", "deadline passed"),
        "c": ("missing", "deadline passed"),
    }
    assert summary.aggregated == 1 and engine.weights_digest() != before
    q = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(engine.parent.state[q], torch.from_numpy(orders["a"].tensors[q]) + 0.1)


def test_bad_updates_are_refused_and_never_merged() -> None:
    engine = make_engine(["shape", "nan", "zero", "extra", "gone", "good"])
    names = ["shape", "nan", "zero", "extra", "gone", "good"]
    admit_all(engine, {n: FULL_BUDGET for n in names})
    orders = {o.device_id: o for o in engine.begin_round(names, now=0.0)}
    q = "bert.encoder.layer.0.attention.self.query.weight"
    wrong_shape = trained(orders["shape"], 0.0)
    wrong_shape[q] = wrong_shape[q][:-1]
    nan = trained(orders["nan"], 0.0)
    nan[q] = nan[q].copy()
    nan[q][0, 0] = np.nan
    extra = {**trained(orders["extra"], 0.0), "surprise": np.zeros(3, np.float32)}
    results = {
        "shape": engine.accept_update(orders["shape"].task_id, wrong_shape, num_samples=5, now=1.0),
        "nan": engine.accept_update(orders["nan"].task_id, nan, num_samples=5, now=1.0),
        "zero": engine.accept_update(orders["zero"].task_id, trained(orders["zero"], 5.0), num_samples=0, now=1.0),
        "extra": engine.accept_update(orders["extra"].task_id, extra, num_samples=5, now=1.0),
    }
    assert {n: r.status for n, r in results.items()} == dict.fromkeys(results, "rejected")
    assert "shape" in results["shape"].reason and "non-finite" in results["nan"].reason
    assert "unexpected surprise" in results["extra"].reason
    failed = engine.task_failed(orders["gone"].task_id, "disconnected (code 1006)")
    assert failed is not None and failed.status == "failed"
    assert engine.task_failed(orders["gone"].task_id, "again") is None  # answered once only
    assert engine.accept_update("no-such-task", {}, num_samples=1, now=1.0).status == "late"
    good = trained(orders["good"], 0.25)
    assert engine.accept_update(orders["good"].task_id, good, num_samples=5, now=1.0).status == "ok"
    engine.close_round(2.0)
    summary = engine.finish_round()
    assert summary.aggregated == 1
    torch.testing.assert_close(engine.parent.state[q], torch.from_numpy(good[q]))


def test_a_round_without_updates_keeps_the_model_and_moves_on() -> None:
    engine = make_engine(["a"])
    engine.admit("a", hello(FULL_BUDGET))
    before = engine.weights_digest()
    (order,) = engine.begin_round(["a"], now=0.0)
    engine.task_failed(order.task_id, "device error task_failed: out of memory")
    engine.close_round(1.0)
    summary = engine.finish_round()
    assert summary.aggregated == 0 and engine.round == 1 and engine.weights_digest() == before
    assert engine.devices()["a"]["rounds_failed"] == 1


def test_delta_updates_are_added_to_what_was_sent() -> None:
    engine = make_engine(["a"])
    engine.admit("a", hello(FULL_BUDGET))
    (order,) = engine.begin_round(["a"], now=0.0)
    delta = {n: np.full_like(a, 0.5) if a.dtype.kind == "f" else np.zeros_like(a) for n, a in order.tensors.items()}
    assert engine.accept_update(order.task_id, delta, num_samples=3, now=1.0, encoding="delta").status == "ok"
    engine.close_round(1.0)
    engine.finish_round()
    q = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(engine.parent.state[q], torch.from_numpy(order.tensors[q]) + 0.5)


def test_update_norm_bound_scales_with_what_was_sent() -> None:
    engine = make_engine(["a", "b"], max_update_norm_ratio=2.0)
    admit_all(engine, {"a": FULL_BUDGET, "b": FULL_BUDGET})
    orders = {o.device_id: o for o in engine.begin_round(["a", "b"], now=0.0)}
    sent = orders["a"].tensors
    norm = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in sent.values() if a.dtype.kind == "f"))
    assert orders["a"].max_update_norm == pytest.approx(2.0 * norm + 1.0, rel=1e-6)
    huge = {n: a * np.float32(10) if a.dtype.kind == "f" else a for n, a in sent.items()}
    refused = engine.accept_update(orders["a"].task_id, huge, num_samples=1, now=0.0)
    assert refused.status == "rejected" and "exceeds the bound" in refused.reason
    # A transport that already checked values and norm (the wire protocol does) skips the second pass.
    trusted = engine.accept_update(orders["b"].task_id, huge, num_samples=1, now=0.0, values_checked=True)
    assert trusted.status == "ok"


def test_fedadam_strategy_keeps_moments_only_where_covered() -> None:
    engine = make_engine(["a"], strategy="fedadam", server_lr=0.01)
    assert isinstance(engine._optimizer, FedAdam)
    dims = engine.parent.dims
    engine.admit("a", hello(budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn // 2))))
    (order,) = engine.begin_round(["a"], now=0.0)
    engine.accept_update(order.task_id, trained(order, 1.0), num_samples=3, now=1.0)
    engine.close_round(1.0)
    engine.finish_round()
    moments = engine._optimizer.state_dict()
    q = "bert.encoder.layer.0.attention.self.query.weight"
    rows = order.spec.layers[0].heads * dims.head_dim
    assert bool((moments[f"m/{q}"][:rows] != 0).all()) and bool((moments[f"m/{q}"][rows:] == 0).all())


def test_the_run_finishes_after_the_configured_rounds() -> None:
    engine = make_engine(["a"], rounds=2)
    engine.admit("a", hello(FULL_BUDGET))
    for _ in range(2):
        (order,) = engine.begin_round(["a"], now=0.0)
        engine.accept_update(order.task_id, trained(order, 0.01), num_samples=1, now=0.0)
        engine.close_round(0.0)
        engine.finish_round()
    assert engine.finished
    with pytest.raises(EdgeFMError, match="finished"):
        engine.begin_round(["a"], now=0.0)


def test_with_levers_a_small_budget_trains_the_full_width_and_its_task_says_how() -> None:
    engine = make_engine(["small", "large"], levers=LeverPolicy())
    dims = engine.parent.dims
    small = budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn))  # plain: a cut width
    admit_all(engine, {"small": small, "large": FULL_BUDGET})
    orders = {o.device_id: o for o in engine.begin_round(["small", "large"], now=0.0)}
    assert orders["small"].spec.is_full and orders["large"].spec.is_full
    assert orders["small"].predicted_bytes <= small
    assert not orders["small"].settings.levers.is_plain  # the levers bought the width
    assert orders["large"].settings.levers.is_plain  # nothing to buy: plain training


def test_exclusive_admits_only_devices_that_can_train_the_whole_model_plainly() -> None:
    engine = make_engine(["small", "large"], width=WidthPolicy(kind="exclusive"))
    dims = engine.parent.dims
    small = budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=dims.ffn))
    with pytest.raises(BudgetError, match="exclusive"):
        engine.admit("small", hello(small))
    plan = engine.admit("large", hello(FULL_BUDGET))
    assert plan.spec.is_full and plan.levers.is_plain
