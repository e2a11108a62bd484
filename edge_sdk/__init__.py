"""edge-fm device SDK: profile the device, build and train a sub-network, serve it with ONNX Runtime.

Importing ``edge_sdk`` never imports torch: names that need it (building and training a
sub-network, ONNX export) load on first use, so an inference-only install (no ``[train]`` extra)
can ``from edge_sdk import load`` and serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._errors import (
    AggregationError,
    BudgetError,
    ConfigError,
    EdgeFMError,
    ExportError,
    ModelLoadError,
    ProfileError,
    ProtocolError,
    SpecError,
    UnsupportedModelError,
)
from edge_sdk._lazy import lazy_face
from edge_sdk._spec import SPEC_VERSION, LayerSpec, ParentDims, SubnetSpec
from edge_sdk._units import format_bytes, parse_size
from edge_sdk._version import __version__

# name -> the room (sub-package face) that defines it, imported on first access (torch, onnxruntime, psutil)
_LAZY: dict[str, str] = {
    "build_model": "edge_sdk.scaling",
    "TrainConfig": "edge_sdk.training",
    "TrainResult": "edge_sdk.training",
    "train_local": "edge_sdk.training",
    "evaluate": "edge_sdk.training",
    "proximal_term": "edge_sdk.training",
    "Workload": "edge_sdk.scaling",
    "MemoryEstimate": "edge_sdk.scaling",
    "training_estimate": "edge_sdk.scaling",
    "inference_estimate": "edge_sdk.scaling",
    "DeviceProfile": "edge_sdk.device",
    "detect_profile": "edge_sdk.device",
    "MemoryBudget": "edge_sdk.scaling",
    "compute_budget": "edge_sdk.device",
    "DeviceClass": "edge_sdk.device",
    "list_device_classes": "edge_sdk.device",
    "load_device_class": "edge_sdk.device",
    "export_onnx": "edge_sdk.serving",
    "ExportReport": "edge_sdk.serving",
    "load": "edge_sdk.serving",
    "EdgeDevice": "edge_sdk.client",
    "DeviceOptions": "edge_sdk.client",
    "websocket_messages": "edge_sdk.client",
    "DataChannel": "edge_sdk.client",
    "serve_data_channels": "edge_sdk.client",
    "TextDataset": "edge_sdk.training",
    "TaskRunner": "edge_sdk.training",
    "prepare_runtime": "edge_sdk.training",
    "Encoded": "edge_sdk.training",
    "TextExample": "edge_sdk.training",
    "encode": "edge_sdk.training",
    "iter_batches": "edge_sdk.training",
    "load_tokenizer": "edge_sdk.training",
    "read_tsv": "edge_sdk.training",
    "ImageDataset": "edge_sdk.training",
    "ImageProcessing": "edge_sdk.training",
    "image_seq_len": "edge_sdk.training",
    "read_image_folder": "edge_sdk.training",
    "DataFile": "edge_sdk.training",
    "DataFormat": "edge_sdk.training",
    "LabelMap": "edge_sdk.training",
    "read_rows": "edge_sdk.training",
    "PromptDataset": "edge_sdk.training",
    "encode_prompts": "edge_sdk.training",
    "is_prompt_file": "edge_sdk.training",
    "read_prompts": "edge_sdk.training",
    "Predictor": "edge_sdk.serving",
    "Prediction": "edge_sdk.serving",
}

__all__ = [
    "SPEC_VERSION",
    "AggregationError",
    "BudgetError",
    "ConfigError",
    "DataChannel",
    "DataFile",
    "DataFormat",
    "DeviceClass",
    "DeviceOptions",
    "DeviceProfile",
    "EdgeDevice",
    "EdgeFMError",
    "Encoded",
    "ExportError",
    "ExportReport",
    "ImageDataset",
    "ImageProcessing",
    "LabelMap",
    "LayerSpec",
    "MemoryBudget",
    "MemoryEstimate",
    "ModelLoadError",
    "ParentDims",
    "Prediction",
    "Predictor",
    "ProfileError",
    "PromptDataset",
    "ProtocolError",
    "SpecError",
    "SubnetSpec",
    "TaskRunner",
    "TextDataset",
    "TextExample",
    "TrainConfig",
    "TrainResult",
    "UnsupportedModelError",
    "Workload",
    "__version__",
    "build_model",
    "compute_budget",
    "detect_profile",
    "encode",
    "encode_prompts",
    "evaluate",
    "export_onnx",
    "format_bytes",
    "image_seq_len",
    "inference_estimate",
    "is_prompt_file",
    "iter_batches",
    "list_device_classes",
    "load",
    "load_device_class",
    "load_tokenizer",
    "parse_size",
    "prepare_runtime",
    "proximal_term",
    "read_image_folder",
    "read_prompts",
    "read_rows",
    "read_tsv",
    "serve_data_channels",
    "train_local",
    "training_estimate",
    "websocket_messages",
]


__getattr__, __dir__ = lazy_face(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from edge_sdk.client._channel import DataChannel, serve_data_channels
    from edge_sdk.client._client import DeviceOptions, EdgeDevice
    from edge_sdk.client._stream import websocket_messages
    from edge_sdk.device._budget import compute_budget
    from edge_sdk.device._classes import DeviceClass, list_device_classes, load_device_class
    from edge_sdk.device._profile import DeviceProfile, detect_profile
    from edge_sdk.scaling._budget import MemoryBudget
    from edge_sdk.scaling._build import build_model
    from edge_sdk.scaling._memory import MemoryEstimate, Workload, inference_estimate, training_estimate
    from edge_sdk.serving._export import ExportReport, export_onnx
    from edge_sdk.serving._infer import Prediction, Predictor, load
    from edge_sdk.training._data import Encoded, TextExample, encode, iter_batches, load_tokenizer, read_tsv
    from edge_sdk.training._formats import DataFile, DataFormat, read_rows
    from edge_sdk.training._images import ImageDataset, ImageProcessing, image_seq_len, read_image_folder
    from edge_sdk.training._labels import LabelMap
    from edge_sdk.training._prompts import PromptDataset, encode_prompts, is_prompt_file, read_prompts
    from edge_sdk.training._runner import TaskRunner, TextDataset
    from edge_sdk.training._runtime import prepare_runtime
    from edge_sdk.training._train import TrainConfig, TrainResult, evaluate, proximal_term, train_local
