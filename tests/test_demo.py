"""``make demo``'s entry point as a newcomer runs it (one round instead of three): a real federation of
three ``edge-sdk join`` processes over loopback websockets on the real MiniLM, then the deploy step end to
end: every device exports its inference sub-network to ONNX itself, checks it and installs it, and the
installed folders are served by edge-fm's runtime, by optimum's ORTModel and by ``edge-sdk infer``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.serving._infer import load

from ._federation import child_env
from ._onnx_models import sst2_dev

pytestmark = pytest.mark.slow

CLASSES = ("raspberry-pi-4-2gb", "jetson-nano-4gb", "raspberry-pi-5-8gb")
REVIEW = "a gorgeous, witty, seductive movie."


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.demo", "--rounds", "1"],
        check=False,
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = (cwd / "runs").glob("demo-*")
    return folder, done.stdout


def test_demo_runs_a_federation_of_three_device_classes(demo: tuple[Path, str]) -> None:
    folder, out = demo
    assert "report: " in out and "obvious sentences right" in out and "round 1/1: accuracy" in out, out
    history = json.loads((folder / "rounds.json").read_text())
    assert [h["round"] for h in history] == [1]
    for entry in history:
        got = {d["device_id"]: d for d in entry["devices"]}
        assert {n: d["status"] for n, d in got.items()} == dict.fromkeys(CLASSES, "ok")
        # the smallest device's budget cannot hold plain training of the full model: levers come
        # before width cuts, so it trains the full width with levers, within its budget
        small, large = got["raspberry-pi-4-2gb"], got["raspberry-pi-5-8gb"]
        assert small["levers"] != "plain" and small["params_fraction"] == large["params_fraction"] == 1.0
        assert small["predicted_bytes"] <= small["usable_bytes"]
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
    summary = (folder / "summary.md").read_text()
    assert summary.count("\n| ") >= 2 + 5  # the rounds table and the deployments table


def test_every_device_installs_an_inference_model_at_least_as_large_as_its_training_model(
    demo: tuple[Path, str],
) -> None:
    folder, _ = demo
    trained = {d["device_id"]: d for d in json.loads((folder / "rounds.json").read_text())[-1]["devices"]}
    deployed = {d["device_id"]: d for d in json.loads((folder / "coordinator" / "deployments.json").read_text())}
    assert sorted(deployed) == sorted(CLASSES)
    for name, d in deployed.items():
        assert d["status"] == "ok", d
        assert d["round"] == 1 and d["train_params"] == trained[name]["params"]
        assert d["params"] >= d["train_params"], d
        if d["could_grow"]:  # the budget holds more than the training sub-network: it serves more
            assert d["params"] > d["train_params"], d
        assert d["predicted_bytes"] <= d["budget_bytes"]
        m = d["metrics"]
        assert 0.0 <= m["parity_max_abs_diff"] <= 1e-4, d
        served = folder / "models" / name
        assert m["onnx_bytes"] == (served / "model.onnx").stat().st_size
        assert d["fits"] and not (served / "model_quantized.onnx").exists()  # fp32 deploys: no int8 model
        manifest = json.loads((served / "edge_manifest.json").read_text())
        assert manifest["source"]["round"] == 1 and manifest["source"]["task_id"] == d["task_id"]
        assert manifest["spec"] == d["spec"] and manifest["model"]["parameters"] == d["params"]
        assert manifest["parity"]["max_abs_diff"] == m["parity_max_abs_diff"]
        inference = dict(manifest["inference"])
        assert isinstance(inference.pop("optimize"), bool)  # fused where the fused export fits the budget
        assert inference == {"batch_size": 1, "seq_len": 128, "quantize": False}
    # Every device trains the full width (levers before width cuts), so each serves the full model.
    assert all(d["params"] == d["train_params"] == trained["raspberry-pi-5-8gb"]["params"] for d in deployed.values())


def test_the_installed_models_load_in_optimum_and_edge_sdk_infer_answers(demo: tuple[Path, str]) -> None:
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    folder, _ = demo
    texts = sst2_dev()[0][:8]
    for name in CLASSES:
        served = folder / "models" / name
        ort_model = ORTModelForSequenceClassification.from_pretrained(served, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(served, local_files_only=True)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        expected = load(served, prefer_quantized=False).logits(texts)
        np.testing.assert_allclose(ort_model(**batch).logits.detach().numpy(), expected, atol=1e-4)

    small = folder / "models" / CLASSES[0]
    infer = subprocess.run(
        [sys.executable, "-m", "edge_sdk.cli", "infer", "--model", str(small), "--json", REVIEW],
        check=False,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    (result,) = json.loads(infer.stdout)["results"]
    assert result["text"] == REVIEW and result["label"] in ("negative", "positive")
    (prediction,) = load(small).predict([REVIEW])
    assert (result["label"], round(result["score"], 4)) == (prediction.label, round(prediction.score, 4))


def test_the_demo_says_a_collapse_once_on_its_progress_line() -> None:
    """The engine's collapse warning is dropped from the demo's log output (the round's line says it);
    every other warning is still printed."""
    import logging

    from coordinator.demo import _shown_by_progress

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    assert not _shown_by_progress(record("coordinator.federation._engine", "round 1: the global model COLLAPSED: x"))
    assert _shown_by_progress(record("coordinator.federation._engine", "round 1: device pi lost its round"))
    assert _shown_by_progress(record("coordinator.serve._run", "COLLAPSED"))
