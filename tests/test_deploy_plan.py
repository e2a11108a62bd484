"""Deployment planning on the coordinator (tiny random BERT, no transport) and the ``[deploy]`` table."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from coordinator.federation._config import DeployConfig, parse_config
from coordinator.federation._deploy_plan import DeployOutcome, make_order, outcome, plan_deployment, plan_inference_for
from edge_sdk import ConfigError, LabelMap
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract, param_count
from edge_sdk.scaling._memory import INFERENCE_RUNTIME_BYTES, Workload, inference_estimate
from edge_sdk.scaling._search import Plan, plan_training

from .test_engine import budget_for, hello, make_engine

INFER = Workload(1, 16)


def at_least(big: SubnetSpec, small: SubnetSpec) -> bool:
    """``big`` keeps every layer of ``small`` with at least its heads and FFN neurons."""
    layers = {layer.index: layer for layer in big.layers}
    return all(
        layer.index in layers and layers[layer.index].heads >= layer.heads and layers[layer.index].ffn >= layer.ffn
        for layer in small.layers
    )


def training_plan(engine: Any, heads: int, ffn: int) -> Plan:
    spec = SubnetSpec.uniform(engine.parent.dims, heads=heads, ffn=ffn)
    work = engine.planner.work
    return plan_training(engine.parent, engine.salience, budget_for(engine, spec), work, runtime=0)


def serving_bytes(engine: Any, spec: SubnetSpec) -> int:
    return inference_estimate(spec, param_count(engine.parent, spec), INFER, INFERENCE_RUNTIME_BYTES).total


def test_admitted_devices_serve_at_least_what_they_train_and_more_when_their_budget_allows() -> None:
    engine = make_engine(["small", "medium", "full"])
    dims = engine.parent.dims
    budgets = {
        "small": budget_for(engine, SubnetSpec.uniform(dims, heads=1, ffn=8)),
        "medium": budget_for(engine, SubnetSpec.uniform(dims, heads=3, ffn=30)),
        "full": budget_for(engine, SubnetSpec.full(dims)) + 10**6,
    }
    for name, usable in budgets.items():
        engine.admit(name, hello(usable, runtime=400_000_000))
    config = DeployConfig(batch_size=1, seq_len=16)
    plans = {name: plan_deployment(engine, name, config) for name in budgets}
    for name, plan in plans.items():
        assert plan.training.spec == engine.registry.training_plan(name).spec  # the floor is what it trains
        assert at_least(plan.inference.spec, plan.training.spec), name
        assert plan.inference.params >= plan.training.params
        assert plan.inference.estimate.total <= plan.budget_bytes
        # inference bytes = training bytes + the runtime footprint the device reported
        assert plan.budget_bytes == budgets[name] + 400_000_000
    assert not plans["small"].training.spec.is_full and not plans["medium"].training.spec.is_full
    for name in ("small", "medium"):  # torch's 400 MB are free when serving: the whole model fits
        assert plans[name].could_grow and plans[name].larger
        assert plans[name].inference.spec.is_full
    assert plans["full"].training.spec.is_full and not plans["full"].could_grow and not plans["full"].larger


def test_the_inference_plan_grows_exactly_when_the_budget_allows() -> None:
    engine = make_engine(["d"])
    training = training_plan(engine, heads=1, ffn=12)
    floor = training.spec
    assert not floor.is_full

    def plan(budget: int) -> Any:
        return plan_inference_for(
            engine.parent, engine.salience, training, device_id="d", budget_bytes=budget, work=INFER
        )

    tight = plan(serving_bytes(engine, floor))  # room for the floor, not one unit more
    assert not tight.could_grow and tight.inference.spec == floor and not tight.larger

    full = SubnetSpec.full(engine.parent.dims)
    middle = plan((serving_bytes(engine, floor) + serving_bytes(engine, full)) // 2)
    assert middle.could_grow and middle.larger
    assert at_least(middle.inference.spec, floor) and middle.inference.spec != floor
    assert not middle.inference.spec.is_full and middle.inference.estimate.total <= middle.budget_bytes

    roomy = plan(serving_bytes(engine, full))
    assert roomy.could_grow and roomy.inference.spec.is_full

    # Below even the floor's inference needs: the device still serves what it trains.
    starved = plan(serving_bytes(engine, floor) - 1)
    assert starved.inference.spec == floor and not starved.could_grow and not starved.larger


def test_a_deploy_order_carries_the_inference_weights_and_the_class_names() -> None:
    engine = make_engine(["d"])
    dims = engine.parent.dims
    engine.admit("d", hello(budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=20)), runtime=0))
    # the run's label map is in the model config every task and deploy carries (set before the engine
    # is built in a real run: serve/_run.py applies it to the parent's config)
    engine.model_config = LabelMap.from_config(["a", "b", "c"]).apply_to(engine.model_config)
    config = DeployConfig(batch_size=2, seq_len=16, quantize=True)
    order = make_order(engine, "d", config, "d0-d-1")
    expected = extract(engine.parent, order.plan.inference.spec)
    assert {n: tuple(a.shape) for n, a in order.tensors.items()} == {n: tuple(t.shape) for n, t in expected.items()}
    assert (order.settings.batch_size, order.settings.seq_len, order.settings.quantize) == (2, 16, True)
    assert order.model_config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert order.model_config["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert order.round == 0 and order.task_id == "d0-d-1"

    done = outcome(order, "ok", metrics={"parity_max_abs_diff": 3e-7, "onnx_bytes": 2e6, "export_s": 1.5})
    record = done.to_json()
    assert record["params"] == order.plan.inference.params and record["train_params"] == order.plan.training.params
    assert record["spec"] == order.plan.inference.spec.to_dict() and record["quantize"] is True
    line = done.log_line()
    assert "ok" in line and "parity 3.00e-07" in line and "serves" in line
    skipped = DeployOutcome("x", "t", 3, "skipped", "not connected")
    assert skipped.log_line().endswith("skipped (not connected)") and not skipped.ok


# ------------------------------------------------------------------------------------------ config

BASE: dict[str, Any] = {
    "model": {"name": "all-MiniLM-L6-v2"},
    "devices": {"a": "token-aaaa", "b": "token-bbbb"},
    "run": {"dir": "runs/x"},
}


def with_deploy(**values: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["deploy"] = values
    return data


def test_deploy_defaults_and_values() -> None:
    assert parse_config(BASE).deploy == DeployConfig()
    default = DeployConfig()
    assert (default.enabled, default.batch_size, default.seq_len, default.quantize) == (True, 1, 128, False)
    run = parse_config(
        with_deploy(
            enabled=True,
            batch_size=4,
            seq_len=64,
            quantize=True,
            timeout_s=120,
            labels=["negative", "positive"],  # the older place of the class names: read as [model] labels
            operator_token="operator-token-1",
        )
    )
    cfg = run.deploy
    assert (cfg.batch_size, cfg.seq_len, cfg.quantize, cfg.timeout_s) == (4, 64, True, 120.0)
    assert run.model.labels is not None and run.model.labels.names == ("negative", "positive")
    assert cfg.operator_token == "operator-token-1"
    assert "operator-token-1" not in repr(cfg)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 0}, r"\[deploy\] batch_size: must be >= 1"),
        ({"seq_len": 1}, r"\[deploy\] seq_len: must be >= 2"),
        ({"quantize": "yes"}, r"\[deploy\] quantize: must be true or false"),
        ({"enabled": 1}, r"\[deploy\] enabled: must be true or false"),
        ({"timeout_s": 0}, r"\[deploy\] timeout_s: must be > 0"),
        ({"labels": ["only-one"]}, r"\[deploy\] labels: a label map has 2 to 4096 labels, got 1"),
        ({"labels": ["x", "x"]}, r"\[deploy\] labels: label names must be distinct"),
        ({"operator_token": "short"}, r"\[deploy\] operator_token: the token must be"),
        ({"operator_token": "token-aaaa"}, r"\[deploy\] operator_token: must differ from every device"),
        ({"quantise": True}, r"\[deploy\]: unknown key\(s\) quantise"),
    ],
)
def test_bad_deploy_values_name_their_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_deploy(**values), where="run.toml")


def test_the_export_is_fused_only_where_the_fused_export_fits_the_budget() -> None:
    """The planner sizes the served sub-network with the unfused export's bytes; the device is asked
    to fuse (about twice the export's peak) only when that fits its budget as well."""
    from coordinator.federation._deploy_plan import plan_inference_for
    from edge_sdk.scaling import export_estimate

    engine = make_engine(["d"])
    dims = engine.parent.dims
    engine.admit("d", hello(budget_for(engine, SubnetSpec.uniform(dims, heads=2, ffn=20)), runtime=0))
    training = engine.registry.training_plan("d")
    params, runtime = training.params, 100_000_000

    def plan(budget: int) -> Any:
        return plan_inference_for(
            engine.parent,
            engine.salience,
            training,
            device_id="d",
            budget_bytes=budget,
            work=INFER,
            runtime_footprint=runtime,
        )

    fused = runtime + export_estimate(params, quantize=False, optimize=True)
    unfused = runtime + export_estimate(params, quantize=False)
    assert unfused < fused
    tight = plan(unfused)  # room for the plain export of the training sub-network only
    assert tight.fits and not tight.optimize and tight.inference.spec == training.spec
    roomy = plan(10 * fused)
    assert roomy.optimize
    order_settings = make_order(engine, "d", DeployConfig(), "t").settings  # the registry's budget decides
    assert isinstance(order_settings.optimize, bool)
