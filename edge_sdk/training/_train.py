"""Local training of a sub-network: AdamW steps, an optional FedProx proximal term, measured memory."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_sdk.device._allocator import tune_allocator

__all__ = ["TrainConfig", "TrainResult", "evaluate", "peak_rss_bytes", "proximal_term", "train_local"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 5e-5
    weight_decay: float = 0.01
    prox_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the loss when > 0
    max_grad_norm: float = 1.0
    seed: int = 0
    tune_allocator: bool = True  # pin glibc's thresholds: smaller, predictable peak memory (_alloc.py)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int
    loss: float  # mean training loss over the steps
    step_time_s: float  # median seconds per step
    train_time_s: float
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark.

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to the current address space.
    (``getrusage``'s ``ru_maxrss`` survives ``execve``: a child started from a big parent would
    report the parent's peak.) Elsewhere, ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * sum ||w - w_anchor||^2`` over the trainable parameters named in ``anchor``."""
    terms = [
        ((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in anchor
    ]
    if not terms:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()


def _to_torch(batch: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def train_local(
    model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]], config: TrainConfig
) -> TrainResult:
    """Train ``model`` for ``config.steps`` AdamW steps on ``batches`` (dicts with ``labels``)."""
    if config.tune_allocator:
        tune_allocator()
    torch.manual_seed(config.seed)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if config.prox_mu > 0 else {}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    model.train()
    losses, times, samples = [], [], 0
    start = time.perf_counter()
    for step in range(config.steps):
        t0 = time.perf_counter()
        batch = _to_torch(next(batches))
        loss = model(**batch).loss
        if config.prox_mu > 0:
            loss = loss + proximal_term(model, anchor, config.prox_mu)
        loss.backward()
        if config.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        samples += int(batch["labels"].shape[0])
        times.append(time.perf_counter() - t0)
        logger.debug("step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
    model.eval()
    return TrainResult(
        steps=config.steps,
        samples=samples,
        loss=float(np.mean(losses)) if losses else float("nan"),
        step_time_s=float(np.median(times)) if times else 0.0,
        train_time_s=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]]
) -> dict[str, float]:
    """Accuracy and mean loss over one pass of ``batches``."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for raw in batches:
        batch = _to_torch(raw)
        out = model(**batch)
        n = int(batch["labels"].shape[0])
        loss_sum += float(out.loss) * n
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += n
    if total == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0.0}
    return {"accuracy": correct / total, "loss": loss_sum / total, "samples": float(total)}
