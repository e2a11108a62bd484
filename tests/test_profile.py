"""Device profile detection and the memory budget.

The device's boundaries are faked where this machine cannot show them: ``root`` stands for ``/``
(cgroup, device-tree and Jetson release files are written under a temporary directory), ``system``
is a psutil-like object and ``torch_module`` a torch-like one. No Jetson or CUDA device exists on
this machine: the integrated-GPU tests fake torch's CUDA API at that boundary and say so.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from edge_sdk import ConfigError, ProfileError
from edge_sdk.device._budget import compute_budget
from edge_sdk.device._cgroup import read_cgroup_memory
from edge_sdk.device._classes import load_device_class
from edge_sdk.device._probe import ComputeProbe, measure_matmul, measure_step
from edge_sdk.device._profile import (
    PROFILE_VERSION,
    Accelerator,
    Battery,
    DeviceProfile,
    Temperature,
    detect_profile,
)
from edge_sdk.scaling._budget import DEFAULT_MARGIN_MIN, MemoryBudget, budget_for_device_class, default_margin

MiB = 1024**2
GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent


class FakePsutil:
    """The psutil functions detect_profile uses, with fixed answers; sensors are added per test."""

    def __init__(
        self,
        total: int = 8 * GiB,
        available: int = 6 * GiB,
        rss: int = 300 * MiB,
        logical: int | None = 4,
        physical: int | None = 4,
    ) -> None:
        self._memory = SimpleNamespace(total=total, available=available)
        self._rss = rss
        self._cores = {True: logical, False: physical}

    def virtual_memory(self) -> Any:
        return self._memory

    def cpu_count(self, logical: bool = True) -> int | None:
        return self._cores[logical]

    def Process(self) -> Any:
        return SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=self._rss))


def fake_root(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return tmp_path


def detect(root: Path, system: Any, torch_module: Any = None) -> DeviceProfile:
    return detect_profile(root=root, system=system, torch_module=torch_module, runtime_modules=(), probe=False)


# --- every optional sensor missing ----------------------------------------------------------------


def test_every_optional_sensor_missing(tmp_path: Path) -> None:
    # No cpu_freq / sensors_temperatures / sensors_battery attributes at all (as on platforms where
    # psutil lacks them), cpu_count answering None, an empty root (no cgroup, device tree, Jetson
    # file) and no torch.
    system = FakePsutil(logical=None, physical=None)
    profile = detect(tmp_path, system)
    assert profile.cpu_freq_mhz is None and profile.cpu_freq_max_mhz is None
    assert profile.temperatures == ()
    assert profile.battery is None
    assert profile.cpu_logical_cores == 1  # at least one core is running this code
    assert profile.cpu_physical_cores is None
    assert profile.cgroup_limit is None and profile.cgroup_available is None
    assert profile.device_model is None and profile.is_jetson is False
    assert profile.torch_version is None and profile.accelerator is None
    assert profile.compute is None
    assert profile.memory_total == 8 * GiB and profile.memory_available == 6 * GiB
    assert profile.runtime_rss == 300 * MiB
    # and such a profile still travels: JSON and back
    assert DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    budget = compute_budget(profile)
    assert budget.source == "detected" and budget.pool == "system"
    assert budget.usable > 0


def test_sensors_that_exist_but_fail_or_answer_nothing(tmp_path: Path) -> None:
    system = FakePsutil()

    def raise_not_implemented() -> Any:
        raise NotImplementedError("no sensors here")

    def raise_oserror() -> Any:
        raise FileNotFoundError("/sys/class/power_supply")

    system.cpu_freq = lambda: None  # type: ignore[attr-defined]  # psutil does this on some ARM boards
    system.sensors_temperatures = raise_not_implemented  # type: ignore[attr-defined]
    system.sensors_battery = raise_oserror  # type: ignore[attr-defined]
    profile = detect(tmp_path, system)
    assert (profile.cpu_freq_mhz, profile.temperatures, profile.battery) == (None, (), None)

    system.cpu_freq = lambda: SimpleNamespace(current=0.0, min=0.0, max=0.0)  # type: ignore[attr-defined]
    system.sensors_temperatures = lambda: {"cpu_thermal": [SimpleNamespace(label="", current=None)]}  # type: ignore[attr-defined]
    system.sensors_battery = lambda: None  # type: ignore[attr-defined]  # psutil: no battery
    profile = detect(tmp_path, system)
    assert (profile.cpu_freq_mhz, profile.cpu_freq_max_mhz, profile.temperatures, profile.battery) == (
        None,
        None,
        (),
        None,
    )


def test_sensors_present(tmp_path: Path) -> None:
    system = FakePsutil()
    system.cpu_freq = lambda: SimpleNamespace(current=1500.0, min=600.0, max=1800.0)  # type: ignore[attr-defined]
    system.sensors_temperatures = lambda: {  # type: ignore[attr-defined]
        "cpu_thermal": [SimpleNamespace(label="", current=52.5, high=None, critical=None)],
        "soc": [SimpleNamespace(label="gpu", current=48.0), SimpleNamespace(label="x", current=float("nan"))],
    }
    system.sensors_battery = lambda: SimpleNamespace(percent=87.0, secsleft=-2, power_plugged=True)  # type: ignore[attr-defined]
    profile = detect(tmp_path, system)
    assert profile.cpu_freq_mhz == 1500.0 and profile.cpu_freq_max_mhz == 1800.0
    assert profile.temperatures == (Temperature("cpu_thermal/0", 52.5), Temperature("soc/gpu", 48.0))
    assert profile.battery == Battery(percent=87.0, plugged=True, seconds_left=None)  # -2: unlimited


def test_missing_memory_reading_is_an_error(tmp_path: Path) -> None:
    system = FakePsutil()
    system.virtual_memory = lambda: None  # type: ignore[method-assign]
    with pytest.raises(ProfileError):
        detect(tmp_path, system)


# --- cgroup limits ----------------------------------------------------------------------------------


def test_cgroup_v2_limit_caps_the_budget(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/memory.max": f"{2 * GiB}\n",
            "sys/fs/cgroup/memory.current": f"{768 * MiB}\n",
            "sys/fs/cgroup/memory.stat": f"anon 600000000\ninactive_file {256 * MiB}\nactive_file 1000\n",
        },
    )
    assert read_cgroup_memory(root) == (2 * GiB, 2 * GiB - 768 * MiB + 256 * MiB)
    profile = detect(root, FakePsutil(total=16 * GiB, available=12 * GiB, rss=300 * MiB))
    assert profile.cgroup_limit == 2 * GiB
    budget = compute_budget(profile)
    # ceiling: the cgroup's headroom plus what this process already holds, far below 12 GiB available
    assert budget.ceiling == (2 * GiB - 768 * MiB + 256 * MiB) + 300 * MiB
    assert budget.cgroup_limit == 2 * GiB
    assert budget.margin == default_margin(budget.ceiling)
    assert budget.usable == budget.ceiling - budget.margin - 300 * MiB
    assert budget.usable < 2 * GiB


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "1000\n"},
    )
    assert read_cgroup_memory(root) == (None, None)
    profile = detect(root, FakePsutil(available=6 * GiB, rss=300 * MiB))
    assert compute_budget(profile).ceiling == 6 * GiB + 300 * MiB


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "5:devices:/\n4:memory:/\n0::/\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{GiB}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{400 * MiB}\n",
            "sys/fs/cgroup/memory/memory.stat": (
                f"cache 5\ninactive_file {10 * MiB}\ntotal_inactive_file {50 * MiB}\n"
            ),
        },
    )
    assert read_cgroup_memory(root) == (GiB, GiB - 400 * MiB + 50 * MiB)


def test_cgroup_v1_unlimited_value(tmp_path: Path) -> None:
    # What this machine's own cgroup v1 files hold when no limit is set.
    root = fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "4:memory:/jobs/abc\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/jobs/abc/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/jobs/abc/memory.usage_in_bytes": "123\n",
        },
    )
    assert read_cgroup_memory(root) == (None, None)


def test_cgroup_limit_on_an_ancestor_and_tightest_level_wins(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "0::/outer/inner\n",
            "sys/fs/cgroup/outer/memory.max": f"{3 * GiB}\n",
            "sys/fs/cgroup/outer/memory.current": f"{2 * GiB}\n",  # siblings use most of it
            "sys/fs/cgroup/outer/inner/memory.max": f"{2 * GiB}\n",
            "sys/fs/cgroup/outer/inner/memory.current": f"{512 * MiB}\n",
        },
    )
    # inner: 2 GiB limit, 1.5 GiB headroom; outer: 3 GiB limit, only 1 GiB headroom -> outer binds
    assert read_cgroup_memory(root) == (3 * GiB, GiB)


def test_cgroup_limit_without_readable_usage_caps_at_the_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {
            "proc/self/cgroup": "0::/\n",
            "sys/fs/cgroup/memory.max": f"{GiB}\n",
            "sys/fs/cgroup/memory.current": "garbage\n",
        },
    )
    assert read_cgroup_memory(root) == (GiB, None)
    budget = compute_budget(detect(root, FakePsutil(available=6 * GiB, rss=200 * MiB)))
    assert budget.ceiling == GiB
    assert budget.usable == GiB - DEFAULT_MARGIN_MIN - 200 * MiB


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert read_cgroup_memory(tmp_path) == (None, None)
    root = fake_root(tmp_path, {"proc/self/cgroup": "garbage line\n0::/missing/path\n"})
    assert read_cgroup_memory(root) == (None, None)


# --- accelerators (faked: this machine has no GPU) --------------------------------------------------


class FakeCuda:
    """torch.cuda's API as detect_profile uses it; records whether free memory was asked for."""

    def __init__(self, *, integrated: bool, total: int, free: int) -> None:
        self.integrated, self.total, self.free = integrated, total, free
        self.free_memory_asked = False

    def is_available(self) -> bool:
        return True

    def get_device_properties(self, index: int) -> Any:
        return SimpleNamespace(
            name="Orin (nvgpu)" if self.integrated else "NVIDIA RTX A2000",
            total_memory=self.total,
            is_integrated=self.integrated,
        )

    def mem_get_info(self, index: int = 0) -> tuple[int, int]:
        self.free_memory_asked = True
        return self.free, self.total


