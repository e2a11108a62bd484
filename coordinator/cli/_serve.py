"""``edge-coordinator serve``: run a federated fine-tuning run from a TOML config.

Before the model loads, the config's files are checked and the port is bound (a port in use: exit
code 2, one line). Each round shows as it happens on a terminal (``coordinator._progress``).

SIGINT and SIGTERM stop it within seconds in any phase, with exit code 130: while the engine is
built (model load, salience) they interrupt it; once the port is open the server's own handlers stop
it (see :func:`~coordinator.serve.serve_async`), the round-0 checkpoint and evaluation included. Checkpoints are atomic,
so the last one on disk stands. After a signal the process ends with ``os._exit`` once the log is
flushed: the run's state is on disk, and the interpreter's teardown of torch alone can take seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any, NoReturn

from coordinator._progress import terminal_progress
from coordinator.federation import RunConfig, load_config
from coordinator.serve import RunAbortedError, run_coordinator
from edge_sdk._errors import ConfigError

logger = logging.getLogger(__name__)

EXIT_ABORTED = 3
EXIT_SIGNAL = 130


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a federated run to devices (rounds, budget-matched sub-networks, checkpoints)",
        description="Hold the model, give each device the sub-network its memory budget can train, "
        "merge what comes back, checkpoint every round. See docs/running.md.",
    )
    p.add_argument("--config", required=True, help="the run's TOML file (see examples/run.toml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's last checkpoint (a new run if there is none)",
    )
    p.add_argument(
        "--status-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the status page and /metrics on this port (0: any free port; needs [deploy] operator_token;"
        " default: [status] port)",
    )


def with_status_port(config: RunConfig, port: int) -> RunConfig:
    """``config`` with its status page on ``port`` (ConfigError without an operator token)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--status-port must be in 0..65535, got {port}")
    if config.deploy.operator_token is None:
        raise ConfigError("--status-port: the status page is behind the operator token: set [deploy] operator_token")
    return dataclasses.replace(config, status=dataclasses.replace(config.status, enabled=True, port=port))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.status_port is not None:
        config = with_status_port(config, args.status_port)
    signal.signal(signal.SIGTERM, _interrupt)  # as SIGINT does, until the server's handlers take over
    try:
        code = run_coordinator(config, resume=args.resume, observer=terminal_progress(sys.stdout))
    except RunAbortedError as exc:
        logger.error("%s", exc)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        logger.info("stopped on a signal while starting: the last checkpoint on disk stands")
        code = EXIT_SIGNAL
    if code == EXIT_SIGNAL:
        _exit_now(code)
    return code


def _exit_now(code: int) -> NoReturn:
    """Flush the log and leave at once (skipping the interpreter's teardown, and any worker thread)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
