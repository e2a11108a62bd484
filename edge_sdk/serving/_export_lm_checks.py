"""The checks a decoder LLM's export must pass or report: parity of the cached graph with torch, and the
int8 graph's quantization and drift.

**Parity** (fp32 ONNX vs torch). For each parity prompt ``x_1..x_n``, ONNX Runtime generates ``k``
greedy tokens ``y_1..y_k`` the way :mod:`edge_sdk.serving._generate` does (prefill, then one token per
step with the key/value cache), keeping the logits each token was chosen from. torch then runs the
whole sequence ``x_1..x_n y_1..y_{k-1}`` once, without a cache (teacher forcing); its logits at
positions ``n..n+k-1`` must equal ONNX's step logits within ``atol`` (max absolute difference). This
checks the prefill and every cached step against the module itself. ``tokens_equal`` counts, per
prompt, the leading steps where torch's argmax is ONNX's token (equal unless two logits tie within the
tolerance), and the report keeps the smallest.

**int8**: dynamic quantization of the ``MatMul`` weights (int8, per output channel), except the FFN
down-projections, whose inputs (the gated SwiGLU product) carry outlier activations that a per-tensor
uint8 activation scale cannot hold (measured on SmolLM2-135M: teacher-forced top-1 agreement with fp32
0.63 with them quantized, 0.85 without). The tied output projection ``lm_head`` (a ``Transpose`` of
the embedding table in optimum's graph, which the quantizer skips) is stored transposed so that it is
quantized too: it is the largest matrix of a small LLM. Weights use 7 bits (``reduce_range``): ONNX
Runtime's uint8 x int8 kernels on x86 CPUs without VNNI add pairs of products in int16 and saturate
with full-range per-channel weights (on SmolLM2 the generation was garbage: agreement 0.0).

**Drift** (int8 vs fp32, both ONNX Runtime): on the fp32 greedy sequences of the parity prompts, the
share of generated positions where the int8 graph's argmax (teacher forced) is the fp32 token, and the
mean number of leading tokens int8 greedy generation shares with fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ExportError
from edge_sdk.serving._export_optimize import quiet_export_logs
from edge_sdk.serving._generate import Generator

__all__ = ["LMDriftReport", "LMParityReport", "check_lm_parity", "measure_lm_drift", "quantize_lm_int8"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMParityReport:
    """fp32 ONNX (cached steps) vs torch (teacher forced) on the parity prompts."""

    max_abs_diff: float
    atol: float
    prompts: int
    steps: int  # greedy steps per prompt
    tokens_equal: int  # the smallest, over prompts, number of leading steps where torch's argmax is ONNX's token


@dataclass(frozen=True)
class LMDriftReport:
    """int8 vs fp32 (both ONNX Runtime) on the fp32 greedy sequences of the parity prompts."""

    prompts: int
    steps: int
    agreement: float  # share of generated positions where int8's argmax (teacher forced) is fp32's token
    mean_prefix_equal: float  # mean leading tokens int8 greedy generation shares with fp32
    max_abs_logit_diff: float


@torch.no_grad()
def _torch_logits(model: PreTrainedModel, ids: Sequence[int]) -> np.ndarray:
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return np.asarray(out.logits[0].float().cpu().numpy())


def check_lm_parity(
    model: PreTrainedModel, fp32: Generator, prompts: Sequence[Sequence[int]], steps: int, atol: float
) -> tuple[LMParityReport, list[list[int]]]:
    """Raise :class:`ExportError` unless ONNX's cached step logits equal torch's within ``atol``; the
    report and each prompt's ONNX greedy tokens (for the drift measurement)."""
    worst, equal, generated = 0.0, steps, []
    for ids in prompts:
        tokens, onnx_rows = fp32.greedy_logits(ids, steps)
        torch_rows = _torch_logits(model, [*ids, *tokens[:-1]])[len(ids) - 1 :]
        if torch_rows.shape != onnx_rows.shape:
            raise ExportError(f"parity check failed: ONNX step logits {onnx_rows.shape}, torch {torch_rows.shape}")
        diff = float(np.max(np.abs(torch_rows - onnx_rows)))
        worst = max(worst, diff) if np.isfinite(diff) else float("inf")
        same = torch_rows.argmax(axis=-1) == np.asarray(tokens)
        equal = min(equal, int(np.argmin(same)) if not same.all() else steps)
        generated.append(tokens)
    if not np.isfinite(worst) or worst > atol:
        raise ExportError(
            f"parity check failed: ONNX (with its key/value cache) and torch logits differ by up to {worst:.3g}"
            f" (allowed {atol:.1g}) over {len(prompts)} prompt(s) x {steps} greedy step(s); nothing was written"
        )
    logger.info("parity: max |ONNX - torch| = %.3g over %d prompt(s) x %d steps", worst, len(prompts), steps)
    report = LMParityReport(max_abs_diff=worst, atol=atol, prompts=len(prompts), steps=steps, tokens_equal=equal)
    return report, generated


def quantize_lm_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 of a decoder graph: MatMul weights per output channel in 7 bits, the tied ``lm_head``
    included, the FFN down-projections kept in fp32 (see the module's docstring for why)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staged = dst.with_name(dst.stem + ".staged.onnx")
    try:
        graph = onnx.load(str(src))
        _materialize_transposed_weights(graph)
        keep = [n.name for n in graph.graph.node if n.op_type == "MatMul" and "down_proj" in n.name]
        onnx.save(graph, str(staged))
        del graph
        with quiet_export_logs():
            quantize_dynamic(
                staged,
                dst,
                per_channel=True,
                reduce_range=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=keep,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except Exception as exc:  # onnx and onnxruntime.quantization raise assorted types
        raise ExportError(f"int8 quantization of {src.name} failed: {exc}") from exc
    finally:
        staged.unlink(missing_ok=True)


def _materialize_transposed_weights(model: object) -> None:
    """Replace each ``Transpose`` of a 2-D initializer feeding a ``MatMul`` (optimum's tied ``lm_head``)
    by the transposed initializer, so the quantizer sees a weight."""
    from onnx import numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        if consumers.get(node.output[0]) != ["MatMul"]:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]]).T.copy()
        graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
        graph.node.remove(node)


def measure_lm_drift(
    fp32: Generator, int8: Generator, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]
) -> LMDriftReport:
    """int8 vs fp32 on the fp32 greedy continuations ``generated`` of ``prompts`` (see the module docstring)."""
    agree: list[float] = []
    prefixes: list[int] = []
    worst = 0.0
    for ids, tokens in zip(prompts, generated, strict=True):
        sequence = [*ids, *tokens]
        a = fp32.logits(sequence)[len(ids) - 1 : -1]
        b = int8.logits(sequence)[len(ids) - 1 : -1]
        agree.append(float(np.mean(b.argmax(axis=-1) == np.asarray(tokens))))
        worst = max(worst, float(np.max(np.abs(a - b))))
        own = int8.generate(list(ids), max_new_tokens=len(tokens)).token_ids
        prefixes.append(
            next((i for i, (x, y) in enumerate(zip(own, tokens, strict=False)) if x != y), min(len(own), len(tokens)))
        )
    return LMDriftReport(
        prompts=len(prompts),
        steps=len(generated[0]) if generated else 0,
        agreement=float(np.mean(agree)) if agree else 1.0,
        mean_prefix_equal=float(np.mean(prefixes)) if prefixes else 0.0,
        max_abs_logit_diff=worst,
    )
