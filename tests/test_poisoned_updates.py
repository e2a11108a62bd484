"""One device cannot hurt the federation: each poisoned update an attacker with a valid token sent.

Every test runs the same round twice on the tiny BERT, sans I/O (real protocol state machines, the
real session and engine): two honest devices and a third that attacks, and then the same round with
the third failing its task instead. The global model after the round must be the same, to the bit
(sha256 of the weights): the attack cost the attacker its round and nothing else. The honest devices
move the weights by a small shift, the attacker sends hand-made frames (a JSON field rewritten after
the SDK's own state machine produced it), as a malicious client would.

The findings (an attacker's probe of a live coordinator) these tests pin down:

1. ``num_samples`` had no upper bound: 10**12 with negated weights made the global model the
   attacker's; 10**39 made it NaN (a checkpoint that cannot be resumed); 10**400 crashed the merge.
2. ``peak_rss_bytes`` had no upper bound: 10**18 made the next round's planning fail, and the shrink
   was checkpointed, so a resume failed the same way.
3. the norm bound was loose: weights x(-1.9), or real weights labelled as a delta, were merged.
4. a device could fail another device's task by naming it in an Error or an EvalResult.
8. a ``num_samples`` of 0 was dropped without telling the device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from coordinator.federation import DeviceSession, FederationEngine, RoundSummary
from edge_sdk.protocol import ErrorCode, ErrorReceived, TaskReceived, WelcomeReceived

from .test_engine import FULL_BUDGET, make_engine
from .test_session import Device

HONEST = {"h1": 0.01, "h2": -0.02}  # each honest device's shift of every weight
MEMORY_TOTAL = 8 << 30
DECLARED_SAMPLES = 4


def profile() -> dict[str, Any]:
    """What the SDK's Hello carries: a budget, the device's memory, the size of its shard."""
    return {
        "budget": {"usable": FULL_BUDGET, "runtime_footprint": 400_000_000},
        "device": {"machine": "x86_64", "memory_total": MEMORY_TOTAL},
        "data": {"num_samples": DECLARED_SAMPLES},
    }


def engine_for(rounds: int = 3) -> FederationEngine:
    """The default bounds (update norm 2x, change 0.5x what was sent), three devices."""
    return make_engine(["h1", "h2", "evil"], rounds=rounds, max_update_norm_ratio=2.0, max_delta_norm_ratio=0.5)


def join(engine: FederationEngine, name: str) -> Device:
    device = Device(DeviceSession(engine, name, wall_clock=lambda: 0.0))
    device.conn.send_hello(device_id=name, sdk_version="0", profile=profile(), capabilities=("train",))
    assert device.to_session().go_on
    assert isinstance(device.from_session()[0], WelcomeReceived)
    return device


def rewritten(frames: list[str | bytes], **fields: Any) -> list[str | bytes]:
    """The frames with fields of the first (the Update's JSON) replaced, as a malicious client would."""
    head = frames[0]
    assert isinstance(head, str)
    message = json.loads(head)
    message.update(fields)
    return [json.dumps(message), *frames[1:]]


Attack = Callable[[Device, TaskReceived], list[str | bytes]]


def run_round(attack: Attack | None) -> tuple[FederationEngine, RoundSummary, dict[str, Device]]:
    """One round: honest h1 and h2; ``evil`` attacks, or fails its task when ``attack`` is None."""
    engine = engine_for()
    devices = {name: join(engine, name) for name in ("h1", "h2", "evil")}
    for order in engine.begin_round(sorted(devices), now=0.0):
        device = devices[order.device_id]
        task = device.task(order)
        if order.device_id in HONEST:
            device.update(task, HONEST[order.device_id])
            frames = device.conn.data_to_send()
        elif attack is None:
            device.conn.send_error(code=ErrorCode.TASK_FAILED, message="out of memory", task_id=task.task.task_id)
            frames = device.conn.data_to_send()
        else:
            frames = attack(device, task)
        for frame in frames:
            device.session.receive(frame, 1.0)
    engine.close_round(2.0)
    return engine, engine.finish_round(), devices


def honest_update(device: Device, task: TaskReceived, tensors: Mapping[str, np.ndarray] | None = None,
                  **fields: Any) -> list[str | bytes]:  # fmt: skip
    values = {"num_samples": 4, "metrics": {"loss": 0.5}, "peak_rss_bytes": 0, "step_time_s": 0.1}
    values.update(train_time_s=1.0, encoding="weights")
    values.update(fields)
    sent = tensors if tensors is not None else task.tensors
    device.conn.send_update(task_id=task.task.task_id, tensors=dict(sent), **values)
    return device.conn.data_to_send()


def scaled(task: TaskReceived, factor: float) -> dict[str, np.ndarray]:
    return {n: (a * np.float32(factor)).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in task.tensors.items()}


CLEAN_DIGEST: dict[str, str] = {}


def clean_digest() -> str:
    """The global model after the round in which the third device only failed its task."""
    if "d" not in CLEAN_DIGEST:
        engine, summary, _ = run_round(None)
        assert summary.aggregated == 2
        CLEAN_DIGEST["d"] = engine.weights_digest()
    return CLEAN_DIGEST["d"]


def assert_attacker_lost_only_its_round(engine: FederationEngine, summary: RoundSummary) -> None:
    status = {o.device_id: o.status for o in summary.outcomes}
    assert status["h1"] == status["h2"] == "ok"
    assert status["evil"] in ("failed", "rejected", "missing"), status
    assert all(bool(np.isfinite(t.numpy()).all()) for t in engine.parent.state.values() if t.is_floating_point())
    assert engine.weights_digest() == clean_digest()


# ------------------------------------------------------------------------ 1. the sample count


@pytest.mark.parametrize("count", [10**12, 10**39, 10**400])
def test_a_huge_sample_count_is_refused_and_the_model_is_the_one_without_the_attacker(count: int) -> None:
    def attack(device: Device, task: TaskReceived) -> list[str | bytes]:
        return rewritten(honest_update(device, task, scaled(task, -1.0)), num_samples=count)

    engine, summary, _ = run_round(attack)  # 10**400 raised OverflowError here; 10**39 made NaN
    assert_attacker_lost_only_its_round(engine, summary)
    (evil,) = [o for o in summary.outcomes if o.device_id == "evil"]
    assert "num_samples" in evil.reason or "out of range (|x| <= 2**53)" in evil.reason  # the JSON bound


def test_a_sample_count_above_the_declared_shard_is_refused_and_the_device_is_told() -> None:
    def attack(device: Device, task: TaskReceived) -> list[str | bytes]:
        moved = {
            n: (a + np.float32(0.01)).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in task.tensors.items()
        }
        return honest_update(device, task, moved, num_samples=DECLARED_SAMPLES * 1000)

    engine, summary, devices = run_round(attack)
    assert_attacker_lost_only_its_round(engine, summary)
    (error,) = devices["evil"].from_session()
    assert isinstance(error, ErrorReceived) and error.error.code == ErrorCode.BAD_UPDATE
    assert "above the 4 samples the device declared" in error.error.message


def test_a_sample_count_of_zero_is_refused_and_the_device_is_told() -> None:
    def attack(device: Device, task: TaskReceived) -> list[str | bytes]:
        return honest_update(device, task, num_samples=0)

    engine, summary, devices = run_round(attack)
    assert_attacker_lost_only_its_round(engine, summary)
    (error,) = devices["evil"].from_session()  # it was dropped without a word
    assert isinstance(error, ErrorReceived) and error.error.code == ErrorCode.BAD_UPDATE
    assert error.error.task_id is not None and "num_samples" in error.error.message


# ------------------------------------------------------------------------- 2. the peak memory


@pytest.mark.parametrize("peak", [10**18, MEMORY_TOTAL + 1])
def test_a_huge_peak_is_refused_and_the_next_round_and_a_resume_still_plan(peak: int) -> None:
    def attack(device: Device, task: TaskReceived) -> list[str | bytes]:
        return rewritten(honest_update(device, task), peak_rss_bytes=peak)

    engine, summary, _ = run_round(attack)
    assert_attacker_lost_only_its_round(engine, summary)
    assert engine.devices()["evil"]["shrink_bytes"] == 0
    assert {o.device_id for o in engine.begin_round(["h1", "h2", "evil"], now=3.0)} == {"h1", "h2", "evil"}
    engine.close_round(4.0)
    engine.finish_round()
    resumed = FederationEngine.restore(
        engine.snapshot(), engine.federation, engine.training, devices=["h1", "h2", "evil"]
    )
    for name in ("h1", "h2", "evil"):
        resumed.admit(name, profile())
    assert len(resumed.begin_round(["h1", "h2", "evil"], now=0.0)) == 3


def test_a_peak_within_the_declared_memory_that_would_leave_no_plan_is_not_kept() -> None:
    engine = engine_for()
    engine.admit("evil", {**profile(), "budget": {"usable": 200_000_000, "runtime_footprint": 0}})
    engine.registry.note_peak("evil", MEMORY_TOTAL)  # far above a budget no sub-network could shrink to
    assert engine.devices()["evil"]["shrink_bytes"] == 0
    assert engine.registry.training_plan("evil").params > 0


def test_a_device_no_plan_fits_sits_the_round_out_without_stopping_it() -> None:
    engine = engine_for()
    for name in ("h1", "h2", "evil"):
        engine.admit(name, profile())
    with engine.registry._lock:  # a checkpoint written before the shrink was bounded
        engine.registry._records["evil"].shrink_bytes = FULL_BUDGET
    orders = engine.begin_round(["h1", "h2", "evil"], now=0.0)
    assert {o.device_id for o in orders} == {"h1", "h2"}


# ---------------------------------------------------------------------------- 3. the norm bound


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda device, task: honest_update(device, task, scaled(task, -1.9)), id="weights x(-1.9)"),
        pytest.param(lambda device, task: honest_update(device, task, encoding="delta"), id="weights as a delta"),
    ],
)
def test_an_update_that_moves_the_weights_too_far_is_refused(make: Attack) -> None:
    engine, summary, _ = run_round(make)
    assert_attacker_lost_only_its_round(engine, summary)
    (evil,) = [o for o in summary.outcomes if o.device_id == "evil"]
    assert "changes the weights by an L2 norm" in evil.reason


