"""Budgets that hold on real processes: every device class of 8 GB or less, planned and measured.

    python bench/budgets.py [--batch 32] [--seq 128] [--steps 2]

For each class in ``profiles/`` with at most 8 GiB: its memory budget (the class's available
memory less the safety margin; the runtime footprint is measured here), the MiniLM sub-network the
planner fits into it for training at batch x sequence, then a fresh process that trains that
sub-network on SST-2 for a few steps. Printed: the budget (what the training process may hold:
usable + runtime footprint), the plan's parameters, the predicted
and the measured peak RSS, and the prediction's error against the measurement (the baseline).

Training runs on this machine's CPU: a Jetson class is simulated by its memory figures only (its
GPU, and the CUDA context it would add, cannot run here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    from coordinator import load_parent, reorder, resolve_model_dir, weight_l1
    from coordinator.simulation._memcheck import check_device_classes
    from edge_sdk._units import format_bytes
    from edge_sdk.device._classes import list_device_classes
    from edge_sdk.scaling._memory import Workload

    model_dir = resolve_model_dir("all-MiniLM-L6-v2")
    parent = load_parent(model_dir)
    parent, salience, _ = reorder(parent, weight_l1(parent))
    classes = [dc for dc in list_device_classes() if dc.memory <= 8 * 1024**3]
    work = Workload(args.batch, args.seq)
    print(f"MiniLM training at batch {args.batch} x sequence {args.seq}, {args.steps} steps, fresh process each")
    rows = check_device_classes(
        parent, salience, classes, work, data=ROOT / "examples/data/sst2/train.tsv", tokenizer_dir=model_dir,
        steps=args.steps,
    )  # fmt: skip
    print(f"{'profile':<22} {'budget':>10} {'params':>11} {'predicted':>10} {'measured':>10} {'error':>7}  fits")
    for r in rows:
        print(
            f"{r.device_class:<22} {format_bytes(r.allowance):>10} {r.params / 1e6:>6.1f}M {r.params_fraction:>4.0%}"
            f" {format_bytes(r.predicted):>10} {format_bytes(r.measured.peak_rss_bytes):>10} {r.error:>+7.1%}"
            f"  {'yes' if r.within_budget else 'NO'}"
        )
    return 0 if all(r.within_budget and abs(r.error) <= 0.15 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
