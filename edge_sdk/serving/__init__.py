"""Serving on the device: ONNX export, parity checks, installing a deployed model, inference.

Importing this face never imports torch: inference needs ONNX Runtime, tokenizers and numpy only;
export (which needs torch) loads when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "Deployer": "edge_sdk.serving._install",
    "ExportReport": "edge_sdk.serving._export",
    "MANIFEST_NAME": "edge_sdk.serving._infer",
    "Prediction": "edge_sdk.serving._infer",
    "Predictor": "edge_sdk.serving._infer",
    "export_onnx": "edge_sdk.serving._export",
    "load": "edge_sdk.serving._infer",
    "sha256_file": "edge_sdk.serving._infer",
}

__all__ = [
    "MANIFEST_NAME",
    "Deployer",
    "ExportReport",
    "Prediction",
    "Predictor",
    "export_onnx",
    "load",
    "sha256_file",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.serving._export import ExportReport, export_onnx
    from edge_sdk.serving._infer import MANIFEST_NAME, Prediction, Predictor, load, sha256_file
    from edge_sdk.serving._install import Deployer
