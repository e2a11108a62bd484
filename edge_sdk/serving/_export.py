"""Export a trained sub-network (held in memory) to a folder ONNX Runtime can serve.

This module (with :mod:`edge_sdk.serving._export_graph`, the two exporters, and :mod:`edge_sdk.serving._export_checks`,
parity / quantization / drift) imports torch, transformers and, on use, optimum and
onnxruntime.quantization. ``edge_sdk/__init__.py`` never imports it, so an inference-only install (no
``[export]`` extra) does not need them.

What :func:`export_onnx` writes (the *served folder*, read by :func:`edge_sdk.serving._infer.load`):

- ``model.onnx``: the fp32 graph, exported from the module in memory, so per-layer head counts and FFN
  widths survive (the Hugging Face config cannot describe them; the graph carries the shapes). Its logits
  are checked against torch on ``parity_batch`` (max abs difference <= ``parity_atol``) before anything
  is published.
- With ``optimize=True`` (default) and a BERT-like model type, ``model.onnx`` is the graph after ONNX
  Runtime's transformer fusions (attention, skip-LayerNorm, bias-GELU, embedding-LayerNorm; one
  ``Attention`` node per layer with that layer's head count, :mod:`edge_sdk.serving._export_optimize`),
  and the parity check runs on the fused graph. If the fusion fails or its graph misses parity, the
  unfused graph is checked and served instead, with a warning.
- ``model_quantized.onnx`` when ``quantize=True``: dynamic int8 with per-channel weights, quantized from the
  served fp32 graph (fused first, then quantized: the order measured fastest, ``bench/inference.py``).
  Both files are kept: the fp32 one is the checked reference and the fallback;
  the predictor serves the int8 one by default (``prefer_quantized=True``). A device short of storage may
  delete ``model.onnx``; the predictor then uses what is left.
- ``config.json`` (loads in ``optimum.onnxruntime.ORTModelForSequenceClassification``), the tokenizer files
  of ``tokenizer_dir`` (``tokenizer.json`` generated if only slow files exist), and ``edge_manifest.json``.

The folder is built in a temporary directory beside ``out_dir`` and renamed into place only once every
check passed; a failed export leaves the previous model in place and no partial folder behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ConfigError, ExportError
from edge_sdk.serving._export_checks import (
    DriftReport,
    ParityInput,
    ParityReport,
    check_parity,
    measure_drift,
    quantize_int8,
)
from edge_sdk.serving._export_graph import ExportMethod, export_graph
from edge_sdk.serving._export_optimize import FusionReport, fuse_graph, optimizer_model_type
from edge_sdk.serving._infer import (
    MANIFEST_NAME,
    MODEL_FP32,
    MODEL_INT8,
    TOKENIZER_NAME,
    load,
    sha256_file,
)

__all__ = ["DriftReport", "ExportReport", "FusionReport", "ParityReport", "export_onnx"]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "edge-fm/onnx-export"
MANIFEST_VERSION = 1
DEFAULT_OPSET = 18  # optimum-onnx 0.1.0's default for BERT; ONNX Runtime >= 1.17 runs it
_TOKENIZER_FILES = (
    TOKENIZER_NAME,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_RESERVED_KEYS = frozenset(
    {
        "format",
        "format_version",
        "created",
        "exporter",
        "model",
        "max_length",
        "parity",
        "quantization",
        "drift",
        "graph",
        "files",
    }
)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    out_dir: Path
    exporter: Literal["optimum", "torch"]
    opset: int
    parity: ParityReport
    fp32_bytes: int
    int8_bytes: int | None
    drift: DriftReport | None
    seconds: float
    manifest: Mapping[str, Any]
    fusion: FusionReport | None = None  # None: the served graph is not fused

    @property
    def size_ratio(self) -> float | None:
        """int8 file size / fp32 file size."""
        return None if self.int8_bytes is None else self.int8_bytes / self.fp32_bytes


def export_onnx(
    model: PreTrainedModel,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    parity_batch: ParityInput,
    max_length: int = 128,
    quantize: bool = False,
    drift_texts: Sequence[str] | None = None,
    drift_labels: Sequence[int] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    method: ExportMethod = "auto",
    opset: int = DEFAULT_OPSET,
    parity_atol: float = 1e-4,
    optimize: bool = True,
) -> ExportReport:
    """Export ``model`` (a ``*ForSequenceClassification`` module, any per-layer widths) to ``out_dir``.

    ``parity_batch``: texts (tokenized with ``tokenizer_dir``'s tokenizer, as served) or a mapping of
    arrays (``input_ids`` and optionally ``attention_mask``, ``token_type_ids``). ``max_length``: the
    serving truncation length, recorded in the manifest. ``quantize``: also write the int8 model and
    measure its drift on ``drift_texts`` (accuracy too when ``drift_labels`` are given).
    ``manifest_extra``: JSON-serializable facts for the manifest (source run, round, per-layer spec...).
    ``method``: ``"optimum"`` (``onnx_export_from_model``), ``"torch"`` (``torch.onnx.export``,
    ``dynamo=False``) or ``"auto"`` (optimum, falling back to torch when it cannot export the model).
    ``optimize``: apply ONNX Runtime's transformer fusions to the graph before the parity check and
    quantization (BERT, RoBERTa, DistilBERT model types; others are served unfused).

    Raises :class:`ConfigError` for bad arguments (before any work) and :class:`ExportError` when the
    export fails or its logits differ from torch by more than ``parity_atol``.
    """
    started = time.perf_counter()
    req = _Request(
        tok_dir=Path(tokenizer_dir), out=Path(out_dir).absolute(), parity_batch=parity_batch,
        max_length=max_length, quantize=quantize, drift_texts=drift_texts, drift_labels=drift_labels,
        method=method, opset=opset, parity_atol=parity_atol, optimize=optimize,
    )  # fmt: skip
    extra = _check_args(model, req, manifest_extra)
    out = req.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        exporter, parity, drift, fusion = _write_models(model, req, tmp)
        manifest = _manifest(model, tmp, req, exporter=exporter, parity=parity, drift=drift, extra=extra, fusion=fusion)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(
        out_dir=out, exporter=exporter, opset=opset, parity=parity, fp32_bytes=(out / MODEL_FP32).stat().st_size,
        int8_bytes=(out / MODEL_INT8).stat().st_size if quantize else None, drift=drift,
        seconds=time.perf_counter() - started, manifest=manifest, fusion=fusion,
    )  # fmt: skip
    _log_report(report)
    return report


@dataclass(frozen=True)
class _Request:
    """:func:`export_onnx`'s arguments, as one value its steps share."""

    tok_dir: Path
    out: Path
    parity_batch: ParityInput
    max_length: int
    quantize: bool
    drift_texts: Sequence[str] | None
    drift_labels: Sequence[int] | None
    method: ExportMethod
    opset: int
    parity_atol: float
    optimize: bool


def _write_models(
    model: PreTrainedModel, req: _Request, tmp: Path
) -> tuple[Literal["optimum", "torch"], ParityReport, DriftReport | None, FusionReport | None]:
    """Write the tokenizer, config and fp32 graph (fused when possible; and the int8 graph if ``quantize``)
    into ``tmp``; check the fp32 graph's parity with ``model`` and measure the int8 graph's drift from it."""
    with _eval_mode(model):
        _copy_tokenizer(req.tok_dir, tmp)
        _write_config(model, tmp)
        exporter = export_graph(model, tmp / MODEL_FP32, req.method, req.opset, tmp)
        fusion = _fuse(model, req, tmp) if req.optimize else None
        fp32 = load(tmp, prefer_quantized=False, max_length=req.max_length, verify=False)
        parity = check_parity(model, fp32, req.parity_batch, req.parity_atol)
        drift: DriftReport | None = None
        if req.quantize:
            quantize_int8(tmp / MODEL_FP32, tmp / MODEL_INT8)
            int8 = load(tmp, prefer_quantized=True, max_length=req.max_length, verify=False)
            drift = measure_drift(fp32, int8, req.parity_batch, texts=req.drift_texts, labels=req.drift_labels)
    return exporter, parity, drift, fusion


def _fuse(model: PreTrainedModel, req: _Request, tmp: Path) -> FusionReport | None:
    """Replace ``tmp/model.onnx`` with its fused graph if the fusion works and keeps parity with ``model``;
    otherwise keep the unfused graph (with a warning naming why). None when nothing was fused."""
    model_type = optimizer_model_type(getattr(model.config, "model_type", None))
    if model_type is None:
        logger.info("no ONNX Runtime fusion for model type %r: serving the unfused graph", model.config.model_type)
        return None
    unfused = tmp / "model.unfused.onnx"
    os.replace(tmp / MODEL_FP32, unfused)
    try:
        report = fuse_graph(unfused, tmp / MODEL_FP32, model_type)
        fused = load(tmp, prefer_quantized=False, max_length=req.max_length, verify=False)
        check_parity(model, fused, req.parity_batch, req.parity_atol)
    except ExportError as exc:
        logger.warning("the fused graph is not used (%s); checking the unfused graph", exc)
        os.replace(unfused, tmp / MODEL_FP32)
        return None
    unfused.unlink()
    return report


def _log_report(report: ExportReport) -> None:
    drift = report.drift
    logger.info(
        "exported %s with %s in %.1f s: parity %.2e%s",
        report.out_dir,
        report.exporter,
        report.seconds,
        report.parity.max_abs_diff,
        "" if drift is None else f", int8 {report.size_ratio:.0%} of fp32, agreement {drift.agreement:.4f}",
    )


def _check_args(model: PreTrainedModel, req: _Request, manifest_extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Refuse bad arguments before any work (:class:`ConfigError`); the manifest's extra facts, checked."""
    tok_dir, out, max_length, parity_batch = req.tok_dir, req.out, req.max_length, req.parity_batch
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if req.method not in ("auto", "optimum", "torch"):
        raise ConfigError(f"method must be 'auto', 'optimum' or 'torch', got {req.method!r}")
    if not tok_dir.is_dir():
        raise ConfigError(f"tokenizer_dir {str(tok_dir)!r} is not a directory")
    if not any((tok_dir / n).is_file() for n in _TOKENIZER_FILES):
        raise ConfigError(f"tokenizer_dir {str(tok_dir)!r} holds no tokenizer file ({', '.join(_TOKENIZER_FILES)})")
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length < 2 or (isinstance(positions, int) and max_length > positions):
        raise ConfigError(f"max_length must be in 2..{positions}, got {max_length}")
    if isinstance(parity_batch, str) or (not isinstance(parity_batch, Mapping) and len(parity_batch) == 0):
        raise ConfigError("parity_batch must be a non-empty list of texts or a mapping of arrays")
    if isinstance(parity_batch, Mapping) and "input_ids" not in parity_batch:
        raise ConfigError("a tokenized parity_batch needs 'input_ids'")
    if req.drift_texts is not None and not req.quantize:
        raise ConfigError("drift_texts measure the int8 model: pass quantize=True")
    labels, texts = req.drift_labels, req.drift_texts
    if labels is not None and (texts is None or len(labels) != len(texts)):
        raise ConfigError("drift_labels needs drift_texts of the same length")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ConfigError(f"out_dir {str(out)!r} is not empty and holds no earlier export: refusing to replace it")
    extra = dict(manifest_extra or {})
    clash = sorted(_RESERVED_KEYS & extra.keys())
    if clash:
        raise ConfigError(f"manifest_extra may not set {clash}: those keys are written by the exporter")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"manifest_extra must be JSON-serializable: {exc}") from exc
    return extra


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (exporters leave the module in training mode) and restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _copy_tokenizer(tok_dir: Path, dest: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, dest / name)
    if (dest / TOKENIZER_NAME).is_file():
        return
    # Only slow-tokenizer files (vocab.txt...): let transformers convert them to a tokenizers file.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        raise ConfigError(f"cannot load a tokenizer from {str(tok_dir)!r}: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{str(tok_dir)!r}: no {TOKENIZER_NAME} and no fast tokenizer conversion")
    tok.backend_tokenizer.save(str(dest / TOKENIZER_NAME))
    logger.info("%s had no %s: generated one from its slow tokenizer files", tok_dir, TOKENIZER_NAME)


def _write_config(model: PreTrainedModel, dest: Path) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(dest))


