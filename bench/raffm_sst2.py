"""Does every device's work count? Five ways to federate 20 memory-bound devices on SST-2.

    python bench/raffm_sst2.py                                  # 3 seeds x 5 methods; writes docs/benchmark.md
    python bench/raffm_sst2.py --seeds 0 --rounds 2 --steps 2 --no-docs     # a quick smoke run

all-MiniLM-L6-v2 fine-tuned on SST-2 (train: 67,349 rows; scored on the whole dev split, 872 rows,
after every round) by 20 simulated devices, 5 drawn per round, each task trained for real through
the SDK's task runner and the wire protocol. Every method uses the same rounds, local steps, batch,
learning rate, maximum length (64: rows are truncated there, batches padded to their longest row)
and seeds; a seed fixes the classifier head's initialisation, the data split, the device draws and
local training, so the methods are compared seed by seed (paired differences).

Methods:

1. ``full-fedavg``: every drawn device trains the whole model in plain fp32 AdamW, memory ignored
   (what a memory-blind peer would ask of them);
2. ``exclusive``: only the devices that can train the whole model in plain fp32 AdamW take part;
3. ``width-only``: each device trains the largest sub-network whose plain training fits its budget
   (RaFFM as the paper does it);
4. ``levers-then-width``: each device's planner tries the levers that cost no accuracy (micro-batches,
   activation checkpointing, training only the embedding rows in use), then frozen embeddings and
   LoRA, and cuts width only when none fits (ours);
5. ``static-heterofl``: HeteroFL's fixed width ratios 1, 1/2, 1/4 dealt to the devices, whatever
   their memory.

The split: examples are placed by label with probability ``--skew`` and at random otherwise, then
cut in device order (large devices first). The three devices that can train the full model in plain
training hold mostly negative reviews; the seventeen Raspberry Pi 4 2 GB hold most of the positive
ones. Leaving the small devices out (method 2) then costs accuracy, which is the control that keeps
a trivial win from passing: on an IID split, the large devices alone could match full FedAvg.

Budgets: MiniLM is about five times smaller than BERT-base, so unscaled every device class trains it
whole. Each class's usable budget is multiplied by ``--budget-scale`` so that, as with BERT-base,
most devices cannot train the full model in plain training. The budgets are simulated: the planner
uses them, the host does not hold the worker processes to them; each task's measured peak (its
process's resident high-water mark less the worker's resident set before the task) is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SST2 = ROOT.parent / "shared" / "data" / "sst2"  # full GLUE SST-2 (train.tsv, dev.tsv); --data elsewhere

BATCH, SEQ, LR = 16, 64, 1e-4
ROUNDS, STEPS = 14, 5
SKEW = 0.8
PROBE_STEPS = 3  # fresh-process steps per distinct plan (measured memory)
# Large devices first: the label-sorted split gives them the first label's examples.
DEVICES = {
    "jetson-orin-nano-8gb": 1,
    "raspberry-pi-5-4gb": 1,
    "jetson-nano-4gb": 1,
    "raspberry-pi-4-2gb": 17,
}
METHODS: dict[str, dict[str, Any]] = {
    "full-fedavg": {"width": "full", "levers": False},
    "exclusive": {"width": "exclusive", "levers": False},
    "width-only": {"width": "budget", "levers": False},
    "levers-then-width": {"width": "budget", "levers": True},
    "static-heterofl": {"width": "static", "levers": False, "ratios": (1.0, 0.5, 0.25)},
}
BASELINE, CONTROL, OURS = "full-fedavg", "exclusive", "levers-then-width"
SKEWED = 3  # the devices listed before the Raspberry Pi 4 2 GB: the ones that can train MiniLM plainly


def pressure_scale() -> float:
    """The budget scale that puts MiniLM under the memory pressure BERT-base puts on the same devices.

    The memory model's plain fp32 AdamW training bytes (batch 16 x 64, runtime excluded) of MiniLM
    divided by BERT-base's: every device's budget then relates to MiniLM's need as the unscaled budget
    relates to BERT-base's (a Raspberry Pi 4 2 GB: about half of what plain training needs).
    """
    import torch
    import transformers

    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._memory import Workload, training_estimate
    from edge_sdk.scaling._parent import parent_from_module
    from edge_sdk.scaling._ranked import ranked_parent
    from edge_sdk.scaling._search import param_count

    work = Workload(BATCH, SEQ, steps=STEPS, vocab=30522)

    def plain(parent: Any) -> int:
        spec = SubnetSpec.full(parent.dims)
        return training_estimate(spec, param_count(parent, spec), work, runtime=0).total

    with torch.device("meta"):
        bert_base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    minilm, _ = ranked_parent("all-MiniLM-L6-v2", reordered=False)
    return round(plain(minilm) / plain(parent_from_module(bert_base)), 3)


def base_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "model": {"name": "all-MiniLM-L6-v2", "num_labels": 2, "seed": seed, "salience": "weight_l1"},
        "data": {
            "kind": "tsv",
            "train": str(args.data / "train.tsv"),
            "dev": str(args.data / "dev.tsv"),
            "partition": "sorted",
            "skew": args.skew,
            "skewed_devices": SKEWED,
        },
        "devices": DEVICES,
        # min_devices 1: under "exclusive" only the three large devices are ever admitted
        "federation": {
            "rounds": args.rounds,
            "fraction": 0.25,
            "min_devices": 1,
            "round_deadline_s": 3600,
            # a class budget already keeps its own 10 % margin (>= 128 MiB): no further reserve
            "min_margin": "128MiB",
        },
        "training": {"local_steps": args.steps, "lr": LR, "batch_size": BATCH, "seq_len": SEQ},
        # The merge these figures were measured with (docs/benchmark.md): FedAvg's weighted mean per
        # coordinate, no clipping, no cap; the coordinator's default has since become robust.
        "aggregation": {"rule": "mean", "clip": "off", "weight_cap": 0},
        "simulation": {
            "engine": args.engine,
            "max_workers": args.workers,
            "threads": 1,
            "budget_scale": args.budget_scale,
        },
        "run": {"dir": str(args.out)},
    }


def method_config(config: Any, name: str) -> Any:
    from coordinator.simulation._config import MethodConfig
    from edge_sdk.scaling import LeverPolicy

    spec = METHODS[name]
    fields = {k: v for k, v in spec.items() if k != "levers"}
    return dataclasses.replace(
        config,
        method=MethodConfig(name=name, reorder=True, **fields),
        levers=LeverPolicy() if spec["levers"] else LeverPolicy.plain(),
    )


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished run read back from its folder (``simulation.json`` and ``rounds/``)."""

    rounds: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    start_metrics: dict[str, float]
    wall_s: float

    @property
    def final_accuracy(self) -> float:
        return float(self.rounds[-1]["accuracy"])


