"""Device classes of 8 GB or less: the planned sub-network trains within the class's budget, as predicted.

Measured here: the classes whose budget binds (a sub-network smaller than the full model), one fresh
process per distinct plan. ``bench/budgets.py`` measures every class of 8 GB or less, the full-model
plans too, and prints the table.
"""

from pathlib import Path

import pytest

from coordinator.simulation._memcheck import check_device_classes
from edge_sdk.device._classes import list_device_classes
from edge_sdk.scaling._budget import budget_for_device_class
from edge_sdk.scaling._memory import TRAINING_RUNTIME_BYTES, Workload
from edge_sdk.scaling._reorder import reorder
from edge_sdk.scaling._salience import weight_l1
from edge_sdk.scaling._search import plan_training

from .models import long_rows_tsv, minilm, minilm_dir


@pytest.mark.slow
def test_device_class_budgets_hold_in_fresh_processes(tmp_path: Path) -> None:
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    work = Workload(32, 128)
    classes = [dc for dc in list_device_classes() if dc.memory <= 8 * 1024**3]
    assert len(classes) >= 7
    binding = [
        dc
        for dc in classes
        if not plan_training(
            parent, salience, budget_for_device_class(dc, TRAINING_RUNTIME_BYTES).usable, work, runtime=0
        ).spec.is_full
    ]
    assert "raspberry-pi-4-2gb" in [dc.name for dc in binding]  # its 2 GB bind at batch 32 x 128
    data = long_rows_tsv(tmp_path)  # rows that fill the max length: the workload the model plans for
    rows = check_device_classes(parent, salience, binding, work, data=data, tokenizer_dir=minilm_dir())
    for r in rows:
        print(r.device_class, r.allowance, r.predicted, r.measured.peak_rss_bytes, f"{r.error:+.1%}")
        assert r.within_budget, r
        assert abs(r.error) <= 0.15, r