def test_jetson_integrated_gpu_budget_comes_from_system_memory(tmp_path: Path) -> None:
    # Faked at the boundary: no Jetson exists here. The files a JetPack image has, and a torch whose
    # CUDA device reports itself integrated; its free-memory call would answer 7 GiB.
    root = fake_root(
        tmp_path,
        {
            "etc/nv_tegra_release": "# R36 (release), REVISION: 4.0\n",
            "proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00",
        },
    )
    cuda = FakeCuda(integrated=True, total=7 * GiB + 400 * MiB, free=7 * GiB)
    torch = SimpleNamespace(__version__="2.5.0a0+nv24.08", cuda=cuda)
    system = FakePsutil(total=7 * GiB + 400 * MiB, available=5 * GiB, rss=900 * MiB)
    profile = detect(root, system, torch)
    assert profile.is_jetson and profile.device_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert profile.accelerator == Accelerator(
        kind="cuda",
        name="Orin (nvgpu)",
        total_memory=7 * GiB + 400 * MiB,
        free_memory=None,
        unified_memory=True,
    )
    assert cuda.free_memory_asked is False
    assert profile.training_device == "cuda"
    budget = compute_budget(profile)
    assert budget.pool == "unified"
    assert budget.available == 5 * GiB  # system memory, not the GPU's 7 GiB "free"
    assert budget.ceiling == 5 * GiB + 900 * MiB
    assert budget.usable == budget.ceiling - budget.margin - 900 * MiB


