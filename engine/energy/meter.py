"""Several devices in one window: the meter a profiler uses.

    meter = open_meter("cuda:0")            # GPU 0 + CPU packages + DRAM (or the CPU estimate)
    idle = measure_idle_power(meter, 5.0)   # with the model loaded, no request running
    with meter.window() as window:
        backend.generate(32, 8)
    row = window.result.measurement_columns(idle)   # the measurements table's energy columns

or ``meter.start()`` ... ``result = meter.stop()``. One background thread per window
calls each meter's ``poll`` at its own interval (RAPL wrap tracking, GPU power
sampling); meters that need none cost nothing while a window is open.

Totals: readings are summed per kind (``gpu``, ``cpu``, ``dram``). A kind with no
reading is ``None`` (not measured, and not part of ``energy_j``; ``energy_method`` says
so); a kind with a failed reading is ``None``, and so is ``energy_j`` (a window with a
part unknown has no total, never a partial one). If any part is estimated, the window's
``energy_source`` is ``estimated``.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from engine.energy.base import DEVICE_KINDS, DeviceReading, Meter
from engine.energy.cpu_time import ProcessTreeCpu
from engine.energy.errors import MeterStateError, SensorUnavailableError
from engine.energy.estimate import CpuEstimateMeter, CpuPowerModel
from engine.energy.nvml import NvmlGpuMeter
from engine.energy.rapl import POWERCAP_ROOT, RaplMeter, ReadText, _read_text

Clock = Callable[[], float]

#: The energy columns of the measurements table, in order.
MEASUREMENT_COLUMNS = ("energy_j", "energy_source", "energy_method", "gpu_energy_j", "cpu_energy_j",
                       "dram_energy_j", "idle_power_w", "warnings")


def _kind_total(readings: Sequence[DeviceReading], kind: str) -> float | None:
    values = [r.energy_j for r in readings if r.kind == kind]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _method(readings: Sequence[DeviceReading]) -> str:
    groups: dict[str, list[str]] = {}
    for reading in readings:
        groups.setdefault(reading.method, []).append(reading.device)
    parts = [f"{method} [{', '.join(devices)}]" for method, devices in groups.items()]
    if not any(r.kind == "dram" for r in readings):
        parts.append("DRAM not measured")
    return " + ".join(parts)


@dataclass(frozen=True)
class WindowResult:
    """What every device of one window used, and the totals the measurements table stores.

    Attributes:
        started_at, finished_at: wall-clock times (UTC) of the window.
        duration_s: seconds the window lasted (monotonic clock).
        readings: one :class:`DeviceReading` per device.
        gpu_energy_j, cpu_energy_j, dram_energy_j: joules per kind; ``None`` when that
            kind was not measured or a reading of it failed.
        energy_j: the total of the kinds measured, ``None`` if any reading failed.
        energy_source: ``estimated`` if any part is estimated, else ``measured``.
        energy_method: the sensors and estimate methods behind the total, per device.
        warnings: every reading's warnings, as ``device: sentence``.
    """

    started_at: datetime
    finished_at: datetime
    duration_s: float
    readings: tuple[DeviceReading, ...]
    energy_j: float | None
    gpu_energy_j: float | None
    cpu_energy_j: float | None
    dram_energy_j: float | None
    energy_source: str
    energy_method: str
    warnings: tuple[str, ...]

    @classmethod
    def from_readings(cls, readings: Sequence[DeviceReading], duration_s: float, started_at: datetime,
                      finished_at: datetime, extra_warnings: Sequence[str] = ()) -> "WindowResult":
        readings = tuple(readings)
        kinds = {kind: _kind_total(readings, kind) for kind in DEVICE_KINDS}
        present = [kind for kind in DEVICE_KINDS if any(r.kind == kind for r in readings)]
        total = None
        if present and all(kinds[k] is not None for k in present):
            total = float(sum(kinds[k] for k in present))
        warnings = tuple(f"{r.device}: {w}" for r in readings for w in r.warnings) + tuple(extra_warnings)
        return cls(started_at=started_at, finished_at=finished_at, duration_s=duration_s, readings=readings,
                   energy_j=total, gpu_energy_j=kinds["gpu"], cpu_energy_j=kinds["cpu"],
                   dram_energy_j=kinds["dram"],
                   energy_source="estimated" if any(r.estimated for r in readings) else "measured",
                   energy_method=_method(readings), warnings=warnings)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(r.device for r in self.readings)

    def dynamic_energy_j(self, idle: "IdleBaseline") -> float | None:
        """``energy_j − idle power × duration``: the energy the work added to what the
        devices draw anyway. ``None`` when either is unknown or the baseline is of other
        devices. Can be slightly negative for a short, noisy window: it is not clamped."""
        idle_w = idle.power_for(self.devices)
        if self.energy_j is None or idle_w is None:
            return None
        return self.energy_j - idle_w * self.duration_s

    def measurement_columns(self, idle: "IdleBaseline | None" = None) -> dict[str, Any]:
        """The measurements table's energy columns for this window.

        ``idle_power_w`` is the baseline's total over the same devices (``None`` without
        one); ``warnings`` is one string, sentences separated by ``; `` (``None`` if none).
        """
        idle_w = idle.power_for(self.devices) if idle is not None else None
        warnings = list(self.warnings)
        if idle is not None and idle_w is None and idle.idle_power_w is not None:
            warnings.append("the idle baseline was measured on other devices: idle power not stored")
        return {"energy_j": self.energy_j, "energy_source": self.energy_source,
                "energy_method": self.energy_method, "gpu_energy_j": self.gpu_energy_j,
                "cpu_energy_j": self.cpu_energy_j, "dram_energy_j": self.dram_energy_j,
                "idle_power_w": idle_w, "warnings": "; ".join(warnings) or None}

    def to_dict(self) -> dict:
        document = asdict(self)
        document["started_at"] = self.started_at.isoformat()
        document["finished_at"] = self.finished_at.isoformat()
        document["readings"] = [r.to_dict() for r in self.readings]
        document["warnings"] = list(self.warnings)
        return document


@dataclass(frozen=True)
class IdleBaseline:
    """Each device's power with nothing of ours running (the model loaded, no request).

    Attributes:
        window: the idle window itself.
        power_w: watts per device (``None`` where the reading failed).
        idle_power_w: the sum over all devices, ``None`` if any is unknown.
        gpu_idle_power_w, cpu_idle_power_w, dram_idle_power_w: per kind.

    For the CPU estimate the idle power is the estimate applied to the idle window: the
    measured processes' own background CPU use (near 0 W). The estimate has no static
    term, so its "total" is already dynamic energy; subtracting this only removes the
    processes' idle background (e.g. runtime threads, the meter itself).
    """

    window: WindowResult
    power_w: Mapping[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_window(cls, window: WindowResult) -> "IdleBaseline":
        return cls(window, {r.device: r.power_w for r in window.readings})

    @property
    def duration_s(self) -> float:
        return self.window.duration_s

    def _sum(self, devices: Sequence[str]) -> float | None:
        values = [self.power_w.get(d) for d in devices]
        if not values or any(v is None for v in values):
            return None
        return float(sum(values))

    @property
    def idle_power_w(self) -> float | None:
        return self._sum(list(self.power_w))

    def _kind(self, kind: str) -> float | None:
        devices = [r.device for r in self.window.readings if r.kind == kind]
        return self._sum(devices) if devices else None

    @property
    def gpu_idle_power_w(self) -> float | None:
        return self._kind("gpu")

    @property
    def cpu_idle_power_w(self) -> float | None:
        return self._kind("cpu")

    @property
    def dram_idle_power_w(self) -> float | None:
        return self._kind("dram")

    def power_for(self, devices: Sequence[str]) -> float | None:
        """Total idle watts of exactly these devices, or ``None`` if the baseline lacks one."""
        if set(devices) != set(self.power_w):
            return None
        return self._sum(devices)

    def to_dict(self) -> dict:
        return {"duration_s": self.duration_s, "idle_power_w": self.idle_power_w,
                "power_w": dict(self.power_w), "gpu_idle_power_w": self.gpu_idle_power_w,
                "cpu_idle_power_w": self.cpu_idle_power_w, "dram_idle_power_w": self.dram_idle_power_w,
                "energy_source": self.window.energy_source, "energy_method": self.window.energy_method,
                "warnings": list(self.window.warnings)}


class Poller:
    """One background thread calling each meter's ``poll`` at the meter's interval.

    ``poll_due`` does one round in the caller's thread (tests drive it with a fake clock).
    Unexpected exceptions from a meter's ``poll`` are kept in :attr:`errors`, never raised
    in the thread.
    """

    def __init__(self, meters: Sequence[Meter], clock: Clock = time.monotonic):
        self.meters = [m for m in meters if m.poll_interval_s]
        self.clock = clock
        self.errors: list[str] = []
        self._next_due: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self, now_s: float) -> None:
        self.errors = []
        self._next_due = {id(m): now_s + m.poll_interval_s for m in self.meters}

    def poll_due(self) -> None:
        now_s = self.clock()
        for meter in self.meters:
            if now_s >= self._next_due[id(meter)]:
                try:
                    meter.poll(now_s)
                except Exception as exc:  # a meter bug must not kill the window: keep it as a warning
                    self.errors.append(f"{meter.description}: a poll failed: {exc!r}")
                self._next_due[id(meter)] = now_s + meter.poll_interval_s

    def start(self, now_s: float) -> None:
        self.reset(now_s)
        if not self.meters:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="energy-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_s = min(self._next_due.values()) - self.clock()
            if wait_s > 0:
                self._stop.wait(wait_s)
                continue
            self.poll_due()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class Window:
    """Handle of a ``with meter.window()`` block: :attr:`result` is set when it ends."""

    result: WindowResult | None = None


class EnergyMeter:
    """Several meters read over the same windows.

    Args:
        meters: the sources; their devices must not overlap.
        clock: a monotonic clock in seconds (tests pass a fake one).
        wall_clock: the UTC time for ``started_at``/``finished_at``.
        background: poll in a background thread; with ``False`` the caller calls
            :meth:`poll` (tests with a fake clock).
        notes: sentences on how the sources were chosen (e.g. why the CPU is estimated).
    """

    def __init__(self, meters: Sequence[Meter], *, clock: Clock = time.monotonic,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 background: bool = True, notes: Sequence[str] = ()):
        if not meters:
            raise ValueError("an EnergyMeter needs at least one meter")
        devices = [d for m in meters for d in m.devices]
        duplicates = sorted({d for d in devices if devices.count(d) > 1})
        if duplicates:
            raise ValueError(f"devices measured twice: {', '.join(duplicates)}")
        self.meters = tuple(meters)
        self.clock, self.wall_clock, self.background = clock, wall_clock, background
        self.notes = tuple(notes)
        self._poller = Poller(self.meters, clock)
        self._start_s: float | None = None
        self._started_at: datetime | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for m in self.meters for d in m.devices)

    @property
    def description(self) -> str:
        return "; ".join(m.description for m in self.meters)

    @property
    def running(self) -> bool:
        return self._start_s is not None

    def start(self) -> None:
        """Open a window. Raises :class:`MeterStateError` if one is open."""
        if self._start_s is not None:
            raise MeterStateError("an energy window is already open: stop it before starting another")
        self._started_at = self.wall_clock()
        now_s = self.clock()
        for meter in self.meters:
            meter.begin(now_s)
        self._start_s = now_s
        if self.background:
            self._poller.start(now_s)
        else:
            self._poller.reset(now_s)

    def poll(self) -> None:
        """Poll the meters that are due (the background thread does this on its own)."""
        self._poller.poll_due()

    def stop(self) -> WindowResult:
        """Close the window and return every device's reading and the totals."""
        if self._start_s is None:
            raise MeterStateError("no energy window is open: start one first")
        self._poller.stop()
        now_s = self.clock()
        # Ended in reverse order of beginning, so the window of the last meter begun (the
        # CPU, whose estimate counts this process's CPU time) encloses none of the
        # other meters' reading costs.
        ended = {id(meter): meter.end(now_s) for meter in reversed(self.meters)}
        readings = [reading for meter in self.meters for reading in ended[id(meter)]]
        duration_s = now_s - self._start_s
        started_at, self._start_s = self._started_at, None
        return WindowResult.from_readings(readings, duration_s, started_at, self.wall_clock(),
                                          extra_warnings=self._poller.errors)

    @contextmanager
    def window(self) -> Iterator[Window]:
        """``with meter.window() as w: ...``; then ``w.result``. The window is closed even
        when the block raises (the result is still set, the exception propagates)."""
        handle = Window()
        self.start()
        try:
            yield handle
        finally:
            handle.result = self.stop()

    def close(self) -> None:
        """Stop an open window (its result is dropped) and release every meter."""
        if self._start_s is not None:
            self._poller.stop()
            self._start_s = None
        for meter in self.meters:
            meter.close()

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: Seconds of the idle baseline after each model load, in profiling and execution alike.
IDLE_BASELINE_S = 5.0


