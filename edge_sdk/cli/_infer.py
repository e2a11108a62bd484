"""``edge-sdk infer``: classify texts with an exported model folder, on ONNX Runtime, without torch.

    edge-sdk infer --model DIR [--threads N] [--fp32] [--max-length N] [--json] "text" ...

With no text arguments, one text per line is read from stdin. The table on stdout has one row per text:
label, score, latency (milliseconds, one text at a time, after one warm-up run; tokenization, the model
and the scores, the text padded to nothing but its own length) and ``[truncated]`` when the text was cut
to the model's maximum length. ``--json`` prints
``{"model": ..., "threads": ..., "max_length": ..., "load_ms": ..., "results": [{"text", "label",
"score", "scores", "latency_ms", "truncated", "n_tokens"}, ...]}``.

Nothing here, or in what it imports, imports torch; onnxruntime is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from edge_sdk._errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "infer",
        help="classify texts with an exported model (ONNX Runtime, no torch)",
        description="Load an exported model folder (model.onnx / model_quantized.onnx, config.json, "
        "tokenizer.json) and print label, score and latency for each text.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="exported model folder")
    parser.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads")
    parser.add_argument("--fp32", action="store_true", help="serve model.onnx even if an int8 model exists")
    parser.add_argument("--max-length", type=int, metavar="N", help="truncate texts to N tokens")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (default: stdin lines)")
    return parser


def run(args: argparse.Namespace) -> int:
    from edge_sdk.serving._infer import load  # onnxruntime loads here, not when the CLI lists its sub-commands

    texts: list[str] = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ConfigError("no text to classify: pass texts as arguments or on stdin")

    started = time.perf_counter()
    predictor = load(args.model, threads=args.threads, prefer_quantized=not args.fp32, max_length=args.max_length)
    load_ms = (time.perf_counter() - started) * 1e3
    predictor.logits(texts[:1])  # warm-up: the first run allocates ONNX Runtime's buffers

    rows: list[dict[str, Any]] = []
    for text in texts:
        t0 = time.perf_counter()
        (pred,) = predictor.predict([text])
        latency_ms = (time.perf_counter() - t0) * 1e3
        rows.append(
            {
                "text": text,
                "label": pred.label,
                "score": pred.score,
                "scores": pred.scores,
                "latency_ms": latency_ms,
                "truncated": pred.truncated,
                "n_tokens": pred.n_tokens,
            }
        )

    if args.json:
        doc = {
            "model": str(predictor.model_path),
            "threads": predictor.threads,
            "max_length": predictor.max_length,
            "load_ms": load_ms,
            "results": rows,
        }
        print(json.dumps(doc, indent=2))
        return 0

    width = max(len(r["label"]) for r in rows)
    print(f"# {predictor.model_path} (loaded in {load_ms:.0f} ms, max {predictor.max_length} tokens)")
    for r in rows:
        flag = " [truncated]" if r["truncated"] else ""
        print(f"{r['label']:<{width}}  {r['score']:.4f}  {r['latency_ms']:7.1f} ms  {r['text']}{flag}")
    return 0