def test_jetson_recognised_from_device_tree_alone(tmp_path: Path) -> None:
    # Faked Jetson again: only the device-tree model, and a GPU that does not flag itself integrated.
    root = fake_root(tmp_path, {"proc/device-tree/model": b"NVIDIA Jetson Nano Developer Kit\x00"})
    cuda = FakeCuda(integrated=False, total=4 * GiB, free=3 * GiB)
    torch = SimpleNamespace(__version__="1.10", cuda=cuda)
    profile = detect(root, FakePsutil(total=4 * GiB, available=3 * GiB), torch)
    assert profile.is_jetson
    assert profile.accelerator is not None and profile.accelerator.unified_memory
    assert not cuda.free_memory_asked
    assert compute_budget(profile).pool == "unified"


def test_integrated_gpu_flag_alone_means_unified(tmp_path: Path) -> None:
    cuda = FakeCuda(integrated=True, total=16 * GiB, free=10 * GiB)
    profile = detect(tmp_path, FakePsutil(), SimpleNamespace(__version__="2.4", cuda=cuda))
    assert not profile.is_jetson and profile.accelerator is not None and profile.accelerator.unified_memory
    assert not cuda.free_memory_asked


def test_discrete_gpu_budget_comes_from_its_free_memory(tmp_path: Path) -> None:
    cuda = FakeCuda(integrated=False, total=12 * GiB, free=11 * GiB)
    profile = detect(tmp_path, FakePsutil(available=30 * GiB), SimpleNamespace(__version__="2.4", cuda=cuda))
    assert profile.accelerator is not None and profile.accelerator.free_memory == 11 * GiB
    budget = compute_budget(profile)
    assert (budget.pool, budget.total, budget.available) == ("cuda", 12 * GiB, 11 * GiB)
    assert budget.runtime_footprint == 0  # the runtime lives in host RAM, not on the GPU
    assert budget.usable == 11 * GiB - default_margin(11 * GiB)


