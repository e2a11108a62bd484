"""The two ways to turn an in-memory ``*ForSequenceClassification`` module into ``model.onnx``.

optimum's ``onnx_export_from_model`` (first choice) and ``torch.onnx.export(..., dynamo=False)`` (fallback
for architectures optimum does not know). Both trace the module held in memory, so per-layer head counts
and FFN widths reach the graph. Used by :mod:`edge_sdk.serving._export`; needs torch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ExportError
from edge_sdk.serving._export_optimize import quiet_export_logs
from edge_sdk.serving._infer import MODEL_FP32

__all__ = ["ExportMethod", "export_graph", "export_optimum", "export_torch", "input_names"]

logger = logging.getLogger(__name__)

ExportMethod = Literal["auto", "optimum", "torch"]


def input_names(model: PreTrainedModel) -> list[str]:
    """The tokenizer inputs the module's ``forward`` accepts (DistilBERT takes no ``token_type_ids``)."""
    accepted = inspect.signature(model.forward).parameters
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]


def export_graph(
    model: PreTrainedModel, path: Path, method: ExportMethod, opset: int, scratch_parent: Path
) -> Literal["optimum", "torch"]:
    """Write ``path`` with ``method`` ("auto": optimum, then torch if optimum fails); return the one used."""
    if method in ("auto", "optimum"):
        try:
            export_optimum(model, path, opset, scratch_parent)
            return "optimum"
        except Exception as exc:  # optimum raises ValueError/KeyError/RuntimeError for models it cannot do
            if method == "optimum":
                raise ExportError(f"optimum could not export {type(model).__name__}: {exc}") from exc
            logger.warning("optimum could not export %s (%s); using torch.onnx.export", type(model).__name__, exc)
            path.unlink(missing_ok=True)
    try:
        export_torch(model, path, opset)
    except Exception as exc:  # torch.onnx raises many types (OnnxExporterError, RuntimeError, ...)
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
    return "torch"


def export_optimum(
    model: PreTrainedModel,
    path: Path,
    opset: int,
    scratch_parent: Path,
    *,
    task: str = "text-classification",
    post_process: bool = True,
) -> None:
    """optimum's exporter for ``task``, run in a scratch folder under ``scratch_parent``; only the graph
    is kept (``"text-generation-with-past"``: a decoder with its key/value cache). ``post_process``:
    optimum's (tied-weight de-duplication, which reads the weights from the file)."""
    from optimum.exporters.onnx import onnx_export_from_model

    scratch = Path(tempfile.mkdtemp(prefix="optimum-", dir=scratch_parent))
    # optimum copies preprocessors from config._name_or_path (a hub id would mean network access):
    # point it at an empty folder instead (not the scratch folder, where optimum writes config.json first:
    # a Llama tokenizer then loads from the config alone, with a warning about its legacy behaviour).
    empty = scratch / "no-preprocessors"
    empty.mkdir()
    name_or_path = model.config._name_or_path
    model.config._name_or_path = str(empty)
    try:
        with _expected_export_warnings_silenced(), quiet_export_logs():
            onnx_export_from_model(
                model, scratch, opset=opset, task=task, do_validation=False, no_post_process=not post_process
            )
        model.eval()
        written = scratch / MODEL_FP32
        if not written.is_file():
            raise ExportError(f"optimum wrote no {MODEL_FP32} (got {sorted(p.name for p in scratch.iterdir())})")
        if any(scratch.glob("*.onnx_data")):
            raise ExportError("the exported graph uses external data (> 2 GB): not supported")
        os.replace(written, path)
    finally:
        model.config._name_or_path = name_or_path
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _expected_export_warnings_silenced() -> Iterator[None]:
    """Both exporters use torch's TorchScript exporter on purpose (dynamo=False: 1.7 s vs 19 s), which
    warns that it is deprecated; transformers' mask helper warns that it makes a constant while traced.
    Both are expected (the parity check covers the result); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning, module=r"(transformers|optimum|torch\.nn\.functional)"
        )
        # a decoder's cache indexing (non-negative indices: the parity check runs the cached steps)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        yield


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: PreTrainedModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors, strict=True)))
        return out.logits if hasattr(out, "logits") else out[0]


def export_torch(model: PreTrainedModel, path: Path, opset: int) -> None:
    """``torch.onnx.export(dynamo=False)`` of the module's logits, batch and sequence axes dynamic."""
    names = input_names(model)
    # A padded dummy batch, so the traced graph keeps the attention-mask arithmetic.
    token = min(1000, int(getattr(model.config, "vocab_size", 1001)) - 1)
    ids = torch.full((2, 16), token, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    dummy = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    device = next(model.parameters()).device
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes["logits"] = {0: "batch_size"}
    wrapper = _LogitsOnly(model, names).eval()
    with _expected_export_warnings_silenced():
        torch.onnx.export(
            wrapper,
            tuple(dummy[n].to(device) for n in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model.eval()
