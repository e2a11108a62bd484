"""Fuzz a live coordinator for a while: mutated frames from devices with valid tokens (not in CI).

    python bench/fuzz.py [--minutes 30] [--seed 0] [--devices 8] [--json]

The engine of ``tests/test_fuzz.py`` (``tests/_fuzz.py``: mutations of real frames; ``tests/_fuzz_live.py``:
a real ``CoordinatorServer`` on 127.0.0.1 with a small BERT whose updates travel in two chunk frames,
one well-behaved device keeping rounds going, ``--devices`` fuzz devices) run for ``--minutes``.
Printed: frames sent, connections, the close-code histogram ("open": the connection stayed open
through every frame, and closed with 1000 on the device's final Bye), episodes, frames/s, contract
failures (a connection closed with an undocumented code, without a close frame, or hung) and
internal errors: log records of the coordinator with a traceback, "internal error", or at level
ERROR and above. Both must be 0; the exit status is 1 otherwise. Every choice comes from ``--seed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class InternalErrors(logging.Handler):
    """Counts the log records that betray an internal error (keeps the first few)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info or record.levelno >= logging.ERROR or "internal error" in message.lower():
            self.count += 1
            if len(self.first) < 5:
                self.first.append(logging.Formatter().format(record)[:4000])


async def run(args: argparse.Namespace, errors: InternalErrors) -> dict[str, object]:
    from tests._fuzz_live import Stats, fuzz, live_coordinator

    names = ["keeper", *(f"fuzz{i}" for i in range(args.devices))]
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="edge-fm-fuzz-") as folder:
        async with live_coordinator(Path(folder), names) as srv:
            start = time.monotonic()
            await fuzz(srv, names, args.seed, stats, frames=None, seconds=args.minutes * 60)
            seconds = time.monotonic() - start
            running = srv.fuzz_running  # type: ignore[attr-defined]
            run_alive = not running.done()
            run_error = repr(running.exception()) if running.done() and not running.cancelled() else None
            rounds = srv.engine.round
    return {
        "seed": args.seed,
        "minutes": round(seconds / 60, 2),
        "frames": stats.frames,
        "megabytes": round(stats.bytes / 1e6, 1),
        "connections": stats.connections,
        "frames_per_s": round(stats.frames / seconds, 1),
        "close_codes": dict(sorted(stats.codes.items())),
        "close_reasons": stats.reasons,
        "episodes": dict(stats.kinds),
        "rounds": rounds,
        "keeper_updates": stats.keeper_updates,
        "keeper_connections": stats.keeper_connections,
        "run_alive": run_alive,
        "run_error": run_error,
        "log": str(args.log),
        "contract_failures": stats.failures[:20],
        "contract_failure_count": len(stats.failures),
        "internal_errors": errors.count,
        "internal_error_examples": errors.first,
        "summary": stats.summary(seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8, help="fuzz devices (one connection each at a time)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--log", type=Path, default=None, help="the coordinator's warnings (default: a temp file)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.log is None:
        args.log = Path(tempfile.gettempdir()) / f"edge-fm-fuzz-{args.seed}.log"
    errors = InternalErrors()  # no console handler: the coordinator's warnings come by the thousand
    logging.getLogger().addHandler(errors)
    warnings = logging.FileHandler(args.log, mode="w", encoding="utf-8")
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message).500s"))
    logging.getLogger().addHandler(warnings)
    logging.getLogger().setLevel(logging.INFO)
    result = asyncio.run(run(args, errors))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(result["summary"])
        print(f"rounds run: {result['rounds']}; run still going: {result['run_alive']} {result['run_error'] or ''}")
        print(f"the coordinator's warnings: {result['log']}")
        print(f"close reasons (examples): {json.dumps(result['close_reasons'], indent=1)}")
        print(f"internal errors: {result['internal_errors']}")
        for example in result["internal_error_examples"]:  # type: ignore[attr-defined]
            print(example)
        for failure in result["contract_failures"]:  # type: ignore[attr-defined]
            print("contract failure:", failure)
    ok = not result["internal_errors"] and not result["contract_failure_count"] and result["run_alive"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
