"""NVIDIA GPU energy through NVML (``pynvml``, from the nvidia-ml-py package).

Three ways to read a GPU, in the order they are preferred:

``nvml-counter``
    ``nvmlDeviceGetTotalEnergyConsumption``: millijoules since the driver loaded,
    Volta and newer. Read at the start and the end of a window, and once a second in
    between only to catch a counter that goes backwards (a driver reload or GPU reset):
    such a window is invalid (``energy_j=None``), never "corrected". The counter
    advances in steps of up to ~100 ms on some GPUs, so windows under
    :data:`COUNTER_MIN_WINDOW_S` get a warning.
``nvml-power:instant``
    the field ``NVML_FI_DEV_POWER_INSTANT`` (drivers that offer it), sampled by a
    background thread every :data:`INSTANT_SAMPLE_INTERVAL_S` and integrated with the
    trapezoid rule.
``nvml-power:usage`` / ``nvml-power:1s-average``
    ``nvmlDeviceGetPowerUsage``, likewise sampled and integrated. On Ampere and newer,
    except GA100 (A100, A30, A800), it is a moving average over the last second: it
    smears a short window with the power before it, which the method name and a
    warning say.

CUDA and NVML number GPUs differently (CUDA: ``CUDA_VISIBLE_DEVICES`` and, by default,
fastest first; NVML: every GPU in PCI order), so ``cuda:N`` is mapped to its NVML
device by UUID (:func:`resolve_cuda_device`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from engine.energy.base import DeviceReading, Meter
from engine.energy.cpu_time import ProcessTreeCpu
from engine.energy.errors import SensorUnavailableError

# NVML's C enums, stable across releases; read from the module when it has them.
_NVML_SUCCESS = 0
_FI_DEV_POWER_INSTANT = 186
_ARCH_AMPERE = 7
_ARCH_UNKNOWN = 0xFFFFFFFF
ARCHITECTURE_NAMES = {2: "Kepler", 3: "Maxwell", 4: "Pascal", 5: "Volta", 6: "Turing", 7: "Ampere",
                      8: "Ada", 9: "Hopper", 10: "Blackwell", 13: "Rubin"}
_GA100_RE = re.compile(r"\bA(100|30|800)\b")

#: Background sampling interval for instant power (seconds).
INSTANT_SAMPLE_INTERVAL_S = 0.05
#: Background sampling interval for the 1 s average power (seconds); faster adds nothing.
AVERAGE_SAMPLE_INTERVAL_S = 0.1
#: How often the counter is checked for going backwards during a window (seconds).
COUNTER_CHECK_INTERVAL_S = 1.0
#: Windows shorter than this get a warning with the counter (its ~100 ms steps).
COUNTER_MIN_WINDOW_S = 1.0
#: Windows shorter than this get a warning with the 1 s moving average.
AVERAGE_MIN_WINDOW_S = 5.0
#: Fewer power samples than this in a window get a warning.
MIN_POWER_SAMPLES = 5
#: A gap between power samples longer than this many intervals gets a warning.
MAX_SAMPLE_GAP_INTERVALS = 5.0
#: Share of the window that may be covered by holding the first/last sample, beyond
#: which the integrated energy is declared unknown.
MAX_UNSAMPLED_FRACTION = 0.2

MODES = ("counter", "power-instant", "power-usage")


def import_pynvml() -> ModuleType | None:
    """The pynvml module, or ``None`` when nvidia-ml-py is not installed."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    return pynvml


