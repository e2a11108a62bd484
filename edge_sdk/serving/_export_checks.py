"""The checks an export must pass or report: ONNX-vs-torch parity, int8 quantization, int8 drift.

Parity compares fp32 ONNX Runtime logits with the torch module's on the same arrays; quantization is
dynamic int8 with per-channel weights of the served fp32 graph (fused by
:mod:`edge_sdk.serving._export_optimize` when the model type allows: optimize, then quantize);
drift compares the int8 model with the fp32 one on a held-back
slice. Note that dynamic quantization scales activations per batch, so int8 logits depend slightly on how
inputs are batched. Used by :mod:`edge_sdk.serving._export`; needs torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ExportError
from edge_sdk.serving._export_graph import input_names
from edge_sdk.serving._export_optimize import quiet_export_logs
from edge_sdk.serving._infer import Predictor

__all__ = [
    "DriftReport",
    "ParityInput",
    "ParityReport",
    "check_parity",
    "measure_drift",
    "parity_inputs",
    "quantize_int8",
    "torch_logits",
]

logger = logging.getLogger(__name__)

ParityInput = Sequence[str] | Mapping[str, Any]


@dataclass(frozen=True)
class ParityReport:
    """ONNX fp32 vs torch logits on the parity batch."""

    max_abs_diff: float
    atol: float
    batch_size: int
    sequence_length: int


@dataclass(frozen=True)
class DriftReport:
    """int8 vs fp32 (both ONNX Runtime) on a held-back slice (or the parity batch when none was given)."""

    source: Literal["drift_texts", "parity_batch"]
    n: int
    agreement: float  # share of inputs whose argmax is the same
    max_abs_logit_diff: float
    accuracy_fp32: float | None = None  # when labels were given
    accuracy_int8: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_fp32 - self.accuracy_int8


def parity_inputs(predictor: Predictor, batch: ParityInput) -> dict[str, np.ndarray]:
    """int64 model inputs: texts tokenized as served, or given arrays (mask: ones, token types: zeros)."""
    if isinstance(batch, Mapping):
        arrays = {
            k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.int64) for k, v in batch.items()
        }
        ids = arrays["input_ids"]
        arrays.setdefault("attention_mask", np.ones_like(ids))
        arrays.setdefault("token_type_ids", np.zeros_like(ids))
        return arrays
    return predictor.encode(list(batch)).inputs


@torch.no_grad()
def torch_logits(model: PreTrainedModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The module's logits on numpy inputs (call in eval mode)."""
    device = next(model.parameters()).device
    names = input_names(model)
    out = model(**{n: torch.from_numpy(inputs[n]).to(device) for n in names if n in inputs})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return np.asarray(logits.float().cpu().numpy())


def check_parity(model: PreTrainedModel, fp32: Predictor, batch: ParityInput, atol: float) -> ParityReport:
    """Raise :class:`ExportError` unless max |ONNX - torch| over the batch's logits is <= ``atol``."""
    inputs = parity_inputs(fp32, batch)
    expected = torch_logits(model, inputs)
    actual = fp32.forward(inputs)
    if actual.shape != expected.shape:
        raise ExportError(f"parity check failed: ONNX logits {actual.shape}, torch {expected.shape}")
    diff = float(np.max(np.abs(actual - expected)))
    shape = inputs["input_ids"].shape
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(
            f"parity check failed: ONNX and torch logits differ by up to {diff:.3g} (allowed {atol:.1g}) "
            f"on a batch of {shape[0]} x {shape[1]} tokens; nothing was written"
        )
    logger.info("parity: max |ONNX - torch| = %.3g on %d x %d", diff, shape[0], shape[1])
    return ParityReport(max_abs_diff=diff, atol=atol, batch_size=int(shape[0]), sequence_length=int(shape[1]))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 with per-channel weights of ``src``, fused or not (a fused ``Attention`` becomes
    ``QAttention``; tensors the quantizer's shape inference cannot type, the fused ops' outputs, are float)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet_export_logs():
            quantize_dynamic(
                src,
                dst,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except Exception as exc:  # onnxruntime.quantization raises assorted types
        raise ExportError(f"int8 quantization of {src.name} failed: {exc}") from exc


def measure_drift(
    fp32: Predictor,
    int8: Predictor,
    parity_batch: ParityInput,
    *,
    texts: Sequence[str] | None,
    labels: Sequence[int] | None,
    batch_size: int = 64,
) -> DriftReport:
    """Argmax agreement and max logit difference of int8 vs fp32 (accuracies too when labels are given)."""
    if texts is None:
        inputs = parity_inputs(fp32, parity_batch)
        a, b = fp32.forward(inputs), int8.forward(inputs)
    else:
        a = fp32.logits(list(texts), batch_size=batch_size)
        b = int8.logits(list(texts), batch_size=batch_size)
    pa, pb = a.argmax(axis=-1), b.argmax(axis=-1)
    acc_a = acc_b = None
    if labels is not None:
        gold = np.asarray(labels)
        acc_a, acc_b = float(np.mean(pa == gold)), float(np.mean(pb == gold))
    return DriftReport(
        source="parity_batch" if texts is None else "drift_texts",
        n=int(a.shape[0]),
        agreement=float(np.mean(pa == pb)),
        max_abs_logit_diff=float(np.max(np.abs(a - b))),
        accuracy_fp32=acc_a,
        accuracy_int8=acc_b,
    )
