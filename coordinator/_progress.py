"""Progress in the terminal: a line when a round starts, as its devices answer, and when it is done.

One :class:`RoundProgress` serves ``serve``, ``simulate`` and the demo: it is the
:class:`~coordinator.federation.RoundObserver` their round loop calls. Where the lines go:

- ``out`` is a terminal: styled lines through ``rich`` (when it is installed);
- ``out`` is another stream (a pipe, a file): the same lines, plain;
- no ``out``: log records of the ``coordinator.progress`` logger (INFO), for a daemon's log.

A finished round's line reads ``round 3/10: accuracy 0.8125 macro-F1 0.8120 (majority class 0.5092) loss
0.4310; 3/3 devices; 29.2 s`` (``no validation`` without a validation set; ``devices`` counts the updates
merged of those sent).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from coordinator.federation import metrics_text

if TYPE_CHECKING:
    from coordinator.federation import RoundSummary

__all__ = ["RoundProgress", "terminal_progress"]

logger = logging.getLogger("coordinator.progress")


def _rich_console(out: TextIO) -> Any | None:
    try:
        from rich.console import Console
    except ImportError:  # rich is in the coordinator extra; without it, plain lines
        return None
    return Console(file=out, highlight=False, soft_wrap=True)


class RoundProgress:
    """Prints (or logs) a run's rounds as they happen; see the module docstring for where."""

    def __init__(self, out: TextIO | None = None, *, label: str = "") -> None:
        self._out = out
        self._console = _rich_console(out) if out is not None and out.isatty() else None
        self._prefix = f"{label} " if label else ""
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def round_started(self, round: int, rounds: int, devices: int) -> None:
        self._started = time.monotonic()
        self._emit(f"round {round}/{rounds}: training on {devices} device(s)", style="dim")

    def round_answered(self, round: int, answered: int, devices: int) -> None:
        self._emit(f"round {round}: {answered}/{devices} devices answered; {self._elapsed()}", style="dim")

    def round_finished(self, summary: RoundSummary) -> None:
        quality = metrics_text(summary.metrics)
        merged = f"{summary.aggregated}/{len(summary.outcomes)} devices"
        text = f"round {summary.round}/{summary.rounds}: {quality}; {merged}; {self._elapsed()}"
        self._emit(text, style="bold green" if summary.aggregated else "bold yellow")

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:.1f} s"

    def _emit(self, text: str, *, style: str) -> None:
        text = self._prefix + text
        with self._lock:
            if self._console is not None:
                self._console.print(text, style=style, markup=False)
            elif self._out is not None:
                print(text, file=self._out, flush=True)
            else:
                logger.info("%s", text)


def terminal_progress(out: TextIO, *, label: str = "") -> RoundProgress:
    """Lines on ``out`` if it is a terminal (styled), else log records (a daemon's or a pipe's log)."""
    return RoundProgress(out if out.isatty() else None, label=label)