def load_runs(args: argparse.Namespace) -> dict[str, dict[int, Any]]:
    """``results[method][seed]`` read from ``args.out`` (``--from-runs``: re-render without training)."""
    import json

    results: dict[str, dict[int, Any]] = {m: {} for m in args.methods}
    for name in args.methods:
        for seed in args.seeds:
            folder = args.out / f"seed{seed}" / name
            summary = json.loads((folder / "simulation.json").read_text(encoding="utf-8"))
            rounds = [json.loads(f.read_text(encoding="utf-8")) for f in sorted((folder / "rounds").glob("*.json"))]
            results[name][seed] = LoadedRun(rounds, summary["devices"], summary["start_metrics"], summary["wall_s"])
    return results


def run_all(args: argparse.Namespace) -> dict[str, dict[int, Any]]:
    """``results[method][seed]``: every method on every seed, sharing one pool of worker processes."""
    from coordinator.simulation._config import parse_simulation_config
    from coordinator.simulation._executor import make_executor
    from coordinator.simulation._run import run_simulation

    log = logging.getLogger("bench")
    results: dict[str, dict[int, Any]] = {m: {} for m in args.methods}
    executor = make_executor(args.engine, max_workers=args.workers, threads=1)
    try:
        for seed in args.seeds:
            config = parse_simulation_config(base_config(args, seed), base=ROOT, where="bench")
            for name in args.methods:
                started = time.monotonic()
                result = run_simulation(
                    method_config(config, name), executor=executor, run_dir=args.out / f"seed{seed}" / name
                )
                results[name][seed] = result
                log.info(
                    "seed %d %s: final accuracy %.4f (%.1f min)",
                    seed,
                    name,
                    result.final_accuracy,
                    (time.monotonic() - started) / 60,
                )
    finally:
        executor.close()
    return results


