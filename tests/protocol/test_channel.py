"""The data channel's protocol part, sans-I/O: tokens, the hello, reading chunks into place, the end
marker, and the state machines' channel transfers (no socket)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    FEATURE_DATA_CHANNEL,
    ChannelSend,
    ChannelTokens,
    CoordinatorConnection,
    DeviceConnection,
    HelloReceived,
    ProtocolViolation,
    TaskReceived,
    TensorAssembler,
    TrainSettings,
    Welcome,
    WelcomeReceived,
    channel_hello,
    channel_token,
    prepare_tensors,
)
from edge_sdk.protocol._channel import end_marker

TENSORS = {"w": np.arange(600_000, dtype=np.float32).reshape(600, 1000), "b": np.ones(7, dtype=np.float32)}


def test_a_token_is_redeemed_once_and_revoked_with_its_owner() -> None:
    tokens: ChannelTokens[str] = ChannelTokens()
    first, second = tokens.issue("a"), tokens.issue("b")
    assert len(first) == 32 and first != second
    assert tokens.redeem(bytes.fromhex(first)) == "a"
    assert tokens.redeem(bytes.fromhex(first)) is None  # spent
    tokens.revoke("b")
    assert tokens.redeem(bytes.fromhex(second)) is None and len(tokens) == 0


def test_the_channel_hello_is_exactly_magic_and_token() -> None:
    token = "ab" * 16
    assert channel_token(channel_hello(token)) == bytes.fromhex(token)
    for bad in (b"XXXX" + bytes(16), channel_hello(token)[:-1], channel_hello(token) + b"x"):
        with pytest.raises(ProtocolError):
            channel_token(bad)


def test_welcome_bounds_the_channel_fields() -> None:
    base = {"run_id": "r", "device_id": "d", "round": 0, "server_time": 0.0}
    Welcome(**base, data_port=9000, data_token="0" * 32)
    for port, token in ((70000, "0" * 32), (9000, "zz" * 16), (9000, ""), (0, "0" * 32)):
        with pytest.raises(ProtocolError):
            Welcome(**base, data_port=port, data_token=token)


def _read_into_place(assembler: TensorAssembler, stream: bytes, step: int) -> bool:
    """Feed ``stream`` as a socket would, at most ``step`` bytes per read; True once sealed."""
    position = 0
    while position < len(stream):
        target = assembler.target()
        if not target:
            break
        n = min(len(target), step, len(stream) - position)
        target[:n] = stream[position : position + n]
        position += n
        assembler.wrote(n)
        if assembler.work_waiting:
            assembler.verify()
    return assembler.sealed


def _channel_stream(chunk_bytes: int = 1 << 20) -> tuple[TensorAssembler, list[tuple[bytes, ...]]]:
    encoded = prepare_tensors(TENSORS, chunk_bytes=chunk_bytes)
    manifest = encoded.manifest(chunk_bytes=chunk_bytes)
    chunks = [tuple(bytes(p) for p in pieces) for pieces in encoded.chunk_pieces(manifest)]
    chunks.append(end_marker(manifest))
    return TensorAssembler(manifest, expected=manifest.entries), chunks


def test_chunks_read_into_place_decode_the_same_tensors() -> None:
    assembler, chunks = _channel_stream()
    assert len(chunks) == 4  # 2.4 MB in three chunks, then the end marker
    assert _read_into_place(assembler, b"".join(b"".join(c) for c in chunks), step=100_003)
    tensors = assembler.finish()
    assert all(np.array_equal(tensors[name], TENSORS[name]) for name in TENSORS)
    assert not assembler.target()  # nothing more is read


def test_surplus_bytes_or_a_corrupt_chunk_fail_the_transfer() -> None:
    assembler, chunks = _channel_stream()
    head, *payload = chunks[0]
    longer = [(head, *payload, b"\0" * 10), *chunks[1:]]
    with pytest.raises(ProtocolError, match="not a chunk frame"):
        _read_into_place(assembler, b"".join(b"".join(c) for c in longer), step=1 << 20)

    assembler, chunks = _channel_stream()
    head, *payload = chunks[1]
    flipped = bytearray(b"".join(payload))
    flipped[5] ^= 1
    corrupt = [chunks[0], (head, bytes(flipped)), *chunks[2:]]
    with pytest.raises(ProtocolError, match=r"chunk 1 .* is corrupt"):
        _read_into_place(assembler, b"".join(b"".join(c) for c in corrupt), step=1 << 20)
        assembler.finish()


def _handshake(*, device_channel: bool, coordinator_channel: bool) -> tuple[CoordinatorConnection, DeviceConnection]:
    coordinator, device = CoordinatorConnection(), DeviceConnection()
    device.send_hello(device_id="d", sdk_version="0", profile={}, capabilities=(FEATURE_DATA_CHANNEL,))
    (hello,) = coordinator.receive(device.data_to_send()[0])
    assert isinstance(hello, HelloReceived)
    coordinator.send_welcome(run_id="r", round=0, server_time=0.0, data_channel=(9000, "c" * 32))
    (welcome,) = device.receive(coordinator.data_to_send()[0])
    assert isinstance(welcome, WelcomeReceived) and welcome.welcome.data_port == 9000
    assert FEATURE_DATA_CHANNEL in welcome.welcome.features and coordinator.channel_offered
    if device_channel:
        device.channel_opened()
    if coordinator_channel:
        coordinator.channel_opened()
    return coordinator, device


def _send_task(coordinator: CoordinatorConnection) -> list[object]:
    coordinator.send_train_task(
        task_id="t",
        round=0,
        spec={},
        model_config={},
        settings=TrainSettings(local_steps=1, lr=1e-4, batch_size=1, seq_len=1),
        tensors=TENSORS,
    )
    return list(coordinator.frames_to_send(fragments=True))


def test_a_task_travels_on_the_channel_once_both_sides_opened_it() -> None:
    coordinator, device = _handshake(device_channel=True, coordinator_channel=True)
    text, transfer = _send_task(coordinator)
    assert isinstance(text, str) and isinstance(transfer, ChannelSend)
    assert device.receive(text) == [] and device.channel_receiving
    stream = b"".join(b"".join(bytes(p) for p in pieces) for pieces in transfer.chunks)
    position = 0
    while device.channel_target():
        target = device.channel_target()
        n = min(len(target), len(stream) - position)
        target[:n] = stream[position : position + n]
        position += n
        assert device.channel_wrote(n) == []
    work = device.take_work()
    if work is not None:
        work()
    (event,) = device.channel_finish()
    assert isinstance(event, TaskReceived) and event.task.weights.channel == "tcp"
    assert np.array_equal(event.tensors["w"], TENSORS["w"]) and position == len(stream)


def test_a_task_announced_on_a_channel_the_device_has_not_opened_is_a_violation() -> None:
    coordinator, device = _handshake(device_channel=False, coordinator_channel=True)
    text, _ = _send_task(coordinator)
    (event,) = device.receive(text)
    assert isinstance(event, ProtocolViolation) and "data channel that is not open" in event.reason


def test_without_an_open_channel_tasks_stay_on_the_websocket() -> None:
    coordinator, _ = _handshake(device_channel=True, coordinator_channel=False)
    frames = _send_task(coordinator)
    assert not any(isinstance(frame, ChannelSend) for frame in frames) and len(frames) == 4
