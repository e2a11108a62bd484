"""Serving on the device: ONNX export, parity checks, installing a deployed model, inference, LLM generation.

Importing this face never imports torch: inference needs ONNX Runtime, tokenizers and numpy only;
export (which needs torch) loads when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "Deployer": "edge_sdk.serving._install",
    "ExportReport": "edge_sdk.serving._export",
    "Generation": "edge_sdk.serving._generate",
    "Generator": "edge_sdk.serving._generate",
    "LMExportReport": "edge_sdk.serving._export_lm",
    "MANIFEST_NAME": "edge_sdk.serving._infer",
    "Prediction": "edge_sdk.serving._infer",
    "Predictor": "edge_sdk.serving._infer",
    "export_causal_lm": "edge_sdk.serving._export_lm",
    "export_onnx": "edge_sdk.serving._export",
    "load": "edge_sdk.serving._infer",
    "load_generator": "edge_sdk.serving._generate",
    "sha256_file": "edge_sdk.serving._infer",
}

__all__ = [
    "MANIFEST_NAME",
    "Deployer",
    "ExportReport",
    "Generation",
    "Generator",
    "LMExportReport",
    "Prediction",
    "Predictor",
    "export_causal_lm",
    "export_onnx",
    "load",
    "load_generator",
    "sha256_file",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.serving._export import ExportReport, export_onnx
    from edge_sdk.serving._export_lm import LMExportReport, export_causal_lm
    from edge_sdk.serving._generate import Generation, Generator, load_generator
    from edge_sdk.serving._infer import MANIFEST_NAME, Prediction, Predictor, load, sha256_file
    from edge_sdk.serving._install import Deployer
