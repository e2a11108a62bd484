"""Local training of a sub-network: AdamW steps, an optional FedProx proximal term, measured memory.

One step on a batch of B rows split into k micro-batches (``levers.micro_batches``; rows
``B_1 + ... + B_k = B``, each micro-batch padded to its own longest row) accumulates

    grad = sum_i (B_i / B) * grad(mean loss over micro-batch i)

which is exactly the gradient of the mean loss over the whole batch (the models have no batch
statistics and padded positions are masked), then clips the gradient's global norm
(``max_grad_norm``; None or 0: no clipping) and takes one AdamW step over the trainable parameters.
The FedProx term ``mu/2 * ||w - w_round_start||^2`` is added once per step. The other levers
(checkpointing, embedding rows or frozen table, LoRA, dropout) are applied to the model in place
before the first step (:func:`edge_sdk.training._levers.prepare`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
from torch import nn

from edge_sdk._errors import ConfigError
from edge_sdk._levers import Levers
from edge_sdk.device._allocator import trim_heap, tune_allocator
from edge_sdk.training._data import split_batch
from edge_sdk.training._levers import RowEmbedding, prepare, touched_rows
from edge_sdk.training._metrics import class_metrics, confusion_matrix
from edge_sdk.training._prompts import IGNORE_INDEX, lm_metrics

__all__ = ["TrainConfig", "TrainResult", "evaluate", "evaluate_lm", "peak_rss_bytes", "proximal_term", "train_local"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train locally: steps, AdamW, clipping, FedProx, dropout, seed and the memory levers."""

    steps: int
    lr: float = 5e-5
    weight_decay: float = 0.01
    prox_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the loss when > 0
    max_grad_norm: float | None = 1.0  # None or 0: no gradient clipping
    seed: int = 0
    tune_allocator: bool = True  # pin glibc's thresholds, trim the heap each step: predictable peak memory
    levers: Levers = field(default_factory=Levers)
    dropout: float | None = None  # every dropout probability of the model; None: the model's own
    # Called after each step with (steps done, steps in all), from the training thread (keep it cheap).
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.prox_mu < 0:
            raise ConfigError(
                f"lr must be > 0, weight_decay and prox_mu >= 0; got {self.lr}, {self.weight_decay}, {self.prox_mu}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) or None, got {self.dropout}")
        if not isinstance(self.levers, Levers):
            raise ConfigError(f"levers must be a Levers value, got {type(self.levers).__name__}")


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
    terms = [((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in anchor]
    if not terms:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()


def _to_torch(
    batch: Mapping[str, np.ndarray | torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """``batch`` as tensors; with ``model``, fitted to it: no ``token_type_ids`` when its forward takes
    none (decoders such as Llama), and padded positions (``attention_mask`` 0) holding the config's
    ``pad_token_id`` for a sequence classifier that finds each row's last token by that id (Llama's)."""
    drop = model is not None and "token_type_ids" not in _forward_parameters(type(model).forward)
    out = {k: torch.as_tensor(v) for k, v in batch.items() if not (drop and k == "token_type_ids")}
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    ids, mask = out.get("input_ids"), out.get("attention_mask")
    if isinstance(pad, int) and ids is not None and mask is not None and _pools_last_token(type(model)):
        out["input_ids"] = torch.where(mask.bool(), ids, pad)
    return out


def _pools_last_token(cls: type) -> bool:
    """Whether ``cls`` classifies from each row's last token, found by ``pad_token_id`` (Llama's
    sequence classifier: transformers' ``GenericForSequenceClassification``)."""
    from transformers.modeling_layers import GenericForSequenceClassification

    return issubclass(cls, GenericForSequenceClassification)


@functools.cache
def _forward_parameters(forward: Callable[..., object]) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def _prepare(
    model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]], config: TrainConfig
) -> Iterator[Mapping[str, np.ndarray | torch.Tensor]]:
    """Apply the levers to ``model``; the batches to train on.

    Row-only embedding training needs the rows before the first step: unless the model's table is
    already a :class:`RowEmbedding`, the task's ``steps`` batches are drawn first (their token ids
    are small next to the model) and their tokens become the trained rows.
    """
    rows = None
    if config.levers.embeddings == "rows" and not isinstance(model.get_input_embeddings(), RowEmbedding):  # type: ignore[operator]
        drawn = list(islice(batches, config.steps))
        rows = touched_rows(drawn)
        batches = iter(drawn)
    prepare(model, config.levers, rows=rows, dropout=config.dropout)
    return batches


def _step_loss(
    model: nn.Module,
    batch: Mapping[str, np.ndarray | torch.Tensor],
    micro_batches: int,
    prox: tuple[Mapping[str, torch.Tensor], float] | None,
) -> tuple[float, int]:
    """Accumulate one batch's gradient over its micro-batches; (its loss, its rows)."""
    whole = {k: np.asarray(v) for k, v in batch.items()}
    rows = int(whole["labels"].shape[0])
    total = 0.0
    for part in split_batch(whole, micro_batches):
        loss = model(**_to_torch(part, model)).loss * (int(part["labels"].shape[0]) / rows)
        loss.backward()
        total += float(loss.detach())
    if prox is not None:
        term = proximal_term(model, prox[0], prox[1])
        if term.requires_grad:
            term.backward()
        total += float(term.detach())
    return total, rows


def train_local(
    model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]], config: TrainConfig
) -> TrainResult:
    """Train ``model`` for ``config.steps`` AdamW steps on ``batches`` (dicts with ``labels``).

    The levers are applied to ``model`` in place first; afterwards,
    :func:`edge_sdk.training._levers.trained_tensors` reads what it trained.
    """
    if config.tune_allocator:
        tune_allocator()
    torch.manual_seed(config.seed)
    batches = _prepare(model, batches, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prox = ({n: p.detach().clone() for n, p in trainable}, config.prox_mu) if config.prox_mu > 0 else None
    params = [p for _, p in trainable]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    losses, times, samples = [], [], 0
    start = time.perf_counter()
    for step in range(config.steps):
        t0 = time.perf_counter()
        loss, rows = _step_loss(model, next(batches), config.levers.micro_batches, prox)
        if config.tune_allocator:
            trim_heap()  # the freed activations in heap-sized tensors: back to the system before AdamW
        if config.max_grad_norm:
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        samples += rows
        times.append(time.perf_counter() - t0)
        logger.debug("step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
        if config.on_step is not None:
            config.on_step(step + 1, config.steps)
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
def evaluate(model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]]) -> dict[str, float]:
    """Accuracy, mean loss, macro-F1, majority share, per-class recall over one pass of ``batches``;
    for causal-LM batches (labels ``[n, seq]`` like the ids), :func:`evaluate_lm`'s loss and perplexity.

    The classes are the model's ``config.num_labels`` (the logits' width when the model has no
    config); the class metrics and the collapse flag are :func:`edge_sdk.training._metrics.class_metrics`.
    No rows: accuracy and loss are NaN and no class metric is given.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0.0}
    rest = itertools.chain([first], batches)
    if np.ndim(first["labels"]) == 2:
        return evaluate_lm(model, rest)
    return _evaluate_classes(model, rest)


def _evaluate_classes(model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]]) -> dict[str, float]:
    model.eval()
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    correct = total = 0
    loss_sum = 0.0
    confusion: np.ndarray | None = None
    for raw in batches:
        batch = _to_torch(raw, model)
        out = model(**batch)
        n = int(batch["labels"].shape[0])
        loss_sum += float(out.loss) * n
        predictions = out.logits.argmax(-1)
        correct += int((predictions == batch["labels"]).sum())
        total += n
        width = num_labels if isinstance(num_labels, int) and num_labels > 0 else int(out.logits.shape[-1])
        counts = confusion_matrix(batch["labels"].cpu().numpy(), predictions.cpu().numpy(), width)
        confusion = counts if confusion is None else confusion + counts
    if total == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0.0}
    metrics = {"accuracy": correct / total, "loss": loss_sum / total, "samples": float(total)}
    if confusion is not None:
        metrics.update(class_metrics(confusion))
    return metrics


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterator[Mapping[str, np.ndarray | torch.Tensor]]) -> dict[str, float]:
    """A causal LM's mean response-token loss and perplexity over one pass of ``batches``.

    Every scored token weighs the same: ``loss = sum_t -log p(x_t | x_<t) / T`` over the positions
    ``t`` whose (shifted) label is not ``-100``, ``perplexity = exp(loss)``
    (:func:`~edge_sdk.training._prompts.lm_metrics`); also ``tokens`` (``T``) and ``samples``.
    """
    model.eval()
    loss_sum, tokens, samples = 0.0, 0, 0
    for raw in batches:
        batch = _to_torch(raw, model)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss_sum += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((target != IGNORE_INDEX).sum())
        samples += int(labels.shape[0])
    metrics = lm_metrics(loss_sum, tokens, samples)
    return {k: v for k, v in metrics.items() if math.isfinite(v)} | {"samples": float(samples)}
