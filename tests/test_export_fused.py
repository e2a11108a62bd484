"""export_onnx's fused graphs (ONNX Runtime transformer fusions) and its quiet logging."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from transformers import BertForSequenceClassification

from edge_sdk import ExportError
from edge_sdk.serving import _export
from edge_sdk.serving._export import export_onnx
from edge_sdk.serving._export_optimize import quiet_export_logs
from edge_sdk.serving._infer import load

from ._onnx_models import MINILM, REPO, TEXTS, tiny_pruned_bert, torch_logits


@pytest.fixture(scope="module")
def tiny() -> BertForSequenceClassification:
    return tiny_pruned_bert(seed=3)


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_fused_graph_keeps_parity_with_left_padding_and_holes_in_the_mask(
    tmp_path: Path, tiny: BertForSequenceClassification
) -> None:
    # The fusion's default mask form (a count of ones per row) would be wrong on these rows (0.04 measured).
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, size=(3, 20))
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 12:] = 0  # right padding
    mask[2, 3:6] = 0  # a hole
    report = export_onnx(
        tiny, MINILM, tmp_path / "served", parity_batch={"input_ids": ids, "attention_mask": mask}, quantize=True
    )
    assert report.fusion is not None and report.fusion.attention_heads == (2, 3, 4)
    assert report.parity.max_abs_diff <= 1e-4
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"} <= op_types(report.out_dir / "model.onnx")
    assert "QAttention" in op_types(report.out_dir / "model_quantized.onnx")  # optimized, then quantized
    graph = report.manifest["graph"]
    assert graph["optimizer"] == "onnxruntime.transformers" and graph["attention_heads"] == [2, 3, 4]
    int8 = load(report.out_dir).forward({"input_ids": ids, "attention_mask": mask})
    expected = torch_logits(tiny, {"input_ids": ids, "attention_mask": mask}).numpy()
    assert np.abs(int8 - expected).max() < 0.05


def test_optimize_false_serves_the_unfused_graph(tmp_path: Path, tiny: BertForSequenceClassification) -> None:
    report = export_onnx(tiny, MINILM, tmp_path / "served", parity_batch=TEXTS, method="torch", optimize=False)
    assert report.fusion is None and report.manifest["graph"] is None
    assert "Attention" not in op_types(report.out_dir / "model.onnx")


def test_a_failing_fusion_falls_back_to_the_unfused_graph_with_a_warning(
    tmp_path: Path,
    tiny: BertForSequenceClassification,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(src: Path, dst: Path, model_type: str) -> object:
        raise ExportError("graph fusion failed: KeyError: 'x'")

    monkeypatch.setattr(_export, "fuse_graph", broken)
    with caplog.at_level(logging.WARNING, logger="edge_sdk.serving._export"):
        report = export_onnx(tiny, MINILM, tmp_path / "served", parity_batch=TEXTS, method="torch", quantize=True)
    assert report.fusion is None and report.parity.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["served"]
    assert not (report.out_dir / "model.unfused.onnx").exists()
    assert any("fused graph is not used" in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(
        load(report.out_dir, prefer_quantized=False).logits(TEXTS),
        torch_logits(tiny, load(report.out_dir).encode(TEXTS).inputs).numpy(),
        atol=1e-4,
    )


def test_quiet_export_logs_drops_only_the_known_noise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), quiet_export_logs():
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
        logging.warning("Please consider the real problem")  # same logger, other message: passes
        fusion = logging.getLogger("fusion_attention")
        fusion.warning("Input hidden size (%d) is not same as weight matrix dimension of q,k,v (%d). ...", 16, 32)
        fusion.warning("Input hidden size (%d) is not a multiple of num of heads", 16)
        optimum = logging.getLogger("optimum.exporters.onnx.base")
        optimum.warning("Weight deduplication check in the ONNX export requires accelerate. Please install it.")
        optimum.warning("Could not export the model")
    assert [r.getMessage() for r in caplog.records] == [
        "Please consider the real problem",
        "Input hidden size (16) is not a multiple of num of heads",
        "Could not export the model",
    ]
    caplog.clear()
    logging.getLogger("optimum.exporters.onnx.base").warning("Weight deduplication check in the ONNX export ...")
    assert len(caplog.records) == 1  # the filters are gone after the block


_CHILD = """
import logging, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests._onnx_models import MINILM, TEXTS, tiny_pruned_bert
from edge_sdk.serving._export import export_onnx
export_onnx(tiny_pruned_bert(), MINILM, Path({out!r}), parity_batch=TEXTS, quantize=True, max_length=32)
assert logging.getLogger().handlers == [], logging.getLogger().handlers
logging.getLogger("probe").warning("a real problem after the export")
"""


def test_an_export_prints_nothing_a_user_cannot_act_on(tmp_path: Path) -> None:
    code = textwrap.dedent(_CHILD.format(repo=str(REPO), out=str(tmp_path / "served")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    # Nothing but the probe: no library noise, and the root logger was not configured behind our back
    # (onnxruntime.quantization's logging.warning would have called basicConfig: "WARNING:probe:...").
    assert out.stderr.strip() == "a real problem after the export", out.stderr[-3000:]
    assert json.loads((tmp_path / "served" / "edge_manifest.json").read_text())["graph"]["attention_heads"] == [2, 3, 4]
