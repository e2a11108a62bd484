"""Export a decoder LLM held in memory (``LlamaForCausalLM``, LoRA already merged) to a generation folder.

The graph is optimum's ``text-generation-with-past`` export (``onnx_export_from_model`` on the module in
memory): ``input_ids``, ``attention_mask``, ``position_ids`` and the previous key/value cache in;
``logits`` and the new cache out; the tied ``lm_head`` is a ``Transpose`` of the embedding table, stored
once. The folder loads in ``optimum.onnxruntime.ORTModelForCausalLM`` and in
:func:`edge_sdk.serving._generate.load_generator` (no torch).

Widths. The graph reshapes with ``-1`` heads, so each layer keeps its own number of query heads and FFN
neurons (the weights carry them). The *cache* does not allow that freedom: optimum's dummy cache and
``ORTModelForCausalLM``'s empty first cache are shaped from the config's ``num_key_value_heads`` and
``hidden_size // num_attention_heads`` for every layer. So an LLM sub-network deploys only if all its
layers keep the same number of KV heads; the served ``config.json`` states that number (while the
export runs, the module's config says it too), and its ``head_dim`` must be ``hidden_size //
num_attention_heads``. A sub-network whose layers keep different KV-head counts is refused
(:class:`ConfigError`) before any work, unless ``pad_kv_heads`` (what a device's deploy asks for): then
each narrower layer is padded, in place, to the widest layer's ``g`` KV heads, exactly. With ``r``
query heads per KV head (the ratio a sub-network of whole KV groups keeps), a layer of ``g' < g`` groups
gets ``(g - g') r`` query heads and ``g - g'`` KV heads whose ``q``, ``k`` and ``v`` rows are zero, and
as many zero columns of ``o_proj``. A padded query head attends to a padded KV head (head ``i`` reads KV
head ``i // r``: the padding comes after the kept heads), whose values are zero; and its output meets
zero columns of ``o_proj``: the layer's output is unchanged, bit for bit up to the summation order. The
price is the padded heads' compute and cache.

What is written (in a temporary folder beside ``out_dir``, renamed into place once every check passed,
as :func:`edge_sdk.serving._export.export_onnx` does): ``model.onnx`` (fp32, checked against torch:
:mod:`edge_sdk.serving._export_lm_checks`), ``model_quantized.onnx`` with ``quantize`` (its drift
measured), ``config.json``, ``generation_config.json``, the tokenizer files and ``edge_manifest.json``
(``model.task = "causal-lm"``, the per-layer widths, parity, drift, checksums).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ConfigError
from edge_sdk.serving._export import (
    _RESERVED_KEYS,
    DEFAULT_OPSET,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    _copy_tokenizer,
    _eval_mode,
    _publish,
)
from edge_sdk.serving._export_lm_checks import (
    LMDriftReport,
    LMParityReport,
    check_lm_parity,
    measure_lm_drift,
    quantize_lm_int8,
)
from edge_sdk.serving._export_lm_graph import export_lm_graph
from edge_sdk.serving._generate import GENERATION_CONFIG_NAME, load_generator
from edge_sdk.serving._infer import MANIFEST_NAME, MODEL_FP32, MODEL_INT8, sha256_file

__all__ = ["LM_TASK", "LMExportReport", "export_causal_lm", "kv_heads", "pad_kv_groups"]

logger = logging.getLogger(__name__)

LM_TASK = "causal-lm"
OPTIMUM_TASK = "text-generation-with-past"
SKELETON = "model.weights-in-model-onnx.onnx"  # model.onnx's graph, its weights external data in model.onnx


@dataclass(frozen=True)
class LMExportReport:
    """What :func:`export_causal_lm` wrote and measured."""

    out_dir: Path
    opset: int
    parity: LMParityReport
    fp32_bytes: int
    int8_bytes: int | None
    drift: LMDriftReport | None
    seconds: float
    manifest: Mapping[str, Any]


def export_causal_lm(
    model: PreTrainedModel,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    parity_prompts: Sequence[str],
    parity_steps: int = 8,
    quantize: bool = False,
    manifest_extra: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    parity_atol: float = 1e-3,
    pad_kv_heads: bool = False,
) -> LMExportReport:
    """Export ``model`` (a ``*ForCausalLM`` module) with its key/value cache to ``out_dir``.

    ``parity_prompts``: texts (tokenized as served) on which ``parity_steps`` greedy steps of the ONNX
    graph must match torch's logits within ``parity_atol``. ``quantize``: also write the int8 graph and
    measure its drift from fp32 on the same prompts. ``manifest_extra``: JSON facts for the manifest.
    ``pad_kv_heads``: pad layers with fewer KV heads than the widest one (in place, exactly; see the
    module's docstring) instead of refusing the model.

    Raises :class:`ConfigError` for bad arguments or a sub-network the cache cannot describe (before any
    work) and :class:`ExportError` when the export or its parity check fails; nothing is left behind.
    """
    started = time.perf_counter()
    tok_dir, out = Path(tokenizer_dir), Path(out_dir).absolute()
    extra = _check_args(
        model, tok_dir=tok_dir, out=out, prompts=parity_prompts, steps=parity_steps, manifest_extra=manifest_extra
    )
    if pad_kv_heads:
        pad_kv_groups(model)
    heads = kv_heads(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        parity, drift = _write_models(
            model, tmp, tok_dir=tok_dir, heads=heads, opset=opset, prompts=parity_prompts,
            steps=parity_steps, atol=parity_atol, quantize=quantize,
        )  # fmt: skip
        manifest = _manifest(model, tmp, heads, opset=opset, parity=parity, drift=drift, extra=extra)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = LMExportReport(
        out_dir=out, opset=opset, parity=parity, fp32_bytes=(out / MODEL_FP32).stat().st_size,
        int8_bytes=(out / MODEL_INT8).stat().st_size if quantize else None, drift=drift,
        seconds=time.perf_counter() - started, manifest=manifest,
    )  # fmt: skip
    logger.info(
        "exported %s in %.1f s: parity %.2e, %d/%d greedy tokens equal to torch%s",
        out, report.seconds, parity.max_abs_diff, parity.tokens_equal, parity.steps,
        "" if drift is None else f"; int8 agreement {drift.agreement:.3f}",
    )  # fmt: skip
    return report


def _write_models(
    model: PreTrainedModel,
    tmp: Path,
    *,
    tok_dir: Path,
    heads: int,
    opset: int,
    prompts: Sequence[str],
    steps: int,
    atol: float,
    quantize: bool,
) -> tuple[LMParityReport, LMDriftReport | None]:
    """Write the tokenizer, configs and fp32 graph (and the int8 graph with ``quantize``) into ``tmp``;
    check the fp32 graph's parity with ``model`` and measure the int8 graph's drift from it.

    The fp32 checks read ``model.onnx``'s weights through its skeleton (:data:`SKELETON`, removed
    before the folder is published): an ONNX Runtime session of less memory. No fp32 session is open
    while the int8 pass runs (it loads the model more than once); the drift opens one again."""
    skeleton = tmp / SKELETON
    try:
        with _eval_mode(model), _config_kv_heads(model, heads):
            _copy_tokenizer(tok_dir, tmp)
            _write_configs(model, tmp)
            export_lm_graph(model, tmp / MODEL_FP32, opset, tmp, task=OPTIMUM_TASK, skeleton=skeleton)
            fp32 = load_generator(tmp, verify=False, model_file=SKELETON)
            ids = [fp32.encode(p) for p in prompts]
            parity, generated = check_lm_parity(model, fp32, ids, steps, atol)
        if not quantize:
            return parity, None
        del fp32
        gc.collect()
        quantize_lm_int8(tmp / MODEL_FP32, tmp / MODEL_INT8)
        fp32 = load_generator(tmp, verify=False, model_file=SKELETON)
        int8 = load_generator(tmp, prefer_quantized=True, verify=False)
        return parity, measure_lm_drift(fp32, int8, ids, generated)
    finally:
        skeleton.unlink(missing_ok=True)


def _decoder_layers(model: PreTrainedModel) -> Sequence[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no decoder layers at model.layers: not a Llama-like LLM")
    return list(layers)


def _layer_widths(model: PreTrainedModel) -> list[dict[str, int]]:
    """Per layer: query heads, KV heads, head dim and FFN neurons, read off the modules."""
    widths = []
    for layer in _decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = int(attn.head_dim)
        widths.append(
            {
                "heads": int(attn.q_proj.out_features) // head_dim,
                "kv_heads": int(attn.k_proj.out_features) // head_dim,
                "head_dim": head_dim,
                "ffn": int(mlp.up_proj.out_features),
            }
        )
    return widths


def kv_heads(model: PreTrainedModel) -> int:
    """The number of KV heads every layer keeps; :class:`ConfigError` when layers differ (the cache's
    shapes come from one config value) or the head size is not ``hidden_size // num_attention_heads``."""
    widths = _layer_widths(model)
    counts = sorted({w["kv_heads"] for w in widths})
    if len(counts) != 1:
        per_layer = [w["kv_heads"] for w in widths]
        raise ConfigError(
            f"an LLM deploy needs the same number of KV heads in every layer (the ONNX cache is shaped from one"
            f" config value); this sub-network keeps {per_layer}. Query heads and FFN widths may differ per layer."
        )
    config = model.config
    head_dim = widths[0]["head_dim"]
    if int(config.hidden_size) // int(config.num_attention_heads) != head_dim:
        raise ConfigError(
            f"head size {head_dim} is not hidden_size // num_attention_heads ="
            f" {int(config.hidden_size) // int(config.num_attention_heads)}: the ONNX cache cannot be described"
        )
    return counts[0]


