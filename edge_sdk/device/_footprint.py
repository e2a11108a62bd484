"""The training runtime's footprint, measured once per installation and remembered.

Measuring the footprint means importing the runtime (torch, transformers and the families' modeling
code): 4-6 s on a small CPU, for a figure that changes only when the installation does. ``edge-sdk
profile`` measures it once and keeps it in ``runtime-footprint.json`` under the cache folder
(``$EDGE_FM_CACHE``, else ``$XDG_CACHE_HOME/edge-fm``, else ``~/.cache/edge-fm``), keyed by what
decides it: the Python and package versions, the machine and the modules imported. A later profile
with the same key reads it instead of importing; a changed key measures again. Unreadable or
unwritable cache files are ignored (the footprint is then measured, as without a cache).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_sdk._cache import cache_dir
from edge_sdk._version import __version__

__all__ = ["Footprint", "cache_dir", "load_footprint", "save_footprint"]

log = logging.getLogger(__name__)

FILE_NAME = "runtime-footprint.json"
_PACKAGES = ("torch", "transformers", "tokenizers", "peft")


@dataclass(frozen=True)
class Footprint:
    """What importing the runtime cost: the resident set after the imports, and before them."""

    runtime_rss: int
    baseline_rss: int
    modules: tuple[str, ...]
    torch_version: str | None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _key(modules: Sequence[str]) -> dict[str, Any]:
    return {
        "edge_fm": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "modules": list(modules),
    }


def load_footprint(modules: Sequence[str], folder: Path | None = None) -> Footprint | None:
    """The remembered footprint of importing ``modules`` in this installation, or None."""
    path = (folder or cache_dir()) / FILE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != _key(modules):
            return None
        found = Footprint(
            runtime_rss=int(data["runtime_rss"]),
            baseline_rss=int(data["baseline_rss"]),
            modules=tuple(str(m) for m in data["modules"]),
            torch_version=None if data["torch_version"] is None else str(data["torch_version"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("runtime footprint cache %s not used: %s", path, exc)
        return None
    if found.runtime_rss <= 0 or found.baseline_rss < 0:
        return None
    return found


def save_footprint(modules: Sequence[str], footprint: Footprint, folder: Path | None = None) -> None:
    """Remember ``footprint`` for ``modules`` (atomically; a failure is logged at debug level only)."""
    path = (folder or cache_dir()) / FILE_NAME
    data = {
        "key": _key(modules),
        "runtime_rss": footprint.runtime_rss,
        "baseline_rss": footprint.baseline_rss,
        "modules": list(footprint.modules),
        "torch_version": footprint.torch_version,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.debug("runtime footprint not remembered in %s: %s", path, exc)
