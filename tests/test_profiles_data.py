"""The shipped device classes (profiles/*.toml) and the validation of such files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomllib

from edge_sdk import ConfigError, ProfileError
from edge_sdk.device._classes import (
    DeviceClass,
    list_device_classes,
    load_device_class,
    parse_device_class,
    profiles_dir,
)

GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    # name: (GiB installed, CPU cores, CPU max MHz, accelerator)
    "raspberry-pi-4-2gb": (2, 4, 1800, "none"),
    "raspberry-pi-4-4gb": (4, 4, 1800, "none"),
    "raspberry-pi-4-8gb": (8, 4, 1800, "none"),
    "raspberry-pi-5-4gb": (4, 4, 2400, "none"),
    "raspberry-pi-5-8gb": (8, 4, 2400, "none"),
    "jetson-nano-4gb": (4, 4, 1430, "cuda"),
    "jetson-orin-nano-8gb": (8, 6, 1500, "cuda"),
    "jetson-agx-orin-32gb": (32, 8, 2200, "cuda"),
    "laptop-x86-16gb": (16, 10, 4400, "none"),
}

VALID = """\
schema_version = 1
name = "{name}"
display_name = "Test board"
sources = ["Vendor, Test board product brief: https://example.org/brief.pdf"]

[memory]
installed = "1GiB"
usable_fraction = 0.5
usable_fraction_basis = "half, for the test"

[cpu]
model = "test cpu"
cores = 2
max_mhz = 1000

[compute]
fp32_gflops = 8
processor = "cpu"
basis = "2 cores x 1 GHz x 4"

[network]
link = "Ethernet"
uplink_mbps = 10
uplink_basis = "assumed for the test"

[accelerator]
kind = "none"
unified_memory = false
"""


def test_the_repository_profiles_directory_is_found() -> None:
    assert profiles_dir() == REPO / "profiles"


def test_every_expected_class_ships_and_loads() -> None:
    classes = {c.name: c for c in list_device_classes()}
    assert set(EXPECTED) <= set(classes)
    for name, (gib, cores, mhz, accelerator) in EXPECTED.items():
        c = classes[name]
        assert c.path is not None and c.path.stem == name
        assert c.memory == gib * GiB, name
        assert (c.cpu_cores, c.cpu_max_mhz, c.accelerator) == (cores, mhz, accelerator), name
        assert c.unified_memory == (accelerator == "cuda"), name  # every Jetson shares its RAM
        assert c.compute_processor == ("gpu" if accelerator == "cuda" else "cpu"), name
        assert 0.5 < c.usable_fraction < 1 and c.available_bytes < c.memory
        assert c.uplink_mbps > 0 and c.compute_gflops > 0


def test_every_class_cites_sources_and_explains_its_estimates() -> None:
    for c in list_device_classes():
        assert c.sources, c.name
        assert all("https://" in s for s in c.sources), c.name
        for basis in (c.usable_fraction_basis, c.compute_basis, c.uplink_basis):
            assert "estimate" in basis, (c.name, basis)


def test_compute_estimates_follow_their_stated_formulas() -> None:
    gflops = {c.name: c.compute_gflops for c in list_device_classes()}
    # cores x GHz x FLOP/cycle (CPU) or CUDA cores x 2 x GHz (GPU), as each file's basis states
    assert gflops["raspberry-pi-4-4gb"] == pytest.approx(4 * 1.8 * 8)
    assert gflops["raspberry-pi-5-8gb"] == pytest.approx(4 * 2.4 * 16)
    assert gflops["jetson-nano-4gb"] == pytest.approx(128 * 2 * 0.9216, abs=0.05)
    assert gflops["jetson-orin-nano-8gb"] == pytest.approx(1024 * 2 * 0.625)
    assert gflops["jetson-agx-orin-32gb"] == pytest.approx(1792 * 2 * 0.930, abs=0.05)
    assert gflops["laptop-x86-16gb"] == pytest.approx(2 * 4.4 * 32 + 8 * 3.3 * 16)


def test_raspberry_pi_usable_fractions_follow_their_stated_allowance() -> None:
    for c in list_device_classes():
        if c.name.startswith("raspberry-pi-"):
            mib = c.memory / 2**20
            assert c.usable_fraction == math.floor((mib - 400 - 0.016 * mib) / mib * 100) / 100, c.name


def test_device_class_is_frozen_and_json_safe() -> None:
    c = load_device_class("jetson-nano-4gb")
    with pytest.raises(AttributeError):
        c.memory = 1  # type: ignore[misc]
    data = json.loads(json.dumps(c.to_dict()))
    assert data["name"] == "jetson-nano-4gb" and data["available_bytes"] == c.available_bytes


def test_load_by_path_and_by_name(tmp_path: Path) -> None:
    path = tmp_path / "test-board.toml"
    path.write_text(VALID.format(name="test-board"))
    by_path = load_device_class(str(path))
    assert by_path == load_device_class(path) == load_device_class("test-board", directory=tmp_path)
    assert by_path.memory == GiB and by_path.available_bytes == GiB // 2
    assert by_path.accelerator_name is None and by_path.notes is None


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_device_class("raspberry-pi-9")
    assert "raspberry-pi-4-4gb" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_device_class("/nonexistent/board.toml")


def test_bad_file_reports_every_problem_together(tmp_path: Path) -> None:
    path = tmp_path / "bad-board.toml"
    path.write_text("""\
