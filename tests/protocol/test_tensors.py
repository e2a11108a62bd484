"""Tensor transfers: safetensors chunking, the assembler's checks, value checks, torch helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_sdk import ConfigError, ProtocolError
from edge_sdk.protocol import (
    CHUNK_HEADER_BYTES,
    TensorAssembler,
    TensorEntry,
    TensorManifest,
    check_tensor_values,
    chunk_blob,
    decode_chunk,
    decode_tensors,
    describe_tensors,
    encode_chunk,
    encode_tensors,
    entry_mismatches,
    read_safetensors_header,
)

TID = "00112233445566778899aabbccddeeff"


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float16),
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "mask": np.array([True, False, True]),
        "scale": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        assert got[name].dtype == array.dtype.newbyteorder("<"), name
        np.testing.assert_array_equal(got[name], array)


def _raises(fn: Any, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_keeps_names_shapes_dtypes_and_values() -> None:
    tensors = _sample()
    manifest, frames = encode_tensors(tensors, chunk_bytes=100, transfer_id=TID)
    assert manifest.transfer_id == TID
    assert manifest.num_chunks == len(frames) == math.ceil(manifest.total_bytes / 100)
    assert {(e.name, e.shape, e.dtype) for e in manifest.entries} == {
        ("w", (16, 8), "F32"),
        ("b", (8,), "F16"),
        ("ids", (3, 4), "I64"),
        ("mask", (3,), "BOOL"),
        ("scale", (), "F64"),
        ("empty", (0, 5), "F32"),
    }
    payloads = b"".join(bytes(decode_chunk(frame)[2]) for frame in frames)
    assert len(payloads) == manifest.total_bytes
    assert hashlib.sha256(payloads).hexdigest() == manifest.sha256
    decoded = decode_tensors(manifest, frames)
    _assert_same(decoded, tensors)
    assert all(array.flags.writeable for array in decoded.values())


def test_each_frame_carries_magic_transfer_id_and_index() -> None:
    manifest, frames = encode_tensors(_sample(), chunk_bytes=64, transfer_id=TID)
    for index, frame in enumerate(frames):
        assert frame[:4] == b"EFC1"
        assert frame[4:20] == bytes.fromhex(TID)
        assert struct.unpack(">I", frame[20:24])[0] == index
        assert len(frame) - CHUNK_HEADER_BYTES == manifest.chunk_length(index)
    assert len(frames[-1]) - CHUNK_HEADER_BYTES == manifest.total_bytes - 64 * (manifest.num_chunks - 1)


def test_non_contiguous_and_big_endian_arrays_are_encoded_by_value() -> None:
    # safetensors 0.8 numpy.save writes a transposed view's memory in storage order: guard against it.
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": base.T, "strided": base[:, ::2], "be": np.arange(5, dtype=">i4")}
    manifest, frames = encode_tensors(tensors)
    decoded = decode_tensors(manifest, frames)
    np.testing.assert_array_equal(decoded["t"], base.T)
    np.testing.assert_array_equal(decoded["strided"], base[:, ::2])
    np.testing.assert_array_equal(decoded["be"], np.arange(5))
    assert decoded["be"].dtype == np.dtype("<i4")


def test_empty_dict_round_trips() -> None:
    manifest, frames = encode_tensors({})
    assert manifest.entries == () and len(frames) == 1
    assert decode_tensors(manifest, frames) == {}


_DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@st.composite
def _tensor_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(st.text(min_size=1, max_size=10).filter(lambda s: s != "__metadata__"), max_size=5, unique=True)
    )
    out: dict[str, np.ndarray] = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
        elements = st.floats(-1e3, 1e3, width=16) if dtype.kind == "f" else None
        out[name] = draw(hnp.arrays(dtype, shape, elements=elements))
    return out


@settings(max_examples=40, deadline=None)
@given(tensors=_tensor_dicts(), chunk_bytes=st.integers(1, 300))
def test_random_tensor_dicts_round_trip_at_random_chunk_sizes(tensors: dict[str, np.ndarray], chunk_bytes: int) -> None:
    manifest, frames = encode_tensors(tensors, chunk_bytes=chunk_bytes)
    assert len(frames) == manifest.num_chunks == math.ceil(manifest.total_bytes / chunk_bytes)
    assert all(len(frame) <= chunk_bytes + CHUNK_HEADER_BYTES for frame in frames)
    assert entry_mismatches(manifest.entries, describe_tensors(tensors)) == []
    _assert_same(decode_tensors(manifest, frames), tensors)


def test_chunk_size_must_be_1_byte_to_4_mib() -> None:
    with pytest.raises(ConfigError):
        encode_tensors(_sample(), chunk_bytes=0)
    with pytest.raises(ConfigError):
        encode_tensors(_sample(), chunk_bytes=(4 << 20) + 1)
    manifest, _ = encode_tensors(_sample(), chunk_bytes=4 << 20)
    assert manifest.num_chunks == 1


def test_arrays_numpy_cannot_put_on_the_wire_are_refused() -> None:
    err = _raises(encode_tensors, {"c": np.zeros(2, dtype=np.complex64)})
    assert err.close_code == 1003 and "complex64" in str(err)
    assert "invalid tensor name" in str(_raises(encode_tensors, {"__metadata__": np.zeros(1)}))
    with pytest.raises(TypeError, match="expected a numpy array"):
        encode_tensors({"x": [1.0, 2.0]})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------- chunks


def _transfer(chunk_bytes: int = 128) -> tuple[TensorManifest, list[bytes]]:
    return encode_tensors(_sample(), chunk_bytes=chunk_bytes, transfer_id=TID)


def test_truncated_chunk_frame() -> None:
    manifest, frames = _transfer()
    err = _raises(TensorAssembler(manifest).add_chunk, frames[0][:10])
    assert err.close_code == 1002
    assert "truncated chunk frame: 10 bytes, shorter than the 24-byte chunk header" in str(err)


def test_bad_magic() -> None:
    manifest, frames = _transfer()
    err = _raises(TensorAssembler(manifest).add_chunk, b"PK\x03\x04" + frames[0][4:])
    assert err.close_code == 1002 and "not a chunk frame" in str(err)


def test_chunk_out_of_order() -> None:
    manifest, frames = _transfer()
    err = _raises(TensorAssembler(manifest).add_chunk, frames[1])
    assert err.close_code == 1002
    assert f"chunk 1 of transfer {TID} arrived out of order, expected chunk 0" in str(err)


def test_duplicate_chunk() -> None:
    manifest, frames = _transfer()
    assembler = TensorAssembler(manifest)
    assert assembler.add_chunk(frames[0]) is False
    err = _raises(assembler.add_chunk, frames[0])
    assert err.close_code == 1002 and f"duplicate chunk 0 of transfer {TID}" in str(err)


def test_chunk_of_a_foreign_transfer() -> None:
    manifest, _ = _transfer()
    _, other = encode_tensors(_sample(), chunk_bytes=128, transfer_id="f" * 32)
    err = _raises(TensorAssembler(manifest).add_chunk, other[0])
    assert err.close_code == 1002
    assert f"chunk 0 belongs to foreign transfer {'f' * 32}, open transfer is {TID}" in str(err)


def test_chunk_index_out_of_range() -> None:
    manifest, frames = _transfer()
    frame = encode_chunk(TID, manifest.num_chunks + 5, decode_chunk(frames[0])[2])
    err = _raises(TensorAssembler(manifest).add_chunk, frame)
    assert f"chunk index {manifest.num_chunks + 5} out of range" in str(err)


def test_short_chunk_payload() -> None:
    manifest, frames = _transfer()
    err = _raises(TensorAssembler(manifest).add_chunk, frames[0][:-7])
    assert err.close_code == 1002
    assert "chunk 0 of transfer" in str(err) and "carries 121 bytes, expected 128 (truncated)" in str(err)


def test_long_chunk_payload() -> None:
    manifest, frames = _transfer()
    err = _raises(TensorAssembler(manifest).add_chunk, frames[0] + b"xx")
    assert "carries 130 bytes, expected 128" in str(err)


def test_chunk_after_the_transfer_is_complete() -> None:
    manifest, frames = _transfer()
    assembler = TensorAssembler(manifest)
    results = [assembler.add_chunk(frame) for frame in frames]
    assert results == [False] * (len(frames) - 1) + [True]
    err = _raises(assembler.add_chunk, frames[-1])
    assert "after transfer" in str(err) and "was complete" in str(err)


def test_truncated_transfer() -> None:
    manifest, frames = _transfer()
    assembler = TensorAssembler(manifest)
    for frame in frames[:2]:
        assembler.add_chunk(frame)
    err = _raises(assembler.finish)
    assert err.close_code == 1002
    assert f"transfer {TID} truncated: 2 of {manifest.num_chunks} chunks (256 of {manifest.total_bytes} bytes)" in str(
        err
    )


def test_sha256_mismatch() -> None:
    manifest, frames = _transfer()
    _, index, payload = decode_chunk(frames[-1])
    corrupted = bytearray(payload)
    corrupted[-1] ^= 0xFF
    frames[-1] = encode_chunk(TID, index, bytes(corrupted))
    assembler = TensorAssembler(manifest)
    for frame in frames:
        assembler.add_chunk(frame)
    err = _raises(assembler.finish)
    assert err.close_code == 1002 and f"sha256 mismatch for transfer {TID}" in str(err)


# --------------------------------------------------------------------------- expected manifest


def test_announced_manifest_must_match_the_expected_tensors_before_any_chunk() -> None:
    manifest, _ = _transfer()
    expected = [
        TensorEntry(name="w", shape=(16, 4), dtype="F32"),  # shape differs
        TensorEntry(name="b", shape=(8,), dtype="F32"),  # dtype differs
        TensorEntry(name="ids", shape=(3, 4), dtype="I64"),
        TensorEntry(name="mask", shape=(3,), dtype="BOOL"),
        TensorEntry(name="scale", shape=(), dtype="F64"),
        TensorEntry(name="bias", shape=(4,), dtype="F32"),  # missing from the transfer; "empty" is extra
    ]
    err = _raises(TensorAssembler, manifest, expected=expected)
    assert err.close_code == 1008
    text = str(err)
    for fragment in (
        "missing tensor 'bias'",
        "unexpected tensor 'empty'",
        "tensor 'w': shape [16, 8], expected [16, 4]",
        "tensor 'b': dtype F16, expected F32",
    ):
        assert fragment in text
    assert TensorAssembler(manifest, expected=manifest.entries).manifest is manifest


def test_header_that_disagrees_with_its_manifest_is_caught_before_allocating() -> None:
    manifest, frames = _transfer()
    lying = dataclasses.replace(
        manifest,
        entries=tuple(
            dataclasses.replace(e, shape=(8, 16), offset=None, length=None) if e.name == "w" else e
            for e in manifest.entries
        ),
    )
    # The receiver expects what the lying manifest announces, so only the header can expose it.
    err = _raises(decode_tensors, lying, frames, expected=lying.entries)
    assert err.close_code == 1002
    assert "safetensors header of transfer" in str(err) and "tensor 'w': shape [16, 8], expected [8, 16]" in str(err)


def test_transfer_and_chunk_limits_are_checked_at_announcement() -> None:
    manifest, _ = _transfer()
    err = _raises(TensorAssembler, manifest, max_total_bytes=manifest.total_bytes - 1)
    assert err.close_code == 1009 and "exceeds the limit" in str(err)
    err = _raises(TensorAssembler, manifest, max_chunk_bytes=64)
    assert err.close_code == 1009 and "chunks of 128 bytes exceed the limit of 64" in str(err)


# --------------------------------------------------------------------------------------- values


def test_nan_and_inf_are_refused_naming_every_tensor() -> None:
    tensors = _sample()
    tensors["w"][0, :3] = np.nan
    tensors["b"][1] = np.inf
    manifest, frames = encode_tensors(tensors)
    err = _raises(decode_tensors, manifest, frames)
    assert err.close_code == 1008
    assert "non-finite values in 2 tensor(s)" in str(err)
    assert "'w' (3 NaN/Inf)" in str(err) and "'b' (1 NaN/Inf)" in str(err)
    decoded = decode_tensors(manifest, frames, check_values=False)
    assert np.isnan(decoded["w"][0, 0])


def test_norm_bound() -> None:
    tensors: dict[str, np.ndarray] = {
        "a": np.full(4, 3.0, dtype=np.float32),
        "b": np.full(9, 4.0 / 3.0, dtype=np.float64),
        "i": np.full(3, 99),
    }
    expected_norm = math.sqrt(4 * 9 + 9 * 16 / 9)  # integers are not counted
    assert check_tensor_values(tensors) == pytest.approx(expected_norm)
    assert check_tensor_values(tensors, max_norm=expected_norm + 1e-9) == pytest.approx(expected_norm)
    err = _raises(check_tensor_values, tensors, max_norm=7.0, what="update for task 't'")
    assert err.close_code == 1008
    assert f"update for task 't': global L2 norm {expected_norm:.6g} exceeds the bound 7" in str(err)
    manifest, frames = encode_tensors(tensors)
    assert "exceeds the bound" in str(_raises(decode_tensors, manifest, frames, max_norm=1.0))


def test_norm_of_float16_does_not_overflow() -> None:
    big = {"h": np.full(1000, 60000.0, dtype=np.float16)}
    assert check_tensor_values(big) == pytest.approx(60000.0 * math.sqrt(1000), rel=1e-3)


# ---------------------------------------------------------------------------- safetensors header


def _blob(header: dict[str, Any], data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (b"\x01\x02", "has no header"),
        (_blob({}, header_len=10_000), "header length 10000 exceeds"),
        (struct.pack("<Q", 3) + b"{]}", "malformed JSON"),
        (_blob({"w": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8), "expected dtype, shape and data_offsets"),
        (
            _blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\x00" * 8),
            "bad data_offsets",
        ),
        (_blob({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8), "needs 12"),
        (
            _blob({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8),
            "unsupported dtype 'C64'",
        ),
        (
            _blob(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\x00" * 12,
            ),
            "tensor 'b' starts at 4, expected 8",
        ),
        (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 8), "cover 4 of 8"),
        (_blob({"__metadata__": {"k": 1}}), "__metadata__ must map str to str"),
    ],
)
def test_malicious_safetensors_headers_are_refused(blob: bytes, fragment: str) -> None:
    err = _raises(read_safetensors_header, blob)
    assert fragment in str(err)
    assert err.close_code in (1002, 1003)


def test_header_entries_carry_absolute_offsets() -> None:
    blob = _blob({"__metadata__": {"k": "v"}, "w": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, b"\x01" * 8)
    (entry,) = read_safetensors_header(blob)
    assert entry.offset == len(blob) - 8 and entry.length == 8
    manifest, frames = chunk_blob(blob, chunk_bytes=7)
    assert decode_tensors(manifest, frames)["w"].tolist() == [0x01010101, 0x01010101]


# ------------------------------------------------------------------------------------------ torch


def test_importing_the_protocol_does_not_import_torch() -> None:
    code = "import sys, edge_sdk.protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_helpers_round_trip() -> None:
    torch = pytest.importorskip("torch")
    from edge_sdk.protocol import numpy_to_torch, torch_to_numpy

    state = {"w": torch.randn(4, 3).t(), "n": torch.arange(5)}
    manifest, frames = encode_tensors(torch_to_numpy(state))
    back = numpy_to_torch(decode_tensors(manifest, frames))
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["n"], state["n"])
    err = _raises(torch_to_numpy, {"x": torch.zeros(2, dtype=torch.bfloat16)})
    assert err.close_code == 1003 and "bfloat16" in str(err)


def test_a_signalling_nan_from_a_peer_is_counted_without_a_warning() -> None:
    """Arbitrary bytes may hold a signalling NaN: widening it to float64 raised numpy's RuntimeWarning
    (seen in the fuzz test); it is refused as non-finite, silently."""
    import warnings

    bits = np.array([0x7F800001, 0x3F800000], dtype=np.uint32)  # a signalling NaN, then 1.0
    values = np.frombuffer(bits.tobytes(), dtype=np.float32).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ProtocolError, match="non-finite values"):
            check_tensor_values({"w": values})
