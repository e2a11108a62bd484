"""``edge-sdk profile`` run for real, as a user would: ``python -m edge_sdk._cli profile ...``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from edge_sdk._profile import DeviceProfile

REPO = Path(__file__).resolve().parent.parent


def edge_sdk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_sdk._cli", "profile", *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_table_on_this_machine_with_the_probe() -> None:
    out = edge_sdk()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for heading in ("Device", "Memory budget"):
        assert heading in text.splitlines()
    for row in ("system", "cpu", "temperatures", "battery", "accelerator", "compute", "total", "available",
                "cgroup limit", "runtime footprint", "safety margin", "usable"):
        assert any(line.strip().startswith(row) for line in text.splitlines()), row
    assert "GFLOPS float32 matmul (torch on cpu" in text
    assert "source             detected (system memory)" in text
    usable_line = next(line for line in text.splitlines() if line.strip().startswith("usable"))
    usable = int(usable_line.split("(")[1].split(" bytes")[0])
    assert 0 < usable < psutil.virtual_memory().total


def test_json_on_this_machine() -> None:
    out = edge_sdk("--json", "--no-probe")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout is pure JSON: logs go to stderr
    assert set(report) == {"profile", "budget", "device_class"}
    profile = DeviceProfile.from_dict(report["profile"])
    assert profile.compute is None  # --no-probe
    assert profile.memory_total == psutil.virtual_memory().total
    assert "torch" in profile.runtime_modules and profile.runtime_rss > 0
    budget = report["budget"]
    assert budget["source"] == "detected" and budget["pool"] == "system"
    assert budget["usable"] == budget["ceiling"] - budget["margin"] - budget["runtime_footprint"]
    assert 0 < budget["usable"] < budget["total"]
    assert report["device_class"] is None


def test_memory_budget_override() -> None:
    out = edge_sdk("--json", "--no-probe", "--memory-budget", "1.5GB")
    assert out.returncode == 0, out.stderr
    budget = json.loads(out.stdout)["budget"]
    assert (budget["usable"], budget["source"]) == (1_500_000_000, "override")
    table = edge_sdk("--no-probe", "--memory-budget", "512MiB")
    assert table.returncode == 0, table.stderr
    assert "512.00 MiB (536870912 bytes)" in table.stdout and "override" in table.stdout


def test_named_profile() -> None:
    out = edge_sdk("--json", "--no-probe", "--profile", "raspberry-pi-4-4gb")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["budget"]["source"] == "profile:raspberry-pi-4-4gb"
    assert report["budget"]["total"] == 4 * 1024**3
    assert report["device_class"]["name"] == "raspberry-pi-4-4gb"
    table = edge_sdk("--no-probe", "--profile", "jetson-orin-nano-8gb")
    assert table.returncode == 0, table.stderr
    assert "Device class" in table.stdout and "profile:jetson-orin-nano-8gb (unified memory)" in table.stdout


def test_bad_input_fails_cleanly() -> None:
    bad_size = edge_sdk("--no-probe", "--memory-budget", "1.5 potatoes")
    assert bad_size.returncode == 2
    assert "'1.5 potatoes'" in bad_size.stderr and "Traceback" not in bad_size.stderr
    unknown = edge_sdk("--no-probe", "--profile", "raspberry-pi-9")
    assert unknown.returncode == 2 and "raspberry-pi-4-4gb" in unknown.stderr
    both = edge_sdk("--memory-budget", "1GB", "--profile", "raspberry-pi-4-4gb")
    assert both.returncode == 2 and "not allowed with" in both.stderr
