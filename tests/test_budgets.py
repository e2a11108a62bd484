"""Every device class of 8 GB or less: the planned sub-network trains within its budget, as predicted."""

import pytest

from coordinator._memcheck import check_device_classes
from edge_sdk._memory import Workload
from edge_sdk._profiles import list_device_classes
from edge_sdk._reorder import reorder
from edge_sdk._salience import weight_l1

from .models import SST2, minilm, minilm_dir


@pytest.mark.slow
def test_device_class_budgets_hold_in_fresh_processes() -> None:
    parent, salience, _ = reorder(minilm(), weight_l1(minilm()))
    classes = [dc for dc in list_device_classes() if dc.memory <= 8 * 1024**3]
    assert len(classes) >= 7
    rows = check_device_classes(
        parent, salience, classes, Workload(32, 128), data=SST2 / "train.tsv", tokenizer_dir=minilm_dir()
    )
    assert any(r.params_fraction < 1 for r in rows)  # some budget binds
    for r in rows:
        print(r.device_class, r.allowance, r.predicted, r.measured.peak_rss_bytes, f"{r.error:+.1%}")
        assert r.within_budget, r
        assert abs(r.error) <= 0.15, r
