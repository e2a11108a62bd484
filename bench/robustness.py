"""Can one device of five hurt the federation? Three attacks against four aggregation rules on SST-2.

    python bench/robustness.py                        # 4 rules x (no attack + 3 attacks), seed 0
    python bench/robustness.py --rounds 2 --steps 2 --rules fedavg --no-docs      # a quick smoke run

The federation: all-MiniLM-L6-v2 fine-tuned on SST-2 by 5 simulated devices (Raspberry Pi 5 8 GB,
whose budget trains the whole model in plain fp32 AdamW), every device in every round, an IID split
of the 67,349 training rows (13,470 each), ``--rounds`` rounds x ``--steps`` local steps, batch 16,
rows truncated at 64 tokens, lr 1e-4; accuracy on the whole SST-2 dev split (872) after the last
round. Every task is trained for real through the SDK's task runner and the wire protocol.

One device (``raspberry-pi-5-8gb-03``) attacks through the same protocol ([attack] table,
``coordinator/simulation/_attack.py``):

- ``scaled_negated``: returns ``w - s d`` (``d`` its honest trained delta) with ``s`` chosen so that
  ``||s d|| = 0.45 ||w||``: just under an update-norm bound of 0.5 x the norm of what was sent (the
  strongest lie such a bound still accepts; today's bound, 2 ||w|| + 1 on the weights, accepts it too);
- ``huge_samples``: returns ``w - d`` and reports (and declares in its Hello) 10^6 samples;
- ``label_flip``: trains honestly on its shard with every label flipped (1 - y).

Rules (``[aggregation]``): ``fedavg`` (weighted mean, no clipping, no cap: plain FedAvg), ``default``
(no table: the coordinator's default rule), ``trimmed_mean`` and ``median`` (each alone: no clipping,
no cap). Each attacked run is compared with the same rule's run without an attacker: same seed, same
split, same draws, same local training of the honest devices (paired).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SST2 = ROOT.parent / "shared" / "data" / "sst2"  # full GLUE SST-2 (train.tsv, dev.tsv)

BATCH, SEQ, LR = 16, 64, 1e-4
ROUNDS, STEPS = 1, 5  # one round from --warm-start: what 2 shared cores allowed for 24 runs (docs/robustness.md)
TRAIN_LIMIT = 10_000  # the first rows of SST-2's training set: 2,000 a device (each trains on 80 a round)
DEVICE_CLASS, DEVICES = "raspberry-pi-5-8gb", 5
ATTACKER = f"{DEVICE_CLASS}-03"
NORM_FRACTION = 0.45  # the lie's delta norm / the norm of what was sent (a bound of 0.5 accepts it)
HUGE = 10**6
BAR = 2.0  # the bar: the default rule within 2 points of the run without an attacker

RULES: dict[str, dict[str, Any] | None] = {
    "fedavg": {"rule": "mean", "clip": "off", "weight_cap": 0.0},
    "default": None,  # no [aggregation] table
    "trimmed_mean": {"rule": "trimmed_mean", "clip": "off", "weight_cap": 0.0},
    "median": {"rule": "median", "clip": "off", "weight_cap": 0.0},
}
ATTACKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "scaled_negated": {"devices": [ATTACKER], "mode": "scaled_negated", "norm_fraction": NORM_FRACTION},
    "huge_samples": {"devices": [ATTACKER], "mode": "huge_samples", "num_samples": HUGE, "scale": 1.0},
    "label_flip": {"devices": [ATTACKER], "mode": "label_flip"},
}


def has_rules() -> bool:
    """True when the coordinator reads an [aggregation] table (robust aggregation is merged)."""
    try:
        import coordinator.federation._robust  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def warm_model(args: argparse.Namespace) -> str:
    """The ``[model] name`` every run starts from: MiniLM with a fresh head, or (``--warm-start FILE``)
    a model folder under ``--out`` holding MiniLM's config and tokenizer and the weights of FILE (a
    ``final.safetensors`` of ``bench/raffm_sst2.py --methods full-fedavg``: a federation that has
    already learnt SST-2, which the attacker then tries to break)."""
    if args.warm_start is None:
        return "all-MiniLM-L6-v2"
    from edge_sdk.scaling import resolve_model_dir

    source = Path(resolve_model_dir("all-MiniLM-L6-v2"))
    folder = args.out / "warm-model"
    done = folder / "model.safetensors"
    if done.is_file() and done.stat().st_size == args.warm_start.stat().st_size:
        return str(folder)  # (made by an earlier or concurrent run: not rewritten under its readers)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.update(architectures=["BertForSequenceClassification"], num_labels=2)
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    shutil.copyfile(args.warm_start, folder / "model.safetensors")
    return str(folder)


def federation(
    args: argparse.Namespace,
    seed: int,
    run_dir: Path,
    *,
    aggregation: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    attack: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The benchmark federation's simulation config (a dict of TOML tables)."""
    data: dict[str, Any] = {
        "model": {"name": args.model, "num_labels": 2, "seed": seed, "salience": "weight_l1"},
        "data": {
            "kind": "tsv",
            "train": str(args.data / "train.tsv"),
            "dev": str(args.data / "dev.tsv"),
            "dev_limit": args.dev_limit,
            "train_limit": args.train_limit,
            "partition": "iid",
        },
        "devices": {DEVICE_CLASS: DEVICES},
        "method": {"name": "fedavg", "width": "full", "reorder": False},
        "levers": {"enabled": False},  # plain fp32 AdamW on the whole model
        "federation": {"rounds": args.rounds, "fraction": 1.0, "min_devices": DEVICES, "round_deadline_s": 3600},
        "training": {"local_steps": args.steps, "lr": LR, "batch_size": BATCH, "seq_len": SEQ},
        "simulation": {"engine": "local", "max_workers": args.workers, "threads": 1},
        "run": {"dir": str(run_dir)},
    }
    if aggregation is not None and (has_rules() or aggregation != RULES["fedavg"]):
        data["aggregation"] = dict(aggregation)  # (before robust aggregation: FedAvg is the only rule)
    if privacy is not None:
        data["privacy"] = dict(privacy)
    if attack is not None:
        data["attack"] = dict(attack)
    return data


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run read back from its folder."""

    rounds: list[dict[str, Any]]
    wall_s: float
    start: float = float("nan")  # accuracy of the model the run started from

    @property
    def final(self) -> float:
        return float(self.rounds[-1]["accuracy"])

    @property
    def late(self) -> float:
        """Accuracy averaged over the last quarter of the rounds (steadier than the last round)."""
        quarter = max(1, len(self.rounds) // 4)
        return float(np.mean([r["accuracy"] for r in self.rounds[-quarter:]]))

    def merge_notes(self, device: str) -> list[str]:
        """What the merge did to the device's updates (e.g. ``clipped x0.013``, ``weight capped to 4000``)."""
        notes = []
        for record in self.rounds:
            merge = record.get("merge", {})
            if device in merge.get("clipped", {}):
                notes.append(f"clipped x{merge['clipped'][device]:.3g}")
            if device in merge.get("capped", {}):
                notes.append(f"weight capped to {merge['capped'][device]:g}")
        return notes

    def status(self, device: str) -> str:
        """How the device's updates fared over the run, e.g. ``ok x8`` or ``ok x2, failed x6``."""
        seen: dict[str, int] = {}
        for record in self.rounds:
            for d in record["devices"]:
                if d["device_id"] == device:
                    seen[d["status"]] = seen.get(d["status"], 0) + 1
        return ", ".join(f"{s} x{n}" for s, n in sorted(seen.items()))


