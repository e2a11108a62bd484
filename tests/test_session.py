"""The federation's device session, sans I/O: protocol frames in, engine calls and a verdict out.

A real DeviceConnection plays the device; frames go straight from one state machine to the other
(no socket, no clock), with the tiny random BERT of the engine tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from coordinator.federation import DeviceSession, FederationEngine, RoundSummary, TrainOrder, Verdict
from edge_sdk.protocol import (
    CLOSE_REJECTED,
    ByeReceived,
    DeployReceived,
    DeviceConnection,
    ErrorCode,
    ErrorReceived,
    Event,
    InferenceSettings,
    TaskReceived,
    WelcomeReceived,
)

from .test_engine import FULL_BUDGET, hello, make_engine, trained


class Device:
    """A device's protocol state machine, wired to a session by hand."""

    def __init__(self, session: DeviceSession) -> None:
        self.session = session
        self.conn = DeviceConnection()

    def to_session(self, now: float = 1.0, **kwargs: Any) -> Verdict:
        """Deliver what the device queued; the combined verdict."""
        verdict = Verdict()
        for frame in self.conn.data_to_send():
            verdict = verdict.then(self.session.receive(frame, now, **kwargs))
        return verdict

    def from_session(self) -> list[Event]:
        """Deliver what the session queued to the device; its events."""
        return [e for frame in self.session.conn.data_to_send() for e in self.conn.receive(frame)]

    def join(self, profile: Mapping[str, Any] | None = None, capabilities: tuple[str, ...] = ("train",)) -> Verdict:
        self.conn.send_hello(
            device_id="says-x", sdk_version="0", profile=dict(profile or hello(FULL_BUDGET)), capabilities=capabilities
        )
        return self.to_session()

    def task(self, order: TrainOrder) -> TaskReceived:
        assert self.session.start_task(order)
        frames = self.session.conn.data_to_send()
        self.session.task_sent(order, sum(len(f) for f in frames))
        (event,) = [e for frame in frames for e in self.conn.receive(frame)]
        assert isinstance(event, TaskReceived)
        return event

    def update(self, task: TaskReceived, shift: float, **fields: Any) -> None:
        tensors = {
            n: (a + np.float32(shift)).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in task.tensors.items()
        }
        values = {"num_samples": 4, "metrics": {"loss": 0.5}, "peak_rss_bytes": 0, "step_time_s": 0.1}
        values["train_time_s"] = 1.0
        self.conn.send_update(task_id=task.task.task_id, tensors=tensors, encoding="weights", **{**values, **fields})


def joined(names: list[str] | None = None) -> tuple[FederationEngine, dict[str, Device]]:
    engine = make_engine(names or ["a"])
    devices = {}
    for name in names or ["a"]:
        device = Device(DeviceSession(engine, name, wall_clock=lambda: 0.0))
        assert device.join() == Verdict(changed=True)
        assert isinstance(device.from_session()[0], WelcomeReceived)
        devices[name] = device
    return engine, devices


def finish(engine: FederationEngine, now: float = 2.0) -> RoundSummary:
    engine.close_round(now)
    return engine.finish_round()


def test_a_hello_with_a_budget_is_admitted_and_welcomed() -> None:
    engine, devices = joined(["a"])
    session = devices["a"].session
    assert session.admitted and session.ready
    assert engine.devices()["a"]["status"] == "connected"
    assert engine.devices()["a"]["usable_bytes"] == FULL_BUDGET


@pytest.mark.parametrize(
    ("profile", "why"),
    [({"device": {}}, "budget.usable"), (hello(1_000), "fits")],
)
def test_a_hello_without_a_budget_or_too_small_is_refused_and_closed(profile: dict[str, Any], why: str) -> None:
    engine = make_engine(["a"])
    device = Device(DeviceSession(engine, "a"))
    verdict = device.join(profile)
    assert not verdict.go_on and verdict.close_code == CLOSE_REJECTED
    error, bye = device.from_session()
    assert isinstance(error, ErrorReceived) and error.error.code == ErrorCode.REJECTED and why in error.error.message
    assert isinstance(bye, ByeReceived) and bye.bye.code == CLOSE_REJECTED
    assert not device.session.admitted and engine.devices()["a"]["usable_bytes"] == 0