def pad_kv_groups(model: PreTrainedModel) -> int:
    """Pad every layer, in place, to the widest layer's KV heads with zero heads (exact: see the module's
    docstring); the number of layers padded."""
    layers = _decoder_layers(model)
    widths = _layer_widths(model)
    target = max(w["kv_heads"] for w in widths)
    padded = 0
    for layer, width in zip(layers, widths, strict=True):
        if width["kv_heads"] == target:
            continue
        if width["heads"] % width["kv_heads"]:
            raise ConfigError(f"a layer keeps {width['heads']} query heads for {width['kv_heads']} KV heads")
        ratio, dim = width["heads"] // width["kv_heads"], width["head_dim"]
        attn = layer.self_attn
        attn.q_proj = _padded(attn.q_proj, rows=target * ratio * dim)
        attn.k_proj = _padded(attn.k_proj, rows=target * dim)
        attn.v_proj = _padded(attn.v_proj, rows=target * dim)
        attn.o_proj = _padded(attn.o_proj, columns=target * ratio * dim)
        padded += 1
    if padded:
        logger.info("padded %d layer(s) to %d KV heads for the ONNX cache", padded, target)
    return padded


@torch.no_grad()
def _padded(linear: torch.nn.Module, *, rows: int | None = None, columns: int | None = None) -> torch.nn.Linear:
    """``linear`` with zero rows (outputs) or zero columns (inputs) appended up to ``rows`` / ``columns``."""
    assert isinstance(linear, torch.nn.Linear)
    weight = linear.weight
    out_f, in_f = rows or linear.out_features, columns or linear.in_features
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.zero_()
    new.weight[: linear.out_features, : linear.in_features] = weight
    if linear.bias is not None:
        new.bias.zero_()
        new.bias[: linear.out_features] = linear.bias
    return new


