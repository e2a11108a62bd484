"""Where edge-fm remembers what is slow to measure and never changes for an installation.

``$EDGE_FM_CACHE``, else ``$XDG_CACHE_HOME/edge-fm``, else ``~/.cache/edge-fm``. What lives there:
the runtime's footprint (``edge_sdk.device._footprint``) and ranked parents
(``edge_sdk.scaling._parent_cache``). Deleting the folder is always safe: it is measured again.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "EDGE_FM_CACHE"


def cache_dir() -> Path:
    """``$EDGE_FM_CACHE``, else ``$XDG_CACHE_HOME/edge-fm``, else ``~/.cache/edge-fm``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edge-fm"
