"""Deploying on the device: export a received inference sub-network to ONNX, check it, install it.

A ``Deploy`` from the coordinator carries a sub-network (spec, model config, weights) and inference
settings (batch, sequence length, int8 or not). :class:`Deployer` builds the module
(``_build.build_model``), exports it from memory with :func:`edge_sdk.serving._export.export_onnx`, which

- checks the ONNX model's logits against torch on texts of the device's own data (max abs difference
  <= 1e-4; a model that fails is never installed),
- with ``quantize``, writes a dynamic int8 model (per-channel weights) and measures its drift against
  fp32 on a slice of local data (the held-back examples, ``edge-sdk join --holdout N``, when there are
  some; else the last local examples, and the manifest says they were trained on),
- writes the served folder (``model.onnx``, ``model_quantized.onnx``, ``config.json``, tokenizer files,
  ``edge_manifest.json`` with the source run and round, the widths, parity and drift) and swaps it into
  the deploy folder atomically.

A causal LM (the deploy's config names a ``*ForCausalLM`` architecture, or the device's data are
prompt/response records: ``data.task == "causal-lm"``) is exported with its key/value cache by
:func:`edge_sdk.serving._export_lm.export_causal_lm` instead (:mod:`edge_sdk.serving._install_lm`):
parity of greedy steps against torch on the prompts of the device's own records, int8 drift on the
same prompts, installed for ``edge-sdk generate``.

Any failure (a corrupt sub-network, a failed export or parity check) leaves the previously installed
model in place and is reported, never raised: :meth:`Deployer.deploy` returns the DeployResult's
``ok``, ``metrics`` and ``message``. It is synchronous and heavy (torch, seconds): the client runs it
in a worker thread. torch is imported on use only, so importing this module stays cheap.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._errors import ConfigError
from edge_sdk._spec import SubnetSpec
from edge_sdk.protocol import Deploy, thaw_json
from edge_sdk.training._data import TextExample

if TYPE_CHECKING:
    from edge_sdk.serving._export import ExportReport

LM_TASK = "causal-lm"

__all__ = ["DRIFT_ROWS", "PARITY_ATOL", "PARITY_ROWS", "DeployOutput", "Deployer"]

logger = logging.getLogger(__name__)

PARITY_ROWS = 8  # local texts the ONNX model is checked against torch on
DRIFT_ROWS = 64  # local examples the int8 model's drift is measured on
PARITY_ATOL = 1e-4


@dataclass(frozen=True)
class DeployOutput:
    """A deploy's answer: what the DeployResult carries."""

    ok: bool
    metrics: dict[str, float]
    message: str


