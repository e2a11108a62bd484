"""Connection state machines wired together in memory: conversations, faults, close codes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk import ProtocolError
from edge_sdk.protocol import (
    ByeReceived,
    ConnectionLost,
    ConnectionState,
    CoordinatorConnection,
    DeployReceived,
    DeployResultReceived,
    DeviceConnection,
    Error,
    ErrorReceived,
    EvalResult,
    EvalResultReceived,
    EvalSettings,
    Event,
    HelloReceived,
    InferenceSettings,
    Message,
    ProtocolViolation,
    TaskReceived,
    TaskRejected,
    TrainSettings,
    TrainTask,
    Update,
    UpdateReceived,
    UpdateRejected,
    WelcomeReceived,
    WireLimits,
    decode_message,
    encode_chunk,
    encode_message,
    encode_tensors,
)

MiB = 1 << 20
SPEC = {"layers": [{"heads": [0, 1], "intermediate": 512}]}
CONFIG = {"model_type": "bert", "hidden_size": 64}
TRAIN = TrainSettings(local_steps=2, lr=1e-4, batch_size=8, seq_len=64, prox_mu=0.0, seed=1)


def _weights(big: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "encoder.w": rng.standard_normal(650_000 if big else (8, 4)).astype(np.float32),
        "encoder.b": rng.standard_normal(4).astype(np.float16),
        "position_ids": np.arange(6, dtype=np.int64),
    }


def _pump(src: CoordinatorConnection | DeviceConnection, dst: CoordinatorConnection | DeviceConnection) -> list[Event]:
    events: list[Event] = []
    for message in src.data_to_send():
        events += dst.receive(message)
    return events


def _feed(conn: CoordinatorConnection | DeviceConnection, frames: list[str | bytes]) -> list[Event]:
    events: list[Event] = []
    for frame in frames:
        events += conn.receive(frame)
    return events


def _replies(conn: CoordinatorConnection | DeviceConnection) -> list[Message]:
    out = conn.data_to_send()
    assert all(isinstance(m, str) for m in out), "a fault reply is a control message only"
    return [decode_message(m) for m in out if isinstance(m, str)]


def _connected(
    coordinator_limits: WireLimits | None = None, device_limits: WireLimits | None = None
) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord = CoordinatorConnection(limits=coordinator_limits)
    dev = DeviceConnection(limits=device_limits)
    dev.send_hello(device_id="dev-1", sdk_version="0.1.0", profile={"ram_bytes": 4 << 30}, capabilities=("train",))
    (hello,) = _pump(dev, coord)
    assert isinstance(hello, HelloReceived) and hello.hello.device_id == "dev-1"
    coord.send_welcome(run_id="run-1", round=0, server_time=1.5)
    (welcome,) = _pump(coord, dev)
    assert isinstance(welcome, WelcomeReceived) and welcome.welcome.run_id == "run-1"
    return coord, dev


def _train(coord: CoordinatorConnection, tensors: dict[str, np.ndarray], **kwargs: Any) -> TrainTask:
    return coord.send_train_task(
        task_id="t-1", round=1, spec=SPEC, model_config=CONFIG, settings=TRAIN, tensors=tensors, **kwargs
    )


def _at_working(big: bool = False, **kwargs: Any) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = _connected()
    _train(coord, _weights(big), **kwargs)
    (event,) = _pump(coord, dev)
    assert isinstance(event, TaskReceived)
    return coord, dev


def _raw_update(task_id: str, tensors: dict[str, np.ndarray], chunk_bytes: int = MiB) -> list[str | bytes]:
    """What a misbehaving device could send: bypasses DeviceConnection's own checks."""
    manifest, frames = encode_tensors(tensors, chunk_bytes=chunk_bytes)
    update = Update(
        task_id=task_id,
        num_samples=10,
        metrics={"loss": 1.0},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=0.2,
        weights=manifest,
        encoding="delta",
    )
    return [encode_message(update), *frames]


def _violation(events: list[Event], close_code: int, fragment: str) -> ProtocolViolation:
    assert len(events) == 1, events
    (event,) = events
    assert isinstance(event, ProtocolViolation), event
    assert event.close_code == close_code
    assert fragment in event.reason, event.reason
    return event


