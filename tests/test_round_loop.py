"""The round loop, sans I/O: what a transport is told to do, step by step, on a tiny engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.federation import (
    FederationEngine,
    FinishRound,
    RoundLoop,
    RunAbortedError,
    RunComplete,
    SendOrders,
    WaitFor,
)
from coordinator.federation._checkpoint import EngineState
from edge_sdk import EdgeFMError

from .test_engine import FULL_BUDGET, admit_all, make_engine, trained


def engine_with(names: list[str], **federation: object) -> FederationEngine:
    engine = make_engine(names, **federation)
    admit_all(engine, dict.fromkeys(names, FULL_BUDGET))
    return engine


def test_a_round_waits_for_its_devices_then_sends_waits_for_answers_and_finishes() -> None:
    engine = engine_with(["a", "b"], rounds=2, device_wait_s=30.0, round_deadline_s=10.0)
    saved: list[int] = []

    def checkpoint(state: EngineState) -> Path:
        saved.append(state.round)
        return Path(f"round-{state.round}")

    loop = RoundLoop(engine, checkpoint=checkpoint)
    assert loop.poll(["a"], now=0.0) == WaitFor(30.0)  # 1 of 2 idle: wait for the other (bounded)
    assert loop.poll(["a"], now=5.0) == WaitFor(30.0)  # the bound does not move
    step = loop.poll(["b", "a"], now=6.0)
    assert isinstance(step, SendOrders) and sorted(o.device_id for o in step.orders) == ["a", "b"]
    assert loop.poll([], now=7.0) == WaitFor(16.0)  # answers until the round's deadline
    for order in step.orders:
        engine.accept_update(order.task_id, trained(order, 0.1), num_samples=2, now=8.0)
    assert loop.poll([], now=8.0) == FinishRound(1)
    assert loop.poll([], now=8.5) == FinishRound(1)  # until finish() is called
    result = loop.finish()
    assert result.summary.round == 1 and result.summary.aggregated == 2
    assert result.checkpoint == Path("round-1") and saved == [1]
    step = loop.poll(["a", "b"], now=9.0)
    assert isinstance(step, SendOrders)
    assert loop.poll([], now=19.0) == FinishRound(2)  # the deadline passed: unanswered tasks are missing
    summary = loop.finish().summary
    assert {o.status for o in summary.outcomes} == {"missing"}
    assert loop.poll(["a", "b"], now=20.0) == RunComplete(2)


def test_after_the_wait_a_round_starts_with_fewer_devices_if_min_devices_are_there() -> None:
    engine = engine_with(["a", "b", "c"], device_wait_s=30.0, min_devices=2)
    loop = RoundLoop(engine)
    assert isinstance(loop.poll(["a", "b"], now=0.0), WaitFor)
    step = loop.poll(["a", "b"], now=30.0)
    assert isinstance(step, SendOrders) and len(step.orders) == 2


def test_too_few_devices_after_the_wait_abort_the_run() -> None:
    engine = engine_with(["a", "b", "c"], device_wait_s=30.0, min_devices=2)
    loop = RoundLoop(engine, checkpoint=lambda state: Path("x"))
    assert isinstance(loop.poll(["a"], now=0.0), WaitFor)
    expected = r"only 1 device\(s\) after waiting 30 s, at least 2 needed.*round 0 stands"
    with pytest.raises(RunAbortedError, match=expected):
        loop.poll(["a"], now=30.0)


def test_without_a_device_wait_a_round_starts_at_once_and_close_ends_it() -> None:
    engine = engine_with(["a", "b", "c"], fraction=1.0)
    loop = RoundLoop(engine, device_wait_s=0.0)
    step = loop.poll(["a", "b"], now=0.0)  # c is expected but not idle: no wait, go with two
    assert isinstance(step, SendOrders) and len(step.orders) == 2
    first = step.orders[0]
    engine.accept_update(first.task_id, trained(first, 0.1), num_samples=2, now=1.0)
    with pytest.raises(EdgeFMError, match="FinishRound"):
        loop.finish()
    loop.close(now=1.0)
    assert loop.poll([], now=1.0) == FinishRound(1)
    status = sorted((o.status, o.reason) for o in loop.finish().summary.outcomes)
    assert status == [("missing", "no reply"), ("ok", "")]
