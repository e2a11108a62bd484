"""export_onnx: per-layer-width sub-networks and the real MiniLM to a served ONNX folder."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from edge_sdk import ConfigError, ExportError
from edge_sdk.serving import _export_graph
from edge_sdk.serving._export import ExportReport, export_onnx
from edge_sdk.serving._infer import load, sha256_file

from ._onnx_models import (
    MINILM,
    TEXTS,
    TINY_WIDTHS,
    fitted_minilm_classifier,
    sst2_dev,
    tiny_pruned_bert,
    torch_logits,
)

FP32, INT8 = "model.onnx", "model_quantized.onnx"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}


def ort_model_logits(folder: Path, texts: list[str], file_name: str | None = None) -> np.ndarray:
    """Logits from optimum's ORTModelForSequenceClassification, loading the folder as a user would."""
    from optimum.onnxruntime import ORTModelForSequenceClassification

    kwargs = {} if file_name is None else {"file_name": file_name}
    ort_model = ORTModelForSequenceClassification.from_pretrained(folder, local_files_only=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return ort_model(**batch).logits.detach().numpy()


def initializer_shapes(path: Path) -> set[tuple[int, ...]]:
    return {tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def tiny() -> BertForSequenceClassification:
    return tiny_pruned_bert()


@pytest.fixture(scope="module")
def optimum_export(tmp_path_factory: pytest.TempPathFactory, tiny: BertForSequenceClassification) -> ExportReport:
    out = tmp_path_factory.mktemp("optimum") / "served"
    return export_onnx(
        tiny,
        MINILM,
        out,
        parity_batch=TEXTS,
        quantize=True,
        method="optimum",
        manifest_extra={"run": "run-7", "round": 3, "spec": {"layers": TINY_WIDTHS}},
    )


def test_optimum_export_keeps_per_layer_widths_and_matches_torch(
    optimum_export: ExportReport, tiny: BertForSequenceClassification
) -> None:
    report, out = optimum_export, optimum_export.out_dir
    assert report.exporter == "optimum"
    assert report.parity.max_abs_diff <= 1e-4
    assert (report.parity.batch_size, report.parity.atol) == (len(TEXTS), 1e-4)
    assert {p.name for p in out.iterdir()} == {
        FP32,
        INT8,
        "config.json",
        "edge_manifest.json",
    } | TOKENIZER_FILES
    # The graph carries the pruned shapes: 2 and 3 heads of 8 dims, 40 FFN neurons (weights are [in, out]);
    # fused, each layer's Q, K and V weights are one [hidden, 3 x heads x head dim] matrix.
    shapes = initializer_shapes(out / FP32)
    assert {(32, 48), (16, 32), (32, 72), (24, 32), (32, 96), (32, 40), (40, 32), (32, 64)} <= shapes
    assert report.fusion is not None and report.fusion.attention_heads == (2, 3, 4)  # one node per layer
    assert dict(report.fusion.fused) == {
        "Attention": 3,
        "SkipLayerNormalization": 6,
        "BiasGelu": 3,
        "EmbedLayerNormalization": 1,
    }
    # ... and computes what torch computes, through our own predictor too.
    fp32 = load(out, prefer_quantized=False)
    enc = fp32.encode(TEXTS)
    np.testing.assert_allclose(fp32.forward(enc.inputs), torch_logits(tiny, enc.inputs).numpy(), atol=1e-4)


def test_manifest_records_source_widths_figures_and_checksums(optimum_export: ExportReport) -> None:
    out = optimum_export.out_dir
    manifest = json.loads((out / "edge_manifest.json").read_text())
    assert manifest == json.loads(json.dumps(optimum_export.manifest))
    assert (manifest["run"], manifest["round"], manifest["spec"]) == ("run-7", 3, {"layers": TINY_WIDTHS})
    assert manifest["model"]["layer_widths"] == TINY_WIDTHS  # read off the module, not the config
    assert manifest["model"]["labels"] == ["negative", "positive"]
    assert manifest["max_length"] == 128
    assert manifest["exporter"]["method"] == "optimum"
    assert manifest["parity"]["max_abs_diff"] == optimum_export.parity.max_abs_diff
    assert manifest["quantization"] == {
        "method": "dynamic",
        "weight_type": "QInt8",
        "per_channel": True,
        "file": INT8,
    }
    drift = manifest["drift"]
    assert drift["source"] == "parity_batch" and drift["n"] == len(TEXTS)
    assert 0.0 <= drift["agreement"] <= 1.0 and drift["accuracy_fp32"] is None
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    files = manifest["files"]
    assert set(files) == {p.name for p in out.iterdir()} - {"edge_manifest.json"}
    for name, entry in files.items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}


def test_config_describes_the_head_not_the_widths(optimum_export: ExportReport) -> None:
    config = json.loads((optimum_export.out_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 64  # the parent's widths


def test_folder_loads_in_optimum_ort_model_with_the_same_logits(
    optimum_export: ExportReport, tiny: BertForSequenceClassification
) -> None:
    out = optimum_export.out_dir
    expected = load(out, prefer_quantized=False).logits(TEXTS)
    np.testing.assert_allclose(ort_model_logits(out, TEXTS), expected, atol=1e-5)
    int8 = ort_model_logits(out, TEXTS, file_name=INT8)
    np.testing.assert_allclose(int8, load(out).logits(TEXTS), atol=1e-5)
    assert np.abs(int8 - expected).max() < 0.05


def test_torch_exporter_gives_the_same_graph_outputs(
    tmp_path: Path, tiny: BertForSequenceClassification, optimum_export: ExportReport
) -> None:
    report = export_onnx(tiny, MINILM, tmp_path / "served", parity_batch=TEXTS, method="torch")
    assert report.exporter == "torch" and report.parity.max_abs_diff <= 1e-4
    assert report.int8_bytes is None and report.drift is None and report.size_ratio is None
    assert not (tmp_path / "served" / INT8).exists()
    manifest = report.manifest
    assert manifest["exporter"]["method"] == "torch" and manifest["quantization"] is None
    a = load(tmp_path / "served").logits(TEXTS)
    b = load(optimum_export.out_dir, prefer_quantized=False).logits(TEXTS)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(ort_model_logits(tmp_path / "served", TEXTS), a, atol=1e-5)


def test_auto_falls_back_to_torch_for_an_architecture_optimum_does_not_know(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class EdgeBertConfig(BertConfig):
        model_type = "edge-bert"

    class EdgeBertForSequenceClassification(BertForSequenceClassification):
        config_class = EdgeBertConfig

    torch.manual_seed(1)
    model = EdgeBertForSequenceClassification(
        EdgeBertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )
    with caplog.at_level(logging.WARNING, logger="edge_sdk.serving._export"):
        report = export_onnx(model, MINILM, tmp_path / "served", parity_batch=TEXTS, max_length=64)
    assert report.exporter == "torch" and report.parity.max_abs_diff <= 1e-4
    assert any("optimum could not export" in r.message for r in caplog.records)
    assert model.training  # the caller's mode is restored (the exporters leave it in training mode)
    with pytest.raises(ExportError, match="optimum could not export"):
        export_onnx(model, MINILM, tmp_path / "other", parity_batch=TEXTS, max_length=64, method="optimum")
    assert not (tmp_path / "other").exists()


def test_failed_parity_keeps_the_previous_model_and_leaves_nothing_behind(
    tmp_path: Path, tiny: BertForSequenceClassification, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "served"
    export_onnx(tiny, MINILM, out, parity_batch=TEXTS, method="torch", manifest_extra={"round": 1})
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    real_export = _export_graph.export_torch

    def export_a_different_model(model: torch.nn.Module, path: Path, opset: int) -> None:
        skewed = copy.deepcopy(model)
        with torch.no_grad():
            skewed.classifier.bias += 1e-2  # a graph that no longer matches the module
        real_export(skewed, path, opset)

    monkeypatch.setattr(_export_graph, "export_torch", export_a_different_model)
    with pytest.raises(ExportError, match=r"parity check failed: .* differ by up to 0\.01"):
        export_onnx(tiny, MINILM, out, parity_batch=TEXTS, method="torch", quantize=True, manifest_extra={"round": 2})
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert json.loads((out / "edge_manifest.json").read_text())["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["served"]  # no temporary or old folders left

    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx(tiny, MINILM, tmp_path / "fresh", parity_batch=TEXTS, method="torch")
    assert [p.name for p in tmp_path.iterdir()] == ["served"]


def test_a_good_export_replaces_the_previous_one(tmp_path: Path, tiny: BertForSequenceClassification) -> None:
    out = tmp_path / "served"
    export_onnx(tiny, MINILM, out, parity_batch=TEXTS, method="torch", quantize=True, manifest_extra={"round": 1})
    assert (out / INT8).exists()
    export_onnx(tiny, MINILM, out, parity_batch=TEXTS, method="torch", manifest_extra={"round": 2})
    assert json.loads((out / "edge_manifest.json").read_text())["round"] == 2
    assert not (out / INT8).exists()  # the folder is replaced as a whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["served"]


def test_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path: Path, tiny: BertForSequenceClassification) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no earlier export"):
        export_onnx(tiny, MINILM, out, parity_batch=TEXTS)
    assert [p.name for p in out.iterdir()] == ["todo.txt"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"manifest_extra": {"files": {}}}, "may not set"),
        ({"manifest_extra": {"when": datetime.now()}}, "JSON-serializable"),
        ({"manifest_extra": {"loss": float("nan")}}, "JSON-serializable"),
        ({"parity_batch": []}, "non-empty"),
        ({"parity_batch": "a fine film"}, "non-empty"),
        ({"parity_batch": {"attention_mask": np.ones((1, 3))}}, "input_ids"),
        ({"max_length": 129}, "max_length"),
        ({"drift_labels": [0, 1]}, "drift_texts"),
        ({"drift_texts": ["a", "b"]}, "quantize=True"),
        ({"method": "onnxscript"}, "method"),
    ],
)
def test_bad_arguments_fail_before_any_work(
    tmp_path: Path, tiny: BertForSequenceClassification, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"parity_batch": TEXTS, **kwargs}
    with pytest.raises(ConfigError, match=match):
        export_onnx(tiny, MINILM, tmp_path / "served", **args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_tokenized_parity_batch_and_training_mode_restored(tmp_path: Path, tiny: BertForSequenceClassification) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(3, 11))
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    model = copy.deepcopy(tiny).train()
    report = export_onnx(
        model,
        MINILM,
        tmp_path / "served",
        method="torch",
        quantize=True,
        parity_batch={"input_ids": torch.from_numpy(ids), "attention_mask": mask},
    )
    assert (report.parity.batch_size, report.parity.sequence_length) == (3, 11)
    assert report.parity.max_abs_diff <= 1e-4
    assert report.drift is not None and report.drift.n == 3
    assert model.training


def test_a_tokenizer_folder_without_tokenizer_json_gets_one(
    tmp_path: Path, tiny: BertForSequenceClassification
) -> None:
    slow = tmp_path / "slow-tokenizer"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINILM / name, slow / name)
    report = export_onnx(tiny, slow, tmp_path / "served", parity_batch=TEXTS, method="torch")
    assert (report.out_dir / "tokenizer.json").is_file()
    generated = load(report.out_dir).encode(TEXTS).inputs
    shutil.copy(MINILM / "tokenizer.json", report.out_dir / "tokenizer.json")
    reference = load(report.out_dir, verify=False).encode(TEXTS).inputs
    for name in generated:
        np.testing.assert_array_equal(generated[name], reference[name])


@pytest.fixture(scope="module")
def minilm_export(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExportReport, BertForSequenceClassification]:
    model = fitted_minilm_classifier()
    texts, labels = sst2_dev()
    report = export_onnx(
        model,
        MINILM,
        tmp_path_factory.mktemp("minilm") / "served",
        parity_batch=texts[:16],
        quantize=True,
        drift_texts=texts,
        drift_labels=labels,
        manifest_extra={"run": "minilm-full-width", "round": 0},
    )
    return report, model


@pytest.mark.slow
def test_minilm_full_width_parity_size_and_int8_agreement_on_sst2_dev(
    minilm_export: tuple[ExportReport, BertForSequenceClassification],
) -> None:
    report, _ = minilm_export
    assert report.parity.max_abs_diff <= 1e-4
    assert report.size_ratio is not None and report.size_ratio <= 0.30  # measured 0.254 (23.1 MB / 91.0 MB)
    drift = report.drift
    assert drift is not None and drift.source == "drift_texts" and drift.n == 872
    # A fitted head (encoder frozen), so accuracy means something: int8 within 1 point of fp32 on dev.
    assert drift.agreement >= 0.90
    assert drift.accuracy_fp32 is not None and drift.accuracy_drop is not None
    assert drift.accuracy_fp32 >= 0.6  # well above chance
    assert abs(drift.accuracy_drop) <= 0.01
    assert report.manifest["model"]["layer_widths"] == [{"heads": 12, "head_dim": 32, "ffn": 1536}] * 6
    print(
        f"\nMiniLM: parity {report.parity.max_abs_diff:.2e}; int8 {report.int8_bytes} B / fp32 "
        f"{report.fp32_bytes} B = {report.size_ratio:.3f}; SST-2 dev agreement {drift.agreement:.4f}, "
        f"accuracy fp32 {drift.accuracy_fp32:.4f} int8 {drift.accuracy_int8:.4f}"
    )


@pytest.mark.slow
def test_minilm_folder_loads_in_optimum_with_the_same_logits(
    minilm_export: tuple[ExportReport, BertForSequenceClassification],
) -> None:
    report, model = minilm_export
    texts = sst2_dev()[0][:8]
    expected = torch_logits(model, load(report.out_dir, prefer_quantized=False).encode(texts).inputs).numpy()
    np.testing.assert_allclose(ort_model_logits(report.out_dir, texts), expected, atol=1e-4)
