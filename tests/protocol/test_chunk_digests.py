"""Per-chunk xxh3_128 digests: negotiated in the handshake, each chunk verified by its index.

A corrupt, truncated or reordered chunk is refused with an error naming it, and costs the sender its
task (the connection closes; the device comes back next round). A peer that does not announce the
feature keeps the whole-blob sha256, and never sees the new fields.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    FEATURE_CHUNK_XXH3,
    CoordinatorConnection,
    DeviceConnection,
    Error,
    Event,
    Fragment,
    ProtocolViolation,
    TaskReceived,
    TensorManifest,
    TrainSettings,
    Update,
    UpdateReceived,
    decode_message,
    encode_chunk,
    encode_message,
    encode_tensors,
)

MiB = 1 << 20
TRAIN = TrainSettings(local_steps=1, lr=1e-4, batch_size=1, seq_len=8)
OLD_HELLO = (
    '{"type":"hello","v":1,"device_id":"old","sdk_version":"0.0.9","profile":{},"capabilities":["train"],'
    '"limits":{"max_chunk_bytes":1048576,"max_text_bytes":1048576,"max_transfer_bytes":536870912}}'
)


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"w": rng.standard_normal(700_000).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def feed(conn: CoordinatorConnection | DeviceConnection, frames: list[str | bytes | Fragment]) -> list[Event]:
    return [event for frame in frames for event in conn.receive(frame)]


def connected() -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0", profile={})
    feed(coord, dev.data_to_send())
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    feed(dev, coord.data_to_send())
    return coord, dev


def train(coord: CoordinatorConnection) -> list[str | bytes]:
    coord.send_train_task(task_id="t", round=0, spec={}, model_config={}, settings=TRAIN, tensors=weights())
    return coord.data_to_send()


def raw_update(digest: str = "xxh3_128") -> list[str | bytes]:
    """An update as a device would send it (3 chunks), open to tampering."""
    manifest, frames = encode_tensors(weights(), chunk_bytes=MiB, digest=digest)
    update = Update(
        task_id="t",
        num_samples=1,
        metrics={},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=0.1,
        weights=manifest,
        encoding="weights",
    )
    return [encode_message(update), *frames]


def at_working() -> CoordinatorConnection:
    coord, dev = connected()
    (event,) = feed(dev, train(coord))
    assert isinstance(event, TaskReceived)
    return coord


def refused(
    coord: CoordinatorConnection, frames: list[str | bytes | Fragment], fragment: str, close_code: int = 1002
) -> None:
    events = feed(coord, frames)
    (event,) = events
    assert isinstance(event, ProtocolViolation) and event.close_code == close_code, events
    assert fragment in event.reason, event.reason
    (reply,) = [decode_message(m) for m in coord.data_to_send() if isinstance(m, str)]
    assert isinstance(reply, Error) and reply.task_id == "t"


def test_both_directions_carry_chunk_digests_once_negotiated() -> None:
    coord, dev = connected()
    assert dev.welcome is not None and FEATURE_CHUNK_XXH3 in dev.welcome.features
    frames = train(coord)
    announced = json.loads(frames[0])["weights"]
    assert "sha256" not in announced and len(announced["chunk_xxh3"]) == announced["num_chunks"] == 3
    (event,) = feed(dev, frames)
    assert isinstance(event, TaskReceived)
    update = dev.send_update(
        task_id="t",
        tensors=event.tensors,
        num_samples=1,
        metrics={},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=0.1,
        encoding="weights",
    )
    assert update.weights.chunk_xxh3 and not update.weights.sha256
    (received,) = feed(coord, dev.data_to_send())
    assert isinstance(received, UpdateReceived)
    np.testing.assert_array_equal(received.tensors["w"], weights()["w"])


def test_a_device_that_does_not_announce_the_feature_keeps_sha256() -> None:
    coord = CoordinatorConnection()
    feed(coord, [OLD_HELLO])
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    welcome, task = (json.loads(m) for m in coord.data_to_send()[:1] + train(coord)[:1])
    assert "features" not in welcome  # an older device decodes exactly the fields it knows
    assert "chunk_xxh3" not in task["weights"] and len(task["weights"]["sha256"]) == 64
    (event,) = feed(coord, raw_update("sha256"))  # and its sha256 update is taken
    assert isinstance(event, UpdateReceived)


def test_a_coordinator_that_does_not_grant_the_feature_gets_sha256_updates() -> None:
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0", profile={})
    limits = '{"max_chunk_bytes":1048576,"max_text_bytes":1048576,"max_transfer_bytes":536870912}'
    welcome = f'{{"type":"welcome","v":1,"run_id":"r","device_id":"d","round":0,"server_time":0.0,"limits":{limits}}}'
    (welcomed,) = feed(dev, [welcome])  # an older coordinator: no features
    assert not isinstance(welcomed, ProtocolViolation)
    dev.data_to_send()  # the Hello, which this old coordinator would ignore the feature of
    feed(coord, [OLD_HELLO])  # (here: a new coordinator that was not asked, so its task carries sha256)
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    coord.data_to_send()
    (event,) = feed(dev, train(coord))
    assert isinstance(event, TaskReceived)
    update = dev.send_update(
        task_id="t",
        tensors=event.tensors,
        num_samples=1,
        metrics={},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=0.1,
        encoding="weights",
    )
    assert len(update.weights.sha256) == 64 and not update.weights.chunk_xxh3
    assert "chunk_xxh3" not in json.loads(dev.data_to_send()[0])["weights"]


def flip(frame: str | bytes, at: int) -> bytes:
    assert isinstance(frame, bytes)
    changed = bytearray(frame)
    changed[at] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("at", [24, 24 + 1000, -1])  # the payload's first, a middle, and its last byte
def test_one_corrupt_byte_in_one_chunk_is_refused_naming_the_chunk(at: int) -> None:
    coord = at_working()
    frames = raw_update()
    frames[2] = flip(frames[2], at)
    refused(coord, frames, "chunk 1 of transfer")


def test_a_corrupt_last_chunk_is_refused_before_the_update_is_decoded() -> None:
    coord = at_working()
    frames = raw_update()
    frames[-1] = flip(frames[-1], -1)
    refused(coord, frames, "chunk 2 of transfer")


def test_a_corrupt_task_costs_the_device_its_task() -> None:
    coord, dev = connected()
    frames = train(coord)
    frames[1] = flip(frames[1], 500)
    events = feed(dev, frames)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation), events
    assert "chunk 0 of transfer" in events[0].reason and "corrupt" in events[0].reason
    (reply,) = [decode_message(m) for m in dev.data_to_send() if isinstance(m, str)]
    assert isinstance(reply, Error) and reply.code == "bad_task" and reply.task_id == "t"


def test_a_truncated_chunk_or_transfer_is_refused() -> None:
    coord = at_working()
    frames = raw_update()
    refused(coord, [*frames[:2], frames[2][:5000]], "chunk 1 of transfer")
    coord = at_working()
    stop = '{"type":"eval_result","v":1,"task_id":"t","num_samples":1,"metrics":{}}'
    refused(coord, [*frames[:3], stop], "chunk 2 of 3 of transfer", close_code=1003)


def test_reordered_chunks_are_refused() -> None:
    coord = at_working()
    frames = raw_update()
    refused(coord, [frames[0], frames[2], frames[1], frames[3]], "arrived out of order, expected chunk 0")
    # The payloads swapped under headers in order: each chunk's digest names the first that differs.
    coord = at_working()
    manifest = json.loads(frames[0])["weights"]
    swapped = [encode_chunk(manifest["transfer_id"], i, frames[1 + j][24:]) for i, j in enumerate((1, 0, 2))]
    refused(coord, [frames[0], *swapped], "chunk 0 of transfer")


def test_a_manifest_carries_exactly_one_kind_of_digest() -> None:
    manifest, _ = encode_tensors(weights(), digest="xxh3_128")
    good = manifest.to_json()
    cases = {
        "both": ({**good, "sha256": "ab" * 32}, "either sha256 or chunk_xxh3"),
        "neither": ({k: v for k, v in good.items() if k != "chunk_xxh3"}, "expected 64 lowercase hex digits"),
        "count": ({**good, "chunk_xxh3": good["chunk_xxh3"][:-1]}, "2 digests for 3 chunks"),
        "hex": ({**good, "chunk_xxh3": ["zz" * 16, *good["chunk_xxh3"][1:]]}, "32 lowercase hex digits per chunk"),
    }
    for json_obj, fragment in cases.values():
        with pytest.raises(ProtocolError, match=fragment):
            TensorManifest.from_json(json_obj)
    assert TensorManifest.from_json(good) == manifest
    assert dataclasses.replace(manifest, chunk_xxh3=(), sha256="ab" * 32).sha256


# ------------------------------------------------------------------------- pieces (Fragment)


def pieces(frame: str | bytes, cuts: list[int]) -> list[Fragment]:
    """A chunk frame as a websocket could deliver it: cut at ``cuts``, ``fin`` on the last piece."""
    assert isinstance(frame, bytes)
    bounds = [0, *cuts, len(frame)]
    parts = [frame[a:b] for a, b in itertools.pairwise(bounds)]
    return [Fragment(part, fin=i == len(parts) - 1) for i, part in enumerate(parts)]


@pytest.mark.parametrize(
    "cuts",
    [
        [24],  # the header alone, then the payload (as frames_to_send(fragments=True) sends it)
        [5, 30, 300_000],  # the header cut inside
        [24, 24, 1000],  # an empty piece in the middle
    ],
)
def test_a_transfer_received_piece_by_piece_is_the_same(cuts: list[int]) -> None:
    coord = at_working()
    text, *frames = raw_update()
    events = feed(coord, [text])
    for frame in frames:
        events += feed(coord, pieces(frame, [c for c in cuts if c < len(frame)]))
    (event,) = events
    assert isinstance(event, UpdateReceived)
    np.testing.assert_array_equal(event.tensors["w"], weights()["w"])


def test_the_fin_may_come_as_an_empty_last_piece() -> None:
    coord = at_working()
    text, *frames = raw_update()
    events = feed(coord, [text])
    for frame in frames:
        events += feed(coord, [Fragment(frame, fin=False), Fragment(b"", fin=True)])
    assert isinstance(events[-1], UpdateReceived)


def test_pieces_are_refused_as_whole_frames_are() -> None:
    coord = at_working()
    text, first, second, *_ = raw_update()
    corrupt = flip(second, 600_000)
    refused(coord, [text, *pieces(first, [24]), *pieces(corrupt, [24, 500_000])], "chunk 1 of transfer")
    coord = at_working()
    overrun = [Fragment(first, fin=False), Fragment(b"x", fin=False)]
    refused(coord, [text, *overrun], "carries more than 1048576 bytes, expected 1048576")
    coord = at_working()
    refused(coord, [text, Fragment(first[:1000], fin=True)], "carries 976 bytes, expected 1048576 (truncated)")
    coord = at_working()
    header = [Fragment(first[:10], fin=False), Fragment(first[10:20], fin=True)]
    refused(coord, [text, *header], "truncated chunk frame: 20 bytes")


def test_checks_wait_for_a_whole_chunk_before_the_transport_runs_them() -> None:
    coord, dev = connected()
    coord.defer_checks = True
    (event,) = feed(dev, train(coord))
    assert isinstance(event, TaskReceived)
    text, first, *_ = raw_update()
    feed(coord, [text])
    assert coord.take_work() is None
    feed(coord, pieces(first, [24, 300_000])[:2])
    assert coord.take_work() is None  # a quarter of a chunk waits: not worth a worker thread yet
    feed(coord, pieces(first, [24, 300_000])[2:])
    work = coord.take_work()
    assert work is not None
    work()
    assert coord.take_work() is None
