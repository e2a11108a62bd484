"""The device's training runtime, made ready once per process before its footprint is measured.

A device (and each of the simulator's worker processes, which run the same code) pins the
allocator's thresholds, imports torch, transformers and every registered family's modeling code,
and runs two tiny training steps, so that what torch initializes lazily is already resident when
the runtime's footprint is read.
"""

from __future__ import annotations

import importlib

from edge_sdk.device._allocator import tune_allocator
from edge_sdk.device._profile import DEFAULT_RUNTIME_MODULES
from edge_sdk.training._runner import warm_up

__all__ = ["RUNTIME_MODULES", "prepare_runtime"]

RUNTIME_MODULES: tuple[str, ...] = DEFAULT_RUNTIME_MODULES


def prepare_runtime(threads: int | None = None) -> None:
    """Pin the allocator, set torch's threads, import :data:`RUNTIME_MODULES` and warm up."""
    tune_allocator()  # first: the memory model's figures assume it
    if threads:
        import torch

        torch.set_num_threads(threads)
    for module in RUNTIME_MODULES:
        importlib.import_module(module)
    warm_up()
