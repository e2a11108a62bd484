"""``edge-sdk infer``: output, errors, and proof that the inference path runs without torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from edge_sdk.cli._main import main
from edge_sdk.serving._infer import load

from ._onnx_models import LONG_TEXT, REPO, export_tiny

# What the inference path imports, with its real import-time needs: onnxruntime's declared dependencies
# (flatbuffers, packaging, protobuf) and tokenizers' (huggingface-hub) are not imported by it.
RUNTIME = ("onnxruntime", "numpy", "tokenizers")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("cli") / "served", seed=5)


def test_table_has_label_score_and_latency_per_text(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--model", str(served), "a fine film", LONG_TEXT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# {served / 'model_quantized.onnx'}")
    rows = lines[1:]
    assert len(rows) == 2
    expected = load(served).predict(["a fine film", LONG_TEXT])
    for row, pred, text in zip(rows, expected, ["a fine film", LONG_TEXT], strict=True):
        label, score, latency, unit, rest = row.split(maxsplit=4)
        assert label == pred.label and float(score) == pytest.approx(pred.score, abs=1e-4)
        assert float(latency) > 0 and unit == "ms" and rest.startswith(text)
    assert rows[1].endswith("[truncated]") and not rows[0].endswith("[truncated]")


def test_json_output(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--model", str(served), "--threads", "1", "--fp32", "--json", "a fine film", LONG_TEXT]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == str(served / "model.onnx")
    assert (doc["threads"], doc["max_length"]) == (1, 32) and doc["load_ms"] > 0
    first, second = doc["results"]
    expected = load(served, prefer_quantized=False).predict(["a fine film"])[0]
    assert first["text"] == "a fine film" and first["label"] == expected.label
    assert first["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert sum(first["scores"].values()) == pytest.approx(1.0)
    assert first["latency_ms"] > 0 and first["n_tokens"] == 5
    assert (first["truncated"], second["truncated"], second["n_tokens"]) == (False, True, 32)


def test_texts_from_stdin(served: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a fine film\n\nwow\n"))
    assert main(["infer", "--model", str(served), "--json", "--max-length", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in doc["results"]] == ["a fine film", "wow"] and doc["max_length"] == 8


def test_errors_exit_2_with_a_message(
    tmp_path: Path, served: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["infer", "--model", str(tmp_path), "a fine film"]) == 2
    assert "holds no ONNX model" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["infer", "--model", str(served)]) == 2
    assert "no text to classify" in capsys.readouterr().err


def test_infer_never_imports_torch(served: Path) -> None:
    code = (
        "import sys\n"
        "from edge_sdk.cli._main import main\n"
        f"rc = main(['infer', '--model', {str(served)!r}, 'a fine film'])\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(loaded & {'torch', 'transformers', 'optimum', 'onnx'})\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc or bool(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_infer_in_a_venv_without_torch(tmp_path: Path, served: Path, pytestconfig: pytest.Config) -> None:
    """A fresh venv (no system site-packages) with only onnxruntime, numpy and tokenizers installed,
    ``--no-deps``, at the versions of this environment, from a local wheel cache; the repo on PYTHONPATH."""
    started = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    requirements = [f"{name}=={metadata.version(name)}" for name in RUNTIME]

    # Wheels come from $EDGE_FM_WHEELHOUSE, else a cache under .pytest_cache filled once by `pip download`
    # (pip's configured indexes and HTTP cache); installs are then offline (--no-index).
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider: download into tmp
    wheels = Path(
        os.environ.get("EDGE_FM_WHEELHOUSE")
        or (cache.mkdir("edge-fm-wheelhouse") if cache is not None else tmp_path / "wheels")
    )
    install = (
        "--python",
        str(python),
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--find-links",
        str(wheels),
        *requirements,
    )
    if _pip(*install).returncode != 0:
        fetched = _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels), *requirements)
        if fetched.returncode != 0:
            pytest.skip(f"no wheels for {requirements} and none downloadable: {fetched.stderr[-400:]}")
        done = _pip(*install)
        assert done.returncode == 0, done.stderr

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HOME": str(tmp_path),
    }
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([n for n in ('torch', 'transformers', 'onnx') if u.find_spec(n)])",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "[]"  # torch really is absent

    out = subprocess.run(
        [str(python), "-m", "edge_sdk.cli", "infer", "--model", str(served), "--json", "a fine film"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)["results"]
    expected = load(served).predict(["a fine film"])[0]
    assert result["label"] == expected.label
    assert result["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert time.perf_counter() - started < 120
