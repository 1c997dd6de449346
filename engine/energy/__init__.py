"""Energy: which sources exist on this host, and meters that read them.

    from engine.energy import open_meter, measure_idle_power
    meter = open_meter("cuda:0")             # or "cpu"
    idle = measure_idle_power(meter, 5.0)    # model loaded, nothing running
    with meter.window() as w:
        ...                                   # the work
    w.result.measurement_columns(idle)       # energy_j, energy_source, energy_method, ...

Modules: ``base`` (the :class:`Meter` interface and :class:`DeviceReading`), ``nvml``
(NVIDIA GPUs), ``rapl`` (CPU packages and DRAM), ``estimate`` (the labelled CPU
estimate), ``replay`` (a fake for tests), ``meter`` (several devices in one window,
idle baseline), ``discovery`` (what is measurable here and why), ``errors``.
"""

from engine.energy.base import DeviceReading, Meter
from engine.energy.discovery import SensorStatus, discover_sensors
from engine.energy.errors import EnergyError, MeterStateError, SensorUnavailableError
from engine.energy.estimate import CpuEstimateMeter, CpuPowerModel, cpu_power_model
from engine.energy.meter import (MEASUREMENT_COLUMNS, EnergyMeter, IdleBaseline, Poller, WindowResult,
                                 measure_idle_power, open_meter)
from engine.energy.nvml import NvmlGpuMeter
from engine.energy.rapl import RaplMeter
from engine.energy.replay import ReplayMeter

__all__ = [
    "MEASUREMENT_COLUMNS", "CpuEstimateMeter", "CpuPowerModel", "DeviceReading", "EnergyError", "EnergyMeter",
    "IdleBaseline", "Meter", "MeterStateError", "NvmlGpuMeter", "Poller", "RaplMeter", "ReplayMeter",
    "SensorStatus", "SensorUnavailableError", "WindowResult", "cpu_power_model", "discover_sensors",
    "measure_idle_power", "open_meter",
]
