"""The one exception tree of edge-fm.

Every error the project raises on purpose derives from :class:`EdgeFMError`, so a caller can catch
all of them at once, or one family (a bad spec, a budget that cannot be met, a protocol fault).
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "BudgetError",
    "ConfigError",
    "EdgeFMError",
    "ExportError",
    "ModelLoadError",
    "ProfileError",
    "ProtocolError",
    "SpecError",
    "UnsupportedModelError",
]


class EdgeFMError(Exception):
    """Base of every error edge-fm raises on purpose."""


class ConfigError(EdgeFMError, ValueError):
    """A configuration value or command-line argument is malformed (a size, a path, a setting)."""


class UnsupportedModelError(EdgeFMError, ValueError):
    """The model's architecture has no registered family."""


class SpecError(EdgeFMError, ValueError):
    """A sub-network spec is malformed or does not match the model it is applied to."""


class BudgetError(EdgeFMError, ValueError):
    """No sub-network fits the memory budget given."""


class AggregationError(EdgeFMError, ValueError):
    """A client update cannot be merged (wrong names, shapes, dtypes or non-finite values)."""


class ExportError(EdgeFMError):
    """Exporting a sub-network to ONNX failed: the exporter, the parity check or quantization."""


class ModelLoadError(EdgeFMError):
    """A served model cannot be loaded: a corrupt or unsupported ONNX file, a checksum mismatch,
    an unreadable tokenizer."""


class ProfileError(EdgeFMError, ValueError):
    """A device profile (detected or read from a file) is invalid; ``problems`` lists every fault."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message if not problems else message + ":\n  - " + "\n  - ".join(problems))
        self.problems = problems


class ProtocolError(EdgeFMError):
    """A wire message is malformed, of an unknown type or version, too large, or out of order.

    ``close_code`` is the websocket close code the peer should be sent (1002 protocol error,
    1003 unsupported data, 1008 policy violation, 1009 message too big).
    """

    def __init__(self, message: str, close_code: int = 1002) -> None:
        super().__init__(message)
        self.close_code = close_code
