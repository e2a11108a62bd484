"""Update encodings (edge_sdk.protocol._encodings): error bounds, round trips, checked decoding, and
their negotiation between a DeviceConnection and a CoordinatorConnection fed as bytes (no sockets)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zstandard

from coordinator.federation._tables import Table, read_federation
from edge_sdk import ConfigError, ProtocolError
from edge_sdk._levers import Levers
from edge_sdk.protocol import (
    CAPABILITY_ENCODINGS,
    ENCODINGS,
    CoordinatorConnection,
    DeviceConnection,
    Event,
    HelloReceived,
    ProtocolViolation,
    TaskReceived,
    TrainSettings,
    TrainTask,
    UpdateReceived,
    UpdateRejected,
    WelcomeReceived,
    decode_arrays,
    delta_from_weights,
    encode_arrays,
)
from edge_sdk.protocol._encodings import SCALE_SUFFIX, encoded_mismatches
from edge_sdk.protocol._tensors import TensorEntry, encode_tensors

RNG = np.random.default_rng(0)
TENSORS = {
    "w": RNG.normal(0, 0.05, size=(64, 48)).astype(np.float32),
    "b": RNG.normal(0, 1.0, size=(48,)).astype(np.float32),
    "zero_row": np.vstack([np.zeros((1, 8)), RNG.normal(size=(3, 8))]).astype(np.float32),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "w@rows": np.array([1, 5, 9], dtype=np.int64),
}


def _round_trip(tensors: dict[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    packed, logical = encode_arrays(tensors, encoding)
    return decode_arrays(packed, logical, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_keeps_names_shapes_and_dtypes(encoding: str) -> None:
    out = _round_trip(TENSORS, encoding)
    assert list(out) == list(TENSORS)
    for name, array in TENSORS.items():
        assert out[name].shape == array.shape and out[name].dtype == array.dtype
    np.testing.assert_array_equal(out["w@rows"], TENSORS["w@rows"])  # integers travel exactly


@pytest.mark.parametrize("encoding", ["fp32", "fp32+zstd"])
def test_fp32_is_exact(encoding: str) -> None:
    for name, array in _round_trip(TENSORS, encoding).items():
        np.testing.assert_array_equal(array, TENSORS[name])


@pytest.mark.parametrize("encoding", ["fp16", "fp16+zstd"])
def test_fp16_relative_error_is_at_most_half_an_ulp(encoding: str) -> None:
    out = _round_trip(TENSORS, encoding)
    for name in ("w", "b", "zero_row", "scalar"):
        x = TENSORS[name].astype(np.float64)
        normal = np.abs(x) >= 2.0**-14  # float16's normal range: relative error <= 2**-11
        err = np.abs(out[name].astype(np.float64) - x)
        assert (err[normal] <= 2.0**-11 * np.abs(x[normal])).all()
        assert (err[~normal] <= 2.0**-25).all()  # subnormals: half the spacing 2**-24


@pytest.mark.parametrize("encoding", ["int8", "int8+zstd"])
def test_int8_error_is_at_most_half_a_step_per_row(encoding: str) -> None:
    packed, logical = encode_arrays(TENSORS, encoding)
    plain, _ = encode_arrays(TENSORS, "int8")
    out = decode_arrays(packed, logical, encoding)
    for name in ("w", "b", "zero_row", "scalar"):
        x = TENSORS[name]
        rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
        scale = plain[name + SCALE_SUFFIX].astype(np.float64)
        np.testing.assert_allclose(scale, np.abs(rows).max(axis=1) / 127, rtol=1e-6)
        err = np.abs(out[name].reshape(rows.shape).astype(np.float64) - rows)
        assert (err <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    np.testing.assert_array_equal(out["zero_row"][0], 0.0)  # a zero row (scale 0) decodes to zeros


def test_zstd_shrinks_untouched_rows() -> None:
    delta = np.zeros((1000, 64), dtype=np.float32)
    delta[:10] = RNG.normal(0, 1e-3, size=(10, 64))
    packed, _ = encode_arrays({"e": delta}, "int8+zstd")
    assert sum(a.nbytes for a in packed.values()) < delta.nbytes / 20


def test_delta_from_weights_inverts_the_coordinators_reconstruction() -> None:
    received = {"w": TENSORS["w"], "e": TENSORS["zero_row"], "n": np.arange(3)}
    trained = {
        "w": received["w"] + 0.01,
        "e": received["e"][[0, 2]] + 1.0,
        "e@rows": np.array([0, 2]),
        "q@lora_A": np.ones((2, 2), np.float32),
        "n": np.arange(3),
    }
    delta = delta_from_weights(trained, received)
    np.testing.assert_allclose(delta["w"], 0.01, rtol=1e-4)
    np.testing.assert_allclose(delta["e"], 1.0, rtol=1e-6)
    assert delta["e@rows"] is trained["e@rows"] and delta["q@lora_A"] is trained["q@lora_A"]
    assert delta["n"] is trained["n"]


# ------------------------------------------------------------------------------ refused decodes


def _refused(packed: dict[str, np.ndarray], logical: tuple[TensorEntry, ...], encoding: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_arrays(packed, logical, encoding)
    assert info.value.close_code == 1008


def test_a_zstd_bomb_is_refused_before_decompression() -> None:
    tensors = {"w": np.zeros((64, 64), dtype=np.float32)}  # 16 KiB: a frame of a few KiB is within bounds
    packed, logical = encode_arrays(tensors, "fp32+zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB of zeros in a few KiB
    assert len(bomb) < 64 * 1024
    _refused({"w": np.frombuffer(bomb, np.uint8)}, logical, "fp32+zstd", "content size of 67108864 bytes")
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 64)
    _refused({"w": np.frombuffer(unsized, np.uint8)}, logical, "fp32+zstd", "no content size")
    _refused({"w": np.frombuffer(b"not zstd at all", np.uint8)}, logical, "fp32+zstd", "not a zstd frame")
    corrupt = bytearray(packed["w"].tobytes())
    corrupt[-4:] = b"\xff\xff\xff\xff"
    _refused({"w": np.frombuffer(bytes(corrupt), np.uint8)}, logical, "fp32+zstd", "corrupt zstd frame")


def test_a_frame_above_the_compression_bound_is_refused_by_its_entry() -> None:
    logical = (TensorEntry(name="w", shape=(4, 4), dtype="F32"),)
    big = (TensorEntry(name="w", shape=(10_000,), dtype="U8"),)
    assert encoded_mismatches(big, logical, "fp16+zstd") == ["packed tensor 'w': U8 [10000], expected U8 [1..1056]"]


def test_wrong_sizes_and_names_are_refused() -> None:
    packed, logical = encode_arrays({"w": TENSORS["w"]}, "int8")
    _refused({"w": packed["w"][:10]}, logical, "int8", r"packed tensor 'w': I8 \[10, 48\], expected I8 \[64, 48\]")
    _refused({"w": packed["w"]}, logical, "int8", "missing packed tensor 'w@scale'")
    _refused({**packed, "x": packed["w"]}, logical, "int8", "unexpected packed tensor 'x'")
    _refused({"w": packed["w"].astype(np.int16), "w@scale": packed["w@scale"]}, logical, "int8", "expected I8")
    _refused(packed, logical, "int4", "unknown encoding 'int4'")


def test_bad_int8_scales_are_refused() -> None:
    packed, logical = encode_arrays({"w": TENSORS["w"]}, "int8")
    for bad in (np.nan, np.inf, -1.0):
        scales = packed["w@scale"].copy()
        scales[3] = bad
        _refused({**packed, "w@scale": scales}, logical, "int8", "scales must be finite and non-negative")
    q = packed["w"].copy()
    q[0, 0] = -128
    _refused({**packed, "w": q}, logical, "int8", "-128")


def test_values_that_cannot_be_packed_are_refused_when_encoding() -> None:
    with pytest.raises(ProtocolError, match="float16's range"):
        encode_arrays({"w": np.full((2, 2), 1e6, np.float32)}, "fp16")
    with pytest.raises(ProtocolError, match="non-finite"):
        encode_arrays({"w": np.full((2, 2), np.nan, np.float32)}, "int8")
    with pytest.raises(ConfigError, match="unknown encoding"):
        encode_arrays({"w": TENSORS["w"]}, "bf16")


def test_unknown_update_encoding_is_a_config_error(tmp_path: object) -> None:
    table = Table("run.toml", "federation", {"update_encoding": "int4"}, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[federation\] update_encoding: must be one of"):
        read_federation(table)
    ok = read_federation(Table("run.toml", "federation", {"update_encoding": "fp16"}, tmp_path))  # type: ignore[arg-type]
    assert ok.update_encoding == "fp16"


# ------------------------------------------------------------------------------ negotiation


SPEC = {"layers": [{"heads": [0, 1], "intermediate": 512}]}
TRAIN = TrainSettings(local_steps=2, lr=1e-4, batch_size=8, seq_len=64)
SENT = {"encoder.w": RNG.normal(0, 0.05, size=(16, 8)).astype(np.float32)}


def _pump(src: CoordinatorConnection | DeviceConnection, dst: CoordinatorConnection | DeviceConnection) -> list[Event]:
    return [event for frame in src.data_to_send() for event in dst.receive(frame)]


def _working(capabilities: tuple[str, ...], grant: str | None) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0", profile={}, capabilities=capabilities)
    assert isinstance(_pump(dev, coord)[0], HelloReceived)
    coord.send_welcome(run_id="run", round=0, server_time=0.0, update_encoding=grant)
    assert isinstance(_pump(coord, dev)[0], WelcomeReceived)
    coord.send_train_task(task_id="t", round=1, spec=SPEC, model_config={}, settings=TRAIN, tensors=SENT)
    assert isinstance(_pump(coord, dev)[0], TaskReceived)
    return coord, dev


def _send(dev: DeviceConnection, tensors: dict[str, np.ndarray], encoding: str = "delta") -> None:
    dev.send_update(
        task_id="t",
        tensors=tensors,
        num_samples=1,
        metrics={},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=1.0,
        encoding=encoding,  # type: ignore[arg-type]
    )


def test_a_granted_encoding_packs_the_delta_and_the_coordinator_gets_it_back() -> None:
    coord, dev = _working(("train", CAPABILITY_ENCODINGS), "int8+zstd")
    assert coord.update_encoding == dev.update_encoding == "int8+zstd"
    delta = {"encoder.w": RNG.normal(0, 1e-3, size=(16, 8)).astype(np.float32)}
    _send(dev, delta)
    (event,) = _pump(dev, coord)
    assert isinstance(event, UpdateReceived) and event.update.encoding == "delta"
    assert event.update.weights.encoding == "int8+zstd"
    got = event.tensors["encoder.w"]
    assert got.dtype == np.float32 and got.shape == (16, 8)
    assert np.abs(got - delta["encoder.w"]).max() <= np.abs(delta["encoder.w"]).max() / 254 * 1.0001


def test_no_encoding_without_the_capability_or_the_grant() -> None:
    for capabilities, grant in ((("train",), "int8"), (("train", CAPABILITY_ENCODINGS), None)):
        coord, dev = _working(capabilities, grant)
        assert coord.update_encoding is None and dev.update_encoding is None
        _send(dev, SENT)
        (event,) = _pump(dev, coord)
        assert isinstance(event, UpdateReceived) and not event.update.weights.encoding


def test_an_ungranted_encoding_is_a_violation() -> None:
    coord, dev = _working(("train", CAPABILITY_ENCODINGS), "fp16")
    packed, logical = encode_arrays(SENT, "int8")
    manifest, _ = encode_tensors(packed)
    manifest = dataclasses.replace(manifest, encoding="int8", logical=logical)
    coord_events = _lie(coord, dev, manifest)
    assert isinstance(coord_events[0], ProtocolViolation) and "granted 'fp16'" in coord_events[0].reason


def test_a_malformed_encoded_update_costs_the_device_its_task_not_the_connection() -> None:
    coord, dev = _working(("train", CAPABILITY_ENCODINGS), "int8")
    packed, logical = encode_arrays(SENT, "int8")
    packed["encoder.w@scale"] = np.full_like(packed["encoder.w@scale"], np.nan)
    manifest, frames = encode_tensors(packed)
    manifest = dataclasses.replace(manifest, encoding="int8", logical=logical)
    events = _lie(coord, dev, manifest, frames)
    assert [type(e) for e in events] == [UpdateRejected] and "scales must be finite" in events[0].reason
    assert coord.state.name == "READY"  # the connection lives on; the next task can go


def _lie(
    coord: CoordinatorConnection, dev: DeviceConnection, manifest: object, frames: list[bytes] | None = None
) -> list[Event]:
    """Send an Update with ``manifest`` (and its ``frames``) as a device that does not follow the rules."""
    from edge_sdk.protocol import Update, encode_message

    update = Update(
        task_id="t",
        num_samples=1,
        metrics={},
        peak_rss_bytes=1,
        step_time_s=0.1,
        train_time_s=1.0,
        weights=manifest,  # type: ignore[arg-type]
        encoding="delta",
    )
    events = coord.receive(encode_message(update))
    for frame in frames or []:
        events += coord.receive(frame)
    return events


# ------------------------------------------------------------------------------ trained updates


@pytest.mark.parametrize(
    "levers", [Levers(), Levers(embeddings="rows"), Levers(lora_rank=2)], ids=lambda lv: lv.describe()
)
def test_a_trained_delta_packed_as_int8_zstd_rebuilds_the_trained_weights(levers: Levers) -> None:
    """A device's real update (tiny BERT, each lever), as deltas through int8+zstd: the coordinator's
    reconstruction passes the aggregation checks and is within half an int8 step of what was trained."""
    import json

    import torch

    from coordinator.federation._updates import ClientUpdate, check_update, weights_from_delta
    from edge_sdk._spec import SubnetSpec
    from edge_sdk.protocol import numpy_to_torch, torch_to_numpy
    from edge_sdk.scaling._extract import extract
    from edge_sdk.training._runner import TaskRunner

    from .models import tiny_parent
    from .test_levers_roundtrip import Tokens

    parent = tiny_parent("bert")
    spec = SubnetSpec.full(parent.dims)
    sent = torch_to_numpy(extract(parent, spec))
    manifest, _ = encode_tensors(sent)
    settings = TrainSettings(local_steps=2, lr=1e-2, batch_size=4, seq_len=8, levers=levers)
    config = json.loads(json.dumps(parent.config))
    task = TrainTask(
        task_id="t", round=1, spec=spec.to_dict(), model_config=config, settings=settings, weights=manifest
    )
    output = TaskRunner(Tokens(), threads=1).train(task, sent, keep_received=True)
    assert output.received is not None
    received = numpy_to_torch(output.received)
    delta = delta_from_weights(output.tensors, output.received)
    packed, logical = encode_arrays(delta, "int8+zstd")
    rebuilt = weights_from_delta(received, numpy_to_torch(decode_arrays(packed, logical, "int8+zstd")))
    check_update(parent, ClientUpdate(spec, rebuilt, 4, levers))
    for name, trained in output.tensors.items():
        if trained.dtype.kind != "f":
            assert torch.equal(rebuilt[name], torch.from_numpy(trained))
            continue
        d = delta[name]
        step = np.abs(d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(1, -1)).max(axis=1) / 127
        err = (rebuilt[name].numpy() - trained).reshape(step.shape[0], -1)
        assert (np.abs(err) <= step[:, None] / 2 + 1e-6).all(), name
