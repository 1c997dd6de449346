"""CPU energy where no sensor exists: a labelled estimate.

The model::

    cpu_energy_j = cpu_seconds(measured processes) × watts_per_logical_cpu

``cpu_seconds`` is the CPU time the measured processes (by default this process and
its descendants, see :mod:`engine.energy.cpu_time`) used during the window, summed
over their threads: two threads busy for one second count two CPU-seconds.
``watts_per_logical_cpu`` is, in order of precedence:

1. given by the caller, or ``PLANNER_CPU_WATTS_PER_CPU`` (watts per logical CPU);
2. ``PLANNER_CPU_TDP_W`` (the package's TDP) divided by the logical CPUs of one package
   (from the table below for a known model, else ``siblings`` in /proc/cpuinfo, which
   in a virtual machine is the guest's vCPU count: set the per-CPU watts there instead);
3. a known model's TDP divided by its logical CPUs per package (:data:`KNOWN_CPUS`);
4. :data:`DEFAULT_WATTS_PER_CPU` for any other CPU.

What it models and what it leaves out, so nobody reads more into it: it is the
measured processes' *own* CPU work at an average per-thread share of the package's
rated power. It has no idle or static term (package power that is drawn whether or
not the processes run), no DRAM, no uncore traffic, no turbo or frequency effects, and
no other process. Its idle power is therefore the processes' own background CPU use
(near 0 W), so with the estimate total and dynamic energy are practically the same.
Every number it produces carries ``source="estimated"`` and its method, with the watts
and how the measured processes' threads wait (``passive waiting`` in our workers, see
:mod:`engine.energy.waiting`: a thread that spins while it waits adds CPU time that is
not work, and more of it the busier the host).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from engine.energy.base import ESTIMATED, DeviceReading, Meter
from engine.energy.cpu_time import ProcessTreeCpu
from engine.energy.waiting import waiting_note
from engine.errors import InputError, Problem

WATTS_PER_CPU_ENV = "PLANNER_CPU_WATTS_PER_CPU"
TDP_ENV = "PLANNER_CPU_TDP_W"

#: Watts per logical CPU for a CPU not in the table. Deliberately high: the per-thread
#: shares of rated power of current server and desktop CPUs run from about 1.5 W
#: (128-thread EPYC) to about 5 W (desktop parts), and a lone busy core at boost clock
#: draws more than its share; 10 W keeps an unknown CPU's energy from being understated.
DEFAULT_WATTS_PER_CPU = 10.0

#: A few CPUs by model-name pattern: (pattern, TDP in W, logical CPUs per package).
#: Nominal TDP from the vendors' specifications.
KNOWN_CPUS: tuple[tuple[str, float, int], ...] = (
    (r"EPYC 7742\b", 225.0, 128),
    (r"EPYC 7763\b", 280.0, 128),
    (r"EPYC 7543\b", 225.0, 64),
    (r"EPYC 9654\b", 360.0, 192),
    (r"Xeon\(R\) Gold 6148\b|Xeon Gold 6148\b", 150.0, 40),
    (r"Xeon\(R\) Gold 6248R\b|Xeon Gold 6248R\b", 205.0, 48),
    (r"Xeon\(R\) Platinum 8380\b|Xeon Platinum 8380\b", 270.0, 80),
    (r"Xeon\(R\) Platinum 8480\+?|Xeon Platinum 8480", 350.0, 112),
    (r"i9-13900K\b", 125.0, 32),
    (r"Ryzen 9 7950X\b", 170.0, 32),
)

#: Windows shorter than this get a warning when other processes' CPU time (10 ms ticks) counts.
MIN_WINDOW_S = 0.1

#: Seconds between polls of named processes (their CPU time is kept if they exit).
POLL_INTERVAL_S = 1.0


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def logical_cpus_per_package() -> int:
    """Logical CPUs of one package as the kernel reports them (``siblings``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("siblings"):
                return max(1, int(line.split(":", 1)[1]))
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def logical_cpu_count() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuPowerModel:
    """The estimate's one parameter and where it came from.

    Attributes:
        watts_per_cpu: watts one fully busy logical CPU is assumed to draw.
        cpu_name: the CPU model the figure is for.
        basis: where the figure comes from, in words.
    """

    watts_per_cpu: float
    cpu_name: str
    basis: str

    @property
    def method(self) -> str:
        """The method string every estimated reading carries."""
        return f"estimated: process CPU-seconds × {self.watts_per_cpu:.3g} W per logical CPU ({self.basis})"


def _positive_float(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise InputError(Problem(where=name, message=f"{raw!r} is not a number of watts",
                                 expected="a positive number, e.g. 12.5"))
    return value


def cpu_power_model(cpu_name: str | None = None, *, env: Mapping[str, str] | None = None,
                    watts_per_cpu: float | None = None, tdp_w: float | None = None) -> CpuPowerModel:
    """The watts-per-logical-CPU figure for this CPU (see the module docstring for the order).

    Raises:
        InputError: an environment variable is set to something that is not positive watts.
    """
    env = os.environ if env is None else env
    name = cpu_name or cpu_model_name()
    if watts_per_cpu is not None:
        return CpuPowerModel(watts_per_cpu, name, "set by the caller")
    from_env = _positive_float(env, WATTS_PER_CPU_ENV)
    if from_env is not None:
        return CpuPowerModel(from_env, name, f"{WATTS_PER_CPU_ENV}={from_env:g}")
    known = next(((tdp, cpus) for pattern, tdp, cpus in KNOWN_CPUS if re.search(pattern, name)), None)
    tdp_w = tdp_w if tdp_w is not None else _positive_float(env, TDP_ENV)
    if tdp_w is not None:
        cpus = known[1] if known else logical_cpus_per_package()
        return CpuPowerModel(tdp_w / cpus, name, f"TDP {tdp_w:g} W set by the user / {cpus} logical CPUs per package")
    if known:
        tdp, cpus = known
        return CpuPowerModel(tdp / cpus, name, f"TDP {tdp:g} W / {cpus} logical CPUs of a {name}")
    return CpuPowerModel(DEFAULT_WATTS_PER_CPU, name,
                         f"default for an unknown CPU {name!r}; set {WATTS_PER_CPU_ENV} or {TDP_ENV}")


class CpuEstimateMeter(Meter):
    """The CPU, estimated from the measured processes' CPU time (one reading, device ``cpu``).

    Args:
        model: watts per logical CPU; default :func:`cpu_power_model` for this host.
        process_cpu: the measured processes; default this process and its descendants.
        reason: why the CPU is estimated rather than measured (kept in :attr:`description`).
        waiting: how the measured processes' threads wait, in words, for the method string;
            default :func:`~engine.energy.waiting.waiting_note` of this process's environment
            (which worker processes inherit).
    """

    def __init__(self, model: CpuPowerModel | None = None, *, process_cpu: ProcessTreeCpu | None = None,
                 reason: str | None = None, waiting: str | None = None):
        self.model = model or cpu_power_model()
        self.process_cpu = process_cpu if process_cpu is not None else ProcessTreeCpu()
        self.reason = reason
        self.waiting = waiting if waiting is not None else waiting_note()
        self.poll_interval_s = POLL_INTERVAL_S if self.process_cpu.needs_polling else None
        self._start_s = 0.0
        self._start_cpu_s = 0.0

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    @property
    def method(self) -> str:
        """The estimate's method with how the threads wait: ``estimated: ... (basis), passive waiting``."""
        return f"{self.model.method}, {self.waiting}"

    @property
    def description(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"CPU {self.model.cpu_name}, {self.process_cpu.describe()}: {self.method}{why}"

    def begin(self, now_s: float) -> None:
        self._start_s = now_s
        self._start_cpu_s = self.process_cpu.sample(opening=True).process_cpu_s

    def poll(self, now_s: float) -> None:
        self.process_cpu.poll()

    def end(self, now_s: float) -> tuple[DeviceReading, ...]:
        duration_s = now_s - self._start_s
        sample = self.process_cpu.sample()
        cpu_s = sample.process_cpu_s - self._start_cpu_s
        warnings: list[str] = []
        energy_j: float | None = cpu_s * self.model.watts_per_cpu
        if cpu_s < 0:
            energy_j = None
            warnings.append("the measured processes' CPU time went down (a child left the process tree): "
                            "energy unknown")
        if sample.exited_pids:
            warnings.append(f"process(es) {', '.join(map(str, sample.exited_pids))} exited during the window: "
                            f"up to {POLL_INTERVAL_S:g} s of their CPU time may be missing")
        if not self.process_cpu.own and duration_s < MIN_WINDOW_S:
            if cpu_s == 0:
                energy_j = None  # below the 10 ms tick: not measured, which is not 0 J
                warnings.append(f"the window lasted {duration_s * 1e3:.0f} ms and the named processes' CPU time, "
                                "counted in 10 ms ticks, did not advance: energy unknown")
            else:
                warnings.append(f"the window lasted {duration_s * 1e3:.0f} ms: the named processes' CPU time is "
                                "counted in 10 ms ticks, so the estimate is coarse")
        return (DeviceReading(device="cpu", kind="cpu", energy_j=energy_j, duration_s=duration_s,
                              source=ESTIMATED, method=self.method,
                              detail=f"{self.model.cpu_name}; {self.process_cpu.describe()}; "
                                     f"{cpu_s:.4f} CPU-seconds",
                              warnings=tuple(warnings)),)
