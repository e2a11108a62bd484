"""What each update encoding costs on the wire and in accuracy: MiniLM federated on SST-2, simulated.

    python bench/updates.py                    # bytes of every encoding; runs of weights and int8+zstd, 4 seeds
    python bench/updates.py --bytes-only       # the bytes table only (one device's training, ~2 min)
    python bench/updates.py --encodings weights fp16 int8 --seeds 0 1   # runs of other encodings

all-MiniLM-L6-v2 fine-tuned by simulated devices on the vendored SST-2 subset (examples/data/sst2:
4,000 training rows, scored on the whole dev split, 872 rows, after every round). Every device
trains the whole model in plain fp32 AdamW (``width = "full"``, no levers), so what it sends back is
the full model: the figures compare like with like. Each encoding runs on the same seeds (the head's
initialisation, the data split, the device draws and local training): only the update encoding
differs, so the accuracy differences are the encodings' own.

Encodings (``[federation] update_encoding``): ``weights`` (plain fp32 weights, what a device without
the encodings capability sends: the reference), and ``fp32``, ``fp16``, ``int8`` (per row, fp32
scales), each with or without ``+zstd``: deltas against the weights the device received.

Printed per encoding: bytes a device sends per round (the Update and its chunk frames, as the
coordinator counted them), as a ratio to the full model's fp32 bytes (parameters x 4), the final
accuracy per seed and its paired difference from ``weights``. Done when the default encoding sends at
most 0.3x and costs at most 0.3 points of accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("weights", "fp32", "fp32+zstd", "fp16", "fp16+zstd", "int8", "int8+zstd")
BATCH, SEQ, LR = 16, 64, 5e-4  # 5e-4: two short rounds move the model off chance on most seeds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encodings", nargs="+", default=["weights", "int8+zstd"], choices=ENCODINGS, help="runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="local steps per task")
    p.add_argument("--lr", type=float, default=LR, help="local learning rate")
    p.add_argument("--devices", type=int, default=2, help="devices, every one in every round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard", type=int, default=500, help="training rows of the device whose update is measured")
    p.add_argument("--bytes-only", action="store_true", help="measure the bytes only (no simulated runs)")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "sst2")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-updates")
    p.add_argument("--default", default="int8+zstd", help="the encoding the done-when criterion is checked on")
    return p.parse_args(argv)


def sim_config(args: argparse.Namespace, seed: int, encoding: str) -> dict[str, Any]:
    return {
        "model": {"name": "all-MiniLM-L6-v2", "num_labels": 2, "seed": seed, "salience": "weight_l1"},
        "data": {"kind": "tsv", "train": str(args.data / "train.tsv"), "dev": str(args.data / "dev.tsv")},
        "devices": {"raspberry-pi-5-8gb": args.devices},
        "method": {"name": "full", "width": "full"},
        "federation": {
            "rounds": args.rounds,
            "fraction": 1.0,
            "min_devices": args.devices,
            "round_deadline_s": 3600,
            "update_encoding": encoding,
        },
        "training": {"local_steps": args.steps, "lr": args.lr, "batch_size": BATCH, "seq_len": SEQ},
        # the weighted mean per coordinate: the merge adds nothing of its own to the comparison
        "aggregation": {"rule": "mean", "clip": "off", "weight_cap": 0},
        "simulation": {"engine": "local", "max_workers": args.workers, "threads": 1},
        "run": {"dir": str(args.out)},
    }


@dataclasses.dataclass(frozen=True)
class Measured:
    """One run: bytes each device sent per round (its Update's frames), and the final accuracy."""

    bytes_up: list[int]
    accuracy: float


def run_all(args: argparse.Namespace) -> dict[str, dict[int, Measured]]:
    """``results[encoding][seed]``, sharing one pool of worker processes."""
    from coordinator.simulation._config import parse_simulation_config
    from coordinator.simulation._executor import make_executor
    from coordinator.simulation._run import run_simulation
    from edge_sdk.scaling import LeverPolicy

    log = logging.getLogger("bench")
    results: dict[str, dict[int, Measured]] = {e: {} for e in args.encodings}
    executor = make_executor("local", max_workers=args.workers, threads=1)
    try:
        for seed in args.seeds:
            for encoding in args.encodings:
                config = parse_simulation_config(sim_config(args, seed, encoding), base=ROOT, where="bench")
                config = dataclasses.replace(config, levers=LeverPolicy.plain())
                folder = args.out / f"seed{seed}" / encoding.replace("+", "-")
                shutil.rmtree(folder, ignore_errors=True)
                started = time.monotonic()
                result = run_simulation(config, executor=executor, run_dir=folder)
                sent = [int(d["bytes_in"]) for r in result.rounds for d in r["devices"] if d["status"] == "ok"]
                results[encoding][seed] = Measured(sent, result.final_accuracy)
                log.info(
                    "seed %d %s: %.2f MB per device per round, final accuracy %.4f (%.1f min)",
                    seed,
                    encoding,
                    statistics.mean(sent) / 1e6 if sent else float("nan"),
                    result.final_accuracy,
                    (time.monotonic() - started) / 60,
                )
    finally:
        executor.close()
    return results


def measure_bytes(args: argparse.Namespace, encodings: Sequence[str]) -> dict[str, int]:
    """Wire bytes (the Update message and its chunk frames) of one device's update, each encoding.

    The device trains the full model for ``--steps`` steps on the first ``--shard`` training rows (as a
    simulated device does, through the SDK's TaskRunner); its update is then packed each way.
    """
    from coordinator.simulation._data import TsvData
    from edge_sdk import TaskRunner
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.protocol import TrainSettings, TrainTask, Update, encode_arrays, encode_message, torch_to_numpy
    from edge_sdk.protocol._encodings import delta_from_weights
    from edge_sdk.protocol._tensors import encode_tensors
    from edge_sdk.scaling._extract import extract
    from edge_sdk.scaling._models import resolve_model_dir
    from edge_sdk.scaling._ranked import ranked_parent

    parent, _ = ranked_parent("all-MiniLM-L6-v2", reordered=False)
    spec = SubnetSpec.full(parent.dims)
    tensors = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(tensors)
    settings = TrainSettings(local_steps=args.steps, lr=args.lr, batch_size=BATCH, seq_len=SEQ, seed=args.seeds[0])
    task = TrainTask(
        task_id="t",
        round=1,
        spec=spec.to_dict(),
        model_config=json.loads(json.dumps(dict(parent.config), default=str)),
        settings=settings,
        weights=manifest,
    )
    source = TsvData(args.data / "train.tsv", resolve_model_dir("all-MiniLM-L6-v2")).source(range(args.shard))
    output = TaskRunner(source, threads=1).train(task, tensors, keep_received=True)
    assert output.received is not None
    delta = delta_from_weights(output.tensors, output.received)
    sizes: dict[str, int] = {}
    for encoding in encodings:
        if encoding == "weights":
            manifest, frames = encode_tensors(output.tensors)
        else:
            packed, logical = encode_arrays(delta, encoding)
            manifest, frames = encode_tensors(packed)
            manifest = dataclasses.replace(manifest, encoding=encoding, logical=logical)
        update = Update(
            task_id="t",
            num_samples=args.shard,
            metrics=output.metrics,
            peak_rss_bytes=1,
            step_time_s=1.0,
            train_time_s=1.0,
            weights=manifest,
            encoding="weights" if encoding == "weights" else "delta",
        )
        sizes[encoding] = len(encode_message(update)) + sum(len(f) for f in frames)
    return sizes


def full_model_fp32_bytes() -> int:
    """The full MiniLM classifier's parameters x 4 bytes (what ``weights`` sends, less framing)."""
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._ranked import ranked_parent
    from edge_sdk.scaling._search import param_count

    parent, _ = ranked_parent("all-MiniLM-L6-v2", reordered=False)
    return 4 * param_count(parent, SubnetSpec.full(parent.dims))


def table(results: Mapping[str, Mapping[int, Measured]], full_bytes: int, seeds: Sequence[int]) -> list[str]:
    """The figures as a markdown table (one row per encoding)."""
    head = "| encoding | MB / device / round | x fp32 full model | " + " | ".join(f"acc. seed {s}" for s in seeds)
    lines = [head + " | mean diff. vs weights (points) |", "|" + "---|" * (4 + len(seeds))]
    reference = results.get("weights", {})
    for encoding, by_seed in results.items():
        sent = [b for m in by_seed.values() for b in m.bytes_up]
        mean = statistics.mean(sent) if sent else float("nan")
        accs = " | ".join(f"{100 * by_seed[s].accuracy:.2f}" if s in by_seed else "-" for s in seeds)
        diffs = [100 * (by_seed[s].accuracy - reference[s].accuracy) for s in seeds if s in by_seed and s in reference]
        diff = f"{statistics.mean(diffs):+.2f}" if diffs else "-"
        lines.append(f"| {encoding} | {mean / 1e6:.2f} | {mean / full_bytes:.3f} | {accs} | {diff} |")
    return lines


def verdict(results: Mapping[str, Mapping[int, Measured]], full_bytes: int, default: str) -> str:
    """Whether ``default`` meets the done-when criterion (<= 0.3x bytes, <= 0.3 points lost vs fp32 weights)."""
    if default not in results or "weights" not in results:
        return f"(run both 'weights' and {default!r} to check the criterion)"
    by_seed, reference = results[default], results["weights"]
    ratio = statistics.mean(b for m in by_seed.values() for b in m.bytes_up) / full_bytes
    seeds = [s for s in by_seed if s in reference]
    loss = statistics.mean(100 * (reference[s].accuracy - by_seed[s].accuracy) for s in seeds)
    ok = ratio <= 0.3 and loss <= 0.3
    return (
        f"default {default}: {ratio:.3f}x the fp32 bytes of the full model per device per round (<= 0.3),"
        f" {loss:+.2f} points of accuracy lost against fp32 weights on seeds {seeds} (<= 0.3): "
        + ("met" if ok else "NOT met")
    )


def bytes_table(sizes: Mapping[str, int], full_bytes: int) -> list[str]:
    """One device's update, each encoding: bytes on the wire and their ratio to the full model's fp32."""
    lines = ["| encoding | MB per device per round | x fp32 full model |", "|---|---|---|"]
    lines += [f"| {e} | {n / 1e6:.2f} | {n / full_bytes:.3f} |" for e, n in sizes.items()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for name in ("coordinator", "edge_sdk", "edge_fm.device", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    full_bytes = full_model_fp32_bytes()
    sizes = measure_bytes(args, ENCODINGS)
    print(f"all-MiniLM-L6-v2, full model fp32: {full_bytes / 1e6:.2f} MB ({full_bytes // 4:,} parameters)")
    print(
        f"\nOne device's update ({args.steps} local steps, batch {BATCH}, length {SEQ}, lr {args.lr},"
        f" {args.shard} rows):"
    )
    print("\n".join(bytes_table(sizes, full_bytes)))
    if args.bytes_only:
        return 0
    results = run_all(args)
    print(
        f"\nSimulated runs: {args.devices} devices x {args.rounds} rounds x {args.steps} local steps;"
        f" seeds {args.seeds}; bytes as the coordinator counted them"
    )
    print("\n".join(table(results, full_bytes, args.seeds)))
    print(verdict(results, full_bytes, args.default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
