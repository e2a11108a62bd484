"""Validation metrics with hand-worked numbers: accuracy, macro-F1, per-class recall, majority share, collapse."""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.federation import FederationConfig, FederationEngine, metrics_text
from coordinator.simulation._report import MethodSummary, markdown_table, write_plots
from coordinator.simulation._run import SimulationResult
from edge_sdk import evaluate
from edge_sdk.scaling._policy import LeverPolicy
from edge_sdk.training._metrics import MAX_RECALL_KEYS, class_metrics, confusion_matrix, is_collapsed

from .test_engine import FULL_BUDGET, TRAINING, hello, ranked_parent


def metrics_of(labels: list[int], predictions: list[int], num_labels: int) -> dict[str, float]:
    return class_metrics(confusion_matrix(np.array(labels), np.array(predictions), num_labels))


def test_a_two_class_confusion_by_hand() -> None:
    # 4 rows of class 0, 6 of class 1; confusion [[3, 1], [2, 4]]
    m = metrics_of([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0], 2)
    assert m["recall_0"] == pytest.approx(3 / 4)
    assert m["recall_1"] == pytest.approx(4 / 6)
    assert m["min_recall"] == pytest.approx(4 / 6)
    # F1 = 2 tp / (true + predicted): class 0 2*3/(4+5), class 1 2*4/(6+5)
    assert m["macro_f1"] == pytest.approx((6 / 9 + 8 / 11) / 2)  # 0.69697
    assert m["majority_share"] == pytest.approx(0.6)
    assert m["top_prediction_share"] == pytest.approx(0.5) and m["collapsed"] == 0.0


def test_a_collapsed_predictor_is_flagged_and_its_accuracy_is_the_majority_share() -> None:
    # MRPC-like: 68 % class 1, the model answers 1 for everything
    m = metrics_of([0] * 32 + [1] * 68, [1] * 100, 2)
    assert m["majority_share"] == pytest.approx(0.68)
    assert m["recall_0"] == 0.0 and m["recall_1"] == 1.0 and m["min_recall"] == 0.0
    assert m["macro_f1"] == pytest.approx((0 + 2 * 68 / (68 + 100)) / 2)  # 0.40476
    assert m["top_prediction_class"] == 1.0 and m["top_prediction_share"] == 1.0
    assert m["collapsed"] == 1.0
    # 96 of 100 predictions one class whose true share is 60 %: still a collapse
    assert metrics_of([0] * 40 + [1] * 60, [0] * 4 + [1] * 96, 2)["collapsed"] == 1.0


def test_a_balanced_predictor_and_one_class_data_are_not_flagged() -> None:
    good = metrics_of([0, 1] * 50, [0, 1] * 45 + [1, 1] * 5, 2)  # 95 of 100 right, predictions 45/55
    assert good["collapsed"] == 0.0 and good["top_prediction_share"] == pytest.approx(0.55)
    # the data really is 97 % class 0: answering 0 everywhere is not a collapse (share 1.00 vs 0.97)
    skewed = metrics_of([0] * 97 + [1] * 3, [0] * 100, 2)
    assert skewed["collapsed"] == 0.0 and skewed["majority_share"] == pytest.approx(0.97)
    assert not is_collapsed(np.zeros((2, 2), dtype=np.int64))  # no rows: nothing to flag


