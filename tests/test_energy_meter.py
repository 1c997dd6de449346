"""Several devices in one window: totals, labels, idle baseline, and the meter for a device."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pynvml
import pytest

from engine.energy import (MEASUREMENT_COLUMNS, EnergyMeter, MeterStateError, ReplayMeter, SensorUnavailableError,
                           measure_idle_power, open_meter)
from engine.energy.base import Meter
from engine.energy.estimate import CpuEstimateMeter
from engine.energy.nvml import NvmlGpuMeter
from engine.energy.rapl import RaplMeter
from engine.errors import InputError
from engine.store.migrations import MIGRATIONS
from tests.test_energy_nvml import FakeNvml, volta
from tests.test_energy_rapl import make_zone


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def replay_meter(clock: FakeClock, gpu_w=250.0, cpu_w=40.0, dram_w=5.0, cpu_source="rapl-package") -> EnergyMeter:
    return EnergyMeter([ReplayMeter("cuda:0", "gpu", gpu_w, "nvml-counter"),
                        ReplayMeter("cpu:package-0", "cpu", cpu_w, cpu_source),
                        ReplayMeter("dram:package-0", "dram", dram_w, "rapl-dram")],
                       clock=clock, background=False)


def test_totals_are_summed_per_kind_and_labelled_measured():
    clock = FakeClock()
    meter = replay_meter(clock)
    with meter.window() as w:
        clock.advance(2.0)
    r = w.result
    assert (r.gpu_energy_j, r.cpu_energy_j, r.dram_energy_j, r.energy_j) == (500.0, 80.0, 10.0, 590.0)
    assert r.duration_s == 2.0 and r.energy_source == "measured"
    assert r.energy_method == ("nvml-counter [cuda:0] + rapl-package [cpu:package-0] + rapl-dram [dram:package-0]")
    assert r.started_at <= r.finished_at and r.started_at.tzinfo is not None


def test_any_estimated_part_makes_the_total_estimated():
    clock = FakeClock()
    meter = replay_meter(clock, cpu_source="estimated")
    with meter.window() as w:
        clock.advance(1.0)
    assert w.result.energy_source == "estimated" and w.result.energy_j == 295.0


def test_a_failed_reading_leaves_its_kind_and_the_total_unknown_never_zero():
    clock = FakeClock()
    meter = replay_meter(clock, gpu_w=[None])
    with meter.window() as w:
        clock.advance(1.0)
    r = w.result
    assert r.gpu_energy_j is None and r.energy_j is None
    assert r.cpu_energy_j == 40.0  # the parts that were measured stay
    assert "cuda:0: replayed a failed reading" in r.warnings
    row = r.measurement_columns()
    assert row["energy_j"] is None and row["warnings"] == "cuda:0: replayed a failed reading"


def test_measurement_columns_are_exactly_the_tables_energy_columns():
    table = next(sql for m in MIGRATIONS for sql in m.statements if "CREATE TABLE measurements" in sql)
    for column in MEASUREMENT_COLUMNS:
        assert re.search(rf"^\s*{column}\s", table, re.MULTILINE), column
    clock = FakeClock()
    meter = replay_meter(clock)
    with meter.window() as w:
        clock.advance(1.0)
    assert tuple(w.result.measurement_columns()) == MEASUREMENT_COLUMNS


def test_idle_baseline_gives_idle_power_and_dynamic_energy():
    clock = FakeClock()
    idle_meter = replay_meter(clock, gpu_w=[60.0, 250.0], cpu_w=[20.0, 40.0], dram_w=[2.0, 5.0])
    idle = measure_idle_power(idle_meter, 5.0, sleep=clock.advance)
    assert idle.duration_s == 5.0
    assert dict(idle.power_w) == {"cuda:0": 60.0, "cpu:package-0": 20.0, "dram:package-0": 2.0}
    assert (idle.idle_power_w, idle.gpu_idle_power_w, idle.cpu_idle_power_w) == (82.0, 60.0, 20.0)
    with idle_meter.window() as w:
        clock.advance(2.0)
    assert w.result.energy_j == 590.0
    assert w.result.dynamic_energy_j(idle) == pytest.approx(590.0 - 82.0 * 2.0)
    assert w.result.measurement_columns(idle)["idle_power_w"] == 82.0


def test_an_idle_baseline_of_other_devices_is_not_used():
    clock = FakeClock()
    idle = measure_idle_power(EnergyMeter([ReplayMeter("cuda:1", "gpu", 60.0)], clock=clock, background=False),
                              1.0, sleep=clock.advance)
    meter = replay_meter(clock)
    with meter.window() as w:
        clock.advance(1.0)
    row = w.result.measurement_columns(idle)
    assert row["idle_power_w"] is None and "other devices" in row["warnings"]
    assert w.result.dynamic_energy_j(idle) is None


def test_the_window_closes_when_the_work_raises():
    clock = FakeClock()
    meter = replay_meter(clock)
    with pytest.raises(RuntimeError):
        with meter.window() as w:
            clock.advance(1.0)
            raise RuntimeError("backend crashed")
    assert w.result is not None and w.result.energy_j == 295.0
    meter.start()  # not left open
    meter.stop()


def test_windows_cannot_overlap_or_stop_unopened():
    meter = replay_meter(FakeClock())
    with pytest.raises(MeterStateError):
        meter.stop()
    meter.start()
    with pytest.raises(MeterStateError):
        meter.start()


def test_a_device_cannot_be_measured_twice():
    with pytest.raises(ValueError, match="cuda:0"):
        EnergyMeter([ReplayMeter("cuda:0", "gpu", 1.0), ReplayMeter("cuda:0", "gpu", 1.0)])


class BrokenPoll(ReplayMeter):
    poll_interval_s = 0.5

    def poll(self, now_s: float) -> None:
        raise ZeroDivisionError("bug")


def test_polls_are_due_by_interval_and_a_poll_bug_becomes_a_warning():
    clock = FakeClock()
    polled = ReplayMeter("cpu", "cpu", 1.0, "estimated")
    polled.poll_interval_s = 1.0
    meter = EnergyMeter([polled, BrokenPoll("cuda:0", "gpu", 1.0)], clock=clock, background=False)
    meter.start()
    for _ in range(10):
        clock.advance(0.25)
        meter.poll()
    result = meter.stop()
    assert polled.polls == 2  # at 1.0 s and 2.0 s of a 2.5 s window
    assert result.energy_j == pytest.approx(5.0)
    assert any("a poll failed" in w and "ZeroDivisionError" in w for w in result.warnings)


def test_the_background_thread_polls_with_the_real_clock():
    polled = ReplayMeter("cpu", "cpu", 1.0, "estimated")
    polled.poll_interval_s = 0.02
    meter = EnergyMeter([polled])
    with meter.window():
        time.sleep(0.25)
    assert polled.polls >= 5
    assert not any(t.name == "energy-poller" for t in __import__("threading").enumerate())


# -- the meter for a device ----------------------------------------------------------------------

def test_cpu_work_on_a_rapl_host_is_measured(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "dram")
    meter = open_meter("cpu", powercap_root=tmp_path)
    assert [type(m) for m in meter.meters] == [RaplMeter] and meter.notes == ()
    assert meter.devices == ("cpu:package-0", "dram:package-0")


def test_root_only_rapl_falls_back_to_the_estimate_and_says_how_to_fix_it(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")

    def deny(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    meter = open_meter("cpu", powercap_root=tmp_path, read_text=deny, env={})
    assert [type(m) for m in meter.meters] == [CpuEstimateMeter]
    (note,) = meter.notes
    assert "estimated" in note and "root only" in note and "udev" in note


def test_gpu_work_measures_the_gpu_and_the_cpu(tmp_path: Path):
    meter = open_meter("cuda:0", powercap_root=tmp_path / "absent", nvml=FakeNvml([volta()]), env={})
    assert [type(m) for m in meter.meters] == [NvmlGpuMeter, CpuEstimateMeter]
    assert meter.devices == ("cuda:0", "cpu")


def test_gpu_work_without_nvml_is_refused_with_the_reason(tmp_path: Path):
    fake = FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    with pytest.raises(SensorUnavailableError) as raised:
        open_meter("cuda:0", powercap_root=tmp_path, nvml=fake, env={})
    assert "libnvidia-ml.so" in raised.value.detail


def test_a_bad_device_string_is_an_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="cpu, cuda or cuda:N"):
        open_meter("tpu:0", powercap_root=tmp_path)


def test_every_meter_implements_the_interface():
    for cls in (NvmlGpuMeter, RaplMeter, CpuEstimateMeter, ReplayMeter):
        assert issubclass(cls, Meter)