_ERROR_MESSAGES: tuple[tuple[str, str, str | None], ...] = (
    ("NVMLError_LibraryNotFound",
     "the NVIDIA driver library (libnvidia-ml.so) is not installed: no NVIDIA GPU driver on this host",
     "Install the NVIDIA driver if this host has an NVIDIA GPU (in a container, run it with the GPU "
     "and its driver libraries passed through, e.g. `--gpus all`)."),
    ("NVMLError_DriverNotLoaded", "the NVIDIA driver is installed but not loaded",
     "Load the driver (`sudo modprobe nvidia`) or reboot."),
    ("NVMLError_NoPermission", "NVML refused access (no permission)",
     "Run as a user allowed to use the GPU (e.g. in the video group), or ask the administrator."),
    ("NVMLError_NotSupported", "this GPU or driver does not support the query", None),
    ("NVMLError_FunctionNotFound", "the installed NVIDIA driver is too old for this NVML query",
     "Update the NVIDIA driver."),
    ("NVMLError_LibRmVersionMismatch",
     "the NVML library and the loaded kernel driver are different versions (the driver was updated "
     "without a reboot)", "Reboot, or reload the nvidia kernel modules."),
    ("NVMLError_GpuIsLost", "the GPU has fallen off the bus (GPU is lost)", "Check the GPU and reboot the host."),
    ("NVMLError_ResetRequired", "the GPU needs a reset", "Reset it (`nvidia-smi -r`) or reboot the host."),
    ("NVMLError_InsufficientPower", "the GPU's external power cables are not connected properly",
     "Check the GPU's power connectors."),
    ("NVMLError_Timeout", "NVML timed out talking to the GPU", "Try again; if it persists, check the GPU."),
    ("NVMLError_Uninitialized", "NVML was used before being initialised (a bug in the caller)", None),
)


