"""Deploying a causal LM on the device: build the received sub-network, export it with its key/value cache,
check it against torch on the device's own prompts, install it for ``edge-sdk generate``.

Called by :class:`edge_sdk.serving._install.Deployer` when the deploy's task is ``causal-lm``. The
device's data are prompt/response records (a :class:`~edge_sdk.training._prompts.PromptDataset`:
``records`` and, held back, ``held_out``, rows with a ``prompt``; ``tokenizer_dir``; ``tokenizer``).
The deploy's ``seq_len`` is the served model's context (:func:`served_context`); the parity check
runs :data:`LM_PARITY_STEPS` greedy steps after the first :data:`LM_PARITY_PROMPTS` prompts that leave
room for them in that context (:func:`fitting_prompts`), and the int8 drift is measured on the same
prompts. The metrics it returns are the DeployResult's: the sub-network's size, the parity (max logit difference and the
greedy tokens equal to torch), the files' bytes, the int8 drift, and the installed model's tokens per
second (:data:`LM_LATENCY_TOKENS` new tokens after one prompt, loaded as ``edge-sdk generate`` loads it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._errors import ConfigError
from edge_sdk._spec import SubnetSpec
from edge_sdk.protocol import Deploy, thaw_json

if TYPE_CHECKING:
    from edge_sdk.serving._export_lm import LMExportReport

__all__ = [
    "LM_LATENCY_TOKENS",
    "LM_PARITY_ATOL",
    "LM_PARITY_PROMPTS",
    "LM_PARITY_STEPS",
    "deploy_lm",
    "fitting_prompts",
    "served_context",
]

LM_PARITY_PROMPTS = 2
LM_PARITY_STEPS = 8
LM_PARITY_ATOL = 1e-3  # logits over a whole vocabulary, after every cached step (measured: ~1e-5)
LM_LATENCY_TOKENS = 16
LM_PROMPT_CANDIDATES = 64  # local prompts tokenized to find those that fit the served context


def local_prompts(data: Any) -> list[str]:
    """The prompts of the device's records (held-back ones first: never trained on), the first
    :data:`LM_PROMPT_CANDIDATES` (:func:`fitting_prompts` keeps the parity count of those that fit)."""
    rows = [*(getattr(data, "held_out", None) or ()), *(getattr(data, "records", None) or ())]
    prompts = [p for p in (getattr(r, "prompt", None) for r in rows) if isinstance(p, str) and p.strip()]
    if not prompts or getattr(data, "tokenizer_dir", None) is None:
        raise ConfigError(
            "this device's data has no prompts and tokenizer (prompt/response records have both):"
            " it cannot check an exported LLM, so it does not deploy"
        )
    return prompts[:LM_PROMPT_CANDIDATES]


def served_context(config: Any, seq_len: int) -> int:
    """The served model's context: the deploy's ``seq_len`` (what the coordinator planned its key/value
    cache for), at most the model's positions. Written as the served ``config.json``'s
    ``max_position_embeddings``, so ``edge-sdk generate`` stops there (``stop = "max_length"``). Rotary
    frequencies do not depend on it unless the config scales them (``rope_scaling``): then it is kept."""
    positions = int(config.max_position_embeddings)
    if getattr(config, "rope_scaling", None):
        return positions
    config.max_position_embeddings = min(positions, max(2, int(seq_len)))
    return int(config.max_position_embeddings)


def fitting_prompts(data: Any, prompts: list[str], context: int) -> list[str]:
    """The prompts that leave room for the parity steps within ``context`` tokens (ConfigError if none)."""
    tokenizer = getattr(data, "tokenizer", None)
    ids = tokenizer.ids(prompts) if tokenizer is not None and hasattr(tokenizer, "ids") else None
    kept = [
        p for p, i in zip(prompts, ids or prompts, strict=True) if ids is None or len(i) + LM_PARITY_STEPS <= context
    ]
    if not kept:
        raise ConfigError(
            f"no local prompt fits the deploy's {context} tokens with {LM_PARITY_STEPS} generated:"
            " raise [deploy] seq_len"
        )
    return kept[:LM_PARITY_PROMPTS]


def deploy_lm(
    data: Any,
    folder: Any,
    deploy: Deploy,
    tensors: Mapping[str, np.ndarray],
    *,
    run_id: str | None,
    threads: int | None,
) -> dict[str, float]:
    """Build, export, check and install the deploy's causal LM in ``folder``; its metrics."""
    prompts = local_prompts(data)
    import torch

    from edge_sdk.protocol import numpy_to_torch
    from edge_sdk.scaling._build import build_model
    from edge_sdk.serving._export_lm import LM_TASK, export_causal_lm

    if threads:
        torch.set_num_threads(threads)  # per thread under OpenMP: set it in the worker
    spec = SubnetSpec.from_dict(thaw_json(deploy.spec))
    model: Any = build_model(spec, thaw_json(deploy.model_config), numpy_to_torch(dict(tensors)), task=LM_TASK)
    settings = deploy.settings
    context = served_context(model.config, settings.seq_len)
    prompts = fitting_prompts(data, prompts, context)
    report = export_causal_lm(
        model,
        data.tokenizer_dir,
        folder,
        parity_prompts=prompts,
        parity_steps=LM_PARITY_STEPS,
        parity_atol=LM_PARITY_ATOL,
        quantize=settings.quantize,
        pad_kv_heads=True,  # a sub-network may keep different KV groups per layer: padded exactly
        manifest_extra={
            "source": {"run_id": run_id, "round": deploy.round, "task_id": deploy.task_id},
            "spec": spec.to_dict(),
            "inference": {
                "batch_size": settings.batch_size,
                "seq_len": settings.seq_len,
                "context": context,
                "quantize": settings.quantize,
            },
        },
    )
    params = sum(p.numel() for p in model.parameters())
    del model
    return _lm_metrics(report, params, folder, prompts[0], threads, quantized=settings.quantize)


def _lm_metrics(
    report: LMExportReport, params: int, folder: Any, prompt: str, threads: int | None, *, quantized: bool
) -> dict[str, float]:
    """The DeployResult's metrics of an installed LLM (finite values only)."""
    from edge_sdk.training._train import peak_rss_bytes

    metrics: dict[str, float] = {
        "params": float(params),
        "parity_max_abs_diff": report.parity.max_abs_diff,
        "parity_tokens_equal": float(report.parity.tokens_equal),
        "onnx_bytes": float(report.fp32_bytes),
        "export_s": report.seconds,
        "tokens_per_s": _tokens_per_s(folder, prompt, threads, quantized=quantized),
        "process_peak_rss_bytes": float(peak_rss_bytes()),
    }
    if report.int8_bytes is not None:
        metrics["int8_bytes"] = float(report.int8_bytes)
    if report.drift is not None:
        metrics["drift_agreement"] = report.drift.agreement
        metrics["drift_prefix_equal"] = report.drift.mean_prefix_equal
        metrics["drift_max_abs_logit_diff"] = report.drift.max_abs_logit_diff
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}


def _tokens_per_s(folder: Any, prompt: str, threads: int | None, *, quantized: bool) -> float:
    """New tokens per second of the installed folder (checksums verified), after a one-token warm-up."""
    from edge_sdk.serving._generate import load_generator

    generator = load_generator(folder, threads=threads, prefer_quantized=quantized)
    generator.generate(prompt, max_new_tokens=1)
    return generator.generate(prompt, max_new_tokens=LM_LATENCY_TOKENS).tokens_per_s