def load_run(folder: Path) -> Run:
    summary = json.loads((folder / "simulation.json").read_text(encoding="utf-8"))
    rounds = [json.loads(f.read_text(encoding="utf-8")) for f in sorted((folder / "rounds").glob("*.json"))]
    return Run(rounds, float(summary["wall_s"]), float(summary["start_metrics"].get("accuracy", "nan")))


def run_cells(args: argparse.Namespace, cells: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Run each (folder name, config dict) not already finished under ``args.out``, sharing one worker pool."""
    from coordinator.simulation._config import parse_simulation_config
    from coordinator.simulation._executor import make_executor
    from coordinator.simulation._run import run_simulation

    log = logging.getLogger("bench")
    executor = make_executor("local", max_workers=args.workers, threads=1)
    try:
        for name, data in cells:
            folder = args.out / name
            if (folder / "simulation.json").exists():
                log.info("%s: already run", name)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            started = time.monotonic()
            config = parse_simulation_config(data, base=ROOT, where=name)
            result = run_simulation(config, executor=executor, run_dir=folder)
            log.info(
                "%s: final accuracy %.4f (%.1f min)", name, result.final_accuracy, (time.monotonic() - started) / 60
            )
    finally:
        executor.close()


def cell_name(seed: int, rule: str, attack: str) -> str:
    return f"seed{seed}/{rule}/{attack}"


def seeds_of(args: argparse.Namespace, rule: str) -> list[int]:
    """The seeds whose runs of ``rule`` are all there (every attack and the no-attack run)."""
    return [s for s in args.seeds if all(finished(args.out / cell_name(s, rule, a)) for a in args.attacks)]


def finished(folder: Path) -> bool:
    return (folder / "simulation.json").exists()


def table(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The results table (accuracy and paired difference to the rule's no-attack run) and the verdict."""
    rows = [
        "| rule | attack | final accuracy %, mean (per seed) | vs no attack, paired points, mean (per seed)"
        " | the attacker's updates: status; what the merge did to them |",
        "| --- | --- | --- | --- | --- |",
    ]
    verdict: list[str] = []
    for rule in args.rules:
        seeds = seeds_of(args, rule)
        if not seeds:
            continue
        clean = {s: load_run(args.out / cell_name(s, rule, "none")) for s in seeds}
        for attack in args.attacks:
            runs = {s: load_run(args.out / cell_name(s, rule, attack)) for s in seeds}
            diffs = [100 * (runs[s].final - clean[s].final) for s in seeds]
            finals = ", ".join(f"{100 * runs[s].final:.2f}" for s in seeds)
            status = "; ".join(runs[s].status(ATTACKER) for s in seeds) if attack != "none" else "-"
            notes = sorted({n for s in seeds for n in runs[s].merge_notes(ATTACKER)})
            rows.append(
                f"| {rule} | {attack} | {np.mean([runs[s].final for s in seeds]) * 100:.2f} ({finals})"
                f" | {_pm(diffs) if attack != 'none' else '-'} | {status}{'; ' + ', '.join(notes) if notes else ''} |"
            )
            if rule == "default" and attack != "none":
                gap = float(np.mean(diffs))
                verdict.append(
                    f"- default rule, {attack}: {gap:+.2f} points against no attack (per seed"
                    f" {', '.join(f'{d:+.2f}' for d in diffs)}): {'not' if gap >= -BAR else 'MORE than'} {BAR:g}"
                    f" points worse; |difference| {'<=' if abs(gap) <= BAR else '>'} {BAR:g}."
                )
    firsts = [args.out / cell_name(s, r, "none") for s in args.seeds for r in args.rules]
    starts = sorted({f"{100 * load_run(f).start:.2f}" for f in firsts if finished(f)})
    verdict.insert(0, f"- accuracy of the model every run starts from: {', '.join(starts)} %.")
    return "\n".join(rows), verdict


def _pm(diffs: Sequence[float]) -> str:
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f}"
    return f"{np.mean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})"


