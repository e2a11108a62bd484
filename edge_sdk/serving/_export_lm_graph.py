"""A decoder's ``model.onnx`` without a second copy of its weights in memory.

Why. ``torch.onnx.export`` (the TorchScript exporter optimum drives) holds, at its peak, the module's
weights, their constant-folded transposes (every ``Linear`` is ``MatMul(x, Transpose(W))``, folded into
a new ``W^T``), the ``ModelProto`` it builds in C++ with a copy of every initializer, that proto
serialized, and the serialized bytes handed to Python: five copies of the weights. Measured on
SmolLM2-135M (``python bench/lm_export_memory.py``): 2.65 GB above the runtime, 19.7 bytes per
parameter, all of it inside that one call.

How. optimum traces the graph alone (``export_params=False``, constant folding off: the weights are
graph inputs, with their ``state_dict`` names, and carry no data), in a scratch file. Then
:func:`write_with_weights` writes ``model.onnx`` itself: the graph without those inputs, then one
initializer at a time, its bytes streamed from the torch tensor's memory into the file. A ``Transpose``
whose only input is a weight used nowhere else (each ``Linear``'s) is replaced by the transposed
weight, written under the ``Transpose``'s output name: the graph is the folded one, and the largest
transient copy is one linear's weight. A weight read by several nodes (the tied embedding table: the
``Gather`` and the ``lm_head``'s ``Transpose``) is written once and its nodes kept, as optimum's tied-
weight de-duplication leaves it.

The file is one protobuf ``ModelProto``: the graph is written as several ``graph`` fields, each holding
one initializer, which protobuf parsers merge into one ``GraphProto`` (an embedded message field that
occurs more than once is merged; a repeated field is concatenated). ONNX Runtime and ``onnx.load``
read it as the usual single file. Weights are raw little-endian bytes (``TensorProto.raw_data``).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import PreTrainedModel

from edge_sdk._errors import ExportError

__all__ = ["export_lm_graph", "write_with_weights"]

_MODEL_GRAPH = (7 << 3) | 2  # ModelProto.graph, length-delimited
_GRAPH_INITIALIZER = (5 << 3) | 2  # GraphProto.initializer
_TENSOR_RAW_DATA = (9 << 3) | 2  # TensorProto.raw_data
_MAX_PROTO = 2**31 - 1  # protobuf's limit on one message


def export_lm_graph(
    model: PreTrainedModel, path: Path, opset: int, scratch_parent: Path, *, task: str, skeleton: Path | None = None
) -> None:
    """Write ``path``: optimum's ``task`` export of ``model`` (see the module's docstring), without the
    torch exporter ever holding a copy of the weights; and ``skeleton`` (see :func:`write_with_weights`)."""
    from edge_sdk.serving._export_graph import export_optimum

    scratch = Path(tempfile.mkdtemp(prefix="graph-", dir=scratch_parent))
    try:
        graph = scratch / "graph.onnx"
        with _graph_only_torch_export():
            export_optimum(model, graph, opset, scratch, task=task, post_process=False)
        write_with_weights(graph, _named_tensors(model), path, skeleton=skeleton)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _graph_only_torch_export() -> Iterator[None]:
    """``torch.onnx.export`` exports the graph alone while this runs (optimum resolves it at call time).
    The patch is process-wide, so LLM exports in one process take turns (``_TORCH_EXPORT_PATCH``)."""
    with _TORCH_EXPORT_PATCH:
        original = torch.onnx.export

        def graph_only(*args: Any, **kwargs: Any) -> Any:
            kwargs.update(export_params=False, do_constant_folding=False)
            return original(*args, **kwargs)

        torch.onnx.export = graph_only
        try:
            yield
        finally:
            torch.onnx.export = original


_TORCH_EXPORT_PATCH = threading.Lock()


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_buffers())
    tensors.update(model.named_parameters(remove_duplicate=False))
    return tensors


def write_with_weights(
    graph_path: Path, tensors: Mapping[str, torch.Tensor], out: Path, *, skeleton: Path | None = None
) -> None:
    """``out``: the graph at ``graph_path`` with each of its inputs named in ``tensors`` made an
    initializer holding that tensor (``Transpose``s of single-use 2-D weights folded; see the module's
    docstring). :class:`ExportError` if the graph has no weight inputs or the file would exceed 2 GB.

    ``skeleton`` (in ``out``'s folder): the same model whose initializers are ONNX external data that
    point at their bytes inside ``out`` (``location`` ``out``'s name, ``offset``, ``length``). ONNX
    Runtime loads it reading the weights from ``out`` itself, without parsing them into a protobuf
    first: measured on SmolLM2-135M with the torch weights resident, +0.68 GB to open a session instead
    of +1.01 GB from ``out``. The export's checks run on it: on ``out``'s bytes."""
    import onnx

    if sys.byteorder != "little":
        raise ExportError("writing ONNX raw tensor data needs a little-endian machine")
    model = onnx.load(str(graph_path))
    graph = model.graph
    weights = [i.name for i in graph.input if i.name in tensors]
    if not weights:
        raise ExportError("the traced graph takes no weights as inputs: nothing to attach")
    folded = _foldable_transposes(graph, set(weights))
    kept = [i for i in graph.input if i.name not in tensors]
    del graph.input[:]
    graph.input.extend(kept)
    for node in folded.values():
        graph.node.remove(node)
    head = model.SerializeToString()
    del model
    external = []
    with open(out, "wb") as f:
        f.write(head)
        for name in weights:
            node = folded.get(name)
            array = tensors[name].detach().cpu()
            array = array.t() if node is not None else array
            external.append(
                _write_initializer(f, node.output[0] if node is not None else name, array.contiguous().numpy())
            )
        size = f.tell()
    if size > _MAX_PROTO:
        out.unlink(missing_ok=True)
        raise ExportError(f"the ONNX model would be {size} bytes, over protobuf's 2 GB: not supported")
    if skeleton is not None:
        _write_skeleton(skeleton, head, external, out.name)


def _write_skeleton(path: Path, head: bytes, external: list[tuple[Any, int, int]], location: str) -> None:
    from onnx import TensorProto

    with open(path, "wb") as f:
        f.write(head)
        for header, offset, length in external:
            header.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = header.external_data.add()
                entry.key, entry.value = key, value
            tensor = header.SerializeToString()
            body = bytes([_GRAPH_INITIALIZER]) + _varint(len(tensor)) + tensor
            f.write(bytes([_MODEL_GRAPH]) + _varint(len(body)) + body)


def _foldable_transposes(graph: Any, weights: set[str]) -> dict[str, Any]:
    """weight name -> the ``Transpose`` node that is its only consumer (a 2-D swap): to fold."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name in weights:
                consumers.setdefault(name, []).append(node)
    folded = {}
    for name, nodes in consumers.items():
        node = nodes[0]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if len(nodes) == 1 and node.op_type == "Transpose" and perm == [1, 0]:
            folded[name] = node
    return folded


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _write_initializer(f: BinaryIO, name: str, array: np.ndarray) -> tuple[Any, int, int]:
    """One ``graph`` field holding one initializer: ``name``, ``array``'s shape and type, its bytes;
    the ``TensorProto`` without its data, and where its bytes start in the file and their length."""
    from onnx import TensorProto, helper

    header = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    head = header.SerializeToString()
    raw = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # no copy
    tensor_len = len(head) + 1 + len(_varint(raw.nbytes)) + raw.nbytes
    graph_len = 1 + len(_varint(tensor_len)) + tensor_len
    f.write(bytes([_MODEL_GRAPH]) + _varint(graph_len) + bytes([_GRAPH_INITIALIZER]) + _varint(tensor_len))
    f.write(head + bytes([_TENSOR_RAW_DATA]) + _varint(raw.nbytes))
    offset = f.tell()
    f.write(raw)
    return header, offset, raw.nbytes
