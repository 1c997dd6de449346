"""The meter interface: what every energy source implements and what it returns.

A *meter* covers one or more devices read through one source (one GPU through NVML;
every CPU package and DRAM zone through RAPL; the CPU through the estimate). The
composite :class:`~engine.energy.meter.EnergyMeter` opens a window on several meters
at once and keeps one background thread that calls :meth:`Meter.poll` on each at its
own interval.

Time is always passed in (``now_s``, seconds of a monotonic clock), never read by a
meter, so tests drive a meter with scripted readings and a scripted clock, and every
device of one window shares one start and one stop time.

Contract between :class:`EnergyMeter` and a meter: ``begin``, ``poll`` and ``end`` are
never called concurrently; ``poll`` is only called between ``begin`` and ``end``.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass

#: Device kinds; a window's totals are summed per kind.
DEVICE_KINDS = ("gpu", "cpu", "dram")

#: The source name every estimated reading carries.
ESTIMATED = "estimated"


@dataclass(frozen=True)
class DeviceReading:
    """The energy one device used during one window.

    Attributes:
        device: what was measured: ``cuda:0``, ``cpu:package-0``, ``dram:package-0``,
            ``cpu`` (the estimate).
        kind: ``gpu``, ``cpu`` or ``dram``; totals are summed per kind.
        energy_j: joules used in the window, or ``None`` when it could not be measured
            (then ``warnings`` says why). Never 0 for "unknown".
        duration_s: seconds the window lasted.
        source: the sensor (``nvml-counter``, ``nvml-power``, ``rapl-package``,
            ``rapl-dram``) or ``estimated``.
        method: how the number was obtained, short enough for a table cell
            (``nvml-power:instant@50ms``, ``estimated: ...``, with the watts assumed).
        detail: what exactly was read (GPU name and UUID, powercap zone, CPU model).
        warnings: anything that makes the number less trustworthy, one sentence each.
    """

    device: str
    kind: str
    energy_j: float | None
    duration_s: float
    source: str
    method: str
    detail: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def estimated(self) -> bool:
        """Whether the number comes from a model rather than a sensor."""
        return self.source == ESTIMATED

    @property
    def power_w(self) -> float | None:
        """Average power over the window, in watts, or ``None`` when unknown."""
        if self.energy_j is None or self.duration_s <= 0:
            return None
        return self.energy_j / self.duration_s

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings), "power_w": self.power_w}


class Meter(abc.ABC):
    """One energy source covering one or more devices.

    Subclasses: :class:`~engine.energy.nvml.NvmlGpuMeter`,
    :class:`~engine.energy.rapl.RaplMeter`, :class:`~engine.energy.estimate.CpuEstimateMeter`,
    :class:`~engine.energy.replay.ReplayMeter`.
    """

    #: Seconds between background polls while a window is open, or ``None`` when the
    #: meter needs none (a counter that cannot wrap, read only at start and stop).
    poll_interval_s: float | None = None

    @property
    @abc.abstractmethod
    def devices(self) -> tuple[str, ...]:
        """The device names this meter's readings carry, in reading order."""

    @property
    def description(self) -> str:
        """One line saying what this meter reads (for logs and the sensors list)."""
        return ", ".join(self.devices)

    @abc.abstractmethod
    def begin(self, now_s: float) -> None:
        """Start a window at ``now_s``: take the first reading."""

    def poll(self, now_s: float) -> None:
        """Take an intermediate reading (wrap tracking, power sampling). Default: nothing."""

    @abc.abstractmethod
    def end(self, now_s: float) -> tuple[DeviceReading, ...]:
        """Stop the window at ``now_s`` and return one reading per device.

        Never raises for a sensor failure: a reading that failed has ``energy_j=None``
        and a warning saying why.
        """

    def close(self) -> None:
        """Release what the meter holds (library handles). Default: nothing."""