def total_minutes(args: argparse.Namespace) -> float:
    folders = [args.out / cell_name(s, r, a) for s in args.seeds for r in args.rules for a in args.attacks]
    return sum(load_run(f).wall_s for f in folders if finished(f)) / 60


def write_block(doc: Path, marker: str, text: str) -> None:
    """Put ``text`` between ``<!-- MARKER:begin -->`` and ``<!-- MARKER:end -->`` in ``doc`` (appended
    under a "## Results" heading if the markers are not there yet)."""
    block = f"<!-- {marker}:begin (written by bench/{marker}.py) -->\n{text}\n<!-- {marker}:end -->"
    current = doc.read_text(encoding="utf-8") if doc.exists() else ""
    pattern = re.compile(rf"<!-- {marker}:begin.*?<!-- {marker}:end -->", re.S)
    if pattern.search(current):
        current = pattern.sub(lambda _m: block, current)
    else:
        current = current.rstrip("\n") + ("\n\n" if current else "") + "## Results\n\n" + block + "\n"
    doc.write_text(current, encoding="utf-8")


def common_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_SST2, help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--steps", type=int, default=STEPS, help="local steps per device per round")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=TRAIN_LIMIT, help="train on the first N rows (0: all)")
    p.add_argument("--dev-limit", type=int, default=0, help="score on the first N dev rows (0: all 872)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / out)
    p.add_argument(
        "--warm-start",
        type=Path,
        default=None,
        help="start every run from these weights (a final.safetensors of bench/raffm_sst2.py's full-fedavg)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not update the docs")
    p.add_argument("--from-runs", action="store_true", help="only render the figures from the runs in --out")


def quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("coordinator.federation", "coordinator.simulation", "edge_sdk", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, "bench-robustness")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    args = p.parse_args(argv)
    quiet_logs()
    args.model = warm_model(args)
    if "none" not in args.attacks:
        args.attacks = ["none", *args.attacks]
    if not has_rules() and set(args.rules) != {"fedavg"}:
        print("error: this coordinator has no [aggregation] rules yet: --rules fedavg only", file=sys.stderr)
        return 2
    if not args.from_runs:
        cells = [
            (
                cell_name(s, r, a),
                federation(args, s, args.out / cell_name(s, r, a), aggregation=RULES[r], attack=ATTACKS[a]),
            )
            for s in args.seeds
            for r in args.rules  # in the order given (fedavg and the default first)
            for a in args.attacks
        ]
        run_cells(args, cells)
    text, verdict = table(args)
    output = "\n".join([text, "", *verdict])
    print(output)
    print(f"\ntotal {total_minutes(args):.1f} min of runs; runs in {args.out}")
    if not args.no_docs:
        write_block(ROOT / "docs" / "robustness.md", "robustness", f"{setup(args)}\n\n{output}")
    return 0


def setup(args: argparse.Namespace) -> str:
    flags = [f"--rounds {args.rounds}", f"--steps {args.steps}", "--seeds " + " ".join(map(str, args.seeds))]
    flags += [f"--warm-start {args.warm_start}"] if args.warm_start else []
    dev = "the whole SST-2 dev split (872)" if not args.dev_limit else f"the first {args.dev_limit} dev rows"
    data = f"the first {args.train_limit:,} rows of" if args.train_limit else "all of"
    start = (
        f"every run starts from `{args.warm_start}`" if args.warm_start else "every run starts from MiniLM, fresh head"
    )
    return (
        f"Reproduce: `python bench/robustness.py {' '.join(flags)}` (from the repository root).\n\n"
        f"Setup: {DEVICES} x {DEVICE_CLASS} (the whole model, plain fp32 AdamW), all in every round, IID split"
        f" of {data} SST-2's training set, {args.rounds} round(s) x {args.steps} local steps, batch {BATCH}, rows"
        f" truncated at {SEQ} tokens, lr {LR:g}, seeds {', '.join(map(str, args.seeds))}; {start}; accuracy on"
        f" {dev} after the last round. Attacker: {ATTACKER}. Wall time of the runs on this machine (2 cores"
        f" shared with other work): {total_minutes(args):.1f} min."
    )


if __name__ == "__main__":
    sys.exit(main())
