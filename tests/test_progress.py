"""Progress of a device's training task and the coordinator's metrics, piece by piece (no sockets):
the device's throttle and log display, the session keeping the last steps (a flood is dropped), the
engine's phase, the ``[status]`` table, and the metrics registry's isolation and bounded labels."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from coordinator.federation import DeviceSession, Verdict
from coordinator.federation._config import parse_config
from coordinator.serve._metrics import MAX_DEVICE_SERIES, RunMetrics
from edge_sdk import ConfigError
from edge_sdk.client._progress import StepLog, StepThrottle
from edge_sdk.protocol import FEATURE_PROGRESS, WelcomeReceived

from .test_engine import FULL_BUDGET, hello, make_engine
from .test_run_config import BASE, with_value
from .test_session import Device


class _Loop:
    """Stands in for the event loop: runs what is handed over at once."""

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        fn(*args)


def test_the_throttle_passes_one_step_a_second_and_always_the_last() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    throttle = StepThrottle(_Loop(), lambda d, t: seen.append((d, t)), interval_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for step in range(1, 11):
        throttle(step, 10)
        now[0] += 0.3
    assert seen == [(1, 10), (5, 10), (9, 10), (10, 10)]


def test_the_log_display_writes_a_line_per_tenth_of_the_task(caplog: pytest.LogCaptureFixture) -> None:
    show = StepLog()
    with caplog.at_level(logging.INFO, logger="edge_sdk.client._progress"):
        for step in range(1, 101):
            show("t-1", step, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0] == "task t-1: step 10/100" and lines[-1] == "task t-1: step 100/100"


def _joined_with_progress() -> tuple[Any, Device]:
    engine = make_engine(["a"])
    device = Device(DeviceSession(engine, "a", wall_clock=lambda: 0.0))
    assert device.join(dict(hello(FULL_BUDGET)), capabilities=("train", FEATURE_PROGRESS)) == Verdict(changed=True)
    (welcome,) = device.from_session()
    assert isinstance(welcome, WelcomeReceived) and device.conn.progress_accepted
    return engine, device


def test_the_session_keeps_the_last_steps_and_drops_a_flood() -> None:
    engine, device = _joined_with_progress()
    (order,) = engine.begin_round(["a"], now=0.0)
    assert engine.phase == "training"
    device.task(order)
    for step in range(1, 101):  # a hundred in the same instant: one is kept
        device.conn.send_progress(task_id=order.task_id, steps_done=min(step, 2), steps_total=2)
    assert device.to_session(now=5.0) == Verdict()  # informative: nothing changes for the round
    progress, session = device.session.progress, device.session
    assert progress is not None and (progress.task_id, progress.steps_done, progress.at) == (order.task_id, 1, 5.0)
    assert session.progress_dropped == 99
    device.conn.send_progress(task_id=order.task_id, steps_done=2, steps_total=2)
    device.to_session(now=6.0)
    assert session.progress is not None and session.progress.steps_done == 2


def test_the_engine_phase_follows_the_round() -> None:
    engine, device = _joined_with_progress()
    assert engine.phase == "waiting"
    (order,) = engine.begin_round(["a"], now=0.0)
    received = device.task(order)
    device.update(received, 0.01)
    device.to_session(now=1.0)
    engine.close_round(2.0)
    phases: list[str] = []
    engine._evaluator = lambda parent: phases.append(engine.phase) or {"accuracy": 0.5}  # type: ignore[assignment]
    engine.finish_round()
    assert phases == ["evaluating"] and engine.phase == "waiting"


def test_the_status_table_needs_the_operator_token() -> None:
    assert not parse_config(BASE).status.enabled  # no operator token: off
    with_token = with_value("deploy", "operator_token", "operator-1234")
    status = parse_config(with_token).status
    assert status.enabled and (status.host, status.port) == ("127.0.0.1", 8766)
    with pytest.raises(ConfigError, match=r"\[status\] enabled: the status page is behind the operator token"):
        parse_config(with_value("status", "enabled", True))
    with pytest.raises(ConfigError, match=r"\[status\] port"):
        parse_config({**with_token, "status": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"\[status\].*colour"):
        parse_config({**with_token, "status": {"colour": "blue"}})


def test_metrics_live_on_their_own_registry_with_bounded_device_labels() -> None:
    names = {f"d{i}": "t" for i in range(MAX_DEVICE_SERIES + 5)}
    first, second = RunMetrics(names), RunMetrics(names)  # two servers in one process: no collision
    for i in range(MAX_DEVICE_SERIES + 5):
        first._may_label(f"d{i}")
    assert not first._may_label("stranger")  # not a configured device: never a label
    assert len(first._labelled) == MAX_DEVICE_SERIES
    assert REGISTRY.get_sample_value("edge_fm_rounds_completed_total") is None  # the global registry is untouched
    assert b"edge_fm_event_loop_lag_seconds" in second.render()


def test_the_loop_lag_probe_measures_a_blocked_loop() -> None:
    from coordinator.serve._metrics import watch_loop_lag

    metrics = RunMetrics()

    async def main() -> None:
        probe = asyncio.ensure_future(watch_loop_lag(metrics, interval_s=0.01))
        await asyncio.sleep(0.02)
        import time

        time.sleep(0.2)  # block the loop: the probe's next wake-up is late by about this much
        await asyncio.sleep(0.05)
        probe.cancel()

    asyncio.run(main())
    assert metrics._lag_max >= 0.1


def test_join_shows_a_bar_on_a_terminal_and_log_lines_otherwise() -> None:
    import io

    from edge_sdk.client._progress import StepBar, step_display

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(step_display(io.StringIO()), StepLog)
    terminal = Terminal()
    bar = step_display(terminal)
    assert isinstance(bar, StepBar)
    bar("t-1", 3, 4)
    assert "task t-1" in terminal.getvalue() and "3/4" in terminal.getvalue()
    bar("t-1", 4, 4)  # the last step closes the bar
    bar("t-2", 1, 4)  # the next task gets its own
    assert "task t-2" in terminal.getvalue()
