"""Train a shipped sub-network in this process and report measured memory: ``python -m edge_sdk.training._probe``.

Used to check the memory model and budgets against reality in a *fresh* process (peak RSS is a
high-water mark: anything the process did before would count). Reads a folder holding
``spec.json``, ``config.json`` and ``weights.safetensors``; prints one JSON line.

Data: the first rows of a TSV (``--data``, tokenized with ``--tokenizer``, truncated at ``--seq``,
each batch padded to its longest row), or ``--random-tokens``: every row ``--seq`` random token ids
long, the worst case a max length of ``--seq`` allows (and, with row-only embedding training, about
``batch x seq x steps`` distinct rows). ``--levers`` (JSON of :class:`~edge_sdk._levers.Levers`) and
``--dropout`` shape the training as a task's settings would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._errors import EdgeFMError
from edge_sdk.training._train import peak_rss_bytes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge_sdk.training._probe")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data", type=Path, help="TSV with label and sentence columns")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json")
    parser.add_argument("--random-tokens", action="store_true", help="rows of --seq random token ids")
    parser.add_argument("--levers", default="{}", help="training levers as JSON (default: plain)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout probability (default: the model's)")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's thresholds dynamic")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.random_tokens and (args.data is None or args.tokenizer is None):
        parser.error("give --data and --tokenizer, or --random-tokens")

    from edge_sdk.device._allocator import tune_allocator

    if not args.no_tune_allocator:
        tune_allocator()

    import torch
    from safetensors.torch import load_file

    from edge_sdk._levers import Levers
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._build import build_model, model_class
    from edge_sdk.scaling.families import default_task, family_for
    from edge_sdk.training._data import encode, iter_batches, load_tokenizer, read_tsv
    from edge_sdk.training._train import TrainConfig, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    levers = Levers.from_dict(json.loads(args.levers))
    config = json.loads((args.folder / "config.json").read_text())
    model_class(config)  # the modeling code is part of the runtime's footprint
    runtime = peak_rss_bytes()
    spec = SubnetSpec.from_json((args.folder / "spec.json").read_text())
    model = build_model(
        spec, config, load_file(args.folder / "weights.safetensors"), attn_implementation=levers.attention
    )
    if args.random_tokens:
        causal = default_task(family_for(config)) == "causal-lm"  # a causal LM's labels are its tokens
        batches = _random_batches(int(config["vocab_size"]), args.batch, args.seq, token_labels=causal)
    else:
        rows = read_tsv(args.data, limit=args.batch * args.steps)
        batches = iter_batches(encode(load_tokenizer(args.tokenizer, args.seq), rows), args.batch, seed=0)
    train_config = TrainConfig(
        steps=args.steps, tune_allocator=not args.no_tune_allocator, levers=levers, dropout=args.dropout
    )
    result = train_local(model, batches, train_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for n, p in model.named_parameters() if not _added(n))
    print(
        json.dumps(
            {
                "runtime_rss_bytes": runtime,
                "peak_rss_bytes": result.peak_rss_bytes,
                "loss": result.loss,
                "step_time_s": result.step_time_s,
                "params": params,
                "trainable": trainable,
            }
        )
    )
    return 0


def write_probe_folder(folder: Path, spec: Any, config: Mapping[str, Any], weights: Mapping[str, Any]) -> Path:
    """Lay out what the probe reads, as a device receives it: ``spec.json`` (a ``SubnetSpec``),
    ``config.json`` (the parent's config) and ``weights.safetensors`` (the extracted sub-network)."""
    from safetensors.torch import save_file

    (folder / "spec.json").write_text(spec.to_json())
    (folder / "config.json").write_text(json.dumps(dict(config)))
    save_file(dict(weights), folder / "weights.safetensors")
    return folder


def run_probe(
    folder: Path,
    *,
    batch: int,
    seq: int,
    steps: int = 3,
    levers: Mapping[str, Any] | None = None,
    dropout: float | None = None,
    data: Path | None = None,
    tokenizer: Path | None = None,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Run this probe on ``folder`` in a fresh Python process; its JSON result.

    Random full-length tokens unless ``data`` and ``tokenizer`` are given.
    """
    cmd = [sys.executable, "-m", "edge_sdk.training._probe", str(folder), "--batch", str(batch),
           "--seq", str(seq), "--steps", str(steps), "--levers", json.dumps(dict(levers or {}))]  # fmt: skip
    cmd += ["--data", str(data), "--tokenizer", str(tokenizer)] if data is not None else ["--random-tokens"]
    if tokenizer is not None and data is None:
        raise ValueError("a tokenizer without data")
    if dropout is not None:
        cmd += ["--dropout", str(dropout)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if out.returncode != 0:
        raise EdgeFMError(f"the training probe failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _added(name: str) -> bool:
    """A parameter the levers added (adapters, the compact embedding rows), not the sub-network's."""
    return "lora_" in name or name.endswith("rows_weight")


def _random_batches(vocab: int, batch: int, seq: int, *, token_labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of ``batch`` rows of ``seq`` random token ids (no padding), labels 0/1 (or, for a
    causal LM, the tokens themselves: the loss is on every next token)."""
    rng = np.random.default_rng(0)
    while True:
        ids = rng.integers(min(1000, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
        labels = ids.copy() if token_labels else rng.integers(0, 2, batch)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


if __name__ == "__main__":
    sys.exit(main())