def _error_reply(conn: CoordinatorConnection | DeviceConnection, code: str, task_id: str | None) -> Error:
    (reply,) = _replies(conn)
    assert isinstance(reply, Error)
    assert reply.code == code
    assert reply.task_id == task_id
    return reply


# ------------------------------------------------------------------------------- conversations


def test_full_conversation_handshake_train_evaluate_deploy_bye() -> None:
    coord, dev = _connected()
    assert coord.state is dev.state is ConnectionState.READY
    assert coord.peer_limits == dev.limits and dev.peer_limits == coord.limits

    sent = _weights(big=True)
    task = _train(coord, sent, max_update_norm=1e6)
    frames = coord.data_to_send()
    assert isinstance(frames[0], str) and all(isinstance(f, bytes) for f in frames[1:])
    assert len(frames) == 1 + task.weights.num_chunks == 1 + 3
    assert all(len(f) <= MiB + 24 for f in frames[1:])
    assert coord.state is ConnectionState.AWAITING_RESULT and coord.outstanding_task == task

    # The device receives frame by frame: nothing to report until the last chunk.
    assert dev.receive(frames[0]) == [] and dev.state is ConnectionState.RECEIVING
    assert dev.receive(frames[1]) == [] and dev.receive(frames[2]) == []
    (received,) = dev.receive(frames[3])
    assert isinstance(received, TaskReceived) and received.task == task
    for name, array in sent.items():
        np.testing.assert_array_equal(received.tensors[name], array)
    assert dev.state is ConnectionState.WORKING and dev.current_task == task

    delta = {name: np.zeros_like(array) for name, array in received.tensors.items()}
    delta["encoder.w"][:4] = [3.0, 4.0, 0.0, 0.0]
    update = dev.send_update(
        task_id="t-1",
        tensors=delta,
        num_samples=128,
        metrics={"loss": 0.5},
        peak_rss_bytes=300 * MiB,
        step_time_s=0.25,
        train_time_s=0.5,
    )
    assert dev.state is ConnectionState.READY
    (got,) = _pump(dev, coord)
    assert isinstance(got, UpdateReceived)
    assert got.update == update and got.update.encoding == "delta"
    assert got.norm == pytest.approx(5.0)
    np.testing.assert_array_equal(got.tensors["encoder.w"], delta["encoder.w"])
    assert coord.state is ConnectionState.READY and coord.outstanding_task is None

    coord.send_evaluate_task(
        task_id="e-1",
        round=1,
        spec=SPEC,
        model_config=CONFIG,
        settings=EvalSettings(batch_size=4, seq_len=64),
        tensors=_weights(),
    )
    (eval_task,) = _pump(coord, dev)
    assert isinstance(eval_task, TaskReceived) and eval_task.task.task_id == "e-1"
    dev.send_eval_result(task_id="e-1", num_samples=50, metrics={"accuracy": 0.8})
    (result,) = _pump(dev, coord)
    assert isinstance(result, EvalResultReceived) and result.result.metrics == {"accuracy": 0.8}

    coord.send_deploy(
        task_id="d-1",
        round=2,
        spec=SPEC,
        model_config=CONFIG,
        settings=InferenceSettings(batch_size=1, seq_len=64, quantize=True),
        tensors=_weights(),
    )
    (deploy,) = _pump(coord, dev)
    assert isinstance(deploy, DeployReceived) and deploy.deploy.settings.quantize is True
    dev.send_deploy_result(task_id="d-1", ok=True, metrics={"cosine_min": 0.99}, message="ok")
    (deployed,) = _pump(dev, coord)
    assert isinstance(deployed, DeployResultReceived) and deployed.result.ok

    coord.send_bye(reason="run finished")
    (bye,) = _pump(coord, dev)
    assert isinstance(bye, ByeReceived) and bye.bye.reason == "run finished" and bye.pending_task_id is None
    assert coord.state is dev.state is ConnectionState.CLOSED


