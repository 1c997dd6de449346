"""A meter that replays recorded power, for CPU-only tests of code that measures.

Like zeus's ``ReplayZeusMonitor``: the profiler, the executor and their tests run the
real :class:`~engine.energy.meter.EnergyMeter` against it and get readings whose
energy grows with the window's length, labelled with the source they replay.
"""

from __future__ import annotations

from typing import Sequence

from engine.energy.base import DeviceReading, Meter


class ReplayMeter(Meter):
    """One device whose power in successive windows is taken from ``power_w``.

    Args:
        device: the device name (``cuda:0``, ``cpu``, ...).
        kind: ``gpu``, ``cpu`` or ``dram``.
        power_w: watts per window, used in turn and cycled; ``None`` replays a failed
            reading (``energy_j=None`` with a warning).
        source: the source to label readings with (``nvml-counter``, ``estimated``, ...).
        method: the method string; default the source.
    """

    def __init__(self, device: str, kind: str, power_w: float | Sequence[float | None],
                 source: str = "nvml-counter", method: str | None = None):
        self.device, self.kind, self.source = device, kind, source
        self.method = method or source
        self.trace: tuple[float | None, ...] = (power_w,) if isinstance(power_w, (int, float)) else tuple(power_w)
        if not self.trace:
            raise ValueError("power_w needs at least one value")
        self.windows = 0
        self.polls = 0
        self._start_s = 0.0

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.device,)

    @property
    def description(self) -> str:
        return f"{self.device}: replay of {self.source}"

    def begin(self, now_s: float) -> None:
        self._start_s = now_s

    def poll(self, now_s: float) -> None:
        self.polls += 1

    def end(self, now_s: float) -> tuple[DeviceReading, ...]:
        duration_s = now_s - self._start_s
        power_w = self.trace[self.windows % len(self.trace)]
        self.windows += 1
        energy_j = None if power_w is None else power_w * duration_s
        warnings = ("replayed a failed reading",) if power_w is None else ()
        return (DeviceReading(self.device, self.kind, energy_j, duration_s, self.source, self.method,
                              detail="replay", warnings=warnings),)
