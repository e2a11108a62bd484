"""What a device is planned from the budget it reports: one rule for the coordinator and ``edge-sdk profile``."""

from pathlib import Path

import pytest

from edge_sdk import BudgetError
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._budget import DEFAULT_MIN_MARGIN_BYTES, inference_bytes, training_bytes
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory import (
    INFERENCE_RUNTIME_BYTES,
    Workload,
    export_estimate,
    inference_estimate,
    training_estimate,
)
from edge_sdk.scaling._planning import plan_device, plan_dict, plan_table
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling._search import plan_inference, plan_training

from .models import tiny_parent

MiB = 1 << 20


def test_the_reserve_counts_the_budgets_own_margin() -> None:
    assert DEFAULT_MIN_MARGIN_BYTES == 192 << 20
    assert training_bytes(1000 * MiB) == 808 * MiB  # an override has no margin: all of the reserve
    assert training_bytes(1000 * MiB, margin=100 * MiB) == 908 * MiB  # the rest of the reserve
    assert training_bytes(1000 * MiB, margin=300 * MiB) == 1000 * MiB  # its margin covers the reserve
    assert training_bytes(1000 * MiB, min_margin=0) == 1000 * MiB
    # the served model's process has no torch: the runtime footprint is free for it
    assert inference_bytes(1000 * MiB, runtime_footprint=400 * MiB) == 1208 * MiB
    assert inference_bytes(1000 * MiB, margin=300 * MiB, runtime_footprint=-5) == 1000 * MiB


def test_device_plans_are_the_searches_with_those_budgets() -> None:
    parent = tiny_parent("bert")
    parent, salience, _ = reorder(parent, weight_l1(parent))
    train, infer = Workload(8, 32), Workload(1, 32)
    full = plan_training(parent, salience, 10**12, train, runtime=0).estimate.total
    one = SubnetSpec.uniform(parent.dims, heads=1, ffn=1)
    least = training_estimate(one, param_count(parent, one), train, runtime=0).total
    small = MiB + (least + full) // 2  # binds: between the smallest and the full sub-network
    plans = plan_device(
        parent, salience, usable=small, margin=0, runtime_footprint=3 * MiB, train=train, infer=infer, min_margin=MiB
    )
    expected = plan_training(parent, salience, small - MiB, train, runtime=0)
    assert plans.training.spec == expected.spec and plans.training.budget == small - MiB
    served = plan_inference(
        parent, salience, small + 2 * MiB, infer, floor=expected.spec, runtime=INFERENCE_RUNTIME_BYTES
    )
    assert plans.inference.spec == served.spec
    assert plans.inference.spec.covers(plans.training.spec)
    assert plans.inference.params > plans.training.params  # inference needs far less: it serves more
    d = plan_dict(plans.training)
    assert d["params"] == plans.training.params and d["budget_bytes"] == small - MiB
    assert len(plan_table("t", plans.training)) == 2 + parent.dims.num_layers + 1


def test_a_budget_below_the_reserve_fits_nothing() -> None:
    parent = tiny_parent("bert")
    parent, salience, _ = reorder(parent, weight_l1(parent))
    with pytest.raises(BudgetError, match=r"below the safety margin of 192\.00 MiB"):
        plan_device(parent, salience, usable=100 * MiB, train=Workload(8, 32), infer=Workload(1, 32))


def test_the_devices_export_must_fit_too() -> None:
    """Serving is planned against the larger of ONNX Runtime serving and the torch process exporting."""
    parent = tiny_parent("bert")
    parent, salience, _ = reorder(parent, weight_l1(parent))
    train, infer = Workload(8, 32), Workload(1, 32)
    usable = plan_training(parent, salience, 10**12, train, runtime=0).estimate.total  # the full model trains
    footprint = 400 * MiB

    def plans(quantize: bool):  # type: ignore[no-untyped-def]
        return plan_device(
            parent,
            salience,
            usable=usable,
            runtime_footprint=footprint,
            train=train,
            infer=infer,
            quantize=quantize,
            min_margin=0,
        )

    fp32, int8 = plans(False), plans(True)
    params = fp32.training.params
    assert fp32.training.spec.is_full and usable > export_estimate(params, quantize=False)
    assert fp32.serving.fits and fp32.inference.spec.is_full
    served = inference_estimate(fp32.inference.spec, params, infer).total
    assert fp32.inference.estimate.total == max(served, footprint + export_estimate(params, quantize=False))
    # int8 export (quantizer, two sessions) needs more than this budget trains in: served anyway, flagged
    assert usable < export_estimate(params, quantize=True)
    assert not int8.serving.fits and not int8.serving.could_grow
    assert int8.inference.spec == int8.training.spec
    assert int8.inference.estimate.total == footprint + export_estimate(params, quantize=True)
    # the export grows with the parameters: per parameter and a fixed part, int8 above fp32
    assert export_estimate(2_000_000, quantize=True) - export_estimate(1_000_000, quantize=True) == 23_000_000
    # ONNX Runtime's transformer fusion (symbolic shape inference copies the graph) about doubles it
    assert (
        export_estimate(2_000_000, quantize=True, optimize=True)
        - export_estimate(1_000_000, quantize=True, optimize=True)
        == 45_000_000
    )
    assert export_estimate(0, quantize=False) < export_estimate(0, quantize=True)


def test_a_causal_lm_is_planned_to_serve_with_its_own_serving_model() -> None:
    """``plan_device`` (as ``edge-sdk profile --model`` calls it) prices a causal LM's inference
    sub-network as the coordinator's deploys do: KV cache, the table's second copy, the LLM export."""
    from edge_sdk.scaling._memory import Workload, workload_for
    from edge_sdk.scaling._memory_lm import lm_serving_estimate

    parent, _ = reorder(tiny_parent("llama"), weight_l1(tiny_parent("llama")))[:2]
    salience = weight_l1(parent)
    infer = Workload(1, 64)
    plans = plan_device(
        parent, salience, usable=2**30, runtime_footprint=400 * 2**20, train=Workload(4, 32), infer=infer
    )
    served = plans.inference
    expected = lm_serving_estimate(
        served.spec, served.params, workload_for(parent, infer), runtime_footprint=400 * 2**20, quantize=False
    )
    assert served.estimate.total == expected.total


def test_the_plan_cli_prices_a_causal_lm_with_its_serving_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``edge-coordinator plan`` on a Llama folder: the inference estimate is the LLM serving model's."""
    import json

    from coordinator.cli._main import main
    from edge_sdk.scaling._memory import Workload, workload_for
    from edge_sdk.scaling._memory_lm import lm_serving_estimate
    from edge_sdk.scaling._ranked import ranked_parent

    from ._llm import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "llama")
    assert main(["plan", "--model", str(model), "--memory", "1GB", "--seq", "32", "--no-cache", "--json"]) == 0
    infer = json.loads(capsys.readouterr().out)["inference"]
    parent, _ = ranked_parent(model)
    spec = SubnetSpec.full(parent.dims)
    work = workload_for(parent, Workload(1, 32))
    expected = lm_serving_estimate(spec, param_count(parent, spec), work, runtime_footprint=None, quantize=False)
    assert infer["params_fraction"] == 1 and infer["predicted_peak_bytes"] == expected.total
