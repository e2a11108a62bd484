"""edge-fm device SDK: profile the device, build and train a sub-network, serve it with ONNX Runtime.

Importing ``edge_sdk`` never imports torch: names that need it (building and training a
sub-network, ONNX export) load on first use, so an inference-only install (no ``[train]`` extra)
can ``from edge_sdk import load`` and serve.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
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
from ._spec import SPEC_VERSION, LayerSpec, ParentDims, SubnetSpec
from ._units import format_bytes, parse_size

__version__ = "0.1.0.dev0"

# name -> module, imported on first access (they need torch, transformers, onnxruntime or psutil)
_LAZY: dict[str, str] = {
    "build_model": "edge_sdk._build",
    "TrainConfig": "edge_sdk._train",
    "TrainResult": "edge_sdk._train",
    "train_local": "edge_sdk._train",
    "evaluate": "edge_sdk._train",
    "proximal_term": "edge_sdk._train",
    "Workload": "edge_sdk._memory",
    "MemoryEstimate": "edge_sdk._memory",
    "training_estimate": "edge_sdk._memory",
    "inference_estimate": "edge_sdk._memory",
    "DeviceProfile": "edge_sdk._profile",
    "detect_profile": "edge_sdk._profile",
    "MemoryBudget": "edge_sdk._budget",
    "compute_budget": "edge_sdk._budget",
    "DeviceClass": "edge_sdk._profiles",
    "list_device_classes": "edge_sdk._profiles",
    "load_device_class": "edge_sdk._profiles",
    "export_onnx": "edge_sdk._export",
    "ExportReport": "edge_sdk._export",
    "load": "edge_sdk._infer",
    "EdgeDevice": "edge_sdk._client",
    "DeviceOptions": "edge_sdk._client",
    "TextDataset": "edge_sdk._runner",
    "Predictor": "edge_sdk._infer",
    "Prediction": "edge_sdk._infer",
}

__all__ = [
    "SPEC_VERSION",
    "AggregationError",
    "BudgetError",
    "ConfigError",
    "DeviceClass",
    "DeviceOptions",
    "DeviceProfile",
    "EdgeDevice",
    "EdgeFMError",
    "ExportError",
    "ExportReport",
    "LayerSpec",
    "MemoryBudget",
    "MemoryEstimate",
    "ModelLoadError",
    "ParentDims",
    "Prediction",
    "Predictor",
    "ProfileError",
    "ProtocolError",
    "SpecError",
    "SubnetSpec",
    "TextDataset",
    "TrainConfig",
    "TrainResult",
    "UnsupportedModelError",
    "Workload",
    "__version__",
    "build_model",
    "compute_budget",
    "detect_profile",
    "evaluate",
    "export_onnx",
    "format_bytes",
    "inference_estimate",
    "list_device_classes",
    "load",
    "load_device_class",
    "parse_size",
    "proximal_term",
    "train_local",
    "training_estimate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from ._budget import MemoryBudget, compute_budget
    from ._build import build_model
    from ._client import DeviceOptions, EdgeDevice
    from ._export import ExportReport, export_onnx
    from ._infer import Prediction, Predictor, load
    from ._memory import MemoryEstimate, Workload, inference_estimate, training_estimate
    from ._profile import DeviceProfile, detect_profile
    from ._profiles import DeviceClass, list_device_classes, load_device_class
    from ._runner import TextDataset
    from ._train import TrainConfig, TrainResult, evaluate, proximal_term, train_local
