"""Control messages: round trips, strict decoding, close codes, immutability."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk import ProtocolError
from edge_sdk.protocol import (
    MAX_JSON_INT,
    MAX_TEXT_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Bye,
    Deploy,
    DeployResult,
    Error,
    EvalResult,
    EvalSettings,
    EvaluateTask,
    Hello,
    InferenceSettings,
    Message,
    Progress,
    TensorEntry,
    TensorManifest,
    TrainSettings,
    TrainTask,
    Update,
    Welcome,
    WireLimits,
    decode_message,
    encode_message,
    thaw_json,
)

MANIFEST = TensorManifest(
    transfer_id="0123456789abcdef0123456789abcdef",
    entries=(
        TensorEntry(name="encoder.layer.0.attention.self.query.weight", shape=(384, 384), dtype="F32"),
        TensorEntry(name="embeddings.position_ids", shape=(1, 512), dtype="I64", offset=600, length=4096),
    ),
    total_bytes=600_000,
    chunk_bytes=1 << 20,
    num_chunks=1,
    sha256="ab" * 32,
)
SPEC = {"layers": [{"heads": [0, 2, 5], "intermediate": 768}], "hidden": 384}
CONFIG = {"model_type": "bert", "hidden_size": 384, "architectures": ["BertModel"], "layer_norm_eps": 1e-12}
TRAIN = TrainSettings(local_steps=5, lr=5e-5, batch_size=16, seq_len=128, optimizer="adamw", prox_mu=0.01, seed=7)

SAMPLES: list[Message] = [
    Hello(
        device_id="pi-4-kitchen",
        sdk_version="0.1.0",
        profile={
            "ram_bytes": 4 << 30,
            "cpu": {"cores": 4, "arch": "aarch64"},
            "gpu": None,
            "flags": [1, 2.5],
        },
        capabilities=("train", "onnx"),
        limits=WireLimits(max_chunk_bytes=2 << 20, max_text_bytes=256 << 10, max_transfer_bytes=200 << 20),
    ),
    Welcome(run_id="run-1", device_id="pi-4-kitchen", round=3, server_time=1_700_000_000.25),
    TrainTask(task_id="t-1", round=3, spec=SPEC, model_config=CONFIG, settings=TRAIN, weights=MANIFEST),
    EvaluateTask(
        task_id="e-1",
        round=3,
        spec=SPEC,
        model_config=CONFIG,
        settings=EvalSettings(batch_size=32, seq_len=128),
        weights=MANIFEST,
    ),
    Deploy(
        task_id="d-1",
        round=9,
        spec=SPEC,
        model_config=CONFIG,
        settings=InferenceSettings(batch_size=1, seq_len=128, quantize=True),
        weights=MANIFEST,
    ),
    Update(
        task_id="t-1",
        num_samples=640,
        metrics={"loss": 0.42, "accuracy": 0.9},
        peak_rss_bytes=700 << 20,
        step_time_s=0.8,
        train_time_s=4.1,
        weights=MANIFEST,
        encoding="delta",
    ),
    EvalResult(task_id="e-1", num_samples=872, metrics={"accuracy": 0.91}),
    DeployResult(task_id="d-1", ok=True, metrics={"cosine_min": 0.989, "latency_ms": 8.0}, message="int8"),
    Error(task_id="t-1", code="task_failed", message="out of memory at step 3"),
    Error(code="rejected", message="device too small"),
    Bye(reason="run finished", code=1000),
    Progress(task_id="t-1", steps_done=3, steps_total=20),
]


def _obj(message: Message) -> dict[str, Any]:
    return dict(json.loads(encode_message(message)))


def _decode_error(obj: object, **kwargs: Any) -> ProtocolError:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    with pytest.raises(ProtocolError) as info:
        decode_message(text, **kwargs)
    return info.value


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert len(MESSAGE_TYPES) == 11


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    text = encode_message(message)
    obj = json.loads(text)
    assert obj["type"] == message.TYPE
    assert obj["v"] == PROTOCOL_VERSION == message.v
    decoded = decode_message(text)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode_message(decoded) == text


def test_json_payloads_are_deep_frozen_and_thaw_back() -> None:
    hello = SAMPLES[0]
    assert isinstance(hello, Hello)
    with pytest.raises(TypeError):
        hello.profile["ram_bytes"] = 1  # type: ignore[index]
    assert hello.profile["flags"] == (1, 2.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hello.device_id = "other"  # type: ignore[misc]
    plain = thaw_json(hello.profile)
    assert plain == {
        "ram_bytes": 4 << 30,
        "cpu": {"cores": 4, "arch": "aarch64"},
        "gpu": None,
        "flags": [1, 2.5],
    }
    assert type(plain["cpu"]) is dict and type(plain["flags"]) is list


def test_integers_are_accepted_for_float_fields_but_booleans_are_not() -> None:
    assert TrainSettings(local_epochs=1, lr=1, batch_size=1, seq_len=8).lr == 1.0
    with pytest.raises(ProtocolError, match=r"TrainSettings\.lr: expected a number, got boolean"):
        TrainSettings(local_epochs=1, lr=True, batch_size=1, seq_len=8)


def test_non_ascii_text_is_escaped_and_survives() -> None:
    error = Error(task_id="tâche-🚀", code="task_failed", message="mémoire épuisée")
    text = encode_message(error)
    assert text.isascii()
    assert decode_message(text) == error


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"type": "bye", "v": 1, "reason": "x", "code": 1000', "malformed JSON"),
        ("", "malformed JSON"),
        ('{"type": "bye"} trailing', "malformed JSON"),
        ("[1, 2]", "expected a JSON object, got array"),
        ('"bye"', "expected a JSON object, got string"),
        ('{"type": "bye", "type": "bye", "v": 1, "reason": "", "code": 1000}', "duplicate JSON key 'type'"),
        ('{"type": "eval_result", "v": 1, "task_id": "e", "num_samples": 1, "metrics": {"l": NaN}}', "NaN"),
        ("[" * 5000 + "]" * 5000, "malformed JSON"),
    ],
)
def test_malformed_json_is_a_protocol_error(text: str, fragment: str) -> None:
    err = _decode_error(text)
    assert err.close_code == 1002
    assert fragment in str(err)


def test_unknown_type_is_unsupported_data() -> None:
    err = _decode_error({"type": "gossip", "v": 1})
    assert err.close_code == 1003
    assert "unknown message type 'gossip'" in str(err)


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (2, "unsupported protocol version 2 (this side speaks 1)"),
        (0, "unsupported protocol version 0"),
        ("1", "must be an integer, got string"),
        (True, "must be an integer, got boolean"),
    ],
)
def test_wrong_protocol_version_closes_with_1002(version: object, fragment: str) -> None:
    obj = _obj(SAMPLES[10])
    obj["v"] = version
    err = _decode_error(obj)
    assert err.close_code == 1002
    assert fragment in str(err)


def test_version_is_checked_before_the_type() -> None:
    err = _decode_error({"type": "from_the_future", "v": 2})
    assert err.close_code == 1002 and "unsupported protocol version 2" in str(err)
    err = _decode_error({"type": "bye", "reason": "", "code": 1000})
    assert err.close_code == 1002 and "missing field 'v'" in str(err)


def test_missing_type() -> None:
    err = _decode_error({"v": 1, "reason": "", "code": 1000})
    assert err.close_code == 1002 and "missing field 'type'" in str(err)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_missing_field_is_named(message: Message) -> None:
    full = _obj(message)
    for field in (name for name in full if name not in ("type", "v")):
        obj = {key: value for key, value in full.items() if key != field}
        err = _decode_error(obj)
        assert err.close_code == 1002
        assert f"{type(message).__name__}: missing field {field!r}" in str(err)


def test_extra_fields_are_named() -> None:
    obj = _obj(SAMPLES[1])
    obj["admin"] = True
    obj["zone"] = "eu"
    err = _decode_error(obj)
    assert err.close_code == 1002
    assert "Welcome: unknown field 'admin'; unknown field 'zone'" in str(err)


@pytest.mark.parametrize(
    ("index", "path", "value", "fragment"),
    [
        (5, ["num_samples"], "640", "Update.num_samples: expected an integer, got string"),
        (5, ["num_samples"], 1.5, "Update.num_samples: expected an integer, got number"),
        (5, ["metrics", "loss"], "low", "Update.metrics['loss']: expected a number, got string"),
        (5, ["encoding"], "sparse", "Update.encoding: expected one of 'weights', 'delta', got 'sparse'"),
        (5, ["weights", "total_bytes"], None, "Update.weights.total_bytes: expected an integer, got null"),
        (
            5,
            ["weights", "entries", 0, "shape", 1],
            "384",
            "Update.weights.entries[0].shape[1]: expected an integer",
        ),
        (2, ["settings", "lr"], "fast", "TrainTask.settings.lr: expected a number, got string"),
        (2, ["spec"], [1, 2], "TrainTask.spec: expected an object, got array"),
        (0, ["capabilities"], "train", "Hello.capabilities: expected an array, got string"),
        (0, ["capabilities", 0], 7, "Hello.capabilities[0]: expected a string, got number"),
        (
            0,
            ["limits", "max_chunk_bytes"],
            False,
            "Hello.limits.max_chunk_bytes: expected an integer, got boolean",
        ),
        (7, ["ok"], 1, "DeployResult.ok: expected a boolean, got number"),
        (8, ["task_id"], 5, "Error.task_id: expected a string, got number"),
    ],
)
def test_wrong_typed_fields_are_named(index: int, path: list[Any], value: object, fragment: str) -> None:
    obj = _obj(SAMPLES[index])
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    err = _decode_error(obj)
    assert err.close_code == 1002
    assert fragment in str(err)


def test_nested_record_with_unknown_field_is_named() -> None:
    obj = _obj(SAMPLES[2])
    obj["settings"]["momentum"] = 0.9
    err = _decode_error(obj)
    assert "TrainTask.settings: unknown field 'momentum'" in str(err)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda: TrainSettings(local_steps=5, local_epochs=1, lr=0.1, batch_size=1, seq_len=8),
            "exactly one",
        ),
        (lambda: TrainSettings(lr=0.1, batch_size=1, seq_len=8), "exactly one"),
        (lambda: TrainSettings(local_steps=0, lr=0.1, batch_size=1, seq_len=8), "local_steps: must be >= 1"),
        (lambda: TrainSettings(local_steps=1, lr=0.0, batch_size=1, seq_len=8), "lr: must be > 0"),
        (lambda: TrainSettings(local_steps=1, lr=0.1, batch_size=1, seq_len=8, prox_mu=-1), "prox_mu"),
        (lambda: EvalSettings(batch_size=0, seq_len=8), "EvalSettings.batch_size: must be >= 1"),
        (lambda: Bye(reason="x" * 124), "Bye.reason: 124 bytes, at most 123"),
        (lambda: Bye(code=999), "not a websocket close code"),
        (lambda: Bye(code=1005), "not a websocket close code a close frame can carry: 1005"),
        (lambda: Bye(code=1015), "not a websocket close code a close frame can carry: 1015"),
        (lambda: Bye(code=2000), "not a websocket close code a close frame can carry: 2000"),
        (lambda: Error(code="Bad Code!", message="m"), "Error.code: expected a short snake_case code"),
        (lambda: EvalResult(task_id="", num_samples=1, metrics={}), "EvalResult.task_id: must be 1 to 256"),
        (lambda: EvalResult(task_id="e", num_samples=-1, metrics={}), "num_samples: must be in 0..2147483647, got -1"),
        (lambda: EvalResult(task_id="e", num_samples=1, metrics={"l": float("nan")}), "finite number"),
        (lambda: Hello(device_id="d", sdk_version="1", profile={"x": float("inf")}), "non-finite number"),
        (lambda: Hello(device_id="d", sdk_version="1", profile={"x": object()}), "not a JSON value"),
        (
            lambda: Welcome(run_id="r", device_id="d", round=0, server_time=0, v=2),
            "unsupported protocol version 2",
        ),
        (lambda: WireLimits(max_chunk_bytes=1000), "WireLimits.max_chunk_bytes: 1000 is outside"),
        (lambda: WireLimits(max_chunk_bytes=8 << 20), "is outside"),
        (
            lambda: dataclasses.replace(MANIFEST, num_chunks=2),
            "TensorManifest.num_chunks: 2 chunks of 1048576 bytes cannot hold 600000 bytes",
        ),
        (lambda: dataclasses.replace(MANIFEST, transfer_id="xyz"), "TensorManifest.transfer_id"),
        (
            lambda: dataclasses.replace(MANIFEST, total_bytes=20 << 20, num_chunks=20),
            "TensorManifest.total_bytes: 20971520 bytes for 593920 bytes of tensors",
        ),
        (lambda: TensorEntry(name="w", shape=(2,), dtype="BF16"), "unsupported dtype 'BF16'"),
        (lambda: TensorEntry(name="w", shape=(2, -1), dtype="F32"), "negative dimension"),
        (lambda: Progress(task_id="t", steps_done=4, steps_total=3), "Progress.steps_done: must be in 0..steps_total"),
        (lambda: Progress(task_id="t", steps_done=-1, steps_total=3), "Progress.steps_done"),
        (lambda: Progress(task_id="t", steps_done=0, steps_total=0), "Progress.steps_total: must be in 1..10000000"),
        (lambda: Progress(task_id="t", steps_done=0, steps_total=10**7 + 1), "Progress.steps_total"),
        (lambda: Welcome(run_id="r", device_id="d", round=0, server_time=0, features=("x" * 33,)), "features"),
    ],
)
def test_invalid_values_are_refused_on_construction(build: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build()
    assert fragment in str(info.value)


def test_unsupported_dtype_is_unsupported_data() -> None:
    obj = _obj(SAMPLES[5])
    obj["weights"]["entries"][0]["dtype"] = "BF16"
    err = _decode_error(obj)
    assert err.close_code == 1003
    assert "unsupported dtype 'BF16'" in str(err)


def test_oversize_text_frame_is_1009() -> None:
    text = encode_message(SAMPLES[0])
    err = _decode_error(text, max_bytes=len(text) - 1)
    assert err.close_code == 1009
    assert f"text message of {len(text)} bytes exceeds the limit of {len(text) - 1}" in str(err)
    assert decode_message(text, max_bytes=len(text)) == SAMPLES[0]


def test_oversize_text_counts_utf8_bytes() -> None:
    text = json.dumps({"type": "bye", "v": 1, "reason": "é" * 40, "code": 1000}, ensure_ascii=False)
    assert len(text) < 100 < len(text.encode())
    assert _decode_error(text, max_bytes=100).close_code == 1009


def test_encoding_refuses_a_message_above_the_receivers_limit() -> None:
    hello = Hello(device_id="d", sdk_version="1", profile={"blob": "x" * MAX_TEXT_BYTES})
    with pytest.raises(ProtocolError) as info:
        encode_message(hello)
    assert info.value.close_code == 1009
    assert "Hello message of" in str(info.value)


def test_a_binary_frame_is_not_a_control_message() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(b'{"type": "bye"}')  # type: ignore[arg-type]
    assert info.value.close_code == 1003


def test_limits_give_the_websocket_max_size() -> None:
    assert WireLimits().max_frame_bytes == (1 << 20) + 24
    assert WireLimits(max_chunk_bytes=4 << 20, max_text_bytes=1 << 20).max_frame_bytes == (4 << 20) + 24
    assert WireLimits(max_text_bytes=8 << 20).max_frame_bytes == 8 << 20


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_JSON_INT, MAX_JSON_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=50, deadline=None)
@given(profile=st.dictionaries(st.text(max_size=12), _json_values, max_size=6))
def test_any_json_profile_round_trips(profile: dict[str, Any]) -> None:
    hello = Hello(device_id="d", sdk_version="1", profile=profile)
    decoded = decode_message(encode_message(hello))
    assert decoded == hello
    assert isinstance(decoded, Hello)
    assert json.dumps(thaw_json(decoded.profile), sort_keys=True) == json.dumps(profile, sort_keys=True)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"shape": [4, True]}, "W.shape[1]: expected an integer, got boolean"),
        ({"shape": [2**60, 4]}, "W.shape[0]: integer out of range"),
        ({"shape": [4, "4"]}, "W.shape[1]: expected an integer, got string"),
        ({"shape": [-1, 4]}, "negative dimension"),  # the record's own constraint, after the field checks
        ({"offset": 0, "length": 3}, "3 bytes, but (4, 4) F32 is 64"),
        ({"offset": 0}, "offset and length must be given together"),
    ],
)
def test_decoded_records_get_every_field_check_and_their_own_constraints(change: dict[str, Any], fragment: str) -> None:
    """Decoding checks each field once (no second pass through the constructor) and still runs the
    record's cross-field constraints; an array's fast path (all plain ints) never hides a bad item."""
    obj = {"name": "w", "shape": [4, 4], "dtype": "F32", "offset": None, "length": None, **change}
    with pytest.raises(ProtocolError) as info:
        TensorEntry.from_json(obj, "W")
    assert fragment in str(info.value)


def test_a_decoded_record_equals_the_one_built_in_python() -> None:
    for message in SAMPLES:
        again = decode_message(encode_message(message))
        assert again == message
        assert type(again) is type(message)
        assert again.to_json() == message.to_json()


def test_an_absent_wire_optional_field_decodes_to_its_default_or_factory() -> None:
    from edge_sdk.protocol._wire import OPTIONAL_ON_WIRE, WireRecord

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Tagged(WireRecord):
        name: str
        tags: tuple[str, ...] = dataclasses.field(default_factory=tuple, metadata=OPTIONAL_ON_WIRE)
        weight: float = dataclasses.field(default=1.0, metadata=OPTIONAL_ON_WIRE)

    assert Tagged.from_json({"name": "x"}) == Tagged(name="x")
    assert Tagged.from_json({"name": "x"}).to_json() == {"name": "x"}
    assert Tagged.from_json({"name": "x", "tags": ["a"], "weight": 2}) == Tagged(name="x", tags=("a",), weight=2.0)
    with pytest.raises(ProtocolError, match=r"Tagged.tags\[0\]: expected a string, got number"):
        Tagged.from_json({"name": "x", "tags": [1]})
