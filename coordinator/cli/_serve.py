"""``edge-coordinator serve``: run a federated fine-tuning run from a TOML config."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from coordinator.federation import load_config
from coordinator.serve import RunAbortedError, run_coordinator

logger = logging.getLogger(__name__)

EXIT_ABORTED = 3


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


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        return run_coordinator(config, resume=args.resume)
    except RunAbortedError as exc:
        logger.error("%s", exc)
        return EXIT_ABORTED