def _layer_widths(model: PreTrainedModel) -> list[dict[str, int]] | None:
    """Per-layer heads / head dim / FFN width read off the module (BERT family), or None."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if layers is None:
        return None
    widths = []
    try:
        for layer in layers:
            attn = layer.attention.self
            widths.append(
                {
                    "heads": int(attn.num_attention_heads),
                    "head_dim": int(attn.attention_head_size),
                    "ffn": int(layer.intermediate.dense.out_features),
                }
            )
    except AttributeError:
        return None
    return widths


def _manifest(
    model: PreTrainedModel,
    folder: Path,
    req: _Request,
    *,
    exporter: str,
    parity: ParityReport,
    drift: DriftReport | None,
    extra: Mapping[str, Any],
    fusion: FusionReport | None,
) -> dict[str, Any]:
    import onnxruntime
    import transformers

    id2label = dict(model.config.id2label or {})
    labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(int(model.config.num_labels))]
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    drift_doc = None if drift is None else {**asdict(drift), "accuracy_drop": drift.accuracy_drop}
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": {
            "method": exporter,
            "opset": req.opset,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "model": {
            "architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "labels": labels,
            "layer_widths": _layer_widths(model),
        },
        "max_length": req.max_length,
        "parity": asdict(parity),
        "quantization": (
            {"method": "dynamic", "weight_type": "QInt8", "per_channel": True, "file": MODEL_INT8}
            if req.quantize
            else None
        ),
        "drift": drift_doc,
        "graph": None if fusion is None else _graph_doc(fusion),
        "files": files,
        **extra,
    }


def _graph_doc(fusion: FusionReport) -> dict[str, Any]:
    return {
        "optimizer": "onnxruntime.transformers",
        "model_type": fusion.model_type,
        "fused": dict(fusion.fused),
        "attention_heads": list(fusion.attention_heads),
    }


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an earlier export; restore it on failure."""
    _fsync_tree(tmp)
    old: Path | None = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
