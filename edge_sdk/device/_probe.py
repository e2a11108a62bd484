"""Short compute probes: how fast this device multiplies matrices, and optionally trains a small layer.

``measure_matmul`` times square matrix products in the training dtype (float32) for about a second,
with torch when it imports (on the CUDA device when one is given) and numpy otherwise. The figure is
what the coordinator can use to predict step times; it is a sustained rate of one kernel, not a peak.

``measure_step`` (torch only, optional) times full training steps of a small transformer layer:
forward, backward and an AdamW update, so it also sees the memory-bound parts a matmul misses.
torch is imported inside the functions only: importing this module never imports torch.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STEP_PROBE_MODEL", "ComputeProbe", "measure_matmul", "measure_step"]

log = logging.getLogger(__name__)

STEP_PROBE_MODEL = "TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024), batch 8 x seq 64, AdamW"


@dataclass(frozen=True)
class ComputeProbe:
    """Result of the matmul probe (and, when asked for, the training-step probe)."""

    backend: str = field(metadata={"choices": ("torch", "numpy")})
    device: str = field(metadata={"choices": ("cpu", "cuda")})
    dtype: str = field(metadata={"choices": ("float32",)})
    matrix_size: int = field(metadata={"min": 1})  # n of the n x n products timed
    iterations: int = field(metadata={"min": 1})
    seconds: float = field(metadata={"min": 0})  # wall time of the timed iterations
    gflops: float = field(metadata={"min": 0})  # 2 n^3 iterations / seconds / 1e9
    # median seconds of one training step of STEP_PROBE_MODEL; None when not measured
    step_seconds: float | None = field(default=None, metadata={"min": 0})


def _torch() -> Any | None:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install (missing shared library)
        log.debug("torch unavailable: %s", exc)
        return None
    return torch


def _time_loop(run_once: Any, sync: Any, seconds: float, min_iterations: int) -> tuple[int, float]:
    """Run ``run_once`` (synchronised) until ``seconds`` have passed and ``min_iterations`` are done."""
    run_once()  # warm-up: first-call allocations, thread-pool start-up, kernel selection
    sync()
    iterations = 0
    start = time.perf_counter()
    elapsed = 0.0
    while iterations < min_iterations or elapsed < seconds:
        run_once()
        sync()
        iterations += 1
        elapsed = time.perf_counter() - start
    return iterations, elapsed


def measure_matmul(
    seconds: float = 1.0, size: int = 512, device: str = "cpu", backend: str | None = None
) -> ComputeProbe | None:
    """Time float32 ``size`` x ``size`` matmuls for about ``seconds``; None if no backend can run.

    ``backend`` forces "torch" or "numpy"; by default torch is used when it imports, else numpy.
    """
    if seconds <= 0 or size <= 0:
        raise ValueError("measure_matmul needs positive seconds and size")
    torch = _torch() if backend in (None, "torch") else None
    if torch is not None:
        dev = torch.device(device)
        a = torch.randn(size, size, dtype=torch.float32, device=dev)
        b = torch.randn(size, size, dtype=torch.float32, device=dev)
        out = torch.empty(size, size, dtype=torch.float32, device=dev)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        with torch.no_grad():
            iterations, elapsed = _time_loop(lambda: torch.mm(a, b, out=out), sync, seconds, 3)
        used = "torch"
    elif backend in (None, "numpy"):
        if device != "cpu":
            log.warning("numpy can only probe the CPU, not %s", device)
            return None
        try:
            import numpy as np
        except ImportError:
            return None
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        out = np.empty((size, size), dtype=np.float32)
        iterations, elapsed = _time_loop(lambda: np.matmul(a, b, out=out), lambda: None, seconds, 3)
        used = "numpy"
    else:
        return None
    gflops = 2.0 * size**3 * iterations / elapsed / 1e9
    log.debug(
        "matmul probe: %s %s n=%d, %d iterations in %.3f s: %.1f GFLOPS",
        used,
        device,
        size,
        iterations,
        elapsed,
        gflops,
    )
    return ComputeProbe(used, device, "float32", size, iterations, elapsed, gflops)


def measure_step(device: str = "cpu", steps: int = 3) -> float | None:
    """Median seconds of one training step of :data:`STEP_PROBE_MODEL`; None without torch."""
    torch = _torch()
    if torch is None:
        return None
    dev = torch.device(device)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True).to(dev)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
        inputs = torch.randn(8, 64, 256, device=dev)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            layer(inputs).pow(2).mean().backward()
            optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        step()  # warm-up
        times = []
        for _ in range(max(1, steps)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        torch.random.set_rng_state(generator_state)
    return float(statistics.median(times))
