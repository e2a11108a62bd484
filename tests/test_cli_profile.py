"""``edge-sdk profile``: twice for real as a newcomer runs it (the installed script, a fresh process),
the other cases in this process through the same ``main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_sdk.cli._main import main
from edge_sdk.device._profile import DeviceProfile
from edge_sdk.scaling._budget import DEFAULT_MIN_MARGIN_BYTES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "edge-sdk"


def edge_sdk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "profile", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["profile", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def check_plans(plan: dict[str, Any], budget: dict[str, Any]) -> None:
    """The plan follows the coordinator's rule (edge_sdk.scaling._planning) and serves at least what it trains."""
    training, inference = plan["training"], plan["inference"]
    train_bytes = budget["usable"] - max(0, DEFAULT_MIN_MARGIN_BYTES - budget["margin"])
    assert training["budget_bytes"] == train_bytes
    assert training["predicted_peak_bytes"] <= train_bytes
    assert inference["budget_bytes"] == train_bytes + budget["runtime_footprint"]
    assert inference["predicted_peak_bytes"] <= inference["budget_bytes"]
    assert inference["params"] >= training["params"] > 0
    for t, i in zip(training["layers"], inference["layers"], strict=True):
        assert i["heads"] >= t["heads"] and i["ffn"] >= t["ffn"]


