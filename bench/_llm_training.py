"""bench/llm.py's ``training`` section: SmolLM2-135M's training peak, predicted and measured.

Two sets of rows, each a plan then a fresh process measuring it:

- ``--budgets`` (bytes that training may add to the runtime, as a device reports them with
  ``--memory-budget``), at ``--batch`` x ``--seq``, with the example's policy (levers before widths:
  full fine-tuning where it fits, else LoRA of the largest rank in ``--ranks`` that fits, then frozen
  tables, checkpointing, narrower sub-networks).
- ``--device-budgets`` (what the whole training process may hold, its runtime footprint included) at
  ``--device-batch`` x ``--seq``, every lever allowed: the larger batch, where activations rather than
  the heap decide the peak (formerly ``bench/llama_memory.py``).

The process receives the sub-network as a device would (spec, config, safetensors weights) and trains
it for ``--steps`` AdamW steps on random full-length token rows (the planner's worst case: every row as
long as ``--seq``), reporting its peak RSS and its runtime footprint (RSS after imports, before the
model arrives).

Printed per row: the batch, the budget, the plan (levers, the share of the parent's parameters kept),
the predicted peak (the memory model's estimate plus the runtime footprint that process measured),
the measured peak, the prediction's error against the measurement (the baseline), and whether what
training added to the runtime stayed within the budget.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from edge_sdk._units import format_bytes, parse_size
from edge_sdk.scaling import (
    TRAINING_RUNTIME_BYTES,
    LeverPolicy,
    Workload,
    extract,
    load_parent,
    plan_training,
    reorder,
    weight_l1,
)
from edge_sdk.scaling._memory import training_estimate, workload_for
from edge_sdk.scaling._models import resolve_model_dir
from edge_sdk.training._probe import run_probe, write_probe_folder

DEFAULT_BUDGETS = ("3GB", "2GB", "900MB")  # the budgets of examples/llm-federation.toml's devices
DEFAULT_DEVICE_BUDGETS = ("4GB", "1GB")  # whole devices, runtime included, at --device-batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training section")
    group.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS), help="training budgets, e.g. 2GB")
    group.add_argument("--batch", type=int, default=4)
    group.add_argument("--seq", type=int, default=64)
    group.add_argument("--steps", type=int, default=3, help="AdamW steps per fresh process (two reach the peak)")
    group.add_argument("--ranks", type=int, nargs="+", default=[16, 8, 4], help="LoRA ranks the planner may give")
    group.add_argument("--device-budgets", nargs="*", default=list(DEFAULT_DEVICE_BUDGETS),
                       help="device budgets (runtime included), every lever allowed")  # fmt: skip
    group.add_argument("--device-batch", type=int, default=8)


def _measure(parent: Any, plan: Any, work: Workload, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edge-fm-bench-llm-train-") as tmp:
        folder = write_probe_folder(Path(tmp), plan.spec, parent.config, extract(parent, plan.spec))
        return run_probe(
            folder, batch=work.batch, seq=work.seq, steps=steps, levers=plan.levers.to_dict(), timeout_s=1800
        )


def _row(
    parent: Any, salience: Any, text: str, work: Workload, args: argparse.Namespace, *, device: bool
) -> dict[str, Any]:
    """Plan one budget and measure the plan in a fresh process."""
    budget = parse_size(text)
    allowance = budget - TRAINING_RUNTIME_BYTES if device else budget
    policy = LeverPolicy() if device else LeverPolicy(lora_ranks=tuple(args.ranks))
    plan = plan_training(parent, salience, allowance, work, runtime=0, policy=policy)
    measured = _measure(parent, plan, work, args.steps)
    runtime, peak = int(measured["runtime_rss_bytes"]), int(measured["peak_rss_bytes"])
    predicted = training_estimate(plan.spec, plan.params, workload_for(parent, work), runtime, plan.levers).total
    within = peak <= budget if device else peak - runtime <= budget
    return {"batch": work.batch, "budget": budget, "budget_text": f"{text}{' dev' if device else ''}",
            "levers": plan.levers.describe(), "params": plan.params, "params_fraction": plan.params_fraction,
            "predicted_peak": predicted, "measured_peak": peak, "runtime": runtime,
            "error": (predicted - peak) / peak, "within_budget": within, "load_avg_1m": os.getloadavg()[0]}  # fmt: skip


def section_training(args: argparse.Namespace) -> dict[str, Any]:
    """Plan the budgets' training of SmolLM2-135M and measure each plan in a fresh process."""
    parent = load_parent(resolve_model_dir("SmolLM2-135M"), task="causal-lm")
    parent, salience, _ = reorder(parent, weight_l1(parent))
    rows = [_row(parent, salience, text, Workload(args.batch, args.seq), args, device=False) for text in args.budgets]
    device_work = Workload(args.device_batch, args.seq, steps=args.steps)
    rows += [_row(parent, salience, text, device_work, args, device=True) for text in args.device_budgets]
    return {"model": "SmolLM2-135M-Instruct", "seq": args.seq, "steps": args.steps, "rows": rows}


def print_training(doc: dict[str, Any]) -> None:
    print(
        f"{doc['model']} causal-LM training, sequence {doc['seq']}, {doc['steps']} AdamW steps, a fresh process "
        "per plan (baseline: the measured peak; 'dev': a device budget, runtime included, every lever)"
    )
    print(
        f"{'batch':>5} {'budget':>9} {'plan':<58} {'params':>12} {'predicted':>10} {'measured':>10} "
        f"{'error':>7}  within"
    )
    for r in doc["rows"]:
        params = f"{r['params'] / 1e6:.1f}M {r['params_fraction']:.0%}"
        print(
            f"{r['batch']:>5} {r['budget_text']:>9} {r['levers']:<58} {params:>12} "
            f"{format_bytes(r['predicted_peak']):>10} {format_bytes(r['measured_peak']):>10} {r['error']:>+7.1%}  "
            f"{'yes' if r['within_budget'] else 'NO'}"
        )
    print(f"(runtime footprints measured: {', '.join(format_bytes(r['runtime']) for r in doc['rows'])})")