def test_chunk_size_is_the_smaller_of_both_sides() -> None:
    coord, dev = _connected(coordinator_limits=WireLimits(max_chunk_bytes=4 * MiB))
    task = _train(coord, _weights(big=True))
    assert task.weights.chunk_bytes == MiB  # the device accepts 1 MiB
    (event,) = _pump(coord, dev)
    assert isinstance(event, TaskReceived)


def test_device_reports_a_failed_task() -> None:
    coord, dev = _at_working()
    dev.send_error(task_id="t-1", code="task_failed", message="out of memory")
    assert dev.state is ConnectionState.READY and dev.current_task is None
    (event,) = _pump(dev, coord)
    assert isinstance(event, ErrorReceived) and event.error.code == "task_failed"
    assert coord.state is ConnectionState.READY and coord.outstanding_task is None


def test_coordinator_refuses_a_device() -> None:
    coord = CoordinatorConnection()
    dev = DeviceConnection()
    dev.send_hello(device_id="tiny", sdk_version="0.1.0", profile={})
    _pump(dev, coord)
    coord.send_error(code="rejected", message="device too small")
    coord.send_bye(reason="rejected", code=1008)
    events = _pump(coord, dev)
    assert [type(e) for e in events] == [ErrorReceived, ByeReceived]
    assert dev.state is ConnectionState.CLOSED


def test_connection_lost_mid_transfer_names_the_task() -> None:
    coord, dev = _at_working(big=True)
    dev.send_update(
        task_id="t-1",
        tensors=_weights(big=True),
        num_samples=1,
        metrics={},
        peak_rss_bytes=0,
        step_time_s=0.0,
        train_time_s=0.0,
    )
    frames = dev.data_to_send()
    assert len(frames) == 4 and _feed(coord, frames[:2]) == []
    assert coord.state is ConnectionState.RECEIVING
    (lost,) = coord.receive_close(1006, "")
    assert isinstance(lost, ConnectionLost)
    assert lost.pending_task_id == "t-1" and lost.transfer_incomplete and lost.code == 1006
    assert coord.state is ConnectionState.CLOSED
    assert coord.receive_close(1006, "") == []


# ------------------------------------------------------------------------------- update faults


def test_update_for_a_task_that_was_never_sent() -> None:
    coord, _ = _at_working()
    events = _feed(coord, _raw_update("t-999", _weights()))
    _violation(events, 1008, "Update for unknown task 't-999' (the outstanding task is 't-1')")
    _error_reply(coord, "unknown_task", "t-999")
    assert coord.state is ConnectionState.CLOSED


def test_update_when_no_task_is_outstanding() -> None:
    coord, _ = _connected()
    events = _feed(coord, _raw_update("t-1", _weights())[:1])
    _violation(events, 1008, "no task is outstanding")


def test_update_whose_manifest_differs_from_what_was_sent_is_refused_before_its_chunks() -> None:
    coord, _ = _at_working()
    wrong = _weights()
    wrong["encoder.w"] = wrong["encoder.w"][:, :2].copy()
    wrong["encoder.b"] = wrong["encoder.b"].astype(np.float32)
    del wrong["position_ids"]
    wrong["extra"] = np.zeros(1, dtype=np.float32)
    frames = _raw_update("t-1", wrong)
    event = _violation(coord.receive(frames[0]), 1008, "does not match the expected tensors")
    for fragment in (
        "missing tensor 'position_ids'",
        "unexpected tensor 'extra'",
        "tensor 'encoder.w': shape [8, 2], expected [8, 4]",
        "tensor 'encoder.b': dtype F32, expected F16",
    ):
        assert fragment in event.reason
    assert event.task_id == "t-1"
    _error_reply(coord, "bad_update", "t-1")
    assert coord.receive(frames[1]) == []  # closed: later frames are ignored


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_update_with_non_finite_values_is_rejected_but_the_connection_survives(value: float) -> None:
    coord, dev = _at_working()
    bad = _weights()
    bad["encoder.w"][0, 0] = value
    (event,) = _feed(coord, _raw_update("t-1", bad))
    assert isinstance(event, UpdateRejected) and event.task_id == "t-1"
    assert "non-finite values in 1 tensor(s): 'encoder.w' (1 NaN/Inf)" in event.reason
    reply = _error_reply(coord, "bad_update", "t-1")
    assert coord.state is ConnectionState.READY and coord.outstanding_task is None
    (told,) = dev.receive(encode_message(reply))
    assert isinstance(told, ErrorReceived) and told.error.task_id == "t-1"
    _train(coord, _weights())  # the connection is still usable: the next task goes out
    assert coord.state is ConnectionState.AWAITING_RESULT