def test_torch_without_cuda(tmp_path: Path) -> None:
    torch = SimpleNamespace(__version__="2.13.0+cpu", cuda=SimpleNamespace(is_available=lambda: False))
    profile = detect(tmp_path, FakePsutil(), torch)
    assert profile.torch_version == "2.13.0+cpu" and profile.accelerator is None
    assert profile.training_device == "cpu"


# --- the real machine, probes, serialisation --------------------------------------------------------


def test_detect_this_machine() -> None:
    profile = detect_profile(runtime_modules=("torch",), probe_seconds=0.2)
    vm = psutil.virtual_memory()
    assert profile.memory_total == vm.total
    assert 0 < profile.memory_available <= profile.memory_total
    assert profile.runtime_modules == ("torch",)
    assert profile.runtime_rss > 50 * MiB  # torch alone is well over this
    assert profile.cpu_logical_cores == psutil.cpu_count()
    assert profile.torch_version is not None
    assert profile.compute is not None and profile.compute.backend == "torch"
    assert profile.compute.gflops > 0.1 and profile.compute.seconds >= 0.2
    assert DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict(), allow_nan=False))) == profile
    budget = compute_budget(profile)
    assert 0 < budget.usable < profile.memory_total


def test_probes() -> None:
    numpy_probe = measure_matmul(0.05, size=128, backend="numpy")
    assert numpy_probe is not None and numpy_probe.backend == "numpy" and numpy_probe.iterations >= 3
    torch_probe = measure_matmul(0.05, size=128)
    assert torch_probe is not None and torch_probe.backend == "torch" and torch_probe.gflops > 0
    expected = 2 * 128**3 * numpy_probe.iterations / numpy_probe.seconds / 1e9
    assert numpy_probe.gflops == pytest.approx(expected)
    step = measure_step(steps=1)
    assert step is not None and 0 < step < 30
    with pytest.raises(ValueError):
        measure_matmul(0)