def test_an_update_reaches_the_engine_once_checked_and_its_traffic_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    def checked_twice(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("the engine checked values the protocol had already checked")

    monkeypatch.setattr("coordinator.federation._update_check.check_tensor_values", checked_twice)
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    device = devices["a"]
    task = device.task(order)
    assert not device.session.ready  # a task is out
    device.update(task, 0.25)
    frames = device.conn.data_to_send()
    verdict = Verdict()
    for frame in frames:
        verdict = verdict.then(device.session.receive(frame, 1.0))
    assert verdict.go_on and verdict.changed and device.session.ready
    assert device.session.last_update is not None and device.session.last_update.task_id == order.task_id
    summary = finish(engine)
    (outcome,) = summary.outcomes
    assert outcome.status == "ok" and outcome.num_samples == 4
    assert outcome.bytes_in == sum(len(f.encode() if isinstance(f, str) else f) for f in frames)
    assert outcome.bytes_out > 0


def test_an_update_above_the_norm_bound_fails_its_task_and_the_connection_stays() -> None:
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    device = devices["a"]
    task = device.task(order)
    device.update(task, 1e6)
    verdict = device.to_session()
    assert verdict.go_on and device.session.ready
    (error,) = device.from_session()
    assert isinstance(error, ErrorReceived) and error.error.code == ErrorCode.BAD_UPDATE
    (outcome,) = finish(engine).outcomes
    assert outcome.status == "failed" and "update rejected" in outcome.reason


def test_a_device_error_fails_its_task_and_a_measured_peak_shrinks_its_next_plan() -> None:
    engine, devices = joined(["a", "b"])
    orders = {o.device_id: o for o in engine.begin_round(["a", "b"], now=0.0)}
    devices["a"].task(orders["a"])
    devices["a"].conn.send_error(code=ErrorCode.TASK_FAILED, message="out of memory", task_id=orders["a"].task_id)
    assert devices["a"].to_session().go_on
    task = devices["b"].task(orders["b"])
    devices["b"].update(task, 0.1, peak_rss_bytes=7)
    assert devices["b"].to_session(peak_of=lambda peak: peak + FULL_BUDGET + 400_000_000).go_on
    status = {o.device_id: (o.status, o.reason, o.peak_rss_bytes) for o in finish(engine).outcomes}
    assert status["a"][:2] == ("failed", "device error task_failed: out of memory")
    assert status["b"] == ("ok", "", 7 + FULL_BUDGET + 400_000_000)
    assert engine.devices()["b"]["shrink_bytes"] == 7 + FULL_BUDGET // 50


def test_a_protocol_violation_fails_the_task_and_closes_with_its_code() -> None:
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    device = devices["a"]
    device.task(order)
    verdict = device.session.receive("{not json", 1.0)
    assert not verdict.go_on and verdict.close_code == 1002 and verdict.changed
    (error,) = device.from_session()
    assert isinstance(error, ErrorReceived) and error.error.code == "bad_message"
    device.session.lost(1002, "")  # the transport closes: nothing more fails
    (outcome,) = finish(engine).outcomes
    assert outcome.status == "failed" and outcome.reason.startswith("protocol violation")


def test_a_goodbye_mid_task_fails_it_and_closes_with_the_device_code() -> None:
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    device = devices["a"]
    device.task(order)
    device.conn.send_bye(reason="shutting down", code=1001)
    verdict = device.to_session()
    assert (verdict.close_code, verdict.close_reason) == (1001, "shutting down")
    (outcome,) = finish(engine).outcomes
    assert (outcome.status, outcome.reason) == ("failed", "device left")


def test_a_connection_lost_mid_task_fails_it() -> None:
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    devices["a"].task(order)
    devices["a"].session.lost(1006, "")
    (outcome,) = finish(engine).outcomes
    assert (outcome.status, outcome.reason) == ("failed", "disconnected (code 1006)")


def test_a_task_that_cannot_be_sent_fails_at_once() -> None:
    engine, devices = joined(["a"])
    (order,) = engine.begin_round(["a"], now=0.0)
    session = devices["a"].session
    assert session.start_task(order)
    assert not session.start_task(order)  # one task at a time: the protocol refuses a second
    (outcome,) = finish(engine).outcomes
    assert outcome.status == "failed" and outcome.reason.startswith("cannot send")


class Inbox:
    def __init__(self) -> None:
        self.answers: dict[str, tuple[bool, dict[str, float], str]] = {}

    def answer(self, task_id: str, ok: bool, metrics: Mapping[str, float], message: str) -> bool:
        if not task_id.startswith("d"):
            return False
        self.answers[task_id] = (ok, dict(metrics), message)
        return True


@pytest.mark.parametrize("answer", ["result", "error"])
def test_deploy_answers_go_to_the_deploys_never_to_the_round(answer: str) -> None:
    engine = make_engine(["a"])
    inbox = Inbox()
    device = Device(DeviceSession(engine, "a", deploys=inbox))
    device.join(capabilities=("train", "deploy"))
    device.from_session()
    order = engine.begin_round(["a"], now=0.0)[0]  # a round is open: its task must not be touched
    tensors = dict(order.tensors)
    device.session.conn.send_deploy(
        task_id="d1-a", round=1, spec=order.spec.to_dict(), model_config=order.model_config,
        settings=InferenceSettings(batch_size=1, seq_len=16), tensors=tensors,
    )  # fmt: skip
    (event,) = device.from_session()
    assert isinstance(event, DeployReceived)
    if answer == "result":
        device.conn.send_deploy_result(task_id="d1-a", ok=True, metrics={"parity_max_abs_diff": 1e-7})
    else:
        device.conn.send_error(code=ErrorCode.TASK_FAILED, message="export failed", task_id="d1-a")
    assert device.to_session().go_on
    ok, metrics, message = inbox.answers["d1-a"]
    assert (ok, metrics) == ((True, {"parity_max_abs_diff": 1e-7}) if answer == "result" else (False, {}))
    assert answer == "result" or "export failed" in message
    assert engine.settled(1.0) is False  # the round's task is still pending


def test_a_verdict_keeps_the_first_close() -> None:
    close = Verdict(1002, "bad", changed=True)
    assert Verdict().then(close) == close
    assert close.then(Verdict(1000, "bye")) == close
    assert Verdict().then(Verdict(changed=True)) == Verdict(changed=True)


def test_the_same_session_serves_a_whole_round_for_several_devices() -> None:
    engine, devices = joined(["a", "b", "c"])
    orders = engine.begin_round(["a", "b", "c"], now=0.0)
    for order in orders:
        device = devices[order.device_id]
        device.update(device.task(order), 0.1)
        assert device.to_session().go_on
    assert engine.settled(1.0)
    summary = finish(engine)
    assert summary.aggregated == 3
    q = "bert.encoder.layer.0.attention.self.query.weight"
    expected = trained(orders[0], 0.1)[q]
    np.testing.assert_allclose(engine.parent.state[q].numpy(), expected, rtol=1e-6)
