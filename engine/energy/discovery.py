"""What can measure energy on this host, what cannot, and why.

Three kinds of source, in the order they are preferred:
- NVIDIA GPUs through NVML (``pynvml`` from nvidia-ml-py), see :mod:`engine.energy.nvml`;
- CPU packages and DRAM through the Linux powercap (RAPL) tree, see :mod:`engine.energy.rapl`;
- an estimate, where no CPU sensor exists, always labelled as such, see
  :mod:`engine.energy.estimate`.

Every probe takes its environment as a parameter (the powercap root, the NVML module,
the file reader, the environment variables) so tests run it against fakes: a powercap
tree in a temporary folder, an object that raises the real ``pynvml.NVMLError_*``
classes, a reader that raises ``PermissionError``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from engine.energy.errors import SensorUnavailableError
from engine.energy.estimate import (TDP_ENV, WATTS_PER_CPU_ENV, CpuPowerModel, cpu_model_name, cpu_power_model,
                                    logical_cpu_count)
from engine.energy.nvml import (AVERAGE_SAMPLE_INTERVAL_S, INSTANT_SAMPLE_INTERVAL_S, cuda_label_for_nvml_index,
                                import_pynvml, nvml_error_message, probe_gpu)
from engine.energy.rapl import (POWERCAP_ROOT, RAPL_INTERFACES, RaplMeter, device_name, find_rapl_zones,
                                plan_rapl_zones, read_energy_uj, root_only_message)
from engine.errors import InputError

RAPL_PREFIXES = RAPL_INTERFACES

__all__ = ["POWERCAP_ROOT", "RAPL_PREFIXES", "SensorStatus", "cpu_model_name", "discover_sensors",
           "logical_cpu_count", "nvml_error_message", "probe_cpu_estimate", "probe_nvml", "probe_rapl"]


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


def discover_sensors(powercap_root: Path = POWERCAP_ROOT, nvml: ModuleType | None | str | Any = "import",
                     read_text: Callable[[Path], str] | None = None, env: Mapping[str, str] | None = None,
                     cpu_model: CpuPowerModel | None = None) -> list[SensorStatus]:
    """Every energy source found or missing on this host, with reasons.

    ``nvml`` is the pynvml module to use (``"import"`` imports the real one, ``None``
    means it is not installed); ``read_text`` reads sysfs files (tests inject errors);
    ``env`` holds ``CUDA_VISIBLE_DEVICES`` and the ``PLANNER_CPU_*`` settings.
    """
    read_text = read_text or (lambda p: p.read_text())
    found = probe_nvml(import_pynvml() if nvml == "import" else nvml, env=env)
    found += probe_rapl(powercap_root, read_text)
    if not _rapl_usable(powercap_root, read_text):
        found.append(probe_cpu_estimate(env=env, cpu_model=cpu_model))
    return found


def _rapl_usable(powercap_root: Path, read_text: Callable[[Path], str]) -> bool:
    """Whether the meter would measure the CPU here (same test as :func:`open_meter`)."""
    try:
        RaplMeter(powercap_root, read_text=read_text)
    except SensorUnavailableError:
        return False
    return True


def probe_cpu_estimate(env: Mapping[str, str] | None = None, cpu_model: CpuPowerModel | None = None) -> SensorStatus:
    """The CPU estimate that stands in where RAPL cannot be read, with its watts."""
    try:
        model = cpu_model or cpu_power_model(env=env)
    except InputError as exc:
        return SensorStatus("estimate", "cpu", "missing", f"the CPU estimate is misconfigured: {exc}",
                            f"Set {WATTS_PER_CPU_ENV} or {TDP_ENV} to a positive number of watts, or unset it.")
    return SensorStatus(
        source="estimate", device="cpu", status="estimated",
        detail=(f"CPU energy is estimated: the measured processes' CPU-seconds × {model.watts_per_cpu:.3g} W per "
                f"logical CPU ({model.basis}). CPU: {model.cpu_name}. It counts only those processes' own CPU "
                "work: no idle or static power, no DRAM. Inference threads in the workers wait passively "
                "(OMP_WAIT_POLICY=PASSIVE), so waiting is not counted as work."),
        fix=(f"Set {WATTS_PER_CPU_ENV} (watts per logical CPU) or {TDP_ENV} (the package's TDP) for this CPU; "
             "for measured CPU energy, run on a host whose kernel exposes RAPL "
             "(/sys/class/powercap/intel-rapl:*) readable by this user."))


def probe_nvml(nvml: ModuleType | Any | None, env: Mapping[str, str] | None = None) -> list[SensorStatus]:
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
        return [_probe_nvml_device(nvml, index, env) for index in range(count)]
    except nvml.NVMLError as exc:
        detail, fix = nvml_error_message(nvml, exc)
        return [SensorStatus("nvml", "gpu", "missing", detail, fix)]
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _probe_nvml_device(nvml: Any, index: int, env: Mapping[str, str] | None) -> SensorStatus:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    device = cuda_label_for_nvml_index(index, uuid, env)
    caps = probe_gpu(nvml, handle, name)
    who = f"{name} ({uuid}, {caps.architecture})"
    if caps.counter:
        return SensorStatus("nvml-counter", device, "measured", f"{who}: cumulative energy counter (mJ)")
    if caps.instant_power:
        return SensorStatus("nvml-power", device, "measured",
                            f"{who}: no energy counter on this GPU; instant power (NVML_FI_DEV_POWER_INSTANT) is "
                            f"sampled every {INSTANT_SAMPLE_INTERVAL_S * 1e3:.0f} ms and integrated")
    if caps.power_usage:
        if caps.usage_is_1s_average is False:
            what = f"its power reading is sampled every {INSTANT_SAMPLE_INTERVAL_S * 1e3:.0f} ms and integrated"
        else:
            what = (f"its power reading is a 1 s moving average, sampled every "
                    f"{AVERAGE_SAMPLE_INTERVAL_S * 1e3:.0f} ms and integrated: windows under 5 s are smeared")
        return SensorStatus("nvml-power", device, "measured",
                            f"{who}: no energy counter and no instant power on this GPU; {what}",
                            "Update the NVIDIA driver for instant power readings." if caps.usage_is_1s_average
                            is not False else None)
    detail, fix = caps.errors[-1] if caps.errors else ("this GPU answers no energy or power query", None)
    return SensorStatus("nvml", device, "missing", f"{who}: {detail}", fix)


def probe_rapl(powercap_root: Path, read_text: Callable[[Path], str]) -> list[SensorStatus]:
    """Every RAPL zone of the powercap tree: which are counted, which are not and why."""
    try:
        zones = find_rapl_zones(powercap_root, read_text)
    except SensorUnavailableError as exc:
        return [SensorStatus("rapl", "cpu", "missing", exc.detail, exc.fix)]
    except OSError as exc:
        return [SensorStatus("rapl", "cpu", "missing", f"cannot list {powercap_root}: {exc}", None)]
    if not zones:
        return [SensorStatus("rapl", "cpu", "missing", f"{powercap_root} has no RAPL zones", None)]
    plan = plan_rapl_zones(zones, read_text)
    statuses = []
    for zone in zones:
        kind = f"rapl-{zone.domain}" if zone.domain in ("package", "dram", "psys", "core", "uncore") else "rapl"
        counted = plan.reason(zone) is None
        device = device_name(zone) if counted else zone.zone_id
        try:
            read_energy_uj(zone, read_text)
        except PermissionError:
            detail, fix = root_only_message(zone.energy_path)
            statuses.append(SensorStatus(kind, device, "missing", detail, fix))
            continue
        except (OSError, ValueError) as exc:
            statuses.append(SensorStatus(kind, device, "missing", f"cannot read {zone.energy_path}: {exc}"))
            continue
        note = "counted" if counted else plan.reason(zone)
        statuses.append(SensorStatus(kind, device, "measured", f"{zone.name} ({zone.zone_id}): energy counter; {note}"))
    package_read = any(s.source == "rapl-package" and s.status == "measured" for s in statuses)
    if package_read and not any(z.domain == "dram" for z in plan.counted):
        statuses.append(SensorStatus(
            "rapl-dram", "dram", "missing",
            "this CPU's RAPL has no DRAM domain (AMD Zen CPUs expose package and core only): DRAM energy is "
            "not measured and not part of the totals", None))
    return statuses


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
