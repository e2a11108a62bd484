"""The transfer path: tensors sent as views of their own memory, received chunks checked as they arrive."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import safetensors.numpy

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    CoordinatorConnection,
    DeviceConnection,
    EncodedTensors,
    TaskReceived,
    TensorAssembler,
    TrainSettings,
    WireLimits,
    check_tensor_values,
    prepare_tensors,
)
from edge_sdk.protocol._tensors import chunk_xxh3

MiB = 1 << 20


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "big": rng.standard_normal((700, 1024)).astype(np.float32),  # spans chunks
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "ids": np.arange(7, dtype=np.int64),
        "scalar": np.asarray(2.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "tail": rng.standard_normal(300_001).astype(np.float32),  # odd size: chunks end mid-tensor
    }


def blob_of(encoded: EncodedTensors, chunk_bytes: int = MiB) -> bytes:
    manifest = encoded.manifest(chunk_bytes=chunk_bytes)
    return b"".join(bytes(frame[24:]) for frame in encoded.frames(manifest))


def test_prepared_tensors_are_a_valid_safetensors_blob_with_the_announced_digest() -> None:
    tensors = arrays()
    encoded = prepare_tensors(tensors)
    blob = blob_of(encoded)
    assert len(blob) == encoded.total_bytes and hashlib.sha256(blob).hexdigest() == encoded.sha256
    loaded = safetensors.numpy.load(blob)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
    offsets = {entry.name: entry.offset for entry in encoded.entries}
    assert all(offset is not None and offset % 8 == 0 for name, offset in offsets.items() if name != "half")


def test_chunk_pieces_are_views_of_the_arrays_not_copies() -> None:
    tensors = {"big": arrays()["big"]}
    encoded = prepare_tensors(tensors)
    manifest = encoded.manifest(chunk_bytes=MiB)
    first = next(encoded.chunk_pieces(manifest))
    assert len(first[0]) == 24  # the chunk header, then the safetensors header and the first tensor's bytes
    view = first[2]
    assert isinstance(view, memoryview)
    tensors["big"][0, 0] = 123.0  # the view sees a change made after prepare: it is the array's memory
    assert np.frombuffer(view, dtype=np.float32, count=1)[0] == np.float32(123.0)
    assert sum(len(piece) for piece in first) == 24 + MiB


def test_one_encoding_goes_to_several_peers_with_its_own_transfer_id_each() -> None:
    encoded = prepare_tensors(arrays())
    received = []
    for _ in range(2):
        coord, dev = CoordinatorConnection(), DeviceConnection()
        dev.send_hello(device_id="d", sdk_version="0", profile={})
        coord.receive(dev.data_to_send()[0])
        coord.send_welcome(run_id="r", round=0, server_time=0.0)
        dev.receive(coord.data_to_send()[0])
        task = coord.send_train_task(
            task_id="t",
            round=0,
            spec={},
            model_config={},
            settings=TrainSettings(local_steps=1, lr=0.1, batch_size=1, seq_len=8),
            tensors=encoded,
        )
        events = [e for frame in coord.frames_to_send(fragments=True) for e in dev.receive(join(frame))]
        (event,) = events
        assert isinstance(event, TaskReceived)
        received.append((task.weights.transfer_id, event.tensors))
    assert received[0][0] != received[1][0]
    for name, array in arrays().items():
        np.testing.assert_array_equal(received[1][1][name], array)


def join(frame: str | bytes | tuple[bytes | memoryview, ...]) -> str | bytes:
    """What a websocket peer receives for a (possibly fragmented) message."""
    return frame if isinstance(frame, (str, bytes)) else b"".join(frame)


def assembler_for(
    encoded: EncodedTensors, *, deferred: bool, digest: str = "xxh3_128"
) -> tuple[TensorAssembler, list[bytes]]:
    manifest = encoded.manifest(chunk_bytes=MiB, digest=digest)
    assembler = TensorAssembler(manifest, expected=manifest.entries, max_norm=1e9)
    assembler.deferred = deferred
    return assembler, list(encoded.frames(manifest))


def test_deferred_checks_wait_for_the_transport_and_a_corrupted_chunk_is_still_caught() -> None:
    tensors = arrays()
    assembler, frames = assembler_for(prepare_tensors(tensors), deferred=True)
    assert len(frames) >= 4
    assembler.add_chunk(frames[0])
    assert assembler.backlog == 1  # not hashed yet: the transport runs verify (in a worker thread)
    assembler.verify()
    assert assembler.backlog == 0
    for frame in frames[1:]:
        assembler.add_chunk(frame)
        assert assembler.backlog <= 2  # never more than two chunks wait
    decoded = assembler.finish()
    assert assembler.values.norm == pytest.approx(check_tensor_values(tensors), rel=1e-5)
    np.testing.assert_array_equal(decoded["tail"], tensors["tail"])

    # Per-chunk digests: chunk 2 is refused by its index when the transport next feeds a frame.
    corrupt, frames = assembler_for(prepare_tensors(tensors), deferred=True)
    bad = bytearray(frames[2])
    bad[100] ^= 1
    frames[2] = bytes(bad)
    for frame in frames[:3]:
        corrupt.add_chunk(frame)
        corrupt.verify()  # as the transport does, in a worker thread: never raises, keeps the fault
    assert corrupt.fault is not None and "chunk 2 of transfer" in corrupt.fault
    with pytest.raises(ProtocolError, match=r"chunk 2 of transfer \w+ is corrupt: xxh3_128"):
        corrupt.add_chunk(frames[3])

    # A whole-blob sha256 (a peer without per-chunk digests): caught once the transfer is complete.
    corrupt, frames = assembler_for(prepare_tensors(tensors), deferred=True, digest="sha256")
    bad = bytearray(frames[2])
    bad[100] ^= 1
    frames[2] = bytes(bad)
    for frame in frames:
        corrupt.add_chunk(frame)
    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        corrupt.finish()


def test_values_are_scanned_as_chunks_arrive_naming_the_tensor_with_nan() -> None:
    tensors = arrays()
    tensors["tail"][-1] = np.nan
    tensors["half"][0, 0] = np.inf
    assembler, frames = assembler_for(prepare_tensors(tensors), deferred=False)
    for frame in frames:
        assembler.add_chunk(frame)
    with pytest.raises(ProtocolError, match="non-finite values in 2 tensor") as err:
        assembler.finish()
    assert "'tail' (1 NaN/Inf)" in str(err.value) and "'half' (1 NaN/Inf)" in str(err.value)


def test_a_manifest_placing_a_tensor_elsewhere_than_its_header_is_refused() -> None:
    encoded = prepare_tensors({"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)})
    manifest = encoded.manifest()
    entries = tuple(
        e.__class__(name=e.name, shape=e.shape, dtype=e.dtype, offset=other.offset, length=e.length)
        for e, other in zip(manifest.entries, reversed(manifest.entries), strict=True)
    )
    lying = manifest.__class__(**{**manifest.to_json(), "entries": [e.to_json() for e in entries]})
    assembler = TensorAssembler(lying)
    for frame in encoded.frames(manifest):
        assembler.add_chunk(frame.replace(bytes.fromhex(manifest.transfer_id), bytes.fromhex(lying.transfer_id)))
    with pytest.raises(ProtocolError, match="manifest says"):
        assembler.finish()


def test_float32_sums_that_overflow_are_redone_exactly() -> None:
    huge = np.full(10, 1e30, dtype=np.float32)  # finite, but its squares overflow float32
    assert check_tensor_values({"h": huge}) == pytest.approx(1e30 * np.sqrt(10), rel=1e-6)
    assert WireLimits().max_chunk_bytes >= MiB


@pytest.mark.parametrize("chunk_bytes", [MiB, 3 * MiB + 7])
def test_chunk_digests_are_each_chunks_xxh3_across_tensor_boundaries(chunk_bytes: int) -> None:
    encoded = prepare_tensors(arrays())
    blob = blob_of(encoded)
    expected = tuple(chunk_xxh3(blob[at : at + chunk_bytes]) for at in range(0, len(blob), chunk_bytes))
    assert encoded.chunk_xxh3(chunk_bytes) == expected
    manifest = encoded.manifest(chunk_bytes=chunk_bytes)
    assert manifest.chunk_xxh3 == expected and manifest.sha256 == ""
    assert encoded.manifest(chunk_bytes=chunk_bytes, digest="sha256").sha256 == hashlib.sha256(blob).hexdigest()