# --------------------------------------------------------------------------------------- figures


# ------------------------------------------------------------------------------- measured memory


def plan_key(task: Mapping[str, Any]) -> tuple[tuple[tuple[int, ...], ...], str]:
    return tuple(tuple(layer) for layer in task["layers"]), str(task["levers"])


@dataclasses.dataclass(frozen=True)
class Probe:
    predicted: int  # the memory model, runtime excluded
    measured: int  # a fresh process's peak RSS less its runtime (measured before the model is built)
    fraction: float  # parameters as a share of the full model's


def measure_plans(results: Mapping[str, Mapping[int, Any]], out: Path) -> dict[Any, Probe]:
    """Every distinct plan a task ran (width, levers), trained for PROBE_STEPS steps in a fresh process
    on batches of BATCH rows of SEQ random tokens (the longest rows a task can see)."""
    import json

    from safetensors.torch import save_file

    from edge_sdk._levers import Levers
    from edge_sdk._spec import LayerSpec, SubnetSpec
    from edge_sdk.scaling._extract import extract
    from edge_sdk.scaling._ranked import ranked_parent
    from edge_sdk.training._probe import run_probe

    tasks = [d for by_seed in results.values() for r in by_seed.values() for rnd in r.rounds for d in rnd["devices"]]
    first = {plan_key(d): d for d in reversed(tasks) if d["status"] == "ok"}
    parent, _ = ranked_parent("all-MiniLM-L6-v2", reordered=False)
    probes: dict[Any, Probe] = {}
    for i, (key, task) in enumerate(sorted(first.items())):
        spec = SubnetSpec(parent=parent.dims, layers=tuple(LayerSpec(*layer) for layer in key[0]))
        folder = out / "probes" / f"plan-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").write_text(spec.to_json())
        (folder / "config.json").write_text(json.dumps(dict(parent.config)))
        save_file(extract(parent, spec), str(folder / "weights.safetensors"))
        result = run_probe(folder, batch=BATCH, seq=SEQ, steps=PROBE_STEPS, levers=Levers.parse(key[1]).to_dict())
        measured = int(result["peak_rss_bytes"]) - int(result["runtime_rss_bytes"])
        probe = probes[key] = Probe(int(task["predicted_bytes"]), measured, float(task["params_fraction"]))
        logging.getLogger("bench").info(
            "plan %s (%.0f %% of the parameters): predicted %.0f MB, measured %.0f MB",
            key[1], 100 * probe.fraction, probe.predicted / 1e6, measured / 1e6,
        )  # fmt: skip
    return probes


