"""A training task's steps, seen from the device: throttled for the wire, shown to the person running it.

The training loop calls back after every step, in its worker thread. :class:`StepThrottle` passes at
most one call per ``interval_s`` (and the last step) on to the event loop, where the client sends a
``Progress`` message (if the coordinator accepted the feature) and updates the display: a log line
every tenth of the task (:class:`StepLog`), or a terminal bar (:class:`StepBar`, tqdm) when
``edge-sdk join`` runs in a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["PROGRESS_INTERVAL_S", "StepBar", "StepLog", "StepThrottle", "step_display"]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0  # at most one Progress message (and display update) a second

ProgressFn = Callable[[str, int, int], None]  # (task_id, steps done, steps in all)


class StepThrottle:
    """Called from the training thread after each step; forwards at most one call per ``interval_s``
    (and always the last step) to ``deliver`` on the event loop ``loop``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[int, int], None],
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        with self._lock:
            if done < total and self._last is not None and now - self._last < self._interval_s:
                return
            self._last = now
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(self._deliver, done, total)


class StepLog:
    """A log line each time a task passes another tenth of its steps (and at its last step)."""

    def __init__(self, parts: int = 10) -> None:
        self._parts = parts
        self._shown: dict[str, int] = {}

    def __call__(self, task_id: str, done: int, total: int) -> None:
        part = done * self._parts // max(1, total)
        if part <= self._shown.get(task_id, 0) and done < total:
            return
        if len(self._shown) > 64:  # old tasks: forget them
            self._shown.clear()
        self._shown[task_id] = part
        logger.info("task %s: step %d/%d", task_id, done, total)


class StepBar:
    """A terminal progress bar (tqdm) per training task, on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._task: str | None = None
        self._bar: Any = None

    def __call__(self, task_id: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if task_id != self._task:
            if self._bar is not None:
                self._bar.close()
            self._task = task_id
            self._bar = tqdm(total=total, desc=f"task {task_id}", unit="step", file=self._stream, leave=False)
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._bar.close()
            self._bar, self._task = None, None


def step_display(stream: TextIO) -> ProgressFn:
    """A bar on a terminal (when tqdm is installed), log lines otherwise."""
    if stream.isatty():
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return StepLog()
        return StepBar(stream)
    return StepLog()