def test_update_above_the_norm_bound_is_rejected() -> None:
    coord, _ = _at_working(max_update_norm=1.0)
    big = {name: np.full_like(array, 10) for name, array in _weights().items()}
    (event,) = _feed(coord, _raw_update("t-1", big))
    assert isinstance(event, UpdateRejected)
    assert "global L2 norm" in event.reason and "exceeds the bound 1" in event.reason
    _error_reply(coord, "bad_update", "t-1")


def test_result_of_the_wrong_kind() -> None:
    coord, _ = _at_working()
    events = coord.receive(encode_message(Error(code="x", message="m")))  # not naming a task: just reported
    assert isinstance(events[0], ErrorReceived) and coord.state is ConnectionState.AWAITING_RESULT
    events = coord.receive(encode_message(EvalResult(task_id="t-1", num_samples=1, metrics={})))
    _violation(events, 1002, "EvalResult for task 't-1', which is a TrainTask answered by Update")


def test_device_cannot_send_an_update_that_would_be_refused() -> None:
    _, dev = _at_working()
    bad = _weights()
    bad["encoder.b"][0] = np.nan
    kwargs: dict[str, Any] = {
        "num_samples": 1,
        "metrics": {},
        "peak_rss_bytes": 0,
        "step_time_s": 0.0,
        "train_time_s": 0.0,
    }
    with pytest.raises(ProtocolError, match=r"'encoder.b' \(1 NaN/Inf\)"):
        dev.send_update(task_id="t-1", tensors=bad, **kwargs)
    wrong = dict(_weights(), extra=np.zeros(1, dtype=np.float32))
    with pytest.raises(ProtocolError, match="unexpected tensor 'extra'"):
        dev.send_update(task_id="t-1", tensors=wrong, **kwargs)
    with pytest.raises(ProtocolError, match="the running task is 't-1'"):
        dev.send_update(task_id="t-0", tensors=_weights(), **kwargs)
    with pytest.raises(ProtocolError, match="it is a TrainTask"):
        dev.send_eval_result(task_id="t-1", num_samples=1, metrics={})
    assert dev.data_to_send() == [] and dev.state is ConnectionState.WORKING


# ------------------------------------------------------------------------------ framing faults


def test_text_frame_when_a_chunk_is_expected() -> None:
    coord, dev = _connected()
    _train(coord, _weights(big=True))
    frames = coord.data_to_send()
    assert _feed(dev, frames[:2]) == []
    events = dev.receive(encode_message(Error(code="x", message="m")))
    _violation(events, 1003, "text frame while chunk 1 of 3 of transfer")
    assert "(transfer truncated)" in events[0].reason  # type: ignore[attr-defined]
    _error_reply(dev, "unsupported", "t-1")


def test_chunk_with_no_transfer_open() -> None:
    coord, _ = _connected()
    _, frames = encode_tensors(_weights())
    _violation(coord.receive(frames[0]), 1003, "chunk 0 of transfer")
    reply = _error_reply(coord, "unsupported", None)
    assert "arrived with no transfer open (state READY)" in reply.message
    coord2, _ = _connected()
    _violation(coord2.receive(b"\x00\x01"), 1003, "binary frame arrived with no transfer open")


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda frames: [frames[2], frames[1]], "chunk 1 of transfer"),
        (lambda frames: [frames[1], frames[1]], "duplicate chunk 0"),
        (lambda frames: [encode_chunk("ab" * 16, 0, frames[1][24:])], "foreign transfer abab"),
        (lambda frames: [frames[1][:30]], "carries 6 bytes, expected 1048576 (truncated)"),
        (lambda frames: [frames[1][:20]], "truncated chunk frame: 20 bytes"),
    ],
)
def test_chunk_sequencing_faults_close_with_1002(mangle: Any, fragment: str) -> None:
    coord, _ = _at_working(big=True)
    frames = _raw_update("t-1", _weights(big=True))
    assert coord.receive(frames[0]) == []
    _violation(_feed(coord, mangle(frames)), 1002, fragment)
    _error_reply(coord, "bad_message", "t-1")