def test_three_classes_by_hand_and_absent_classes() -> None:
    # confusion [[1, 1, 0], [0, 2, 0], [1, 0, 1]], a 4th class never seen
    m = metrics_of([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 4)
    assert (m["recall_0"], m["recall_1"], m["recall_2"]) == pytest.approx((0.5, 1.0, 0.5))
    assert "recall_3" not in m  # no row of class 3: its recall is undefined, not 0
    # F1: class 0 2/(2+2), class 1 4/(2+3), class 2 2/(2+1); class 3 neither true nor predicted
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # 0.65556
    assert m["majority_share"] == pytest.approx(1 / 3)
    assert m["top_prediction_class"] == 1.0 and m["top_prediction_share"] == pytest.approx(0.5)
    assert m["collapsed"] == 0.0


def test_metric_names_stay_bounded_for_many_classes() -> None:
    n = 200
    labels = np.arange(n).repeat(2)
    m = class_metrics(confusion_matrix(labels, labels, n))
    assert sum(k.startswith("recall_") for k in m) == MAX_RECALL_KEYS
    assert len(m) <= 48 and all(len(k) <= 64 for k in m)  # the wire allows 64 metrics of 64 characters
    assert m["macro_f1"] == 1.0 and m["min_recall"] == 1.0
    # labels outside the classes (e.g. -100 "ignore") are left out
    assert confusion_matrix(np.array([-100, 0, 5]), np.array([0, 0, 0]), 2).sum() == 1


class _Oracle(torch.nn.Module):
    """A stand-in classifier: ``input_ids[:, 0]`` is the class it predicts; ``config.num_labels`` is 4."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_labels=4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: torch.Tensor) -> object:
        logits = torch.nn.functional.one_hot(input_ids[:, 0], 4).float()
        return types.SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))


def test_evaluate_reports_the_class_metrics_over_all_batches() -> None:
    labels, predicted = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]  # the 3-class case above, in 2 batches
    ids = np.array(predicted).reshape(-1, 1)
    batches = [
        {"input_ids": ids[:4], "attention_mask": np.ones_like(ids[:4]), "labels": np.array(labels[:4])},
        {"input_ids": ids[4:], "attention_mask": np.ones_like(ids[4:]), "labels": np.array(labels[4:])},
    ]
    m = evaluate(_Oracle(), iter(batches))
    assert m["accuracy"] == pytest.approx(4 / 6) and m["samples"] == 6.0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["majority_share"] == pytest.approx(1 / 3) and m["collapsed"] == 0.0
    assert evaluate(_Oracle(), iter([]))["samples"] == 0.0


def test_the_round_log_line_and_the_engine_warn_when_the_model_collapses(caplog: pytest.LogCaptureFixture) -> None:
    collapsed = {"accuracy": 0.68, "loss": 0.6, "samples": 100.0, **metrics_of([0] * 32 + [1] * 68, [1] * 100, 2)}
    parent, salience = ranked_parent()
    fed = FederationConfig(rounds=1, min_devices=1, min_margin_bytes=0)

    def evaluator(_: object) -> Mapping[str, float]:
        return collapsed

    engine = FederationEngine(
        parent, salience, fed, TRAINING, devices=["a"], seed=7, levers=LeverPolicy.plain(), evaluator=evaluator
    )
    engine.admit("a", hello(FULL_BUDGET))
    (order,) = engine.begin_round(["a"], now=0.0)
    engine.task_failed(order.task_id, "device error")
    engine.close_round(1.0)
    with caplog.at_level(logging.WARNING, logger="coordinator.federation._engine"):
        summary = engine.finish_round()
    assert any("COLLAPSED: predicts class 1 for 100.0% of the rows" in r.getMessage() for r in caplog.records)
    line = summary.log_line()
    assert "accuracy 0.6800 macro-F1 0.4048 (majority class 0.6800) loss 0.6000" in line and "COLLAPSED" in line
    assert summary.to_json()["metrics"]["collapsed"] == 1.0
    # an older record (accuracy and loss only) still prints
    assert metrics_text({"accuracy": 0.5, "loss": 0.7}) == "accuracy 0.5000 loss 0.7000"
    assert metrics_text({}) == "no validation"


def test_the_report_table_shows_macro_f1_the_majority_share_and_a_collapse_warning() -> None:
    s = MethodSummary(
        method="budget",
        rounds=2,
        final_accuracy=0.68,
        best_accuracy=0.68,
        mean_predicted_bytes=1e6,
        min_predicted_bytes=1e6,
        full_predicted_bytes=2_000_000,
        mean_measured_bytes=math.nan,
        min_measured_bytes=math.nan,
        over_budget=0,
        devices=2,
        full_model_devices=0,
        bytes_per_device_round=1e6,
        compute_s=1.0,
        wall_s=1.0,
        final_macro_f1=0.4048,
        majority_share=0.68,
        collapsed_rounds=(1, 2),
    )
    table = markdown_table([s])
    assert "| budget | 68.00 | 68.00 | 40.48 | 68.00 |" in table
    assert "collapsed) in round(s) 1, 2" in table
    assert "Warning" not in markdown_table([dataclasses.replace(s, collapsed_rounds=())])


def test_the_accuracy_plot_takes_new_and_old_round_records(tmp_path: Path) -> None:
    def result(method: str, **extra: float) -> SimulationResult:
        rounds = [{"round": 1, "accuracy": 0.55, "bytes_down": 10, "bytes_up": 10, **extra}]
        return SimulationResult(
            run_dir=tmp_path,
            method=method,
            rounds=rounds,
            devices=[{"admitted": True, "params": 1000}],
            start_metrics={"accuracy": 0.5},
            weights_digest="",
            wall_s=1.0,
            full_predicted_bytes=1,
            width_metrics={},
        )

    new = result("new", macro_f1=0.35, majority_share=0.55, collapsed=True)
    paths = write_plots([new, result("old")], tmp_path)  # "old": accuracy and loss only, as before
    assert [p.name for p in paths] == ["accuracy.png", "bytes.png", "widths.png"]
    assert all(p.stat().st_size > 0 for p in paths)
