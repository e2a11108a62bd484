"""SmolLM2-135M training peaks, planned and measured: the Llama memory model on the real model.

    python bench/llama_memory.py [--batch 8] [--seq 64] [--steps 3] [BUDGET ...]   (default 1GB 2GB 4GB)

For each device budget (what the training process may hold, its runtime footprint included): the
sub-network and levers the planner chooses for SmolLM2 (reordered by weight L1, every lever allowed),
then a fresh process training it with AdamW on random full-length token rows, the loss on every
next token. Printed: the plan, the predicted and the measured peak RSS (both with the runtime the
process measured), and the prediction's error. The first run converts the packaged GGUF (~1 min).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("budgets", nargs="*", default=["1GB", "2GB", "4GB"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from edge_sdk._units import parse_size
    from edge_sdk.scaling import (
        TRAINING_RUNTIME_BYTES,
        LeverPolicy,
        Workload,
        extract,
        load_parent,
        plan_training,
        reorder,
        resolve_model_dir,
        training_estimate,
        weight_l1,
        workload_for,
    )
    from edge_sdk.training._probe import run_probe, write_probe_folder

    loaded = load_parent(resolve_model_dir("SmolLM2-135M"), task="causal-lm")
    parent, salience, _ = reorder(loaded, weight_l1(loaded))
    work = Workload(args.batch, args.seq, steps=args.steps)
    print(f"{'budget':>7}  {'plan':<44} {'predicted':>10} {'measured':>10} {'error':>7}")
    for text in args.budgets:
        budget = parse_size(text)
        plan = plan_training(parent, salience, budget - TRAINING_RUNTIME_BYTES, work, runtime=0, policy=LeverPolicy())
        widths = sorted({(layer.heads, layer.ffn) for layer in plan.spec.layers})
        summary = f"{plan.params / 1e6:.1f}M params, {plan.levers.describe()}"
        with tempfile.TemporaryDirectory() as folder:
            path = write_probe_folder(Path(folder), plan.spec, parent.config, extract(parent, plan.spec))
            result = run_probe(path, batch=args.batch, seq=args.seq, steps=args.steps, levers=plan.levers.to_dict(),
                               timeout_s=1800)  # fmt: skip
        runtime, peak = int(result["runtime_rss_bytes"]), int(result["peak_rss_bytes"])
        predicted = training_estimate(
            plan.spec, plan.params, workload_for(parent, work), runtime=runtime, levers=plan.levers
        ).total
        error = (predicted - peak) / peak
        print(f"{text:>7}  {summary:<44} {predicted / 1e6:>8.0f}MB {peak / 1e6:>8.0f}MB {error:>+7.1%}")
        print(f"{'':>7}  widths (heads, ffn): {widths[:4]}{' ...' if len(widths) > 4 else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
