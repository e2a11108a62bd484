"""The round loop, sans I/O: what a transport does next to run a federation's rounds.

The websocket server and the simulator drive the same loop; they only move bytes and wait::

    rounds = RoundLoop(engine, checkpoint=lambda state: save_checkpoint(run_dir, state))
    while True:
        step = rounds.poll(idle_devices, now)        # idle: connected, admitted, no task outstanding
        if isinstance(step, WaitFor): ...            # wait for a change (a device joins or answers)
                                                     #   or until step.until, then poll again
        elif isinstance(step, SendOrders): ...       # deliver each order through its DeviceSession
        elif isinstance(step, FinishRound):
            result = rounds.finish()                 # merge, evaluate, checkpoint: heavy (a thread)
        else:                                        # RunComplete
            break

Before a round it waits (at most ``device_wait_s``) until ``wait_target`` devices are idle, then
starts with those; when the wait is over it starts with fewer if ``min_devices`` are there, and
otherwise raises :class:`RunAbortedError` (the last checkpoint stands). A transport whose devices
are all present at once (the simulator) passes ``device_wait_s=0``. A round runs until every task is
answered or its deadline passes; a transport that knows nothing more will arrive calls
:meth:`RoundLoop.close` (later answers are "late").

A :class:`RoundObserver` (``observer=``) hears each round start, each change in how many of its
devices have answered (as polls see it), and each round's summary: what a terminal's progress shows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from coordinator.federation._checkpoint import EngineState
from coordinator.federation._records import RoundSummary, TrainOrder
from edge_sdk._errors import EdgeFMError

if TYPE_CHECKING:
    from coordinator.federation._engine import FederationEngine

__all__ = [
    "FinishRound",
    "RoundLoop",
    "RoundObserver",
    "RoundResult",
    "RunAbortedError",
    "RunComplete",
    "SendOrders",
    "Step",
    "WaitFor",
]

logger = logging.getLogger(__name__)


class RunAbortedError(EdgeFMError):
    """Not enough devices came within the wait; the last checkpoint stands (resume later)."""


@dataclasses.dataclass(frozen=True)
class WaitFor:
    """Nothing to do until something changes (a device joins, answers or leaves) or ``until`` comes."""

    until: float


@dataclasses.dataclass(frozen=True)
class SendOrders:
    """A round began: deliver each order to its device (a failed delivery fails its task)."""

    orders: tuple[TrainOrder, ...]


@dataclasses.dataclass(frozen=True)
class FinishRound:
    """The round is closed: call :meth:`RoundLoop.finish` (stop any delivery still running first)."""

    round: int


@dataclasses.dataclass(frozen=True)
class RunComplete:
    """Every round is done."""

    rounds: int


Step = WaitFor | SendOrders | FinishRound | RunComplete


class RoundObserver(Protocol):
    """Hears a run's rounds as they happen (progress in a terminal); called from the loop's thread."""

    def round_started(self, round: int, rounds: int, devices: int) -> None:
        """Round ``round`` of ``rounds`` went out to ``devices`` devices."""

    def round_answered(self, round: int, answered: int, devices: int) -> None:
        """``answered`` of the round's ``devices`` have answered (updated, failed or refused)."""

    def round_finished(self, summary: RoundSummary) -> None:
        """The round is merged and evaluated (its checkpoint, if any, is written)."""


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """A finished round, and where its checkpoint went (None without a checkpoint hook)."""

    summary: RoundSummary
    checkpoint: Path | None = None


class RoundLoop:
    """The rounds of one engine, step by step (see the module docstring)."""

    def __init__(
        self,
        engine: FederationEngine,
        *,
        device_wait_s: float | None = None,
        checkpoint: Callable[[EngineState], Path] | None = None,
        observer: RoundObserver | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self._answered = 0
        self.device_wait_s = engine.federation.device_wait_s if device_wait_s is None else device_wait_s
        self._checkpoint = checkpoint
        self._phase: Literal["gather", "running", "closed"] = "gather"
        self._wait_until: float | None = None
        self._reported = -1  # idle devices last logged while waiting

    def poll(self, idle: Sequence[str], now: float) -> Step:
        """The next step, given the devices idle now (``now``: the clock round deadlines use)."""
        engine = self.engine
        if self._phase == "running":
            self._tell_answered()
            if not engine.settled(now):
                deadline = engine.deadline
                return WaitFor(deadline if deadline is not None else now)
            self.close(now)
        if self._phase == "closed":
            return FinishRound(engine.round + 1)
        if engine.finished:
            return RunComplete(engine.round)
        return self._gather(sorted(idle), now)

    def close(self, now: float) -> None:
        """Close the running round now: unanswered tasks are "missing", later answers "late"."""
        if self._phase == "running":
            self.engine.close_round(now)
            self._phase = "closed"

    def finish(self) -> RoundResult:
        """Merge and evaluate the closed round, then checkpoint (heavy: may run in a worker thread)."""
        if self._phase != "closed":
            raise EdgeFMError("finish() comes after poll() said FinishRound")
        summary = self.engine.finish_round()
        path = self._checkpoint(self.engine.snapshot()) if self._checkpoint is not None else None
        self._phase = "gather"
        if self.observer is not None:
            self.observer.round_finished(summary)
        return RoundResult(summary, path)

    # ------------------------------------------------------------------------------ internals

    def _gather(self, idle: list[str], now: float) -> Step:
        engine, index = self.engine, self.engine.round + 1
        if self._wait_until is None:
            self._wait_until, self._reported = now + self.device_wait_s, -1
        target = engine.selection.wait_target()
        if len(idle) < target:
            if now < self._wait_until:
                if len(idle) != self._reported:
                    logger.info(
                        "round %d: waiting for devices: %d of %d idle (at most %.0f s more)",
                        index,
                        len(idle),
                        target,
                        self._wait_until - now,
                    )
                    self._reported = len(idle)
                return WaitFor(self._wait_until)
            if not engine.selection.can_start(len(idle)):
                raise RunAbortedError(self._too_few(len(idle)))
            logger.info(
                "round %d: starting with %d device(s) after waiting %.0f s", index, len(idle), self.device_wait_s
            )
        logger.info("round %d starts from global weights sha256 %s", index, engine.weights_digest())
        orders = engine.begin_round(idle, now)
        self._phase, self._wait_until, self._answered = "running", None, 0
        if self.observer is not None:
            self.observer.round_started(index, engine.federation.rounds, len(orders))
        return SendOrders(tuple(orders))

    def _tell_answered(self) -> None:
        """The observer hears how many of the open round's tasks are answered, when that changed."""
        rnd = self.engine._open  # the engine's own room: read-only, a count
        if self.observer is None or rnd is None:
            return
        answered = len(rnd.outcomes)
        if answered != self._answered:
            self._answered = answered
            self.observer.round_answered(rnd.index, answered, len(rnd.orders))

    def _too_few(self, idle: int) -> str:
        engine = self.engine
        text = (
            f"round {engine.round + 1}: only {idle} device(s) after waiting {self.device_wait_s:.0f} s,"
            f" at least {engine.federation.min_devices} needed"
        )
        if self._checkpoint is not None:
            text += f"; the checkpoint of round {engine.round} stands (restart with --resume)"
        return text
