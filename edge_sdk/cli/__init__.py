"""The ``edge-sdk`` command: ``profile``, ``join``, ``infer``."""

from edge_sdk.cli._main import main

__all__ = ["main"]