def test_table_on_this_machine_with_the_probe_and_a_model() -> None:
    out = edge_sdk("--model", "all-MiniLM-L6-v2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for heading in ("Device", "Memory budget"):
        assert heading in lines
    for row in (
        "system",
        "cpu",
        "temperatures",
        "battery",
        "accelerator",
        "compute",
        "total",
        "available",
        "cgroup limit",
        "runtime footprint",
        "safety margin",
        "usable",
    ):
        assert any(line.strip().startswith(row) for line in lines), row
    assert "GFLOPS float32 matmul (torch on cpu" in out.stdout
    assert "source             detected (system memory)" in out.stdout
    usable_line = next(line for line in lines if line.strip().startswith("usable"))
    usable = int(usable_line.split("(")[1].split(" bytes")[0])
    assert 0 < usable < psutil.virtual_memory().total
    assert any(line.startswith("Plan for all-MiniLM-L6-v2 (bert: 6 layers, 12 heads") for line in lines)
    summaries = [line.strip() for line in lines if "sub-network:" in line]
    assert [s.split(":")[0] for s in summaries] == ["training sub-network", "inference sub-network"]
    assert sum(1 for line in lines if line.strip().startswith(("0 ", "5 "))) == 4  # 6 layer rows per plan


def test_json_on_this_machine_with_a_model() -> None:
    out = edge_sdk("--json", "--no-probe", "--model", "all-MiniLM-L6-v2")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout is pure JSON: logs go to stderr
    assert set(report) == {"profile", "budget", "device_class", "plan"}
    profile = DeviceProfile.from_dict(report["profile"])
    assert profile.compute is None  # --no-probe
    assert profile.memory_total == psutil.virtual_memory().total
    assert "torch" in profile.runtime_modules and profile.runtime_rss > 0
    budget = report["budget"]
    assert budget["source"] == "detected" and budget["pool"] == "system"
    assert budget["usable"] == budget["ceiling"] - budget["margin"] - budget["runtime_footprint"]
    assert 0 < budget["usable"] < budget["total"]
    assert report["device_class"] is None
    check_plans(report["plan"], budget)
    assert report["plan"]["training_workload"] == {"batch": 8, "seq": 64}


def test_json_without_a_model_has_no_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(capsys, "--json", "--no-probe")
    assert code == 0
    report = json.loads(out)
    assert report["plan"] is None and report["budget"]["source"] == "detected"


def test_a_small_budget_trains_less_than_it_serves(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(
        capsys,
        "--json",
        "--no-probe",
        "--memory-budget",
        "900MB",
        "--model",
        "all-MiniLM-L6-v2",
        "--batch",
        "16",
        "--seq",
        "128",
        "--no-levers",  # plain training: the width binds
    )
    assert code == 0
    report = json.loads(out)
    budget, plan = report["budget"], report["plan"]
    assert (budget["usable"], budget["margin"]) == (900_000_000, 0)
    check_plans(plan, budget)
    assert plan["training"]["params_fraction"] < 1.0
    assert plan["inference"]["params"] > plan["training"]["params"]
    assert plan["training"]["predicted"]["activations"] > 0  # batch 16 x 128 taken into account


def test_levers_train_the_full_model_where_plain_training_would_cut_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(
        capsys,
        "--json",
        "--no-probe",
        "--memory-budget",
        "900MB",
        "--model",
        "all-MiniLM-L6-v2",
        "--batch",
        "16",
        "--seq",
        "128",
    )
    assert code == 0
    report = json.loads(out)
    plan = report["plan"]
    check_plans(plan, report["budget"])
    training = plan["training"]
    assert training["params_fraction"] == 1.0 and training["levers"] != {
        "micro_batches": 1,
        "checkpointing": False,
        "embeddings": "train",
        "lora_rank": 0,
        "attention": "eager",
    }
    assert training["plain_peak_bytes"] > training["budget_bytes"] >= training["predicted_peak_bytes"]
    assert plan["lever_policy"] is not None and plan["steps"] == 10
    code, out, _ = in_process(
        capsys,
        "--no-probe",
        "--memory-budget",
        "900MB",
        "--model",
        "all-MiniLM-L6-v2",
        "--batch",
        "16",
        "--seq",
        "128",
        "--forbid",
        "lora",
    )
    assert code == 0
    assert "levers: forbidden: lora" in out
    assert any(
        line.strip().startswith("levers: ") and "plain training of this sub-network needs" in line
        for line in out.splitlines()
    )


def test_memory_budget_override(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(capsys, "--json", "--no-probe", "--memory-budget", "1.5GB")
    assert code == 0
    budget = json.loads(out)["budget"]
    assert (budget["usable"], budget["source"]) == (1_500_000_000, "override")
    code, out, _ = in_process(capsys, "--no-probe", "--memory-budget", "512MiB")
    assert code == 0
    assert "512.00 MiB (536870912 bytes)" in out and "override" in out


def test_named_profile(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(capsys, "--json", "--no-probe", "--profile", "raspberry-pi-4-4gb")
    assert code == 0
    report = json.loads(out)
    assert report["budget"]["source"] == "profile:raspberry-pi-4-4gb"
    assert report["budget"]["total"] == 4 * 1024**3
    assert report["device_class"]["name"] == "raspberry-pi-4-4gb"
    code, out, _ = in_process(capsys, "--no-probe", "--profile", "jetson-orin-nano-8gb")
    assert code == 0
    assert "Device class" in out and "profile:jetson-orin-nano-8gb (unified memory)" in out


def test_bad_input_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = in_process(capsys, "--no-probe", "--memory-budget", "1.5 potatoes")
    assert code == 2 and "'1.5 potatoes'" in err
    code, _, err = in_process(capsys, "--no-probe", "--profile", "raspberry-pi-9")
    assert code == 2 and "raspberry-pi-4-4gb" in err
    code, _, err = in_process(capsys, "--memory-budget", "1GB", "--profile", "raspberry-pi-4-4gb")
    assert code == 2 and "not allowed with" in err
    code, _, err = in_process(capsys, "--no-probe", "--model", "/nonexistent/model")
    assert code == 2 and "'/nonexistent/model' is neither a folder nor a packaged model" in err
    code, _, err = in_process(capsys, "--no-probe", "--model", "all-MiniLM-L6-v2", "--min-margin", "lots")
    assert code == 2 and "'lots'" in err
    code, _, err = in_process(capsys, "--no-probe", "--memory-budget", "1MB", "--model", "all-MiniLM-L6-v2")
    assert code == 2 and "no sub-network fits" in err


def test_the_cli_drops_onnxruntime_info_on_the_root_logger() -> None:
    import logging

    from edge_sdk.cli._main import _quiet_third_party

    def record(level: int, name: str, path: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "msg", None, None)

    quantizer = "/site-packages/onnxruntime/quantization/onnx_quantizer.py"
    assert not _quiet_third_party(record(logging.INFO, "root", quantizer))
    assert _quiet_third_party(record(logging.WARNING, "root", quantizer))
    assert _quiet_third_party(record(logging.INFO, "edge_sdk.serving._install", "/edge_sdk/serving/_install.py"))
    assert _quiet_third_party(record(logging.INFO, "root", "/elsewhere/module.py"))
