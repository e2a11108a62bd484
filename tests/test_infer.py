"""The torch-free predictor: labels, scores, truncation, threads, model choice and load errors.

torch is used here only to build and export the test model; the predictor itself never imports it
(checked in a clean subprocess by tests/test_cli_infer.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_sdk import ConfigError, ModelLoadError
from edge_sdk.serving._infer import Prediction, Predictor, load

from ._onnx_models import LONG_TEXT, TEXTS, export_tiny, tiny_pruned_bert, torch_logits

FP32, INT8 = "model.onnx", "model_quantized.onnx"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("infer") / "served", seed=3)


def copy_of(served: Path, dest: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(served, dest)
    for name in without:
        (dest / name).unlink()
    return dest


def test_predictions_are_torch_softmax_with_config_labels(served: Path) -> None:
    predictor = load(served, prefer_quantized=False)
    assert predictor.labels == ("negative", "positive") and predictor.max_length == 32
    predictions = predictor.predict(TEXTS)
    logits = torch_logits(tiny_pruned_bert(seed=3), predictor.encode(TEXTS).inputs).numpy()
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert len(predictions) == len(TEXTS)
    for pred, row in zip(predictions, probs, strict=True):
        assert isinstance(pred, Prediction)
        assert pred.label_id == int(row.argmax()) and pred.label == predictor.labels[pred.label_id]
        assert pred.scores == pytest.approx({"negative": row[0], "positive": row[1]}, abs=1e-5)
        assert pred.score == pred.scores[pred.label] and not pred.truncated
    assert predictions[0].n_tokens == 5  # [CLS] a fine film [SEP]
    with pytest.raises(dataclasses.FrozenInstanceError):
        predictions[0].label = "x"  # type: ignore[misc]


def test_batching_keeps_input_order(served: Path) -> None:
    predictor = load(served)
    texts = [*TEXTS, LONG_TEXT, "", "ok then"] * 2
    one_by_one = [predictor.predict([t])[0] for t in texts]
    batched = predictor.predict(texts, batch_size=3)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.label == b.label and a.n_tokens == b.n_tokens and a.truncated == b.truncated
        assert a.score == pytest.approx(b.score, abs=0.02)  # int8: activation scales are per batch
    np.testing.assert_allclose(
        load(served, prefer_quantized=False).logits(texts, batch_size=3),
        np.concatenate([load(served, prefer_quantized=False).logits([t]) for t in texts]),
        atol=1e-5,
    )
    assert predictor.predict([]) == []


def test_batches_are_padded_to_their_longest_text_only(served: Path) -> None:
    predictor = load(served)
    # Both axes of every input are dynamic: nothing pads to max_length.
    assert all(isinstance(d, str) for i in predictor._session.get_inputs() for d in i.shape)
    widths: list[tuple[int, int]] = []
    real_run = predictor._session.run

    class Recording:
        def run(self, names: object, feed: dict[str, np.ndarray]) -> object:
            widths.append(feed["input_ids"].shape)
            return real_run(names, feed)

    predictor._session = Recording()  # type: ignore[assignment]
    texts = ["wow", "a fine film", "one long string of cliches .", LONG_TEXT]
    predictions = predictor.predict(texts, batch_size=2)
    n = [p.n_tokens for p in predictions]
    assert n[:3] == [3, 5, 10] and n[3] == predictor.max_length  # LONG_TEXT is cut to 32 tokens
    # Sorted by length, two batches: each as wide as its longest text, no wider.
    assert widths == [(2, 5), (2, 32)]
    predictor.predict(["wow"])
    assert widths[-1] == (1, 3)


def test_truncation_is_flagged_and_logged(served: Path, caplog: pytest.LogCaptureFixture) -> None:
    predictor = load(served)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.serving._infer"):
        short, long = predictor.predict(["a fine film", LONG_TEXT])
    assert (short.truncated, long.truncated) == (False, True)
    assert long.n_tokens == 32
    warnings = [r for r in caplog.records if r.name == "edge_sdk.serving._infer" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 2" in warnings[0].getMessage() and "32 tokens" in warnings[0].getMessage()
    # max_length: the manifest's by default, or the caller's, up to the model's position limit.
    assert load(served, max_length=8).predict(["one two three four five six seven"])[0].truncated
    assert load(served, max_length=128).max_length == 128
    with pytest.raises(ConfigError, match="exceeds the model's limit of 128"):
        load(served, max_length=129)


def test_prefers_the_int8_model_and_falls_back(served: Path, tmp_path: Path) -> None:
    assert load(served).model_path.name == INT8 and load(served).quantized
    assert load(served, prefer_quantized=False).model_path.name == FP32
    only_fp32 = copy_of(served, tmp_path / "fp32", without=(INT8,))
    assert load(only_fp32).model_path.name == FP32
    only_int8 = copy_of(served, tmp_path / "int8", without=(FP32,))
    assert load(only_int8, prefer_quantized=False).model_path.name == INT8


def test_thread_setting_reaches_onnx_runtime(served: Path) -> None:
    one = load(served, threads=1)
    assert one.threads == 1
    options = one._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert load(served, threads=2)._session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ConfigError, match="threads"):
        load(served, threads=0)


def test_folder_without_a_model(tmp_path: Path, served: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no ONNX model"):
        load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        load(tmp_path / "file")
    no_model = copy_of(served, tmp_path / "no-model", without=(FP32, INT8))
    with pytest.raises(ConfigError, match=r"expected model\.onnx or model_quantized\.onnx"):
        load(no_model)


def test_missing_tokenizer_or_config(tmp_path: Path, served: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer is missing"):
        load(copy_of(served, tmp_path / "a", without=("tokenizer.json",)))
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load(copy_of(served, tmp_path / "b", without=("config.json",)))
    broken = copy_of(served, tmp_path / "c")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load(broken, verify=False)


def test_corrupt_onnx_file(tmp_path: Path, served: Path) -> None:
    flipped = copy_of(served, tmp_path / "flipped")
    data = bytearray((flipped / INT8).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the weights: ONNX Runtime would load it and answer wrongly
    (flipped / INT8).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model_quantized\.onnx is corrupt: sha256"):
        load(flipped)
    assert load(flipped, prefer_quantized=False).model_path.name == FP32  # the other file is intact

    truncated = copy_of(served, tmp_path / "truncated", without=(INT8,))
    (truncated / FP32).write_bytes((served / FP32).read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load(truncated)  # the manifest's checksum
    with pytest.raises(ModelLoadError, match=r"cannot load ONNX model .*corrupt or unsupported"):
        load(truncated, verify=False)  # ONNX Runtime's own parse error, wrapped


def test_folder_without_manifest_uses_the_model_limits(tmp_path: Path, served: Path) -> None:
    bare = copy_of(served, tmp_path / "bare", without=("edge_manifest.json",))
    predictor = load(bare)
    assert predictor.max_length == 128  # config max_position_embeddings (tokenizer_config says 512)
    assert predictor.predict(["a fine film"])[0].label in predictor.labels


def test_labels_fall_back_and_are_validated(tmp_path: Path, served: Path) -> None:
    folder = copy_of(served, tmp_path / "labels", without=("edge_manifest.json",))
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load(folder).labels == ("LABEL_0", "LABEL_1")
    config["id2label"] = {"0": "same", "1": "same"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="duplicate"):
        load(folder)
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"outputs 2 logits but config\.json names 3 labels"):
        load(folder)


def test_bad_texts(served: Path) -> None:
    predictor: Predictor = load(served)
    with pytest.raises(ConfigError, match="not one string"):
        predictor.predict("a fine film")
    with pytest.raises(ConfigError, match="must be strings"):
        predictor.predict(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="batch_size"):
        predictor.predict(["ok"], batch_size=0)
