"""``edge-sdk``: the device's command line.

Each sub-command lives in its own module (``_cli_<name>.py``) exposing ``add_parser(subparsers)``
and ``run(args) -> int``; they are imported lazily so ``edge-sdk infer`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_sdk._errors import EdgeFMError

# name -> module providing add_parser(subparsers) and run(args)
_COMMANDS: dict[str, str] = {
    "profile": "edge_sdk.cli._profile",
    "infer": "edge_sdk.cli._infer",
    "generate": "edge_sdk.cli._generate",
    "join": "edge_sdk.cli._join",
}


def _available() -> dict[str, object]:
    mods: dict[str, object] = {}
    for name, module in _COMMANDS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a sub-command not built yet, or its extra not installed
            if exc.name == module:
                continue
            raise
    return mods


def _quiet_third_party(record: logging.LogRecord) -> bool:
    """Drop libraries' INFO chatter logged on the root logger (ONNX Runtime's quantizer: ~100 lines a model)."""
    return record.levelno >= logging.WARNING or record.name != "root" or "onnxruntime" not in record.pathname


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-sdk", description="edge-fm device SDK")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    mods = _available()
    for mod in mods.values():
        mod.add_parser(sub)  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_third_party)
    try:
        return int(mods[args.command].run(args))  # type: ignore[attr-defined]
    except EdgeFMError as exc:
        print(f"edge-sdk {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
