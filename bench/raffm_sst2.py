"""RaFFM's central claim on this machine: budget-matched sub-networks train as well as the full model.

    python bench/raffm_sst2.py                      # ~20-40 min on 2 cores; writes docs/benchmark.md
    python bench/raffm_sst2.py --rounds 2 --steps 2 --no-docs    # a quick smoke run

all-MiniLM-L6-v2 on the full GLUE SST-2 (``--data DIR`` holding train.tsv, 67,349 rows, IID over
20 devices, and dev.tsv, 872 rows, scored after every round; label<TAB>sentence), 20 simulated
devices from mixed device classes, 5 per round, the same rounds, local steps, batch, sequence
length, learning rate and seed for every method:

1. ``full-fedavg``: every device trains the whole model, memory ignored (the paper's baseline);
2. ``raffm``: the largest sub-network whose training fits each device's budget, after salience
   reordering (ours);
3. ``raffm-no-reorder``: the same widths, sliced in index order (the paper's ablation);
4. ``static-ratio``: HeteroFL-style widths 1, 1/2, 1/4 assigned round-robin, whatever the device
   (on the reordered model, so that it differs from 2 by the width policy alone).

Budgets: MiniLM (22.7M parameters) is ~5x smaller than BERT-base, so unscaled, every device class
trains it whole at any workload that fits this machine's time. Each class's usable budget is scaled by
``BUDGET_SCALE`` (stated in the output): the smallest class then trains MiniLM's smallest sub-network
with a little room, so the budgets bind as BERT-base's would (most devices cannot train the full
model; the mean budget-matched device trains with at most 60 % of the full model's memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The full split is not shipped (examples/data/sst2 is a subset): the project's machines keep it here.
DEFAULT_SST2 = ROOT.parent / "shared" / "data" / "sst2"

BATCH, SEQ, LR = 16, 128, 1e-4
BUDGET_SCALE = 0.45
DEVICES = {
    "raspberry-pi-4-2gb": 17,
    "jetson-nano-4gb": 1,
    "raspberry-pi-5-4gb": 1,
    "jetson-orin-nano-8gb": 1,
}
METHODS: dict[str, dict[str, Any]] = {
    "full-fedavg": {"width": "full", "reorder": False},
    "raffm": {"width": "budget", "reorder": True},
    "raffm-no-reorder": {"width": "budget", "reorder": False},
    "static-ratio": {"width": "static", "reorder": True, "ratios": [1.0, 0.5, 0.25]},
}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": {"name": "all-MiniLM-L6-v2", "num_labels": 2, "seed": args.seed, "salience": "weight_l1"},
        "data": {
            "kind": "tsv",
            "train": str(args.data / "train.tsv"),
            "dev": str(args.data / "dev.tsv"),
            "partition": "iid",
        },
        "devices": DEVICES,
        "federation": {"rounds": args.rounds, "fraction": 0.25, "min_devices": 5, "round_deadline_s": 1800,
                       # a class budget already keeps its own 10 % margin (>= 128 MiB): no further reserve
                       "min_margin": "128MiB"},
        "training": {"local_steps": args.steps, "lr": LR, "batch_size": BATCH, "seq_len": SEQ},
        "simulation": {"engine": args.engine, "max_workers": args.workers, "threads": 1,
                       "budget_scale": args.budget_scale},
        "run": {"dir": str(args.out)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="local steps per device per round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-scale", type=float, default=BUDGET_SCALE, help="x every class's usable budget")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--data", type=Path, default=DEFAULT_SST2, help="folder of the full SST-2 train.tsv and dev.tsv")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-raffm-sst2")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmark.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("coordinator.federation", "edge_sdk.training._runner", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("train.tsv", "dev.tsv"):
        if not (args.data / name).is_file():
            print(f"error: {args.data / name} is missing: the benchmark trains on the full GLUE SST-2; "
                  "--data names its folder (train.tsv and dev.tsv, label<TAB>sentence)", file=sys.stderr)
            return 2

    from coordinator.simulation._config import MethodConfig, parse_simulation_config
    from coordinator.simulation._executor import make_executor
    from coordinator.simulation._report import markdown_table, summarize, write_report
    from coordinator.simulation._run import run_simulation

    if args.out.exists():
        shutil.rmtree(args.out)
    config = parse_simulation_config(base_config(args), base=ROOT, where="bench")
    started = time.monotonic()
    executor = make_executor(args.engine, max_workers=args.workers, threads=1)
    results = []
    try:
        for name in args.methods:
            method = MethodConfig(name=name, **{k: tuple(v) if k == "ratios" else v
                                                for k, v in METHODS[name].items()})
            cfg = dataclasses.replace(config, method=method)
            logging.getLogger("bench").info("method %s: %s", name, method)
            results.append(run_simulation(cfg, executor=executor, run_dir=args.out / name))
    finally:
        executor.close()
    total = time.monotonic() - started
    summaries = [summarize(r) for r in results]
    notes = setup_text(args, results, total)
    report = write_report(results, args.out, title="RaFFM on SST-2: all-MiniLM-L6-v2, 20 simulated devices",
                          notes=notes)
    table = markdown_table(summaries)
    print(table)
    print(f"\ntotal {total / 60:.1f} min; report {report}")
    if not args.no_docs:
        write_docs(table, notes, args, args.out / "accuracy.png")
    return 0


def setup_text(args: argparse.Namespace, results: list[Any], total_s: float) -> str:
    first = results[0]
    devices = ", ".join(f"{n} x {c}" for c, n in DEVICES.items())
    raffm = next((r for r in results if r.method == "raffm"), None)
    lines = [
        f"Setup: {sum(DEVICES.values())} devices ({devices}), IID shards of SST-2 train (67,349 rows), "
        f"5 devices per round, {args.rounds} rounds x {args.steps} local AdamW steps, batch {BATCH}, "
        f"sequence {SEQ}, lr {LR:g}, FedAvg (server lr 1), seed {args.seed}; the global model is scored on "
        f"the whole SST-2 dev split (872) after every round. Budgets: each device class's usable training "
        f"budget (profiles/, runtime 415 MB and safety margin taken off) x **{args.budget_scale}** (budget scale, "
        "see below). Memory is simulated: the planner uses these budgets; the host does not enforce them. "
        f"Total wall time of the {len(results)} runs on this machine: **{total_s / 60:.1f} min**.",
    ]
    if raffm is not None:
        s = next(x for x in (summaries_of(results)) if x.method == "raffm")
        lines.append(
            f"Method raffm: mean device training memory {s.mean_predicted_bytes / 1e6:.0f} MB = "
            f"{100 * s.mean_predicted_fraction:.1f} % of the full model's {s.full_predicted_bytes / 1e6:.0f} MB; "
            f"{s.devices - s.full_model_devices} of {s.devices} devices cannot train the full model."
        )
    runs = first.run_dir.parent
    lines.append(f"Runs: {runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs}")
    return "\n\n".join(lines)


def summaries_of(results: list[Any]) -> list[Any]:
    from coordinator.simulation._report import summarize

    return [summarize(r) for r in results]


def write_docs(table: str, notes: str, args: argparse.Namespace, accuracy_png: Path) -> None:
    docs = ROOT / "docs"
    shutil.copyfile(accuracy_png, docs / "benchmark-accuracy.png")
    command = "python bench/raffm_sst2.py" + (f" --data {args.data}" if args.data != DEFAULT_SST2 else "") + (
        f" --rounds {args.rounds} --steps {args.steps}" if (args.rounds, args.steps) != (8, 5) else ""
    ) + (f" --budget-scale {args.budget_scale}" if args.budget_scale != BUDGET_SCALE else "")
    block = "\n".join([
        "<!-- bench:begin (written by bench/raffm_sst2.py) -->",
        f"Reproduce: `{command}` (from the repository root; needs the full GLUE SST-2 train.tsv and"
        " dev.tsv, `--data DIR`).",
        "",
        notes,
        "",
        table,
        "",
        "![accuracy by round](benchmark-accuracy.png)",
        "<!-- bench:end -->",
    ])
    path = docs / "benchmark.md"
    empty = "# Benchmark: RaFFM on SST-2\n\n<!-- bench:begin -->\n<!-- bench:end -->\n"
    text = path.read_text(encoding="utf-8") if path.exists() else empty
    pattern = re.compile(r"<!-- bench:begin.*?<!-- bench:end -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