def probe_table(probes: Mapping[Any, Probe]) -> str:
    rows = [
        "| plan: levers | parameters | training memory predicted | measured (fresh process) | error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, p in sorted(probes.items(), key=lambda kv: -kv[1].predicted):
        rows.append(
            f"| {key[1]} | {100 * p.fraction:.0f} % | {p.predicted / 1e6:.0f} MB | {p.measured / 1e6:.0f} MB"
            f" | {100 * (p.predicted - p.measured) / p.measured:+.1f} % |"
        )
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class MethodFigures:
    method: str
    final: dict[int, float]  # seed -> final accuracy
    curve: list[float]  # mean accuracy by round over seeds (round 0 first)
    predicted_mean: float  # device training memory (runtime excluded), mean over admitted devices and seeds
    predicted_min: float
    measured_mean: float  # measured task peaks (ok tasks), mean over tasks and seeds
    measured_min: float
    devices: float  # devices admitted (mean over seeds)
    compute_s: float  # local training seconds per device per round (mean over ok tasks)
    mb: float  # MB per device per round, both ways (mean over tasks)
    full_width_share: float  # share of admitted devices that train the full width
    late: dict[int, float]  # seed -> accuracy averaged over the last quarter of rounds

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.final.values())))


def figures(name: str, by_seed: Mapping[int, Any], probes: Mapping[Any, Probe]) -> MethodFigures:
    quarter = max(1, len(next(iter(by_seed.values())).rounds) // 4)
    late = {s: float(np.mean([x["accuracy"] for x in r.rounds[-quarter:]])) for s, r in by_seed.items()}
    admitted = [d for r in by_seed.values() for d in r.devices if d.get("admitted")]
    tasks = [d for r in by_seed.values() for rnd in r.rounds for d in rnd["devices"]]
    ran = [d for d in tasks if d["status"] == "ok"]
    measured = [float(probes[plan_key(d)].measured) for d in ran]
    curves = [
        [r.start_metrics.get("accuracy", math.nan)] + [float(x["accuracy"]) for x in r.rounds] for r in by_seed.values()
    ]
    predicted = [float(d["predicted_bytes"]) for d in ran]
    return MethodFigures(
        method=name,
        final={seed: float(r.final_accuracy) for seed, r in by_seed.items()},
        curve=[float(np.mean(col)) for col in zip(*curves, strict=True)],
        predicted_mean=float(np.mean(predicted)) if predicted else math.nan,
        predicted_min=float(np.min(predicted)) if predicted else math.nan,
        measured_mean=float(np.mean(measured)) if measured else math.nan,
        measured_min=float(np.min(measured)) if measured else math.nan,
        devices=len(admitted) / max(1, len(by_seed)),
        compute_s=float(np.mean([d["train_time_s"] for d in ran])) if ran else math.nan,
        mb=float(np.mean([(d["bytes_out"] + d["bytes_in"]) / 1e6 for d in tasks])) if tasks else math.nan,
        full_width_share=float(np.mean([d.get("params_fraction") == 1.0 for d in admitted])) if admitted else 0.0,
        late=late,
    )


def paired(a: MethodFigures, b: MethodFigures) -> list[float]:
    """Per-seed differences a - b, in accuracy points."""
    return [100 * (a.final[s] - b.final[s]) for s in sorted(a.final) if s in b.final]


def _pm(diffs: Sequence[float]) -> str:
    if not diffs:
        return "n/a"
    return f"{np.mean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})"


def table(figs: Sequence[MethodFigures]) -> str:
    by = {f.method: f for f in figs}
    base = by.get(BASELINE)
    control = by.get(CONTROL)
    rows = [
        "| method | accuracy %, mean (per seed) | last quarter of rounds, mean (per seed)"
        " | vs full-fedavg, paired (per seed) | vs exclusive, paired"
        " | train memory predicted, mean / min (% of full-fedavg's mean) | measured, mean / min (%)"
        " | devices admitted | train the full width | local compute s / device / round | MB / device / round |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for f in figs:
        per_seed = ", ".join(f"{100 * f.final[s]:.2f}" for s in sorted(f.final))
        vs_base = _pm(paired(f, base)) if base and f is not base else "-"
        vs_control = _pm(paired(f, control)) if control and f is not control else "-"
        mem = _share(f.predicted_mean, f.predicted_min, base.predicted_mean if base else math.nan)
        meas = _share(f.measured_mean, f.measured_min, base.measured_mean if base else math.nan)
        late = ", ".join(f"{100 * f.late[s]:.2f}" for s in sorted(f.late))
        rows.append(
            f"| {f.method} | {100 * f.mean:.2f} ({per_seed}) | {100 * np.mean(list(f.late.values())):.2f} ({late})"
            f" | {vs_base} | {vs_control} | {mem} | {meas} |"
            f" {f.devices:.0f} | {100 * f.full_width_share:.0f} % | {f.compute_s:.1f} | {f.mb:.1f} |"
        )
    return "\n".join(rows)


def _share(mean: float, low: float, base: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean / 1e6:.0f} / {low / 1e6:.0f} MB ({100 * mean / base:.0f} % / {100 * low / base:.0f} %)"


def verdict(figs: Sequence[MethodFigures]) -> list[str]:
    """The issue's three conditions, each measured and stated as met or not."""
    by = {f.method: f for f in figs}
    if not {BASELINE, CONTROL, OURS} <= set(by):
        return ["(the verdict needs full-fedavg, exclusive and levers-then-width)"]
    ours, base, control = by[OURS], by[BASELINE], by[CONTROL]
    gap = 100 * (ours.mean - base.mean)
    ahead = paired(ours, control)
    spread = (max(ahead) - min(ahead)) if len(ahead) > 1 else math.nan
    mem = ours.predicted_mean / base.predicted_mean
    meas = ours.measured_mean / base.measured_mean
    quarter = max(1, (len(base.curve) - 1) // 4)
    plateau = 100 * (base.curve[-1] - base.curve[-1 - quarter])
    return [
        f"- {OURS} vs {BASELINE}: {gap:+.2f} points on the mean over seeds"
        f" ({'within' if abs(gap) <= 1.0 else 'NOT within'} 1.0 point).",
        f"- {OURS} vs {CONTROL}: {np.mean(ahead):+.2f} points on the mean, paired differences from"
        f" {min(ahead):+.2f} to {max(ahead):+.2f} (spread {spread:.2f});"
        f" {'ahead by more than the spread' if np.mean(ahead) > spread else 'NOT ahead by more than the spread'}.",
        f"- {OURS}'s mean device training memory: {100 * mem:.0f} % of {BASELINE}'s predicted, {100 * meas:.0f} %"
        f" measured ({'at most' if max(mem, meas) <= 0.60 else 'NOT at most'} 60 %).",
        f"- {BASELINE} gained {plateau:+.2f} points over its last {quarter} round(s) (mean curve; plateau means"
        f" under 0.5), ending at {100 * base.curve[-1]:.2f} %.",
    ]


def plot(figs: Sequence[MethodFigures], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for f in figs:
        ax.plot(range(len(f.curve)), [100 * y for y in f.curve], marker="o", markersize=3, label=f.method)
    ax.set_xlabel("round")
    ax.set_ylabel("SST-2 dev accuracy (%), mean over seeds")
    ax.set_title("Global model accuracy by round")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_SST2, help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--steps", type=int, default=STEPS, help="local steps per device per round")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument(
        "--budget-scale",
        type=float,
        default=None,
        help="x every class's usable budget (default: MiniLM's plain training need / BERT-base's)",
    )
    p.add_argument("--skew", type=float, default=SKEW, help="share of examples placed by label (0: IID)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-raffm-sst2")
    p.add_argument("--no-docs", action="store_true", help="do not update docs/benchmark.md")
    p.add_argument("--from-runs", action="store_true", help="re-render the figures from the runs in --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("coordinator.federation", "coordinator.simulation", "edge_sdk", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("train.tsv", "dev.tsv"):
        if not (args.data / name).is_file():
            print(
                f"error: {args.data / name} is missing: the benchmark trains on the full GLUE SST-2"
                " (train.tsv and dev.tsv, label<TAB>sentence); give its folder with --data",
                file=sys.stderr,
            )
            return 2
    if args.out.exists() and not args.from_runs:
        shutil.rmtree(args.out)
    started = time.monotonic()
    args.default_scale = pressure_scale()
    if args.budget_scale is None:
        args.budget_scale = args.default_scale
    logging.getLogger("bench").info("budget scale %.3f", args.budget_scale)
    results = load_runs(args) if args.from_runs else run_all(args)
    probes = measure_plans(results, args.out)
    total = time.monotonic() - started
    if args.from_runs:  # the runs' own wall time, plus this re-render's probes
        total += sum(r.wall_s for by_seed in results.values() for r in by_seed.values())
    figs = [figures(m, results[m], probes) for m in args.methods]
    text = "\n".join([table(figs), "", *verdict(figs), "", probe_table(probes)])
    png = plot(figs, args.out / "accuracy.png")
    print(text)
    print(f"\ntotal {total / 60:.1f} min on this machine; runs in {args.out}")
    if not args.no_docs:
        write_docs(text, args, total, png)
    return 0


def setup_text(args: argparse.Namespace, total_s: float) -> str:
    devices = ", ".join(f"{n} x {c}" for c, n in DEVICES.items())
    return (
        f"Setup: {sum(DEVICES.values())} devices ({devices}), SST-2 train split by label with skew"
        f" {args.skew} (the large devices hold mostly negative reviews), 5 devices drawn per round,"
        f" {args.rounds} rounds x {args.steps} local AdamW steps, batch {BATCH}, rows truncated at {SEQ} tokens"
        f" and batches padded to their longest row, lr {LR:g}, FedAvg, seeds {', '.join(map(str, args.seeds))};"
        f" accuracy on the whole SST-2 dev split (872) after the last round. Budgets: each device class's"
        f" usable training budget x **{args.budget_scale}** (simulated). Total wall time on this machine (2 cores):"
        f" **{total_s / 60:.1f} min**."
    )


def command(args: argparse.Namespace) -> str:
    parts = ["python bench/raffm_sst2.py"]
    if args.data != DEFAULT_SST2:
        parts.append(f"--data {args.data}")
    for flag, value, default in (
        ("--rounds", args.rounds, ROUNDS),
        ("--steps", args.steps, STEPS),
        ("--budget-scale", args.budget_scale, args.default_scale),
        ("--skew", args.skew, SKEW),
    ):
        if value != default:
            parts.append(f"{flag} {value}")
    if args.seeds != [0, 1, 2]:
        parts.append("--seeds " + " ".join(map(str, args.seeds)))
    return " ".join(parts)


def write_docs(text: str, args: argparse.Namespace, total_s: float, png: Path) -> None:
    docs = ROOT / "docs"
    shutil.copyfile(png, docs / "benchmark-accuracy.png")
    block = "\n".join(
        [
            "<!-- bench:begin (written by bench/raffm_sst2.py) -->",
            f"Reproduce: `{command(args)}` (from the repository root; needs the full GLUE SST-2 train.tsv and"
            " dev.tsv: `--data DIR`).",
            "",
            setup_text(args, total_s),
            "",
            text,
            "",
            "![accuracy by round](benchmark-accuracy.png)",
            "<!-- bench:end -->",
        ]
    )
    path = docs / "benchmark.md"
    empty = "# Benchmark: does every device's work count?\n\n<!-- bench:begin -->\n<!-- bench:end -->\n"
    current = path.read_text(encoding="utf-8") if path.exists() else empty
    pattern = re.compile(r"<!-- bench:begin.*?<!-- bench:end -->", re.S)
    current = pattern.sub(lambda _m: block, current) if pattern.search(current) else current + "\n" + block + "\n"
    path.write_text(current, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
