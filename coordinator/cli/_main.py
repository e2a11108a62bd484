"""``edge-coordinator``: the coordinator's command line.

Sub-commands live in their own modules (``_cli_<name>.py``) exposing ``add_parser(subparsers)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_sdk._errors import EdgeFMError

_COMMANDS: dict[str, str] = {
    "plan": "coordinator.cli._plan",
    "serve": "coordinator.cli._serve",
    "simulate": "coordinator.cli._simulate",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-coordinator", description="edge-fm coordinator")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    mods = {}
    for name, module in _COMMANDS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mods[name].add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return int(mods[args.command].run(args))
    except EdgeFMError as exc:
        print(f"edge-coordinator {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
