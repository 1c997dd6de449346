"""What can measure energy on this host, what cannot, and why.

Three kinds of source, in the order they are preferred:
- NVIDIA GPUs through NVML (``pynvml`` from nvidia-ml-py);
- CPU packages and DRAM through the Linux powercap (RAPL) tree;
- an estimate, where no sensor exists, always labelled as such.

Every probe takes its environment as a parameter (the powercap root, the NVML module)
so tests run it against fakes: a powercap tree in a temporary folder, an object that
raises the real ``pynvml.NVMLError_*`` classes.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

POWERCAP_ROOT = Path("/sys/class/powercap")
RAPL_PREFIXES = ("intel-rapl", "intel-rapl-mmio", "intel-rapl-tpmi", "amd-rapl")


@dataclass(frozen=True)
class SensorStatus:
    """One energy source and whether it can be used here.

    ``status`` is ``measured`` (a working sensor), ``estimated`` (no sensor; a labelled
    model stands in) or ``missing``; ``detail`` says what was found or why not; ``fix``
    says what a person can do about it, when anything.
    """

    source: str
    device: str
    status: str
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def discover_sensors(powercap_root: Path = POWERCAP_ROOT, nvml: ModuleType | None | str = "import",
                     read_text: Callable[[Path], str] | None = None) -> list[SensorStatus]:
    """Every energy source found or missing on this host, with reasons.

    ``nvml`` is the pynvml module to use (``"import"`` imports the real one, ``None``
    means it is not installed); ``read_text`` reads sysfs files (tests inject errors).
    """
    read_text = read_text or (lambda p: p.read_text())
    found = probe_nvml(_import_pynvml() if nvml == "import" else nvml)
    found += probe_rapl(powercap_root, read_text)
    if not any(s.status == "measured" and s.source.startswith("rapl") for s in found):
        found.append(SensorStatus(
            source="estimate", device="cpu", status="estimated",
            detail=f"CPU energy is estimated from the CPU time of the measured process (CPU: {cpu_model_name()})",
            fix="Run on a host whose kernel exposes RAPL (/sys/class/powercap/intel-rapl*) for measured CPU energy.",
        ))
    return found


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    return pynvml


def nvml_error_message(nvml: ModuleType, exc: Exception) -> tuple[str, str | None]:
    """A sentence for an NVML error and what to do about it."""
    def is_a(name: str) -> bool:
        cls = getattr(nvml, name, None)
        return isinstance(cls, type) and isinstance(exc, cls)

    if is_a("NVMLError_LibraryNotFound"):
        return ("the NVIDIA driver library (libnvidia-ml.so) is not installed: no NVIDIA GPU driver on this host",
                "Install the NVIDIA driver if this host has an NVIDIA GPU.")
    if is_a("NVMLError_DriverNotLoaded"):
        return ("the NVIDIA driver is installed but not loaded", "Load the driver (e.g. `sudo modprobe nvidia`) or reboot.")
    if is_a("NVMLError_NoPermission"):
        return ("NVML refused access (no permission)", "Run as a user allowed to use the GPU (e.g. in the video group).")
    if is_a("NVMLError_NotSupported"):
        return ("this GPU or driver does not support the query", None)
    if is_a("NVMLError_GpuIsLost"):
        return ("the GPU has fallen off the bus (GPU is lost)", "Check the GPU and reboot the host.")
    return (f"NVML failed: {exc}", None)


def probe_nvml(nvml: ModuleType | None) -> list[SensorStatus]:
    """NVIDIA GPUs: the cumulative energy counter where supported, else sampled power."""
    if nvml is None:
        return [SensorStatus("nvml", "gpu", "missing", "nvidia-ml-py (pynvml) is not installed",
                             "pip install nvidia-ml-py")]
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        detail, fix = nvml_error_message(nvml, exc)
        return [SensorStatus("nvml", "gpu", "missing", detail, fix)]
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return [SensorStatus("nvml", "gpu", "missing", "NVML found no NVIDIA GPU", None)]
        statuses = []
        for index in range(count):
            statuses.append(_probe_nvml_device(nvml, index))
        return statuses
    except nvml.NVMLError as exc:
        detail, fix = nvml_error_message(nvml, exc)
        return [SensorStatus("nvml", "gpu", "missing", detail, fix)]
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _probe_nvml_device(nvml: ModuleType, index: int) -> SensorStatus:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    device = f"cuda:{index}"
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return SensorStatus("nvml-counter", device, "measured",
                            f"{name} ({uuid}): cumulative energy counter (mJ)")
    except nvml.NVMLError_NotSupported:
        pass
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
        return SensorStatus("nvml-power", device, "measured",
                            f"{name} ({uuid}): no energy counter on this GPU; power is sampled and integrated")
    except nvml.NVMLError as exc:
        detail, fix = nvml_error_message(nvml, exc)
        return SensorStatus("nvml", device, "missing", f"{name} ({uuid}): {detail}", fix)


def probe_rapl(powercap_root: Path, read_text: Callable[[Path], str]) -> list[SensorStatus]:
    """CPU package and DRAM zones of the powercap tree (psys is listed, never summed)."""
    if not powercap_root.exists():
        return [SensorStatus("rapl", "cpu", "missing",
                             f"{powercap_root} does not exist: this kernel exposes no RAPL energy counters "
                             "(typical of virtual machines and non-x86 CPUs)",
                             "Run on bare metal with the intel_rapl_common (Intel) or amd_energy/RAPL support (AMD Zen) kernel driver.")]
    zones = sorted(p for p in powercap_root.iterdir()
                   if p.name.split(":")[0] in RAPL_PREFIXES and p.name.count(":") >= 1)
    if not zones:
        return [SensorStatus("rapl", "cpu", "missing", f"{powercap_root} has no RAPL zones", None)]
    statuses = []
    for zone in zones:
        try:
            name = read_text(zone / "name").strip()
        except OSError:
            name = zone.name
        kind = "rapl-dram" if name == "dram" else "rapl-psys" if name == "psys" else (
            "rapl-package" if name.startswith("package") else f"rapl-{name}")
        try:
            int(read_text(zone / "energy_uj").strip())
        except PermissionError:
            statuses.append(SensorStatus(kind, f"cpu ({zone.name})", "missing",
                                         f"{zone / 'energy_uj'} is readable by root only (Linux 5.10 and newer)",
                                         f"Run `sudo chmod o+r {zone}/energy_uj`, or add a udev rule that sets the mode "
                                         "of powercap energy_uj files at boot."))
            continue
        except (OSError, ValueError) as exc:
            statuses.append(SensorStatus(kind, f"cpu ({zone.name})", "missing", f"cannot read {zone / 'energy_uj'}: {exc}"))
            continue
        note = " (platform total; listed, never added to the package)" if kind == "rapl-psys" else ""
        statuses.append(SensorStatus(kind, f"cpu ({zone.name})", "measured", f"{name}: energy counter{note}"))
    return statuses


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def logical_cpu_count() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