def test_corrupted_transfer_fails_the_sha256_check() -> None:
    coord, _ = _at_working(big=True)
    frames = _raw_update("t-1", _weights(big=True))
    last = bytearray(frames[-1])  # type: ignore[arg-type]
    last[-1] ^= 0x01
    frames[-1] = bytes(last)
    _violation(_feed(coord, frames), 1002, "sha256 mismatch")
    _error_reply(coord, "bad_update", "t-1")


def test_binary_frame_above_the_limit_is_1009() -> None:
    coord, _ = _at_working()
    _violation(coord.receive(b"\x00" * (MiB + 25)), 1009, f"binary frame of {MiB + 25} bytes exceeds the limit")
    _error_reply(coord, "too_large", "t-1")


def test_text_frame_above_the_limit_is_1009() -> None:
    coord, _ = _connected()
    text = json.dumps({"type": "error", "v": 1, "task_id": None, "code": "x", "message": "m" * MiB})
    _violation(coord.receive(text), 1009, "exceeds the limit of 1048576")
    _error_reply(coord, "too_large", None)


def test_transfer_above_the_limit_is_refused_at_announcement() -> None:
    limits = WireLimits(max_transfer_bytes=1000)
    coord = CoordinatorConnection(limits=limits)
    dev = DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="1", profile={})
    _pump(dev, coord)
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    _pump(coord, dev)
    big = {"w": np.zeros(1000, dtype=np.float32)}
    coord.send_train_task(task_id="t", round=0, spec={}, model_config={}, settings=TRAIN, tensors=big)
    _pump(coord, dev)
    frames = _raw_update("t", big)
    _violation(coord.receive(frames[0]), 1009, "exceeds the limit of 1000")


def test_sender_refuses_a_transfer_above_the_peers_limit() -> None:
    coord, _ = _connected(device_limits=WireLimits(max_transfer_bytes=1000))
    with pytest.raises(ProtocolError, match="exceed the peer's transfer limit of 1000") as info:
        _train(coord, {"w": np.zeros(1000, dtype=np.float32)})
    assert info.value.close_code == 1009
    assert coord.data_to_send() == [] and coord.state is ConnectionState.READY


def test_tiny_chunks_are_a_policy_violation() -> None:
    coord, _ = _at_working()
    _violation(coord.receive(_raw_update("t-1", _weights(), chunk_bytes=16)[0]), 1008, "below the minimum")


# ------------------------------------------------------------------------------ message faults


def test_malformed_json() -> None:
    coord, _ = _connected()
    _violation(coord.receive('{"type": "update",'), 1002, "malformed JSON")
    _error_reply(coord, "bad_message", None)


def test_wrong_protocol_version() -> None:
    coord = CoordinatorConnection()
    obj = json.loads(encode_message(Error(code="x", message="m")))
    obj["v"] = 2
    _violation(coord.receive(json.dumps(obj)), 1002, "unsupported protocol version 2")
    _error_reply(coord, "version", None)


def test_unknown_message_type() -> None:
    coord, _ = _connected()
    _violation(coord.receive('{"type": "gossip", "v": 1}'), 1003, "unknown message type 'gossip'")
    _error_reply(coord, "unsupported", None)


def test_missing_field_names_it() -> None:
    _, dev = _connected()
    _violation(dev.receive('{"type": "error", "v": 1, "code": "x"}'), 1002, "Error: missing field 'task_id'")


def test_anything_before_hello() -> None:
    coord = CoordinatorConnection()
    _violation(_feed(coord, _raw_update("t-1", _weights())[:1]), 1002, "expected Hello first, got Update")
    _error_reply(coord, "unexpected", None)


