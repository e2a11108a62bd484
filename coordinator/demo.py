"""``make demo``: what edge-fm would give devices of different sizes, on the real all-MiniLM-L6-v2.

Ranks MiniLM's heads and neurons by salience, reorders it (its outputs do not change), and plans for
a few device budgets the sub-network each would train (batch 16 x 128 tokens) and the larger one it
would serve. (A real federation over websockets replaces this once the simulation lands.)
"""

from __future__ import annotations

import logging
import sys

from edge_sdk._errors import BudgetError
from edge_sdk._memory import Workload
from edge_sdk._units import format_bytes, parse_size

from ._models import resolve_model_dir
from ._parent import load_parent
from ._reorder import reorder
from ._salience import weight_l1
from ._search import plan_inference, plan_training

BUDGETS = ("700MB", "900MB", "1.1GB", "1.3GB", "2GB")


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    model_dir = resolve_model_dir("all-MiniLM-L6-v2")
    print(f"edge-fm demo: planning sub-networks of all-MiniLM-L6-v2 ({model_dir})\n")
    parent = load_parent(model_dir)
    parent, salience, _ = reorder(parent, weight_l1(parent))
    train_work, infer_work = Workload(16, 128), Workload(1, 128)
    print(f"{'budget':>8}  {'trains':>24}  {'serves':>24}  train heads/FFN per layer")
    for text in BUDGETS:
        budget = parse_size(text)
        try:
            train = plan_training(parent, salience, budget, train_work)
        except BudgetError as exc:
            print(f"{text:>8}  cannot train: {exc}")
            continue
        serve = plan_inference(parent, salience, budget, infer_work, floor=train.spec)
        widths = " ".join(f"{ly.heads}/{ly.ffn}" for ly in train.spec.layers)
        print(
            f"{text:>8}  {train.params / 1e6:6.1f}M ({train.params_fraction:4.0%}) "
            f"{format_bytes(train.estimate.total):>10}  {serve.params / 1e6:6.1f}M ({serve.params_fraction:4.0%}) "
            f"{format_bytes(serve.estimate.total):>10}  {widths}"
        )
    print("\nTry: edge-coordinator plan --model all-MiniLM-L6-v2 --memory 1.5GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
