"""The package version (one place: the SDK, the protocol's Hello and the coordinator read it)."""

__version__ = "0.1.0.dev0"
