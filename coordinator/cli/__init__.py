"""The ``edge-coordinator`` command: ``serve``, ``simulate``, ``plan``."""

from coordinator.cli._main import main

__all__ = ["main"]
