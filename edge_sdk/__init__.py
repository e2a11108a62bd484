"""edge-fm device SDK: profile the device, build and train a sub-network, serve it with ONNX Runtime.

Importing ``edge_sdk`` never imports torch: the training half is loaded on first use, so an
inference-only install (no ``[train]`` extra) works.
"""

from __future__ import annotations

from ._errors import (
    AggregationError,
    BudgetError,
    ConfigError,
    EdgeFMError,
    ProfileError,
    ProtocolError,
    SpecError,
    UnsupportedModelError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AggregationError",
    "BudgetError",
    "ConfigError",
    "EdgeFMError",
    "ProfileError",
    "ProtocolError",
    "SpecError",
    "UnsupportedModelError",
    "__version__",
]