def measure_idle_power(meter: EnergyMeter, duration_s: float = IDLE_BASELINE_S, *,
                       sleep: Callable[[float], None] = time.sleep) -> IdleBaseline:
    """Each device's idle power: a window of ``duration_s`` in which we run nothing.

    Call it with the model loaded and no request running. 5 s covers the 1 s power
    average of recent GPUs several times over and the counters' update steps.
    """
    with meter.window() as window:
        sleep(duration_s)
    return IdleBaseline.from_window(window.result)


_CUDA_RE = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def open_meter(device: str = "cpu", *, powercap_root: Path = POWERCAP_ROOT, read_text: ReadText = _read_text,
               nvml: Any = "import", env: Mapping[str, str] | None = None, cuda_uuid: str | None = None,
               pids: Sequence[int] | None = None, cpu_model: CpuPowerModel | None = None,
               clock: Clock = time.monotonic, background: bool = True,
               peers: Callable[[], Sequence[int]] | None = None) -> EnergyMeter:
    """The meter for work on ``device`` (``cpu``, ``cuda``, ``cuda:N``) on this host.

    It always covers the CPU: every RAPL package and DRAM zone where they can be read,
    else the labelled estimate (``notes`` says why); for ``cuda:N`` also that GPU through
    NVML. ``pids`` names the processes doing the work (default: this process and its
    children); the estimate counts their CPU time and the sensors warn about others.
    ``peers`` returns the pids of the processes doing other devices' work of the same
    run at the same time: a RAPL package reading is split with them by CPU time (the
    estimate and a GPU's reading are the process's or the GPU's own and need no split).

    Raises:
        SensorUnavailableError: a GPU was asked for and NVML cannot measure it (the
            message says why and what to do): a GPU job is never stored with CPU energy
            alone passed off as its total.
        InputError: ``device`` is not a device string, or a PLANNER_CPU_* variable is bad.
    """
    from engine.errors import InputError, Problem

    process_cpu = ProcessTreeCpu(pids, peers)
    meters: list[Meter] = []
    notes: list[str] = []
    match = _CUDA_RE.match(device.strip().lower())
    if device.strip().lower() != "cpu" and not match:
        raise InputError(Problem(where="device", message=f"{device!r} is not a device",
                                 expected="cpu, cuda or cuda:N"))
    try:
        if match:
            meters.append(NvmlGpuMeter(int(match.group(1) or 0), nvml=nvml, env=env, cuda_uuid=cuda_uuid,
                                       process_cpu=process_cpu))
        try:
            meters.append(RaplMeter(powercap_root, read_text=read_text, process_cpu=process_cpu))
        except SensorUnavailableError as exc:
            estimate = CpuEstimateMeter(cpu_model, process_cpu=process_cpu, reason=exc.detail)
            meters.append(estimate)
            notes.append(f"CPU energy is estimated ({estimate.method}) because {exc.detail}"
                         + (f". To measure it: {exc.fix}" if exc.fix else ""))
    except BaseException:
        for meter in meters:
            meter.close()
        raise
    return EnergyMeter(meters, clock=clock, background=background, notes=notes)