class Deployer:
    """Exports received inference sub-networks and installs them in ``folder`` (call from one worker thread).

    ``data``: the device's local data; it needs ``examples`` (:class:`TextExample`) and ``tokenizer_dir``
    (a :class:`~edge_sdk.training._runner.TextDataset` has both), and may hold examples back (``held_out``).
    """

    def __init__(self, folder: str | Path, data: Any, *, threads: int | None = None, method: str = "auto") -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.data = data
        self.threads = threads
        self.method = method
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"the deploy folder {self.folder} exists and is not a directory")

    # ------------------------------------------------------------------------------- local data

    def _examples(self) -> list[TextExample]:
        examples = getattr(self.data, "examples", None)
        if getattr(self.data, "classes", None) is not None and getattr(self.data, "processing", None) is not None:
            raise ConfigError(
                "this device's data is an image folder: deploying image-classification models is not supported"
                " yet (set [deploy] enabled = false, or join with --no-deploy)"
            )
        if not examples or getattr(self.data, "tokenizer_dir", None) is None:
            raise ConfigError(
                "this device's data has no texts and tokenizer (a TextDataset has both): it cannot check"
                " an exported model, so it does not deploy"
            )
        return list(examples)

    def _parity_batch(self, examples: Sequence[TextExample], max_length: int) -> Sequence[str] | dict[str, Any]:
        rows = list(examples[:PARITY_ROWS])
        if all(e.text_pair is None for e in rows):
            return [e.text for e in rows]
        from edge_sdk.training._data import encode, load_tokenizer  # sentence pairs: tokenized here, as in training

        enc = encode(load_tokenizer(self.data.tokenizer_dir, max_length), rows)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids}

    def _drift_slice(self, examples: Sequence[TextExample]) -> tuple[list[TextExample], bool]:
        held = list(getattr(self.data, "held_out", None) or [])
        if held:
            return held[:DRIFT_ROWS], True
        return list(examples[-DRIFT_ROWS:]), False

    # ---------------------------------------------------------------------------------- deploy

    def deploy(self, deploy: Deploy, tensors: Mapping[str, np.ndarray], *, run_id: str | None = None) -> DeployOutput:
        """Export, check and install the deploy's sub-network; never raises for a bad model or export."""
        started = time.perf_counter()
        try:
            metrics = self._deploy(deploy, tensors, run_id)
        except Exception as exc:  # any failure: keep the installed model, tell the coordinator why
            logger.warning(
                "deploy %s failed: %s: %s; the installed model (if any) stays in %s",
                deploy.task_id,
                type(exc).__name__,
                exc,
                self.folder,
                exc_info=not isinstance(exc, (ConfigError, ValueError)),
            )
            message = f"{type(exc).__name__}: {exc}; the previously installed model is kept"
            return DeployOutput(False, {"seconds": time.perf_counter() - started}, message[:2000])
        finally:
            gc.collect()
        metrics["seconds"] = time.perf_counter() - started
        logger.info(
            "deploy %s: installed %.2fM params in %s (parity %.2e, %.1f s)",
            deploy.task_id,
            metrics["params"] / 1e6,
            self.folder,
            metrics["parity_max_abs_diff"],
            metrics["seconds"],
        )
        return DeployOutput(True, metrics, f"installed in {self.folder}")

    def _deploy(self, deploy: Deploy, tensors: Mapping[str, np.ndarray], run_id: str | None) -> dict[str, float]:
        from edge_sdk.scaling.families import model_task
        from edge_sdk.training._labels import bind_labels

        if model_task(thaw_json(deploy.model_config), getattr(self.data, "task", None)) == LM_TASK:
            from edge_sdk.serving._install_lm import deploy_lm

            return deploy_lm(self.data, self.folder, deploy, tensors, run_id=run_id, threads=self.threads)
        bind_labels(self.data, thaw_json(deploy.model_config))  # a device may be sent a deploy before any task
        examples = self._examples()
        import torch

        from edge_sdk.protocol import numpy_to_torch
        from edge_sdk.scaling._build import build_model
        from edge_sdk.training._train import peak_rss_bytes

        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: set it in the worker
        spec = SubnetSpec.from_dict(thaw_json(deploy.spec))
        config = thaw_json(deploy.model_config)
        positions = config.get("max_position_embeddings")
        seq_len = deploy.settings.seq_len
        max_length = min(seq_len, positions) if isinstance(positions, int) else seq_len
        model = build_model(spec, config, numpy_to_torch(dict(tensors)))
        parity_batch = self._parity_batch(examples, max_length)
        report = self._export(
            model, deploy, spec=spec, examples=examples, parity_batch=parity_batch, max_length=max_length, run_id=run_id
        )
        params = sum(p.numel() for p in model.parameters())
        del model
        text = parity_batch[0] if isinstance(parity_batch, list) else "a test sentence"
        metrics: dict[str, float] = {
            "params": float(params),
            "parity_max_abs_diff": report.parity.max_abs_diff,
            "onnx_bytes": float(report.fp32_bytes),
            "export_s": report.seconds,
            "latency_ms": self._latency_ms(text),
            # the process's peak since it started (training included): above the training peak, the export set it
            "process_peak_rss_bytes": float(peak_rss_bytes()),
            **_int8_metrics(report),
        }
        return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}

    def _export(
        self,
        model: Any,
        deploy: Deploy,
        *,
        spec: SubnetSpec,
        examples: Sequence[TextExample],
        parity_batch: Sequence[str] | dict[str, Any],
        max_length: int,
        run_id: str | None,
    ) -> ExportReport:
        """Export ``model`` into the deploy folder (checked, then swapped in); the int8 model's drift is
        measured on a slice of local texts (single-text tasks only)."""
        from edge_sdk.serving._export import export_onnx

        settings = deploy.settings
        drift_texts = drift_labels = None
        drift_slice: dict[str, Any] | None = None
        if settings.quantize and isinstance(parity_batch, list):
            rows, held_out = self._drift_slice(examples)
            drift_texts, drift_labels = [e.text for e in rows], [e.label for e in rows]
            drift_slice = {"rows": len(rows), "held_out": held_out}
        return export_onnx(
            model,
            self.data.tokenizer_dir,
            self.folder,
            parity_batch=parity_batch,
            max_length=max_length,
            quantize=settings.quantize,
            optimize=settings.optimize,
            drift_texts=drift_texts,
            drift_labels=drift_labels,
            manifest_extra={
                "source": {"run_id": run_id, "round": deploy.round, "task_id": deploy.task_id},
                "spec": spec.to_dict(),
                "inference": {
                    "batch_size": settings.batch_size,
                    "seq_len": settings.seq_len,
                    "quantize": settings.quantize,
                    "optimize": settings.optimize,
                },
                "drift_slice": drift_slice,
            },
            method=self.method,  # type: ignore[arg-type]
            parity_atol=PARITY_ATOL,
        )

    def _latency_ms(self, text: str) -> float:
        """One text's latency through the installed folder, loaded as `edge-sdk infer` loads it
        (checksums verified), after one warm-up call."""
        from edge_sdk.serving._infer import load

        predictor = load(self.folder, threads=self.threads)
        predictor.predict([text])  # warm-up
        t0 = time.perf_counter()
        predictor.predict([text])
        return (time.perf_counter() - t0) * 1e3


def _int8_metrics(report: ExportReport) -> dict[str, float]:
    """The int8 model's size and drift from fp32 (agreement, logits, accuracy when labelled), if any."""
    metrics: dict[str, float] = {}
    if report.int8_bytes is not None:
        metrics["int8_bytes"] = float(report.int8_bytes)
    drift = report.drift
    if drift is not None:
        metrics["drift_rows"] = float(drift.n)
        metrics["drift_agreement"] = drift.agreement
        metrics["drift_max_abs_logit_diff"] = drift.max_abs_logit_diff
        if drift.accuracy_fp32 is not None and drift.accuracy_int8 is not None:
            metrics["drift_accuracy_fp32"] = drift.accuracy_fp32
            metrics["drift_accuracy_int8"] = drift.accuracy_int8
            metrics["drift_accuracy_drop"] = drift.accuracy_fp32 - drift.accuracy_int8
    return metrics
