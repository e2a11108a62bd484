"""Where the memory of a causal LM's export goes: SmolLM2-135M exported as a device's deploy does it.

    python bench/lm_export_memory.py [--quantize] [--model SmolLM2-135M] [--interval 0.01]

A fresh process imports the runtime (torch, transformers, optimum's exporter, ONNX Runtime, the
exporter's modules), notes its RSS (the runtime footprint), loads the model, then runs
``export_causal_lm`` as ``edge_sdk.serving._install_lm.deploy_lm`` calls it (2 prompts x 8 parity
steps, int8 with ``--quantize``). A thread samples the RSS (psutil) every ``--interval`` seconds; each
stage of the export (the torch trace, optimum's post-processing, the ONNX Runtime session, the parity
run, the int8 pass, the drift) is timed by wrapping its function. Printed: per stage, the peak RSS
above the runtime footprint (GB and bytes per parameter), then the whole export's peak (also from
``ru_maxrss``). ``--json`` prints the figures as JSON instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "Review: the plot is nothing but boilerplate clichés.\nSentiment:",
]


class Sampler:
    """RSS samples in a thread, and the stages entered and left (times on the same clock)."""

    def __init__(self, interval: float) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stages: list[tuple[str, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._process.memory_info().rss))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self.samples.append((started, self._process.memory_info().rss))
        try:
            yield
        finally:
            self.samples.append((time.perf_counter(), self._process.memory_info().rss))
            self.stages.append((name, started, time.perf_counter()))

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


def wrap(sampler: Sampler, module: Any, attr: str, name: str) -> None:
    """Replace ``module.attr`` by a wrapper that records stage ``name`` around each call."""
    original: Callable[..., Any] = getattr(module, attr)

    @functools.wraps(original)
    def staged(*args: Any, **kwargs: Any) -> Any:
        with sampler.stage(name):
            return original(*args, **kwargs)

    setattr(module, attr, staged)


def instrument(sampler: Sampler) -> None:
    import onnx
    import optimum.onnx
    import torch
    from optimum.exporters.onnx import base, convert

    from edge_sdk.serving import _export_lm, _export_lm_checks, _export_lm_graph

    wrap(sampler, torch.onnx, "export", "torch trace (torch.onnx.export)")
    wrap(sampler, convert, "export_pytorch", "optimum: export_pytorch")
    wrap(sampler, base.OnnxConfig, "fix_dynamic_axes", "optimum: fix_dynamic_axes")
    wrap(sampler, optimum.onnx, "remove_duplicate_weights_from_tied_info", "optimum: tied-weight dedup")
    wrap(sampler, onnx, "load", "onnx.load")
    wrap(sampler, onnx, "save", "onnx.save")
    wrap(sampler, _export_lm, "export_lm_graph", "export_lm_graph (whole)")
    wrap(sampler, _export_lm_graph, "write_with_weights", "write model.onnx with the weights")
    wrap(sampler, _export_lm, "load_generator", "ONNX Runtime session")
    wrap(sampler, _export_lm, "check_lm_parity", "parity (torch + ORT)")
    wrap(sampler, _export_lm, "quantize_lm_int8", "int8 pass")
    wrap(sampler, _export_lm, "measure_lm_drift", "drift (fp32 + int8 sessions)")
    wrap(sampler, _export_lm, "_manifest", "manifest (sha256)")
    wrap(sampler, _export_lm_checks, "_torch_logits", "torch forward (parity)")


def child(model_name: str, quantize: bool, interval: float) -> dict[str, Any]:
    import onnxruntime  # noqa: F401
    import optimum.exporters.onnx  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM

    from edge_sdk.scaling import resolve_model_dir
    from edge_sdk.serving._export_lm import export_causal_lm

    folder = resolve_model_dir(model_name)
    sampler = Sampler(interval)
    instrument(sampler)
    runtime = sampler._process.memory_info().rss
    sampler.start()
    with sampler.stage("load the torch model"):
        model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    params = sum(p.numel() for p in model.parameters())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, sampler.stage("export_causal_lm (whole)"):
        report = export_causal_lm(
            model, folder, Path(tmp) / "m", parity_prompts=PROMPTS, parity_steps=8, quantize=quantize,
            pad_kv_heads=True,
        )  # fmt: skip
    sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stages = [
        {"stage": n, "seconds": round(b - a, 2), "peak_above_runtime": sampler.peak(a, b) - runtime}
        for n, a, b in sorted(sampler.stages, key=lambda s: s[1])
    ]
    return {
        "model": model_name,
        "params": params,
        "quantize": quantize,
        "runtime_bytes": runtime,
        "peak_above_runtime": max(rss for _, rss in sampler.samples) - runtime,
        "ru_maxrss_above_runtime": maxrss - runtime,
        "export_seconds": report.seconds,
        "parity": report.parity.max_abs_diff,
        "tokens_equal": report.parity.tokens_equal,
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    doc = child(args.model, args.quantize, args.interval)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    p = doc["params"]
    print(f"{doc['model']} ({p / 1e6:.1f}M params), {'int8' if doc['quantize'] else 'fp32'}, runtime "
          f"{doc['runtime_bytes'] / 1e9:.2f} GB; export {doc['export_seconds']:.0f} s, parity "
          f"{doc['parity']:.1e}, {doc['tokens_equal']}/8 tokens")  # fmt: skip
    for s in doc["stages"]:
        q = s["peak_above_runtime"]
        print(f"  {s['stage']:<36} {s['seconds']:7.1f} s  peak {q / 1e9:5.2f} GB  {q / p:5.1f} B/param")
    for key in ("peak_above_runtime", "ru_maxrss_above_runtime"):
        print(f"{key}: {doc[key] / 1e9:.2f} GB = {doc[key] / p:.1f} B/param")


if __name__ == "__main__":
    main()