def test_hello_twice() -> None:
    coord, _ = _connected()
    hello = DeviceConnection()
    hello.send_hello(device_id="d", sdk_version="1", profile={})
    _violation(_pump(hello, coord), 1002, "unexpected Hello in state READY")


def test_messages_travelling_the_wrong_way() -> None:
    coord, dev = _connected()
    _train(coord, _weights())
    frames = coord.data_to_send()
    other, _ = _connected()
    _violation(other.receive(frames[0]), 1002, "TrainTask is not a message a coordinator receives")
    _violation(_feed(dev, _raw_update("t-1", _weights())[:1]), 1002, "Update is not a message a device receives")


def test_task_while_the_device_is_working() -> None:
    _, dev = _at_working()
    coord2, _ = _connected()
    _train(coord2, _weights())
    frames = coord2.data_to_send()
    _violation(dev.receive(frames[0]), 1002, "TrainTask 't-1' while task 't-1' is still running")


def test_task_with_nan_weights_is_rejected_by_the_device() -> None:
    coord, dev = _connected()
    bad = _weights()
    bad["encoder.w"][1, 1] = np.nan
    _train(coord, bad)
    (event,) = _pump(coord, dev)
    assert isinstance(event, TaskRejected) and event.task_id == "t-1" and "NaN/Inf" in event.reason
    assert dev.state is ConnectionState.READY
    (reply,) = _pump(dev, coord)
    assert isinstance(reply, ErrorReceived) and reply.error.code == "bad_task"
    assert coord.state is ConnectionState.READY


def test_frames_after_close_are_ignored() -> None:
    coord, _ = _connected()
    coord.receive("not json")
    coord.data_to_send()
    assert coord.receive("not json") == [] and coord.receive(b"\x00") == []
    assert coord.data_to_send() == []


def test_an_internal_bug_never_escapes_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    coord, _ = _at_working()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(coord, "_on_message", boom)
    _violation(coord.receive(encode_message(Error(code="x", message="m"))), 1011, "RuntimeError: kaboom")
    _error_reply(coord, "internal", "t-1")


def test_send_methods_refuse_the_wrong_state() -> None:
    coord = CoordinatorConnection()
    with pytest.raises(ProtocolError, match="cannot send_welcome in state AWAITING_HELLO"):
        coord.send_welcome(run_id="r", round=0, server_time=0.0)
    coord, dev = _at_working()
    with pytest.raises(ProtocolError, match="cannot send_train_task in state AWAITING_RESULT"):
        _train(coord, _weights())
    with pytest.raises(ProtocolError, match="cannot send_hello in state WORKING"):
        dev.send_hello(device_id="d", sdk_version="1", profile={})
    coord.send_bye()
    with pytest.raises(ProtocolError, match="closed"):
        coord.send_error(code="x", message="m")


def test_violation_close_reason_fits_a_close_frame() -> None:
    event = ProtocolViolation(close_code=1002, reason="é" * 200)
    assert len(event.close_reason.encode()) <= 123
    assert dataclasses.replace(event, reason="short").close_reason == "short"


# --------------------------------------------------------------------------------------- fuzz


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_random_frames_never_raise(frame: str | bytes) -> None:
    coord, _ = _at_working()
    events = coord.receive(frame)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert events[0].close_code in (1002, 1003, 1008, 1009)
    assert coord.state is ConnectionState.CLOSED
    assert isinstance(_replies(coord)[0], Error)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_updates_never_raise(data: st.DataObject) -> None:
    coord, _ = _at_working()
    frames = _raw_update("t-1", _weights())
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = frames[index]
    position = data.draw(st.integers(0, len(frame) - 1))
    if isinstance(frame, str):
        frames[index] = frame[:position] + data.draw(st.characters(codec="ascii")) + frame[position + 1 :]
    else:
        frames[index] = frame[:position] + bytes([data.draw(st.integers(0, 255))]) + frame[position + 1 :]
    events = _feed(coord, frames)
    assert len(events) == 1
    assert isinstance(events[0], (UpdateReceived, UpdateRejected, ProtocolViolation))
