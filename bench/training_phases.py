"""Where a training step's memory goes, phase by phase, in a fresh process (Linux, glibc).

    python bench/training_phases.py FOLDER [--batch 4] [--seq 64] [--steps 3] [--levers JSON]

FOLDER is a probe folder (``spec.json``, ``config.json``, ``weights.safetensors``:
``edge_sdk.training._probe.write_probe_folder``). The model trains as ``train_local`` does (the
allocator tuned, the heap trimmed after backward, AdamW) on random full-length token rows; at every
forward, backward, trim and optimizer-step boundary it prints the resident set above the runtime
footprint, the peak within that phase (``VmHWM``, reset before the phase through
``/proc/self/clear_refs``) and the main heap (``mallinfo2``: size, in use, free; mmapped bytes). Run
with ``MALLOC_ARENA_MAX=1`` to see every allocation in the main heap. The measurements behind
``edge_sdk/scaling/_memory_decoder.py`` (the end-of-backward moment) came from this.
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--levers", default="{}", help="training levers as JSON (default: plain)")
    args = parser.parse_args()

    from edge_sdk.device._allocator import _MallInfo2, trim_heap, tune_allocator

    tune_allocator()
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from edge_sdk._levers import Levers
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.scaling._build import build_model, model_class
    from edge_sdk.training._levers import prepare
    from edge_sdk.training._train import _to_torch, split_batch

    levers = Levers.from_dict(json.loads(args.levers))
    config = json.loads((args.folder / "config.json").read_text())
    model_class(config)
    runtime = _status("VmHWM")
    spec = SubnetSpec.from_json((args.folder / "spec.json").read_text())
    weights = load_file(args.folder / "weights.safetensors")
    model: Any = build_model(spec, config, weights, attn_implementation=levers.attention)
    prepare(model, levers)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def note(tag: str) -> None:
        mi = libc.mallinfo2()
        print(
            f"{tag:<12} rss {(_status('VmRSS') - runtime) / MIB:8.1f}  peak {(_status('VmHWM') - runtime) / MIB:8.1f}"
            f"  heap {mi.arena / MIB:7.1f} used {mi.uordblks / MIB:7.1f} free {mi.fordblks / MIB:7.1f}"
            f"  mmapped {mi.hblkhd / MIB:8.1f}  (MiB above the runtime's {runtime / MIB:.1f})"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    model.train()
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        ids = rng.integers(1000, int(config["vocab_size"]), size=(args.batch, args.seq), dtype=np.int64)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
        for i, part in enumerate(split_batch(batch, levers.micro_batches)):
            _reset_peak()
            loss = model(**_to_torch(part, model)).loss * (part["labels"].shape[0] / args.batch)
            note(f"s{step} fwd{i}")
            _reset_peak()
            loss.backward()
            note(f"s{step} bwd{i}")
        trim_heap()
        note(f"s{step} trim")
        _reset_peak()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        note(f"s{step} opt")
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