def nvml_error_message(nvml: ModuleType | Any, exc: Exception) -> tuple[str, str | None]:
    """A sentence for an NVML error and what to do about it."""
    for class_name, detail, fix in _ERROR_MESSAGES:
        cls = getattr(nvml, class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return detail, fix
    return f"NVML failed: {exc}", None


def _nvml_errors(nvml: Any) -> type[BaseException]:
    return getattr(nvml, "NVMLError", Exception)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _normalise_uuid(uuid: str) -> str:
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def architecture_name(code: int | None) -> str:
    """``Hopper`` for NVML's architecture code 9, ``unknown`` when not known."""
    if code is None:
        return "unknown"
    return ARCHITECTURE_NAMES.get(code, "unknown")


def power_usage_is_1s_average(architecture_code: int | None, name: str) -> bool | None:
    """Whether ``nvmlDeviceGetPowerUsage`` is a 1 s moving average on this GPU.

    True on Ampere and newer except GA100 (A100, A30, A800); ``None`` when the
    architecture is unknown (then it is treated as an average, the cautious reading).
    """
    if architecture_code is None or architecture_code == _ARCH_UNKNOWN:
        return None
    return architecture_code >= _ARCH_AMPERE and not _GA100_RE.search(name)


# -- which GPU is cuda:N --------------------------------------------------------------------

def parse_cuda_visible_devices(value: str | None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` as CUDA reads them, or ``None`` when unset.

    CUDA stops at the first entry that is neither a non-negative index nor a
    ``GPU-``/``MIG-`` UUID (so ``-1`` hides every GPU).
    """
    if value is None:
        return None
    entries = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.lower().startswith(("gpu-", "mig-")):
            entries.append(entry)
        else:
            break
    return entries


@dataclass(frozen=True)
class GpuIdentity:
    """One GPU as CUDA and NVML each name it.

    Attributes:
        cuda_device: ``cuda:N`` as the backend (torch) sees it.
        nvml_index: NVML's index (PCI order over every GPU of the host).
        uuid: NVML's UUID, ``GPU-...``.
        name: the product name.
        architecture: ``Pascal``, ``Volta``, ``Hopper``, ... or ``unknown``.
        mapped_by: how ``cuda:N`` was matched: ``torch UUID``, ``CUDA_VISIBLE_DEVICES UUID``,
            ``CUDA_VISIBLE_DEVICES index`` or ``index``.
        warnings: why the mapping may be wrong, when it may.
    """

    cuda_device: str
    nvml_index: int
    uuid: str
    name: str
    architecture: str
    mapped_by: str
    warnings: tuple[str, ...] = ()


def _torch_cuda_uuid(cuda_index: int) -> str | None:
    """The UUID torch gives ``cuda:N``, only if torch has already initialised CUDA.

    Never initialises CUDA itself (that would break a later fork, and cost seconds).
    """
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        return str(torch.cuda.get_device_properties(cuda_index).uuid)
    except Exception:  # any failure means "not known": fall back to the environment
        return None


def _all_gpus(nvml: Any) -> list[tuple[int, Any, str, str]]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpus.append((index, handle, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))))
    return gpus


def resolve_cuda_device(cuda_index: int, nvml: Any, *, env: Mapping[str, str] | None = None,
                        cuda_uuid: str | None = None) -> tuple[GpuIdentity, Any]:
    """The NVML device behind ``cuda:<cuda_index>``, and its handle.

    Matches, in order: ``cuda_uuid`` (from torch, when CUDA is initialised, or given by
    the caller); the ``CUDA_VISIBLE_DEVICES`` entry (a UUID or UUID prefix, or an index);
    else the index itself. An index is exact only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    or when all GPUs are the same model, and a warning says so otherwise.

    Raises:
        SensorUnavailableError: the GPU is not visible, is a MIG instance (NVML reports
            energy for whole GPUs only), or no NVML device has the UUID.
    """
    env = os.environ if env is None else env
    device = f"cuda:{cuda_index}"
    gpus = _all_gpus(nvml)
    if not gpus:
        raise SensorUnavailableError("nvml", "NVML found no NVIDIA GPU", None)
    uuid = cuda_uuid or _torch_cuda_uuid(cuda_index)
    if uuid:
        mapped_by = "torch UUID" if cuda_uuid is None else "CUDA UUID"
        return _identity(nvml, device, _gpu_by_uuid(gpus, uuid, device, mapped_by), mapped_by)
    visible = parse_cuda_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        nvml_index, mapped_by = cuda_index, "index"
    else:
        entry = _visible_entry(visible, cuda_index, device, env.get("CUDA_VISIBLE_DEVICES"))
        if entry.lower().startswith("gpu-"):
            mapped_by = "CUDA_VISIBLE_DEVICES UUID"
            return _identity(nvml, device, _gpu_by_uuid(gpus, entry, device, mapped_by), mapped_by)
        nvml_index, mapped_by = int(entry), "CUDA_VISIBLE_DEVICES index"
    if nvml_index >= len(gpus):
        raise SensorUnavailableError("nvml", f"{device} would be NVML GPU {nvml_index}, but NVML lists {len(gpus)}",
                                     "Check CUDA_VISIBLE_DEVICES against `nvidia-smi -L`.")
    warnings: tuple[str, ...] = ()
    if env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len({g[3] for g in gpus}) > 1:
        warnings = ("this host has different GPU models and CUDA numbers them fastest first, NVML in PCI order: "
                    f"{device} may not be NVML GPU {nvml_index}; set CUDA_DEVICE_ORDER=PCI_BUS_ID",)
    return _identity(nvml, device, gpus[nvml_index], mapped_by, warnings)


def _identity(nvml: Any, device: str, gpu: tuple[int, Any, str, str], mapped_by: str,
              warnings: tuple[str, ...] = ()) -> tuple[GpuIdentity, Any]:
    """The identity of one of :func:`_all_gpus`' GPUs as ``device``, and its handle."""
    index, handle, uuid, name = gpu
    identity = GpuIdentity(cuda_device=device, nvml_index=index, uuid=uuid, name=name,
                           architecture=architecture_name(_architecture_code(nvml, handle)), mapped_by=mapped_by,
                           warnings=warnings)
    return identity, handle


def _gpu_by_uuid(gpus: list[tuple[int, Any, str, str]], prefix: str, device: str,
                 mapped_by: str) -> tuple[int, Any, str, str]:
    """The one GPU whose UUID starts with ``prefix`` (CUDA may give a prefix)."""
    wanted = _normalise_uuid(prefix)
    matches = [g for g in gpus if _normalise_uuid(g[2]).startswith(wanted)]
    if len(matches) != 1:
        found = "no" if not matches else "several"
        raise SensorUnavailableError("nvml", f"{device} is GPU {prefix} ({mapped_by}), but {found} NVML device "
                                     "has that UUID", "Check CUDA_VISIBLE_DEVICES against `nvidia-smi -L`.")
    return matches[0]


def _visible_entry(visible: list[str], cuda_index: int, device: str, variable: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES entry behind ``cuda:<cuda_index>``: a UUID (prefix) or an index.

    Raises SensorUnavailableError when the index is not visible or the entry is a MIG instance.
    """
    if cuda_index >= len(visible):
        raise SensorUnavailableError(
            "nvml", f"{device} is not visible: CUDA_VISIBLE_DEVICES={variable!r} "
            f"makes {len(visible)} GPU(s) visible", "Pick a visible device or change CUDA_VISIBLE_DEVICES.")
    entry = visible[cuda_index]
    if entry.lower().startswith("mig-"):
        raise SensorUnavailableError(
            "nvml", f"{device} is the MIG instance {entry}: NVML measures energy for whole GPUs only, "
            "which other instances share", "Profile on a whole GPU (MIG disabled) for measured energy.")
    return entry


def cuda_label_for_nvml_index(nvml_index: int, uuid: str, env: Mapping[str, str] | None = None) -> str:
    """How CUDA names NVML GPU ``nvml_index`` (``cuda:N``), for listings."""
    env = os.environ if env is None else env
    visible = parse_cuda_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    if visible is None:
        return f"cuda:{nvml_index}"
    for position, entry in enumerate(visible):
        if entry.isdigit() and int(entry) == nvml_index:
            return f"cuda:{position}"
        if entry.lower().startswith("gpu-") and _normalise_uuid(uuid).startswith(_normalise_uuid(entry)):
            return f"cuda:{position}"
    return f"nvml:{nvml_index} (hidden by CUDA_VISIBLE_DEVICES)"


# -- what a GPU offers ----------------------------------------------------------------------

def _architecture_code(nvml: Any, handle: Any) -> int | None:
    try:
        return int(nvml.nvmlDeviceGetArchitecture(handle))
    except (AttributeError, _nvml_errors(nvml)):
        return None


def _field_value(field: Any) -> float:
    """A field value as a number, whatever value type the driver chose."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}.get(
        int(field.valueType), "uiVal")
    return float(getattr(field.value, member))


def read_instant_power_w(nvml: Any, handle: Any) -> float:
    """Instant power (``NVML_FI_DEV_POWER_INSTANT``) in watts; raises ``NVMLError``."""
    field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", _FI_DEV_POWER_INSTANT)
    field = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
    if int(field.nvmlReturn) != getattr(nvml, "NVML_SUCCESS", _NVML_SUCCESS):
        raise nvml.NVMLError(int(field.nvmlReturn))
    return _field_value(field) / 1000.0


def read_power_usage_w(nvml: Any, handle: Any) -> float:
    """``nvmlDeviceGetPowerUsage`` in watts (a 1 s average on Ampere+ except GA100)."""
    return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0


def read_energy_counter_mj(nvml: Any, handle: Any) -> int:
    """The cumulative energy counter, in millijoules."""
    return int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))


@dataclass(frozen=True)
class GpuCapabilities:
    """Which readings a GPU answers. ``errors`` holds the sentence for each that failed
    with anything but "not supported"."""

    counter: bool
    instant_power: bool
    power_usage: bool
    usage_is_1s_average: bool | None
    architecture: str
    errors: tuple[tuple[str, str | None], ...] = ()

    @property
    def best_mode(self) -> str | None:
        if self.counter:
            return "counter"
        if self.instant_power:
            return "power-instant"
        if self.power_usage:
            return "power-usage"
        return None


def probe_gpu(nvml: Any, handle: Any, name: str) -> GpuCapabilities:
    """Try each reading once on a GPU."""
    errors: list[tuple[str, str | None]] = []
    not_supported = getattr(nvml, "NVMLError_NotSupported", ())

    def works(read) -> bool:
        try:
            read(nvml, handle)
            return True
        except AttributeError:  # an old pynvml without the function
            return False
        except _nvml_errors(nvml) as exc:
            if not (not_supported and isinstance(exc, not_supported)):
                errors.append(nvml_error_message(nvml, exc))
            return False

    code = _architecture_code(nvml, handle)
    return GpuCapabilities(
        counter=works(read_energy_counter_mj), instant_power=works(read_instant_power_w),
        power_usage=works(read_power_usage_w), usage_is_1s_average=power_usage_is_1s_average(code, name),
        architecture=architecture_name(code), errors=tuple(errors))


def integrate_power(samples: list[tuple[float, float]], start_s: float, end_s: float) -> tuple[float, float]:
    """Energy (J) of power samples ``(time_s, watts)`` over ``[start_s, end_s]`` by the trapezoid
    rule, holding the first and last sample to the window's edges; and the fraction of the
    window covered only by that holding."""
    points = sorted((t, w) for t, w in samples if start_s <= t <= end_s)
    if not points:
        raise ValueError("no power sample in the window")
    energy_j = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(points, points[1:]))
    held_s = (points[0][0] - start_s) + (end_s - points[-1][0])
    energy_j += points[0][1] * (points[0][0] - start_s) + points[-1][1] * (end_s - points[-1][0])
    duration_s = end_s - start_s
    return energy_j, (held_s / duration_s if duration_s > 0 else 0.0)


class NvmlGpuMeter(Meter):
    """One NVIDIA GPU, by its CUDA index.

    Args:
        cuda_index: ``N`` of ``cuda:N``.
        nvml: the pynvml module (``"import"``: the real one); tests pass a fake that
            raises the real ``pynvml.NVMLError_*`` classes.
        env: the environment (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``).
        cuda_uuid: the GPU's UUID as CUDA reports it, when the caller knows it.
        mode: ``auto`` (the best the GPU offers), or one of :data:`MODES` to force one
            (``scripts/gpu_check.py`` compares them).
        sample_interval_s: power sampling interval; default by mode.
        process_cpu: the measured processes, to tell other users of the GPU from ours.

    Raises:
        SensorUnavailableError: NVML cannot be used, the GPU is not found, or it offers
            no reading (the message says why and what to do).
    """

    def __init__(self, cuda_index: int = 0, *, nvml: Any = "import", env: Mapping[str, str] | None = None,
                 cuda_uuid: str | None = None, mode: str = "auto", sample_interval_s: float | None = None,
                 process_cpu: ProcessTreeCpu | None = None):
        self.nvml = import_pynvml() if nvml == "import" else nvml
        if self.nvml is None:
            raise SensorUnavailableError("nvml", "nvidia-ml-py (pynvml) is not installed", "pip install nvidia-ml-py")
        errors = _nvml_errors(self.nvml)
        try:
            self.nvml.nvmlInit()
        except errors as exc:
            raise SensorUnavailableError("nvml", *nvml_error_message(self.nvml, exc)) from None
        self._initialised = True
        try:
            self.identity, self.handle = resolve_cuda_device(cuda_index, self.nvml, env=env, cuda_uuid=cuda_uuid)
            self.capabilities = probe_gpu(self.nvml, self.handle, self.identity.name)
        except errors as exc:
            self.close()
            raise SensorUnavailableError("nvml", *nvml_error_message(self.nvml, exc)) from None
        except SensorUnavailableError:
            self.close()
            raise
        available = {"counter": self.capabilities.counter, "power-instant": self.capabilities.instant_power,
                     "power-usage": self.capabilities.power_usage}
        if mode != "auto" and mode not in MODES:
            self.close()
            raise ValueError(f"mode must be 'auto' or one of {MODES}, not {mode!r}")
        chosen = self.capabilities.best_mode if mode == "auto" else mode
        if chosen is None or not available[chosen]:
            self.close()
            detail, fix = (self.capabilities.errors[-1] if self.capabilities.errors
                           else ("this GPU answers no energy or power query", None))
            what = "no energy or power reading" if chosen is None else f"no {chosen} reading"
            raise SensorUnavailableError("nvml", f"{self._who()}: {what}: {detail}", fix)
        self.mode = chosen
        self.averaged = chosen == "power-usage" and self.capabilities.usage_is_1s_average is not False
        if chosen == "counter":
            self.poll_interval_s = COUNTER_CHECK_INTERVAL_S
        else:
            default = AVERAGE_SAMPLE_INTERVAL_S if self.averaged else INSTANT_SAMPLE_INTERVAL_S
            self.poll_interval_s = sample_interval_s or default
        self.process_cpu = process_cpu if process_cpu is not None else ProcessTreeCpu()
        self._reset_window(0.0)

    # -- description --------------------------------------------------------------------------

    def _who(self) -> str:
        i = self.identity
        return f"{i.cuda_device} = NVML GPU {i.nvml_index}, {i.name} ({i.uuid})"

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.identity.cuda_device,)

    @property
    def source(self) -> str:
        return "nvml-counter" if self.mode == "counter" else "nvml-power"

    @property
    def method(self) -> str:
        if self.mode == "counter":
            return "nvml-counter"
        ms = round(self.poll_interval_s * 1000)
        if self.mode == "power-instant":
            return f"nvml-power:instant@{ms}ms"
        return f"nvml-power:{'1s-average' if self.averaged else 'usage'}@{ms}ms"

    @property
    def description(self) -> str:
        return f"{self._who()}, {self.identity.architecture}: {self.method} (mapped by {self.identity.mapped_by})"

    # -- the window ---------------------------------------------------------------------------

    def _reset_window(self, now_s: float) -> None:
        self._start_s = now_s
        self._counter_start_mj: int | None = None
        self._counter_last_mj: int | None = None
        self._invalid: str | None = None
        self._samples: list[tuple[float, float]] = []
        self._failed_reads: list[str] = []
        self._gpu_pids: set[int] = set()
        self._begin_failed = False

    def _read(self, now_s: float) -> None:
        errors = _nvml_errors(self.nvml)
        try:
            if self.mode == "counter":
                value = read_energy_counter_mj(self.nvml, self.handle)
                if self._counter_start_mj is None:
                    self._counter_start_mj = self._counter_last_mj = value
                elif value < (self._counter_last_mj or 0) and self._invalid is None:
                    self._invalid = (f"the energy counter went backwards ({self._counter_last_mj} -> {value} mJ): "
                                     "the driver was reloaded or the GPU reset during the window, so this window "
                                     "is invalid; repeat it")
                else:
                    self._counter_last_mj = value
            else:
                read = read_instant_power_w if self.mode == "power-instant" else read_power_usage_w
                self._samples.append((now_s, read(self.nvml, self.handle)))
        except errors as exc:
            detail, _ = nvml_error_message(self.nvml, exc)
            self._failed_reads.append(detail)

    def _note_gpu_processes(self) -> None:
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except (AttributeError, _nvml_errors(self.nvml)):
            return
        self._gpu_pids.update(int(p.pid) for p in procs)

    def begin(self, now_s: float) -> None:
        self._reset_window(now_s)
        self._note_gpu_processes()
        self._read(now_s)
        self._begin_failed = bool(self._failed_reads)

    def poll(self, now_s: float) -> None:
        self._read(now_s)

    def end(self, now_s: float) -> tuple[DeviceReading, ...]:
        failures_before_end = len(self._failed_reads)
        self._read(now_s)
        end_failed = len(self._failed_reads) > failures_before_end
        self._note_gpu_processes()
        duration_s = now_s - self._start_s
        warnings: list[str] = list(self.identity.warnings)
        energy_j: float | None = None
        if self.mode == "counter":
            energy_j = self._counter_energy(warnings, end_failed)
            if energy_j is not None and duration_s < COUNTER_MIN_WINDOW_S:
                warnings.append(f"the window lasted {duration_s:.3f} s: NVML's energy counter advances in steps of "
                                f"up to ~100 ms on some GPUs, so windows under {COUNTER_MIN_WINDOW_S:.0f} s can be "
                                "off by ~10% or more; measure several requests in one window")
        else:
            energy_j = self._power_energy(warnings, duration_s)
        other = self._other_gpu_processes()
        if other:
            warnings.append(f"other processes used this GPU during the window (pids {', '.join(map(str, other))}): "
                            "the reading includes their share")
        return (DeviceReading(device=self.identity.cuda_device, kind="gpu", energy_j=energy_j,
                              duration_s=duration_s, source=self.source, method=self.method,
                              detail=f"{self.identity.name} ({self.identity.uuid}, {self.identity.architecture})",
                              warnings=tuple(warnings)),)

    def _counter_energy(self, warnings: list[str], end_failed: bool) -> float | None:
        if self._invalid:
            warnings.append(self._invalid)
            return None
        if self._counter_start_mj is None or self._begin_failed:
            warnings.append(f"could not read the energy counter at the start of the window: "
                            f"{self._failed_reads[0] if self._failed_reads else 'no reading'}")
            return None
        if end_failed:
            warnings.append(f"could not read the energy counter at the end of the window: {self._failed_reads[-1]}")
            return None
        if self._counter_last_mj == self._counter_start_mj:
            # A GPU never draws 0 W: a counter that did not move measured nothing.
            warnings.append("the energy counter did not advance during the window (shorter than its update "
                            "step, or frozen): energy unknown; measure several requests in one window")
            return None
        return (self._counter_last_mj - self._counter_start_mj) / 1000.0

    def _power_energy(self, warnings: list[str], duration_s: float) -> float | None:
        if self._failed_reads:
            warnings.append(f"{len(self._failed_reads)} power reading(s) failed: {self._failed_reads[-1]}")
        if not self._samples:
            warnings.append("no power reading succeeded in the window: energy unknown")
            return None
        energy_j, held = integrate_power(self._samples, self._start_s, self._start_s + duration_s)
        if held > MAX_UNSAMPLED_FRACTION and duration_s > self.poll_interval_s:
            warnings.append(f"power readings cover only {100 * (1 - held):.0f}% of the window: energy unknown")
            return None
        times = [t for t, _ in self._samples]
        gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
        if gap > MAX_SAMPLE_GAP_INTERVALS * self.poll_interval_s:
            warnings.append(f"a {gap:.2f} s gap between power samples (interval {self.poll_interval_s:.2f} s): "
                            "the sampler was starved; the energy is less certain")
        if len(self._samples) < MIN_POWER_SAMPLES:
            warnings.append(f"only {len(self._samples)} power samples in a {duration_s:.3f} s window: "
                            "the energy is coarse")
        if self.averaged and duration_s < AVERAGE_MIN_WINDOW_S:
            warnings.append(f"power here is NVML's 1 s moving average (Ampere or newer, not GA100): a "
                            f"{duration_s:.2f} s window is smeared by the power of the second before it")
        return energy_j

    def _other_gpu_processes(self) -> list[int]:
        if not self._gpu_pids:
            return []
        ours = self.process_cpu.pids()
        others = sorted(self._gpu_pids - ours)
        # NVML lists host PIDs; in a container our own process shows under a PID we do not
        # know. A single unknown process, and none of ours, is taken to be us.
        if others and not (self._gpu_pids & ours) and len(self._gpu_pids) == 1:
            return []
        return others

    def close(self) -> None:
        if getattr(self, "_initialised", False):
            self._initialised = False
            try:
                self.nvml.nvmlShutdown()
            except _nvml_errors(self.nvml):
                pass
