"""Budget search: fits, keeps salience, nests, and serves at least what it trains."""

import json
import math
import os
import subprocess
import sys

import pytest

from edge_sdk import BudgetError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory import Workload, inference_estimate, training_estimate
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling._search import _fractions, plan_inference, plan_training

from .models import minilm, tiny_parent

WORK = Workload(batch=8, seq=32)


def tiny_reordered():  # type: ignore[no-untyped-def]
    parent = tiny_parent("bert")
    reordered, salience, _ = reorder(parent, weight_l1(parent))
    return reordered, salience


def bounds(parent, work: Workload, estimate=training_estimate) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Predicted bytes of the smallest (1 head, 1 neuron a layer) and of the full sub-network."""
    d = parent.dims
    small = SubnetSpec.uniform(d, heads=1, ffn=1)
    full = SubnetSpec.full(d)
    return (
        estimate(small, param_count(parent, small), work, runtime=RUNTIME).total,
        estimate(full, param_count(parent, full), work, runtime=RUNTIME).total,
    )


RUNTIME = 1_000_000


def test_plans_fit_their_budget_and_nest_as_the_budget_grows() -> None:
    parent, salience = tiny_reordered()
    low, high = bounds(parent, WORK)
    previous = None
    for budget in range(low, high + 20_000, 20_000):
        plan = plan_training(parent, salience, budget, WORK, runtime=RUNTIME)
        assert plan.estimate.total <= budget
        if previous is not None:
            assert plan.spec.covers(previous.spec)
            assert plan.salience_kept >= previous.salience_kept
        previous = plan
    assert previous is not None and previous.spec.is_full and previous.salience_kept == pytest.approx(1.0)


def test_too_small_a_budget_says_what_the_smallest_needs() -> None:
    parent, salience = tiny_reordered()
    low, _ = bounds(parent, WORK)
    with pytest.raises(BudgetError, match=r"no trainable sub-network of bert fits .* needs"):
        plan_training(parent, salience, low // 2, WORK, runtime=RUNTIME)


def test_inference_is_never_smaller_than_training_and_larger_when_it_can_be() -> None:
    parent, salience = tiny_reordered()
    low, high = bounds(parent, WORK)
    for budget in (low + 10_000, (low + high) // 2, high):
        train = plan_training(parent, salience, budget, WORK, runtime=RUNTIME)
        infer = plan_inference(parent, salience, budget, Workload(1, 32), floor=train.spec, runtime=RUNTIME)
        assert infer.spec.covers(train.spec)
        assert infer.estimate.total <= budget
        if not train.spec.is_full:
            assert infer.params > train.params
    # a budget where serving cannot hold the full model: still at least the training widths
    train = plan_training(parent, salience, low + 10_000, WORK, runtime=RUNTIME)
    floor_bytes = inference_estimate(train.spec, train.params, Workload(1, 32), RUNTIME).total
    tight = plan_inference(parent, salience, floor_bytes + 2_000, Workload(1, 32), floor=train.spec, runtime=RUNTIME)
    assert tight.spec.covers(train.spec) and not tight.spec.is_full
    with pytest.raises(BudgetError, match="servable"):
        plan_inference(parent, salience, floor_bytes - 1, Workload(1, 32), floor=train.spec, runtime=RUNTIME)


@pytest.mark.parametrize("budget", [1_000_000_000, 1_150_000_000, 1_300_000_000])
def test_search_beats_every_uniform_slice_that_fits_on_minilm(budget: int) -> None:
    """Per-layer widths chosen by salience keep more than any same-width-everywhere slice that fits."""
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    work = Workload(16, 128)
    plan = plan_training(parent, salience, budget, work)
    assert 0 < plan.salience_kept < 1
    best_uniform = max(
        _objective(spec, salience)
        for h in range(1, 13)
        for f in range(32, 1537, 32)
        if training_estimate(
            spec := SubnetSpec.uniform(parent.dims, heads=h, ffn=f), param_count(parent, spec), work
        ).total
        <= budget
    )
    assert _objective(plan.spec, salience) > best_uniform


def _objective(spec: SubnetSpec, salience) -> float:  # type: ignore[no-untyped-def]
    """The search's objective: sum over layers and kinds of log(fraction of salience kept)."""
    heads, ffn = _fractions(salience.heads), _fractions(salience.ffn)
    return sum(
        math.log(float(heads[ly.index, : ly.heads].sum())) + math.log(float(ffn[ly.index, : ly.ffn].sum()))
        for ly in spec.layers
    )


@pytest.mark.slow
def test_minilm_plan_cli_as_a_newcomer_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Once as the installed script in a fresh process (JSON), the table and a bad size through ``main``."""
    from coordinator.cli._main import main

    args = ["plan", "--model", "all-MiniLM-L6-v2", "--no-levers", "--memory", "1.2GB"]  # plain: width binds
    script = os.path.join(os.path.dirname(sys.executable), "edge-coordinator")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([script, *args, "--json"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    train, infer = plan["training"], plan["inference"]
    assert train["predicted_peak_bytes"] <= 1_200_000_000 < plan["budget_bytes"] + 1
    assert 0 < train["params_fraction"] < 1  # the budget binds at batch 16 x 128
    assert infer["params"] > train["params"]
    for t, i in zip(train["layers"], infer["layers"], strict=True):
        assert i["heads"] >= t["heads"] and i["ffn"] >= t["ffn"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"training sub-network: {train['params']:,} parameters" in table
    assert f"inference sub-network: {infer['params']:,} parameters" in table
    with pytest.raises(SystemExit) as bad:
        main([*args[:-1], "12 parsecs"])
    assert bad.value.code == 2 and "unknown unit" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_cli_shows_the_levers_and_what_they_buy(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli._main import main

    assert main(["plan", "--model", "all-MiniLM-L6-v2", "--memory", "1.2GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    train = plan["training"]
    assert train["params_fraction"] == 1.0  # levers before widths: the full model trains in 1.2 GB
    assert train["predicted_peak_bytes"] <= 1_200_000_000 < train["plain_peak_bytes"]
    assert train["levers_save_bytes"] == train["plain_peak_bytes"] - train["predicted_peak_bytes"]
    assert train["levers"]["lora_rank"] == 0 and train["levers"]["embeddings"] != "frozen"  # no accuracy cost
    assert plan["lever_policy"]["forbid"] == [] and plan["steps"] == 10
    assert "plain_peak_bytes" not in plan["inference"]
    args = ["plan", "--model", "all-MiniLM-L6-v2", "--memory", "700MB", "--forbid", "lora"]
    args += ["--pin", "checkpointing=true"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "levers: forbidden: lora; checkpointing=True" in table
    line = next(line.strip() for line in table.splitlines() if line.strip().startswith("levers:") and "peak" in line)
    assert "checkpointing" in line and "LoRA" not in line and "where plain training of this sub-network needs" in line
    assert main([*args, "--no-levers"]) == 2
    assert "--no-levers cannot be combined" in capsys.readouterr().err


def test_plan_cli_refuses_a_budget_that_fits_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli._main import main

    assert main(["plan", "--model", "all-MiniLM-L6-v2", "--memory", "300MB"]) == 2
    assert "no trainable sub-network of bert fits 286.10 MiB" in capsys.readouterr().err


def test_minilm_budget_search_is_fast_and_binding() -> None:
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    plans = [plan_training(parent, salience, b, Workload(16, 128)) for b in (900_000_000, 1_100_000_000, 1_300_000_000)]
    assert [p.spec.covers(q.spec) for p, q in zip(plans[1:], plans[:-1], strict=True)] == [True, True]
    assert plans[0].params < plans[1].params < plans[2].params
