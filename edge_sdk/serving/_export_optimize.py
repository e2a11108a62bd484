"""ONNX Runtime's transformer graph fusions for an exported encoder, and the export's quiet logging.

:func:`fuse_graph` runs ``onnxruntime.transformers.optimizer.optimize_model`` (model type ``bert``,
``opt_level=0``: only the transformer fusions, the session optimizes the rest when it loads) on the
fp32 graph: attention (Q/K/V matmuls, scaling, mask, softmax and context into one ``Attention`` node),
skip-LayerNorm (residual add + LayerNorm), bias-GELU and embedding-LayerNorm. ``num_heads`` and
``hidden_size`` are 0, so the fusion reads each layer's head count off that layer's own reshape: a
sub-network whose layers keep different numbers of heads gets one ``Attention`` node per layer with that
layer's ``num_heads`` (and Q/K/V weights of that layer's width), verified by the exporter's parity check.
The attention mask stays a raw 2-D mask (``use_raw_attention_mask``): the default "mask index" form
counts the ones in each row, which is wrong for a left-padded mask or one with holes.

Quantizing the fused graph afterwards (``quantize_dynamic`` with a default float tensor type, since its
shape inference does not know the fused ops' outputs) turns the fused ``Attention`` into ``QAttention``;
measured in ``bench/inference.py`` this order is at least as fast as quantize-then-optimize (whose
fusions stop at GELU and skip-LayerNorm) and drifts less.

:func:`quiet_export_logs` drops, by logger and message, the warnings libraries emit during an export that
a user cannot act on; every other record passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_sdk._errors import ExportError

__all__ = ["FUSED_OPS", "FusionReport", "fuse_graph", "optimizer_model_type", "quiet_export_logs"]

logger = logging.getLogger(__name__)

# The fused operators a BERT-like encoder is expected to end up with, as ONNX Runtime names them.
FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu", "EmbedLayerNormalization")

# Hugging Face model types whose encoder ONNX Runtime's "bert" optimizer fuses.
_OPTIMIZER_TYPES: Mapping[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
}

# (logger name, message prefix) of warnings that reach a user's terminal during an export and that they
# cannot act on. Matched on the record's unformatted message, so the arguments may vary.
_NOISE: tuple[tuple[str, str], ...] = (
    # optimum: tied-weight deduplication needs accelerate; a classifier's graph has no tied weights to merge.
    ("optimum.exporters.onnx.base", "Weight deduplication check in the ONNX export requires accelerate"),
    # optimum, exporting a decoder with a tied lm_head: its graph reads the embedding table through a
    # Transpose, which optimum's tied-weight matcher does not recognise; the table is stored once anyway
    # (SmolLM2-135M: 539 MB for 134.5M parameters). Logged on optimum's library logger, three lines.
    ("optimum", "Found different candidate ONNX initializers (likely duplicate) for the tied weights"),
    ("optimum", "\tlm_head.weight: "),
    ("optimum", "\tmodel.embed_tokens.weight: "),
    # onnxruntime.quantization (logged on the root logger): its pre-processing measured no gain here
    # (bench/inference.py) and its symbolic shape inference fails on these graphs.
    ("root", "Please consider to run pre-processing before quantization"),
    # onnxruntime.transformers: a pruned layer's attention width (heads x head dim) differs from the
    # hidden size by design; the fusion uses the detected width, and the parity check verifies it.
    # (onnxruntime.transformers puts its own folder on sys.path: its modules log under their bare names.)
    *(
        (name, "Input hidden size (%d) is not same as weight matrix")
        for name in ("fusion_attention", "onnxruntime.transformers.fusion_attention")
    ),
)


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_graph` fused: the number of nodes per fused operator, and per-layer heads."""

    model_type: str
    fused: Mapping[str, int]
    attention_heads: tuple[int, ...]  # num_heads of each fused Attention node, in graph order


def optimizer_model_type(hf_model_type: str | None) -> str | None:
    """ONNX Runtime's optimizer type for a Hugging Face ``model_type`` (None: no fusion known)."""
    return _OPTIMIZER_TYPES.get(hf_model_type or "")


def fuse_graph(src: Path, dst: Path, model_type: str) -> FusionReport:
    """Write ``src`` with ONNX Runtime's transformer fusions applied to ``dst`` (both fp32).

    Raises :class:`ExportError` when the optimizer fails or fuses no attention at all.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.use_raw_attention_mask(True)
    try:
        with quiet_export_logs():
            optimized = optimize_model(
                str(src),
                model_type=model_type,
                num_heads=0,  # 0: read per layer from the graph (sub-networks keep different head counts)
                hidden_size=0,
                optimization_options=options,
                opt_level=0,
                use_gpu=False,
            )
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if k in FUSED_OPS and v}
        heads = tuple(
            int(onnx.helper.get_attribute_value(attr))
            for node in optimized.model.graph.node
            if node.op_type == "Attention"
            for attr in node.attribute
            if attr.name == "num_heads"
        )
        if not heads:
            raise ExportError(f"no attention was fused (fused: {stats or 'nothing'})")
        optimized.save_model_to_file(str(dst))
    except ExportError:
        raise
    except Exception as exc:  # the optimizer raises assorted types (AssertionError, KeyError, onnx errors)
        raise ExportError(f"graph fusion failed: {type(exc).__name__}: {exc}") from exc
    logger.info("fused %s: %s; heads per layer %s", src.name, stats, list(heads))
    return FusionReport(model_type=model_type, fused=stats, attention_heads=heads)


class _DropNoise(logging.Filter):
    """Drops records whose unformatted message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_export_logs() -> Iterator[None]:
    """Drop the known, unactionable export warnings (``_NOISE``) while the block runs.

    ``onnxruntime.quantization`` warns through ``logging.warning``, which configures the root logger
    (``basicConfig``) when it has no handler: every later warning of the process would then be printed
    in a different format. While the block runs, an unconfigured root logger gets ``logging.lastResort``
    (what Python prints through when nothing is configured), so nothing changes for other records.
    """
    added: list[tuple[logging.Logger, _DropNoise]] = []
    root = logging.getLogger()
    borrowed = None
    if not root.handlers and logging.lastResort is not None:
        borrowed = logging.lastResort
        root.addHandler(borrowed)
    try:
        for name, prefix in _NOISE:
            target = root if name == "root" else logging.getLogger(name)
            drop = _DropNoise(prefix)
            target.addFilter(drop)
            added.append((target, drop))
        yield
    finally:
        for target, drop in added:
            target.removeFilter(drop)
        if borrowed is not None:
            root.removeHandler(borrowed)