@contextlib.contextmanager
def _config_kv_heads(model: PreTrainedModel, heads: int) -> Iterator[None]:
    """The module's config says ``heads`` KV heads while the export runs (optimum shapes its dummy cache
    from it) and ``use_cache`` is on; both restored afterwards."""
    config = model.config
    saved = (config.num_key_value_heads, config.use_cache)
    config.num_key_value_heads, config.use_cache = heads, True
    try:
        yield
    finally:
        config.num_key_value_heads, config.use_cache = saved


def _write_configs(model: PreTrainedModel, dest: Path) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(dest))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(dest))
    if not (dest / GENERATION_CONFIG_NAME).is_file():
        doc = {"eos_token_id": config.eos_token_id, "bos_token_id": getattr(config, "bos_token_id", None)}
        (dest / GENERATION_CONFIG_NAME).write_text(json.dumps(doc) + "\n", encoding="utf-8")


def _check_args(
    model: PreTrainedModel,
    *,
    tok_dir: Path,
    out: Path,
    prompts: Sequence[str],
    steps: int,
    manifest_extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ConfigError(f"export_causal_lm exports *ForCausalLM modules, got {type(model).__name__}")
    if not tok_dir.is_dir():
        raise ConfigError(f"tokenizer_dir {str(tok_dir)!r} is not a directory")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError("parity_prompts must be a non-empty list of non-empty texts")
    if not 1 <= steps <= 256:
        raise ConfigError(f"parity_steps must be in 1..256, got {steps}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ConfigError(f"out_dir {str(out)!r} is not empty and holds no earlier export: refusing to replace it")
    extra = dict(manifest_extra or {})
    clash = sorted((_RESERVED_KEYS | {"generation"}) & extra.keys())
    if clash:
        raise ConfigError(f"manifest_extra may not set {clash}: those keys are written by the exporter")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"manifest_extra must be JSON-serializable: {exc}") from exc
    return extra


def _manifest(
    model: PreTrainedModel,
    folder: Path,
    heads: int,
    *,
    opset: int,
    parity: LMParityReport,
    drift: LMDriftReport | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    import onnxruntime
    import transformers

    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    config = model.config
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": {
            "method": "optimum",
            "task": OPTIMUM_TASK,
            "opset": opset,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "model": {
            "architecture": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "task": LM_TASK,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "kv_heads": heads,
            "layer_widths": _layer_widths(model),
        },
        "generation": {
            "max_positions": int(config.max_position_embeddings),
            "eos_token_id": config.eos_token_id,
        },
        "parity": asdict(parity),
        "quantization": (
            {
                "method": "dynamic",
                "weight_type": "QInt8",
                "per_channel": True,
                "reduce_range": True,
                "kept_fp32": "mlp.down_proj",
                "file": MODEL_INT8,
            }
            if drift is not None
            else None
        ),
        "drift": None if drift is None else asdict(drift),
        "files": files,
        **extra,
    }
