"""Training levers on the wire: TrainSettings' new optional fields, and the tensors an Update may carry."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_sdk import ProtocolError
from edge_sdk._levers import Levers
from edge_sdk.protocol import (
    ConnectionState,
    CoordinatorConnection,
    DeviceConnection,
    HelloReceived,
    ProtocolViolation,
    TaskReceived,
    TensorEntry,
    TrainSettings,
    TrainTask,
    Update,
    UpdateReceived,
    decode_message,
    describe_tensors,
    encode_message,
    encode_tensors,
    split_update_name,
    update_entry_mismatches,
)

EMB = "bert.embeddings.word_embeddings.weight"
Q = "bert.encoder.layer.0.attention.self.query.weight"
LN = "bert.encoder.layer.0.output.LayerNorm.weight"
IDS = "bert.embeddings.position_ids"


def _sent() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        EMB: rng.standard_normal((50, 8)).astype(np.float32),
        Q: rng.standard_normal((6, 8)).astype(np.float32),
        LN: np.ones(8, dtype=np.float32),
        IDS: np.arange(12, dtype=np.int64),
    }


def _rows(n: int = 3) -> dict[str, np.ndarray]:
    return {EMB: np.zeros((n, 8), np.float32), EMB + "@rows": np.arange(n, dtype=np.int64)}


def _lora(rank: int = 2) -> dict[str, np.ndarray]:
    return {Q + "@lora_A": np.zeros((rank, 8), np.float32), Q + "@lora_B": np.zeros((6, rank), np.float32)}


def _problems(update: dict[str, np.ndarray], levers: Levers) -> list[str]:
    return update_entry_mismatches(describe_tensors(update), describe_tensors(_sent()), levers)


# ------------------------------------------------------------------------------------- settings


def test_plain_settings_encode_exactly_as_before_the_levers() -> None:
    plain = TrainSettings(local_steps=2, lr=1e-3, batch_size=8, seq_len=64)
    assert set(plain.to_json()) == {
        "local_steps",
        "local_epochs",
        "lr",
        "batch_size",
        "seq_len",
        "optimizer",
        "prox_mu",
        "seed",
    }
    assert TrainSettings.from_json(plain.to_json()) == plain  # an older peer's settings still decode
    assert plain.levers == Levers() and plain.max_grad_norm is None and plain.dropout is None


def test_levers_and_their_companions_round_trip_in_a_task() -> None:
    settings = TrainSettings(
        local_steps=2,
        lr=1e-3,
        batch_size=16,
        seq_len=64,
        levers=Levers(micro_batches=4, checkpointing=True, embeddings="rows", lora_rank=8, attention="sdpa"),
        max_grad_norm=1.0,
        dropout=0.0,
    )
    obj = settings.to_json()
    assert obj["levers"] == {
        "micro_batches": 4,
        "checkpointing": True,
        "embeddings": "rows",
        "lora_rank": 8,
        "attention": "sdpa",
    }
    assert obj["max_grad_norm"] == 1.0 and obj["dropout"] == 0.0
    manifest, _ = encode_tensors(_sent())
    task = TrainTask(task_id="t", round=1, spec={}, model_config={}, settings=settings, weights=manifest)
    decoded = decode_message(encode_message(task))
    assert decoded == task and isinstance(decoded, TrainTask) and decoded.settings.levers.lora_rank == 8


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"levers": {"micro_batches": 16}}, "TrainSettings.levers: 16 micro-batches cannot split a batch of 8"),
        ({"levers": {"micro_batches": 2.0}}, "micro_batches must be an integer"),
        ({"levers": {"micro_batches": True}}, "micro_batches must be an integer"),
        ({"levers": {"lora_rank": 10**6}}, "lora_rank must be an integer in 0..4096"),
        ({"levers": {"embeddings": "sparse"}}, "embeddings must be one of"),
        ({"levers": {"checkpointing": 1}}, "checkpointing must be true or false"),
        ({"levers": {"lora": 8}}, "unknown key(s) ['lora']"),
        ({"levers": [4]}, "TrainSettings.levers: expected an object, got array"),
        ({"max_grad_norm": 0}, "max_grad_norm: must be in (0, 1e+06] or null"),
        ({"max_grad_norm": 1e9}, "max_grad_norm: must be in (0, 1e+06]"),
        ({"max_grad_norm": "1"}, "max_grad_norm: expected a number, got string"),
        ({"dropout": 1.0}, "dropout: must be in [0, 1) or null"),
        ({"dropout": -0.1}, "dropout: must be in [0, 1)"),
    ],
)
def test_bad_lever_settings_are_named(change: dict[str, Any], fragment: str) -> None:
    obj = {**TrainSettings(local_steps=2, lr=1e-3, batch_size=8, seq_len=64).to_json(), **change}
    with pytest.raises(ProtocolError) as info:
        TrainSettings.from_json(json.loads(json.dumps(obj)))
    assert fragment in str(info.value)
    assert info.value.close_code == 1002


# ------------------------------------------------------------------------------- update tensors


def test_update_names_split_at_their_suffix() -> None:
    assert split_update_name(EMB + "@rows") == (EMB, "@rows")
    assert split_update_name(Q + "@lora_B") == (Q, "@lora_B")
    assert split_update_name(Q) == (Q, "")
    assert split_update_name("@rows") == ("@rows", "")


def test_plain_levers_want_exactly_the_tensors_sent() -> None:
    for levers in (Levers(), Levers(micro_batches=4, checkpointing=True, attention="sdpa")):
        assert _problems(_sent(), levers) == []
        update = {n: a for n, a in _sent().items() if n != LN}
        assert _problems(update, levers) == [f"missing tensor {LN!r}"]
        assert "unexpected tensor" in _problems({**_sent(), **_rows()}, levers)[0]


def test_row_updates_carry_values_and_int64_indices() -> None:
    rows = Levers(embeddings="rows")
    update = {**_sent(), **_rows(3)}
    assert _problems(update, rows) == []
    assert _problems({**update, **_rows(0)}, rows) == []  # no row touched: empty tensors travel
    assert _problems({**update, EMB + "@rows": np.arange(3, dtype=np.int32)}, rows) == [
        f"tensor {EMB + '@rows'!r}: I32 [3], expected I64 [n]"
    ]
    assert "the table has 50" in _problems({**update, **_rows(51)}, rows)[0]
    no_values = {n: a for n, a in update.items() if n != EMB}
    assert _problems(no_values, rows) == [f"tensor {EMB + '@rows'!r} without the row values {EMB!r}"]
    short = {**update, EMB: np.zeros((2, 8), np.float32)}
    assert _problems(short, rows) == [f"tensor {EMB!r}: F32 [2, 8], expected F32 [3, 8]"]
    assert "need the embeddings lever 'rows'" in _problems(update, Levers(embeddings="frozen"))[0]
    assert "need a 2-D table" in _problems({**_sent(), LN + "@rows": np.arange(2)}, rows)[0]
    assert _problems({n: a for n, a in _sent().items() if n != Q}, rows) == [f"missing tensor {Q!r}"]


def test_lora_factors_replace_the_weight_and_frozen_tensors_may_be_absent() -> None:
    lora = Levers(lora_rank=4)
    update = {LN: _sent()[LN], **_lora(2)}  # the LoRA device trained the LayerNorm and Q's factors
    assert _problems(update, lora) == []
    assert _problems({**update, **_lora(4)}, lora) == []
    assert _problems({**update, **_lora(5)}, lora)[0] == f"tensor {Q!r}: LoRA rank 5 is outside 1..4"
    lopsided = {**update, Q + "@lora_B": np.zeros((6, 3), np.float32)}
    assert f"tensor {Q + '@lora_B'!r}: F32 [6, 3], expected F32 [6, 2]" in _problems(lopsided, lora)
    assert "needs both" in _problems({LN: _sent()[LN], Q + "@lora_A": _lora()[Q + "@lora_A"]}, lora)[0]
    assert "travels both dense and as LoRA factors" in _problems({**update, Q: _sent()[Q]}, lora)[0]
    assert "trains without LoRA" in _problems(update, Levers(embeddings="frozen"))[0]
    assert (
        "not 2-D"
        in _problems(
            {LN + "@lora_A": np.zeros((1, 8), np.float32), LN + "@lora_B": np.zeros((8, 1), np.float32)}, lora
        )[0]
    )
    assert _problems({}, Levers(embeddings="frozen")) == []  # frozen: absent is fine


# --------------------------------------------------------------------- through the connections


def _working(levers: Levers) -> tuple[CoordinatorConnection, DeviceConnection]:
    coord, dev = CoordinatorConnection(), DeviceConnection()
    dev.send_hello(device_id="d", sdk_version="0.1.0", profile={}, capabilities=("train",))
    assert isinstance(coord.receive(dev.data_to_send()[0])[0], HelloReceived)
    coord.send_welcome(run_id="r", round=0, server_time=0.0)
    for message in coord.data_to_send():
        dev.receive(message)
    settings = TrainSettings(local_steps=1, lr=1e-3, batch_size=4, seq_len=16, levers=levers)
    coord.send_train_task(task_id="t", round=1, spec={}, model_config={}, settings=settings, tensors=_sent())
    events = [e for m in coord.data_to_send() for e in dev.receive(m)]
    assert isinstance(events[-1], TaskReceived)
    return coord, dev


def _send(dev: DeviceConnection, tensors: dict[str, np.ndarray]) -> None:
    dev.send_update(
        task_id="t", tensors=tensors, num_samples=4, metrics={}, peak_rss_bytes=0, step_time_s=0.0, train_time_s=0.0
    )


def test_a_lever_shaped_update_travels_from_device_to_coordinator() -> None:
    coord, dev = _working(Levers(embeddings="rows", lora_rank=2))
    update = {LN: _sent()[LN], IDS: _sent()[IDS], **_rows(3), **_lora(2)}
    update[EMB + "@rows"] = np.array([0, 7, 49], dtype=np.int64)
    _send(dev, update)
    events = [e for m in dev.data_to_send() for e in coord.receive(m)]
    (received,) = events
    assert isinstance(received, UpdateReceived)
    assert received.tensors[EMB + "@rows"].dtype == np.int64
    assert received.tensors[EMB + "@rows"].tolist() == [0, 7, 49]
    assert coord.state is ConnectionState.READY


def test_the_device_refuses_and_the_coordinator_rejects_an_update_its_levers_do_not_allow() -> None:
    coord, dev = _working(Levers())
    with pytest.raises(ProtocolError, match="unexpected tensor"):
        _send(dev, {**_sent(), **_lora(2)})
    manifest, _ = encode_tensors({**_sent(), **_lora(2)})
    update = Update(
        task_id="t",
        num_samples=4,
        metrics={},
        peak_rss_bytes=0,
        step_time_s=0.0,
        train_time_s=0.0,
        weights=manifest,
        encoding="weights",
    )
    (event,) = coord.receive(encode_message(update))  # a device that skips its own check
    assert isinstance(event, ProtocolViolation) and event.close_code == 1008
    assert "does not match the expected tensors" in event.reason and "unexpected tensor" in event.reason


def test_entries_are_checked_before_any_chunk() -> None:
    sent = describe_tensors(_sent())
    entry = TensorEntry(name=EMB + "@rows", shape=(3,), dtype="I64")
    assert update_entry_mismatches([*sent, entry], sent, Levers(embeddings="rows"))  # values of 50 rows, not 3
