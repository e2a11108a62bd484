"""The memory model against fresh processes training MiniLM with memory levers.

    python bench/levers_memory.py [--steps 3] [--json out.json]

Each row: a fresh process (``edge_sdk.training._probe``, allocator tuned as the SDK does) trains the
real all-MiniLM-L6-v2 classifier, or a narrower sub-network of it, for a few AdamW steps on rows of
random tokens as long as the max length allows (the worst case), with the row's levers. Printed:
the predicted peak (with the runtime footprint the process measured), the measured peak RSS, and the
prediction's error (the model must be at or above the measurement and within 15 % of it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# (label, batch, seq, width ratio, levers, dropout)
Case = tuple[str, int, int, float, dict[str, Any], float | None]
CASES: list[Case] = [
    ("plain s128", 16, 128, 1.0, {}, None),
    ("plain s64", 16, 64, 1.0, {}, None),
    ("plain s32 b32", 32, 32, 1.0, {}, None),
    ("plain s128 b4", 4, 128, 1.0, {}, None),
    ("micro-batches 4 s128", 16, 128, 1.0, {"micro_batches": 4}, None),
    ("micro-batches 4 s64", 16, 64, 1.0, {"micro_batches": 4}, None),
    ("frozen s64", 16, 64, 1.0, {"embeddings": "frozen"}, None),
    ("frozen s128", 16, 128, 1.0, {"embeddings": "frozen"}, None),
    ("rows s64", 16, 64, 1.0, {"embeddings": "rows"}, None),
    ("rows s128", 16, 128, 1.0, {"embeddings": "rows"}, None),
    ("rows+mb4 b32 s64", 32, 64, 1.0, {"embeddings": "rows", "micro_batches": 4}, None),
    ("checkpointing s128", 16, 128, 1.0, {"checkpointing": True}, None),
    ("checkpointing s64", 16, 64, 1.0, {"checkpointing": True}, None),
    ("frozen+checkpointing s64", 16, 64, 1.0, {"embeddings": "frozen", "checkpointing": True}, None),
    ("frozen+ckpt+mb4 s64", 16, 64, 1.0, {"embeddings": "frozen", "checkpointing": True, "micro_batches": 4}, None),
    ("LoRA r8 frozen s64", 16, 64, 1.0, {"lora_rank": 8, "embeddings": "frozen"}, None),
    ("LoRA r8 s128", 16, 128, 1.0, {"lora_rank": 8}, None),
    ("LoRA r16 frozen ckpt s128", 16, 128, 1.0, {"lora_rank": 16, "embeddings": "frozen", "checkpointing": True}, None),
    ("sdpa dropout 0 s128", 16, 128, 1.0, {"attention": "sdpa"}, 0.0),
    ("dropout 0 s128", 16, 128, 1.0, {}, 0.0),
    ("half width rows+ckpt s128", 16, 128, 0.5, {"embeddings": "rows", "checkpointing": True}, None),
    ("half width mb2 s128", 16, 128, 0.5, {"micro_batches": 2}, None),
    ("quarter width frozen s64", 16, 64, 0.25, {"embeddings": "frozen"}, None),
]


def measure(parent: Any, case: Case, steps: int) -> tuple[int, int, int]:
    """(predicted, measured peak, measured runtime footprint) of one case."""
    from safetensors.torch import save_file

    from edge_sdk._levers import Levers
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._extract import extract, param_count
    from edge_sdk.scaling._memory import Workload, training_estimate
    from edge_sdk.training._probe import run_probe

    _, batch, seq, ratio, levers, dropout = case
    spec = SubnetSpec.from_ratio(parent.dims, ratio)
    with tempfile.TemporaryDirectory(prefix="edge-fm-levers-") as tmp:
        folder = Path(tmp)
        (folder / "spec.json").write_text(spec.to_json())
        (folder / "config.json").write_text(json.dumps(dict(parent.config)))
        save_file(extract(parent, spec), folder / "weights.safetensors")
        result = run_probe(folder, batch=batch, seq=seq, steps=steps, levers=levers, dropout=dropout)
    work = Workload(batch, seq, steps=steps, vocab=int(parent.config["vocab_size"]), dropout=dropout != 0.0)
    predicted = training_estimate(
        spec, param_count(parent, spec), work, runtime=result["runtime_rss_bytes"], levers=Levers(**levers)
    ).total
    return predicted, int(result["peak_rss_bytes"]), int(result["runtime_rss_bytes"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="run the cases whose label contains this")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()

    from edge_sdk.scaling import load_parent, resolve_model_dir

    parent = load_parent(resolve_model_dir("all-MiniLM-L6-v2"))
    rows = []
    print(f"{'case':<28} {'predicted':>10} {'measured':>10} {'runtime':>9} {'error':>7}")
    for case in CASES:
        label, batch, seq, ratio, levers, dropout = case
        if args.only not in label:
            continue
        predicted, peak, runtime = measure(parent, case, args.steps)
        error = (predicted - peak) / peak
        rows.append({"case": label, "batch": batch, "seq": seq, "ratio": ratio, "levers": levers, "dropout": dropout,
                     "steps": args.steps, "predicted": predicted, "peak": peak, "runtime": runtime})  # fmt: skip
        print(
            f"{label:<28} {predicted / 1e6:>8.0f}MB {peak / 1e6:>8.0f}MB {runtime / 1e6:>7.0f}MB {error:>+7.1%}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(0 <= (r["predicted"] - r["peak"]) / r["peak"] <= 0.15 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
