"""Train a shipped sub-network in this process and report measured memory: ``python -m edge_sdk.training._probe``.

Used to check the memory model and budgets against reality in a *fresh* process (peak RSS is a
high-water mark: anything the process did before would count). Reads a folder holding
``spec.json``, ``config.json`` and ``weights.safetensors``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_sdk.training._train import peak_rss_bytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_sdk.training._probe")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="TSV with label and sentence columns")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-tune-allocator", action="store_true", help="leave glibc's thresholds dynamic")
    args = parser.parse_args(argv)

    from edge_sdk.device._allocator import tune_allocator

    if not args.no_tune_allocator:
        tune_allocator()

    import torch
    from safetensors.torch import load_file

    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._build import build_model, model_class
    from edge_sdk.training._data import encode, iter_batches, load_tokenizer, read_tsv
    from edge_sdk.training._train import TrainConfig, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads((args.folder / "config.json").read_text())
    model_class(config)  # the modeling code is part of the runtime's footprint
    runtime = peak_rss_bytes()
    spec = SubnetSpec.from_json((args.folder / "spec.json").read_text())
    model = build_model(spec, config, load_file(args.folder / "weights.safetensors"))
    data = encode(
        load_tokenizer(args.tokenizer, args.seq), read_tsv(args.data, limit=args.batch * args.steps)
    )
    result = train_local(
        model,
        iter_batches(data, args.batch, seed=0),
        TrainConfig(steps=args.steps, tune_allocator=not args.no_tune_allocator),
    )
    print(
        json.dumps(
            {
                "runtime_rss_bytes": runtime,
                "peak_rss_bytes": result.peak_rss_bytes,
                "loss": result.loss,
                "step_time_s": result.step_time_s,
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