schema_version = 2
name = "other-name"
display_name = ""
sources = ["a product brief without an address", 7]
colour = "blue"

[memory]
installed = "lots"
usable_fraction = 1.5
usable_fraction_basis = "because"

[compute]
fp32_gflops = -3
processor = "gpu"
basis = "guess"
clock = 5

[network]
link = "Ethernet"
uplink_mbps = "fast"
uplink_basis = "assumed"

[accelerator]
kind = "tpu"
unified_memory = "yes"
""")
    with pytest.raises(ProfileError) as info:
        load_device_class(path)
    problems = info.value.problems
    expected = [
        "schema_version 2 is not supported",
        "name 'other-name' differs from the file name 'bad-board.toml'",
        "display_name is empty",
        "sources[0] names no URL",
        "sources[1] must be a non-empty string",
        "unknown key 'colour'",
        "[memory] installed: malformed size 'lots'",
        "[memory] usable_fraction must be in (0, 1]",
        "missing table [cpu]",
        "[compute] fp32_gflops must be positive",
        "[compute] unknown key 'clock'",
        "[network] uplink_mbps must be float",
        "[accelerator] kind must be one of",
        "[accelerator] unified_memory must be bool",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected), problems
    assert str(path) in str(info.value)


def test_consistency_rules(tmp_path: Path) -> None:
    text = VALID.format(name="board").replace('processor = "cpu"', 'processor = "gpu"')
    text = text.replace("unified_memory = false", "unified_memory = true")
    text = text.replace("sources = [", "sources = [] #")

    with pytest.raises(ProfileError) as info:
        parse_device_class(tomllib.loads(text), stem="board")
    assert set(info.value.problems) == {
        "sources is empty: cite the vendor document (name and URL) for every figure",
        "[accelerator] unified_memory is true but kind is 'none'",
        "[compute] processor is 'gpu' but [accelerator] kind is 'none'",
    }
    cuda = VALID.format(name="board").replace('kind = "none"', 'kind = "cuda"')
    with pytest.raises(ProfileError, match="name is required when kind is 'cuda'"):
        parse_device_class(tomllib.loads(cuda), stem="board")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken\n[memory\n')
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_device_class(path)


def test_listing_reports_the_problems_of_every_bad_file(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(VALID.format(name="good"))
    (tmp_path / "one.toml").write_text(VALID.format(name="not-one"))
    (tmp_path / "two.toml").write_text(VALID.format(name="two").replace("cores = 2", 'cores = "2"'))
    with pytest.raises(ProfileError) as info:
        list_device_classes(tmp_path)
    assert info.value.problems == (
        "one.toml: name 'not-one' differs from the file name 'one.toml'",
        "two.toml: [cpu] cores must be int, got str '2'",
    )
    (tmp_path / "one.toml").unlink()
    (tmp_path / "two.toml").unlink()
    assert [c.name for c in list_device_classes(tmp_path)] == ["good"]


def test_profiles_dir_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.toml").write_text(VALID.format(name="mine"))
    monkeypatch.setenv("EDGE_FM_PROFILES", str(tmp_path))
    assert profiles_dir() == tmp_path
    assert isinstance(load_device_class("mine"), DeviceClass)
    monkeypatch.setenv("EDGE_FM_PROFILES", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory"):
        profiles_dir()