def test_detect_without_torch_uses_numpy(tmp_path: Path) -> None:
    profile = detect_profile(
        root=tmp_path, system=FakePsutil(), torch_module=None, runtime_modules=(), probe_seconds=0.05, probe_step=True
    )
    assert profile.compute is not None and profile.compute.backend == "numpy"
    assert profile.compute.step_seconds is None  # the step probe needs torch


def test_edge_sdk_imports_and_profiles_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import edge_sdk, edge_sdk.cli._profile\n"
        "from edge_sdk.device._profile import detect_profile\n"
        "from edge_sdk.device._budget import compute_budget\n"
        "p = detect_profile(runtime_modules=('torch', 'json'), probe_seconds=0.05)\n"
        "assert p.torch_version is None and p.accelerator is None, p\n"
        "assert p.compute.backend == 'numpy' and p.runtime_modules == ('json',), p\n"
        "print(compute_budget(p).usable > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_importing_the_profile_modules_does_not_import_torch() -> None:
    code = (
        "import sys, edge_sdk.device._profile, edge_sdk.device._budget, edge_sdk.cli._profile\n"
        "import edge_sdk.device._probe\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def full_profile() -> DeviceProfile:
    return DeviceProfile(
        version=PROFILE_VERSION,
        system="Linux",
        machine="aarch64",
        device_model="Raspberry Pi 4 Model B Rev 1.4",
        is_jetson=False,
        python_version="3.11.2",
        torch_version="2.4.1",
        memory_total=4 * GiB,
        memory_available=3 * GiB,
        cgroup_limit=None,
        cgroup_available=None,
        runtime_rss=280 * MiB,
        runtime_modules=("torch", "transformers"),
        cpu_logical_cores=4,
        cpu_physical_cores=4,
        cpu_freq_mhz=1800.0,
        cpu_freq_max_mhz=1800.0,
        temperatures=(Temperature("cpu_thermal/0", 51.1),),
        battery=Battery(percent=50.0, plugged=False, seconds_left=3600),
        accelerator=Accelerator("cuda", "gpu", 4 * GiB, None, True),
        compute=ComputeProbe("torch", "cpu", "float32", 512, 12, 1.01, 3.19, step_seconds=0.25),
    )


def test_profile_round_trips_through_json() -> None:
    profile = full_profile()
    data = json.loads(json.dumps(profile.to_dict(), allow_nan=False))
    assert data["version"] == PROFILE_VERSION
    assert data["temperatures"] == [{"sensor": "cpu_thermal/0", "celsius": 51.1}]
    assert DeviceProfile.from_dict(data) == profile
    with pytest.raises(AttributeError):
        profile.memory_total = 1  # type: ignore[misc]  # frozen


def test_from_dict_reports_every_problem_together() -> None:
    data = full_profile().to_dict()
    del data["memory_total"]
    data["surprise"] = 1
    data["version"] = 2
    data["cpu_logical_cores"] = "four"
    data["is_jetson"] = 1  # an int is not a bool
    data["runtime_rss"] = -5
    data["temperatures"][0]["celsius"] = float("nan")
    data["battery"]["percent"] = 150.0
    data["compute"]["backend"] = "cuda-magic"
    data["accelerator"] = "yes"
    with pytest.raises(ProfileError) as info:
        DeviceProfile.from_dict(data)
    problems = info.value.problems
    expected = [
        "profile.memory_total: missing",
        "profile.surprise: unknown field",
        "profile.version: 2 is not one of 1",
        "profile.cpu_logical_cores: expected int",
        "profile.is_jetson: expected bool",
        "profile.runtime_rss: -5 is below 0",
        "profile.temperatures[0].celsius: must be a finite number",
        "profile.battery.percent: 150.0 is above 100",
        "profile.compute.backend: 'cuda-magic' is not one of",
        "profile.accelerator: expected an object",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert len(problems) == len(expected)
    assert all(p in str(info.value) for p in problems)


def test_from_dict_rejects_non_objects_and_nulls() -> None:
    with pytest.raises(ProfileError, match="expected an object"):
        DeviceProfile.from_dict([1, 2])
    data = full_profile().to_dict()
    data["system"] = None
    data["temperatures"] = "hot"
    with pytest.raises(ProfileError) as info:
        DeviceProfile.from_dict(data)
    assert set(info.value.problems) == {
        "profile.system: expected str, got NoneType None",
        "profile.temperatures: expected a list, got str",
    }


# --- budgets ----------------------------------------------------------------------------------------


def test_default_margin() -> None:
    assert default_margin(0) == DEFAULT_MARGIN_MIN
    assert default_margin(GiB) == DEFAULT_MARGIN_MIN  # 10 % of 1 GiB is under the floor
    assert default_margin(10 * GiB) == GiB


def test_detected_budget_arithmetic(tmp_path: Path) -> None:
    profile = detect(tmp_path, FakePsutil(total=8 * GiB, available=6 * GiB, rss=400 * MiB))
    budget = compute_budget(profile)
    ceiling = 6 * GiB + 400 * MiB
    margin = int(ceiling * 0.1)
    assert budget == MemoryBudget(
        total=8 * GiB,
        available=6 * GiB,
        cgroup_limit=None,
        runtime_footprint=400 * MiB,
        ceiling=ceiling,
        margin=margin,
        usable=ceiling - margin - 400 * MiB,
        source="detected",
        pool="system",
    )
    explicit = compute_budget(profile, margin=100 * MiB)
    assert explicit.margin == 100 * MiB and explicit.usable == 6 * GiB - 100 * MiB
    with pytest.raises(ConfigError):
        compute_budget(profile, margin=-1)
    assert json.loads(json.dumps(budget.to_dict()))["usable"] == budget.usable


def test_override_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    profile = detect(tmp_path, FakePsutil(total=4 * GiB, available=2 * GiB, rss=300 * MiB))
    budget = compute_budget(profile, override="1.5GB")
    assert (budget.usable, budget.source, budget.margin) == (1_500_000_000, "override", 0)
    assert compute_budget(profile, override=123456).usable == 123456
    with caplog.at_level(logging.WARNING, logger="edge_sdk.device._budget"):
        big = compute_budget(profile, override="3GiB")
    assert big.usable == 3 * GiB
    assert "exceeds" in caplog.text
    for bad in ("0", 0, -5, "lots", "2G"):
        with pytest.raises(ConfigError):
            compute_budget(profile, override=bad)
    with pytest.raises(ConfigError, match="not both"):
        compute_budget(profile, override="1GB", named_profile="raspberry-pi-4-4gb")


def test_named_profile_budget(tmp_path: Path) -> None:
    profile = detect(tmp_path, FakePsutil(total=64 * GiB, available=60 * GiB, rss=350 * MiB))
    budget = compute_budget(profile, named_profile="raspberry-pi-4-4gb")
    pi = load_device_class("raspberry-pi-4-4gb")
    assert budget.source == "profile:raspberry-pi-4-4gb" and budget.pool == "system"
    assert budget.total == 4 * GiB
    assert budget.available == budget.ceiling == int(4 * GiB * pi.usable_fraction)
    assert budget.runtime_footprint == 350 * MiB
    assert budget.usable == budget.ceiling - default_margin(budget.ceiling) - 350 * MiB
    assert compute_budget(profile, named_profile=pi) == budget
    jetson = compute_budget(profile, named_profile="jetson-orin-nano-8gb")
    assert jetson.pool == "unified" and jetson.total == 8 * GiB
    with pytest.raises(ConfigError, match="unknown device class"):
        compute_budget(profile, named_profile="raspberry-pi-9")


def test_budget_never_negative(caplog: pytest.LogCaptureFixture) -> None:
    pi2 = load_device_class("raspberry-pi-4-2gb")
    with caplog.at_level(logging.WARNING, logger="edge_sdk.device._budget"):
        budget = budget_for_device_class(pi2, runtime_footprint=3 * GiB)
    assert budget.usable == 0
    assert "no memory left" in caplog.text
    with pytest.raises(ConfigError):
        budget_for_device_class(pi2, runtime_footprint=-1)
