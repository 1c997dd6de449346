"""Sensor discovery against fakes: a powercap tree in tmp_path and NVML raising its real errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from engine.energy.discovery import POWERCAP_ROOT, discover_sensors, probe_nvml, probe_rapl


def make_zone(root: Path, zone: str, name: str, energy_uj: int = 123456) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text("262143328850\n")
    return path


def read_text(path: Path) -> str:
    return path.read_text()


def test_rapl_zones_are_found_and_psys_is_not_package(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "dram")
    make_zone(tmp_path, "intel-rapl:1", "psys")
    (tmp_path / "intel-rapl").mkdir()  # the control type folder, not a zone
    statuses = probe_rapl(tmp_path, read_text)
    kinds = [s.source for s in statuses]
    assert kinds == ["rapl-package", "rapl-dram", "rapl-psys"]
    assert all(s.status == "measured" for s in statuses)
    assert "never added to the package" in statuses[2].detail


def test_root_only_energy_files_explain_the_fix(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")

    def deny(path: Path) -> str:  # tests run as root: inject the permission error through the reader
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    (status,) = probe_rapl(tmp_path, deny)
    assert status.status == "missing"
    assert "root only" in status.detail and "chmod" in status.fix and "udev" in status.fix


def test_missing_powercap_means_estimate(tmp_path: Path):
    statuses = discover_sensors(powercap_root=tmp_path / "absent", nvml=None)
    by_source = {s.source: s for s in statuses}
    assert by_source["rapl"].status == "missing" and "does not exist" in by_source["rapl"].detail
    assert by_source["nvml"].status == "missing"
    assert by_source["estimate"].status == "estimated"


def test_with_rapl_there_is_no_estimate(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    statuses = discover_sensors(powercap_root=tmp_path, nvml=None)
    assert "estimate" not in {s.source for s in statuses}


class FakeNvml:
    """Enough of pynvml for discovery; errors are the real pynvml exception classes."""

    def __getattr__(self, name: str):
        if name.startswith("NVMLError"):  # the real exception classes, as the real module has them
            return getattr(pynvml, name)
        raise AttributeError(name)

    def __init__(self, init_error: Exception | None = None, counter: bool = True):
        self.init_error, self.counter, self.shutdowns = init_error, counter, 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100"

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-0000-{handle.index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise pynvml.NVMLError_NotSupported()
        return 1_000_000

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000


def test_nvml_counter_and_power_fallback():
    counter = probe_nvml(FakeNvml())
    assert [(s.source, s.device) for s in counter] == [("nvml-counter", "cuda:0"), ("nvml-counter", "cuda:1")]
    assert "GPU-0000-1" in counter[1].detail
    sampled = probe_nvml(FakeNvml(counter=False))
    assert {s.source for s in sampled} == {"nvml-power"}


@pytest.mark.parametrize("error, fragment", [
    (pynvml.NVMLError_LibraryNotFound(), "libnvidia-ml.so"),
    (pynvml.NVMLError_DriverNotLoaded(), "not loaded"),
    (pynvml.NVMLError_NoPermission(), "no permission"),
])
def test_nvml_errors_become_sentences(error: Exception, fragment: str):
    (status,) = probe_nvml(FakeNvml(init_error=error))
    assert status.status == "missing" and fragment in status.detail


def test_this_host(tmp_path: Path):
    """On the real host: every status is one of the three, and a missing source says why."""
    statuses = discover_sensors()
    assert statuses
    for status in statuses:
        assert status.status in ("measured", "estimated", "missing")
        assert status.detail
    if not POWERCAP_ROOT.exists():
        assert any(s.source == "estimate" for s in statuses)


# -- what the listing says about each kind of host ---------------------------------------------------

def test_amd_host_says_dram_is_not_measured(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "core")
    statuses = probe_rapl(tmp_path, read_text)
    by_source = {s.source: s for s in statuses}
    assert by_source["rapl-package"].status == "measured" and by_source["rapl-package"].device == "cpu:package-0"
    assert "part of package-0" in by_source["rapl-core"].detail
    assert by_source["rapl-dram"].status == "missing" and "AMD" in by_source["rapl-dram"].detail


def test_mmio_duplicate_is_listed_as_counted_once(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "dram")
    statuses = probe_rapl(tmp_path, read_text)
    mmio = next(s for s in statuses if "intel-rapl-mmio:0" in s.detail)
    assert mmio.device == "intel-rapl-mmio:0" and "counted once" in mmio.detail


def test_unreadable_rapl_means_the_cpu_is_estimated(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")

    def deny(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    statuses = discover_sensors(powercap_root=tmp_path, nvml=None, read_text=deny, env={})
    estimate = next(s for s in statuses if s.source == "estimate")
    assert estimate.status == "estimated" and "W per logical CPU" in estimate.detail


def test_misconfigured_estimate_is_reported_not_raised(tmp_path: Path):
    statuses = discover_sensors(powercap_root=tmp_path / "absent", nvml=None, env={"PLANNER_CPU_TDP_W": "lots"})
    estimate = next(s for s in statuses if s.source == "estimate")
    assert estimate.status == "missing" and "PLANNER_CPU_TDP_W" in estimate.detail


def test_pascal_gpu_is_listed_with_sampled_power_and_cuda_names_follow_the_environment():
    from tests.test_energy_nvml import FakeNvml as ScriptedNvml, hopper, pascal

    statuses = probe_nvml(ScriptedNvml([pascal(), hopper()]), env={"CUDA_VISIBLE_DEVICES": "1"})
    assert [(s.source, s.device) for s in statuses] == [("nvml-power", "nvml:0 (hidden by CUDA_VISIBLE_DEVICES)"),
                                                         ("nvml-counter", "cuda:0")]
    assert "Pascal" in statuses[0].detail and "sampled every 50 ms" in statuses[0].detail
    assert "Hopper" in statuses[1].detail


def test_gpu_lost_while_probing_is_a_sentence():
    from tests.test_energy_nvml import FakeNvml as ScriptedNvml, volta

    gone = pynvml.NVMLError_GpuIsLost()
    gpu = volta(counter_mj=[gone], usage_mw=[gone])
    (status,) = probe_nvml(ScriptedNvml([gpu]), env={})
    assert status.status == "missing" and "fallen off the bus" in status.detail and status.fix
