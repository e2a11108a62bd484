"""The Progress message (device -> coordinator while a TrainTask runs), fed as bytes: no sockets.

Negotiated: a device announces the "progress" capability in its Hello, the coordinator lists the
"progress" feature in its Welcome only then, and the device sends Progress only to a coordinator that
listed it; so neither side of an older version ever sees the field or the message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_sdk import ProtocolError
from edge_sdk.protocol import (
    FEATURE_CHUNK_XXH3,
    FEATURE_PROGRESS,
    ConnectionState,
    CoordinatorConnection,
    DeviceConnection,
    Event,
    HelloReceived,
    Progress,
    ProgressReceived,
    ProtocolViolation,
    TaskReceived,
    TrainSettings,
    UpdateReceived,
    WelcomeReceived,
    decode_message,
    encode_message,
)

SPEC = {"layers": [{"heads": [0, 1], "intermediate": 512}]}
TRAIN = TrainSettings(local_steps=20, lr=1e-4, batch_size=8, seq_len=64)
TENSORS = {"encoder.w": np.ones((8, 4), dtype=np.float32)}


def _pump(src: CoordinatorConnection | DeviceConnection, dst: CoordinatorConnection | DeviceConnection) -> list[Event]:
    return [event for frame in src.data_to_send() for event in dst.receive(frame)]


def _connected(capabilities: tuple[str, ...]) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0", profile={}, capabilities=capabilities)
    assert isinstance(_pump(dev, coord)[0], HelloReceived)
    coord.send_welcome(run_id="run", round=0, server_time=0.0)
    (welcome,) = _pump(coord, dev)
    assert isinstance(welcome, WelcomeReceived)
    return coord, dev


def _working(
    capabilities: tuple[str, ...] = ("train", FEATURE_PROGRESS),
) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = _connected(capabilities)
    coord.send_train_task(task_id="t-1", round=1, spec=SPEC, model_config={}, settings=TRAIN, tensors=TENSORS)
    (task,) = _pump(coord, dev)
    assert isinstance(task, TaskReceived)
    return coord, dev


def _progress(task_id: str = "t-1", done: int = 5, total: int = 20) -> str:
    return encode_message(Progress(task_id=task_id, steps_done=done, steps_total=total))


def test_progress_of_the_running_task_reaches_the_coordinator() -> None:
    coord, dev = _working()
    assert dev.progress_accepted
    dev.send_progress(task_id="t-1", steps_done=5, steps_total=20)
    (event,) = _pump(dev, coord)
    assert isinstance(event, ProgressReceived)
    assert (event.progress.task_id, event.progress.steps_done, event.progress.steps_total) == ("t-1", 5, 20)
    assert coord.state is ConnectionState.AWAITING_RESULT  # the task is still outstanding
    dev.send_update(
        task_id="t-1", tensors=TENSORS, num_samples=1, metrics={}, peak_rss_bytes=1, step_time_s=0.1, train_time_s=1.0
    )
    assert any(isinstance(e, UpdateReceived) for e in _pump(dev, coord))


def test_the_welcome_lists_the_feature_only_for_a_device_that_announced_it() -> None:
    coord = CoordinatorConnection()
    coord.receive(
        '{"type":"hello","v":1,"device_id":"old","sdk_version":"0.0.9","profile":{},"capabilities":["train"],'
        '"limits":{"max_chunk_bytes":1048576,"max_text_bytes":1048576,"max_transfer_bytes":536870912}}'
    )
    coord.send_welcome(run_id="run", round=0, server_time=0.0)
    (text,) = coord.data_to_send()
    assert isinstance(text, str)
    assert "features" not in json.loads(text)  # an older device decodes exactly the fields it knows
    _, dev = _connected(("train", FEATURE_PROGRESS))
    assert dev.welcome is not None and dev.welcome.features == (FEATURE_PROGRESS, FEATURE_CHUNK_XXH3)


def test_a_device_sends_no_progress_to_a_coordinator_that_did_not_accept_it() -> None:
    _, dev = _working(capabilities=("train",))
    assert not dev.progress_accepted
    with pytest.raises(ProtocolError, match="did not accept the 'progress' feature"):
        dev.send_progress(task_id="t-1", steps_done=1, steps_total=20)
    assert dev.data_to_send() == []


def test_a_device_sends_progress_only_for_its_running_training_task() -> None:
    _, dev = _working()
    with pytest.raises(ProtocolError, match="the running task is 't-1'"):
        dev.send_progress(task_id="t-2", steps_done=1, steps_total=20)
    with pytest.raises(ProtocolError, match="steps_done"):
        dev.send_progress(task_id="t-1", steps_done=21, steps_total=20)
    assert dev.data_to_send() == []


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (
            '{"type":"progress","v":1,"task_id":"t-1","steps_done":21,"steps_total":20}',
            "steps_done: must be in 0..steps_total (20), got 21",
        ),
        ('{"type":"progress","v":1,"task_id":"t-1","steps_done":1,"steps_total":99999999}', "steps_total"),
        ('{"type":"progress","v":1,"task_id":"t-1","steps_done":true,"steps_total":20}', "expected an integer"),
        ('{"type":"progress","v":1,"task_id":"t-1","steps_done":1}', "missing field 'steps_total'"),
        ('{"type":"progress","v":1,"task_id":"t-1","steps_done":1,"steps_total":2,"eta":3}', "unknown field 'eta'"),
    ],
)
def test_out_of_bounds_or_malformed_progress_is_a_protocol_error(frame: str, fragment: str) -> None:
    coord, _ = _working()
    (event,) = coord.receive(frame)
    assert isinstance(event, ProtocolViolation) and event.close_code == 1002
    assert fragment in event.reason, event.reason


def test_progress_for_another_task_or_no_task_is_dropped_not_fatal() -> None:
    coord, _ = _working()
    assert coord.receive(_progress(task_id="t-0")) == []  # e.g. an older task's, already answered
    assert coord.state is ConnectionState.AWAITING_RESULT
    idle, _ = _connected(("train", FEATURE_PROGRESS))
    assert idle.receive(_progress()) == []
    assert idle.state is ConnectionState.READY


def test_progress_before_hello_is_a_violation() -> None:
    (event,) = CoordinatorConnection().receive(_progress())
    assert isinstance(event, ProtocolViolation) and "expected Hello first" in event.reason


def test_a_device_refuses_a_progress_message() -> None:
    _, dev = _working()
    (event,) = dev.receive(_progress())
    assert isinstance(event, ProtocolViolation) and "Progress is not a message a device receives" in event.reason


def test_round_trip() -> None:
    message = Progress(task_id="t-1", steps_done=0, steps_total=1)
    assert decode_message(encode_message(message)) == message
