"""Lazy package faces: a name is imported from its private module on first access.

A face lists ``name -> module``; ``from edge_sdk.scaling import plan_training`` then imports only
the module that defines it, so a torch-free face (``edge_sdk``, ``edge_sdk.serving``) stays
torch-free until a caller asks for a name that needs torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_face"]


def lazy_face(
    package: str, names: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, resolving ``names`` into ``namespace``."""

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace.get("__all__", ())) | set(names))

    return getattr_, dir_