# ---------------------------------------------------------------------------- 4. task ownership


def test_a_device_cannot_fail_another_devices_task() -> None:
    engine = engine_for()
    devices = {name: join(engine, name) for name in ("h1", "h2", "evil")}
    orders = {o.device_id: o for o in engine.begin_round(sorted(devices), now=0.0)}
    tasks = {name: devices[name].task(order) for name, order in orders.items()}
    victim = orders["h1"].task_id
    evil = devices["evil"]
    error = json.dumps({"type": "error", "v": 1, "task_id": victim, "code": "task_failed", "message": "x"})
    assert evil.session.receive(error, 1.0).go_on  # an Error naming another device's task
    result = json.dumps({"type": "eval_result", "v": 1, "task_id": victim, "num_samples": 1, "metrics": {}})
    assert not evil.session.receive(result, 1.0).go_on  # a result for a task it does not hold: closed
    for name, shift in HONEST.items():
        devices[name].update(tasks[name], shift)
        for frame in devices[name].conn.data_to_send():
            devices[name].session.receive(frame, 1.0)
    evil.session.lost(1008, "")
    engine.close_round(2.0)
    summary = engine.finish_round()
    assert_attacker_lost_only_its_round(engine, summary)


def test_a_merge_that_would_make_the_model_non_finite_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.federation._engine as engine_module

    real = engine_module.aggregate_round

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        parent, merged = real(*args, **kwargs)
        name = next(n for n, t in parent.state.items() if t.is_floating_point())
        state = {**parent.state, name: parent.state[name] * float("nan")}
        return parent.with_state(state), merged

    monkeypatch.setattr(engine_module, "aggregate_round", poisoned)
    engine, summary, _ = run_round(None)
    assert summary.aggregated == 2
    assert engine.weights_digest() == engine_for().weights_digest()  # the model before the round
    assert engine.history[-1]["merge"]["refused"] == "non-finite"
