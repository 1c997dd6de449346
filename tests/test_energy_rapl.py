"""RAPL against fake powercap trees in tmp_path and scripted counter sequences.

Time is passed in, reads go through an injected reader (CI runs as root, where file
permissions do not stop a read), so wraps, resets and failed reads are exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.energy import EnergyMeter
from engine.energy.cpu_time import CpuSample
from engine.energy.errors import SensorUnavailableError
from engine.energy.rapl import (MIRROR_TOLERANCE_UJ, RaplMeter, WrappingCounter, find_rapl_zones, plan_rapl_zones,
                                poll_interval_for)

INTEL_RANGE_UJ = 262_143_328_850
AMD_RANGE_UJ = 65_712_999_613  # 2^32 units of 15.3 µJ


def make_zone(root: Path, zone_id: str, name: str, energy_uj: int = 123_456_789,
              max_range_uj: int | None = INTEL_RANGE_UJ) -> Path:
    path = root / zone_id
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range_uj is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


class ScriptedReader:
    """Reads sysfs files; ``energy_uj`` of a scripted zone returns its script one value per
    read (the last repeats); an exception in a script is raised. Until :attr:`started`
    is set (the window opens), reads return the first value without consuming it: the
    meter's own checks when it opens (readability, mirrored dies) read it then."""

    def __init__(self, scripts: dict[str, list] | None = None):
        self.scripts = scripts or {}
        self.reads: dict[str, int] = {}
        self.started = False

    def __call__(self, path: Path) -> str:
        zone = path.parent.name
        if path.name == "energy_uj" and zone in self.scripts:
            i = self.reads.get(zone, 0) if self.started else 0
            self.reads[zone] = i + 1 if self.started else 0
            script = self.scripts[zone]
            value = script[min(i, len(script) - 1)]
            if isinstance(value, BaseException):
                raise value
            return f"{value}\n"
        return path.read_text()


class QuietCpu:
    """Stands in for the measured process tree: nobody else is busy unless told."""

    def __init__(self, samples: list[CpuSample] | None = None):
        self.samples = samples or [CpuSample(0.0, 0.0)]
        self.i = 0

    def sample(self, opening: bool = False) -> CpuSample:
        s = self.samples[min(self.i, len(self.samples) - 1)]
        self.i += 1
        return s

    def poll(self) -> None:
        pass

    def pids(self) -> set[int]:
        return set()


def meter(root: Path, reader=None, **kw) -> RaplMeter:
    return RaplMeter(root, read_text=reader or ScriptedReader(), process_cpu=kw.pop("process_cpu", QuietCpu()), **kw)


def window(m: RaplMeter, times: list[float]):
    """begin at times[0], poll at the middle ones, end at the last."""
    m.read_text.started = True
    m.begin(times[0])
    for t in times[1:-1]:
        m.poll(t)
    return {r.device: r for r in m.end(times[-1])}


# -- which zones are counted -----------------------------------------------------------------

def test_one_socket_counts_package_and_dram_never_core_uncore_or_psys(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "core")
    make_zone(tmp_path, "intel-rapl:0:1", "uncore")
    make_zone(tmp_path, "intel-rapl:0:2", "dram")
    make_zone(tmp_path, "intel-rapl:1", "psys")
    (tmp_path / "intel-rapl").mkdir()  # the control-type folder
    reader = ScriptedReader({"intel-rapl:0": [1_000_000, 11_000_000], "intel-rapl:0:2": [0, 2_000_000],
                             "intel-rapl:0:0": [0, 9_000_000], "intel-rapl:1": [0, 50_000_000]})
    m = meter(tmp_path, reader)
    assert m.devices == ("cpu:package-0", "dram:package-0")
    reasons = {z.name: why for z, why in m.plan.skipped}
    assert set(reasons) == {"core", "uncore", "psys"}
    assert "never added" in reasons["psys"] and "part of package-0" in reasons["core"]
    readings = window(m, [0.0, 1.0])
    assert readings["cpu:package-0"].energy_j == pytest.approx(10.0)
    assert readings["dram:package-0"].energy_j == pytest.approx(2.0)
    assert readings["cpu:package-0"].source == "rapl-package" and readings["dram:package-0"].source == "rapl-dram"


def test_two_sockets_give_one_package_and_one_dram_each(tmp_path: Path):
    for socket in (0, 1):
        make_zone(tmp_path, f"intel-rapl:{socket}", f"package-{socket}")
        make_zone(tmp_path, f"intel-rapl:{socket}:0", "dram")
    reader = ScriptedReader({"intel-rapl:0": [0, 3_000_000], "intel-rapl:1": [0, 5_000_000],
                             "intel-rapl:0:0": [0, 1_000_000], "intel-rapl:1:0": [0, 1_500_000]})
    m = meter(tmp_path, reader)
    assert m.devices == ("cpu:package-0", "dram:package-0", "cpu:package-1", "dram:package-1")
    em = EnergyMeter([m], clock=iter([0.0, 1.0]).__next__, background=False)
    reader.started = True
    em.start()
    result = em.stop()
    assert result.cpu_energy_j == pytest.approx(8.0) and result.dram_energy_j == pytest.approx(2.5)
    assert result.energy_j == pytest.approx(10.5) and result.energy_source == "measured"
    assert "rapl-package [cpu:package-0, cpu:package-1]" in result.energy_method


def test_amd_package_and_core_only_has_no_dram_and_does_not_crash(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", max_range_uj=AMD_RANGE_UJ)
    make_zone(tmp_path, "intel-rapl:0:0", "core", max_range_uj=AMD_RANGE_UJ)
    reader = ScriptedReader({"intel-rapl:0": [0, 7_000_000]})
    m = meter(tmp_path, reader)
    assert m.devices == ("cpu:package-0",)
    em = EnergyMeter([m], clock=iter([0.0, 1.0]).__next__, background=False)
    reader.started = True
    em.start()
    result = em.stop()
    assert result.cpu_energy_j == pytest.approx(7.0) and result.energy_j == pytest.approx(7.0)
    assert result.dram_energy_j is None and "DRAM not measured" in result.energy_method


def test_mmio_duplicate_of_the_package_is_counted_once(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0")
    m = meter(tmp_path)
    assert [z.zone_id for z in m.zones] == ["intel-rapl:0"]
    ((skipped, why),) = m.plan.skipped
    assert skipped.zone_id == "intel-rapl-mmio:0" and "counted once" in why


def test_tpmi_only_host_is_measured(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl-tpmi:0", "package-0")
    make_zone(tmp_path, "intel-rapl-tpmi:1", "package-1")
    assert meter(tmp_path).devices == ("cpu:package-0", "cpu:package-1")


def test_mirrored_die_zones_are_counted_once(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0-die-0", energy_uj=987_654_321)
    make_zone(tmp_path, "intel-rapl:1", "package-0-die-1", energy_uj=987_654_321 + MIRROR_TOLERANCE_UJ // 10)
    m = meter(tmp_path)
    assert m.devices == ("cpu:package-0-die-0",)
    assert "mirrors" in m.plan.reason(next(z for z, _ in m.plan.skipped))


def test_independent_die_counters_are_both_counted(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0-die-0", energy_uj=111_000_000_000)
    make_zone(tmp_path, "intel-rapl:1", "package-0-die-1", energy_uj=222_000_000_000)
    reader = ScriptedReader({"intel-rapl:0": [111_000_000_000, 111_004_000_000],
                             "intel-rapl:1": [222_000_000_000, 222_006_000_000]})
    m = meter(tmp_path, reader)
    assert m.devices == ("cpu:package-0-die-0", "cpu:package-0-die-1")
    readings = window(m, [0.0, 10.0])
    assert sum(r.energy_j for r in readings.values()) == pytest.approx(10.0)


def test_a_tree_without_package_zones_is_unavailable(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "psys")
    with pytest.raises(SensorUnavailableError, match="no RAPL package zone"):
        meter(tmp_path)


def test_a_missing_tree_is_unavailable_with_the_reason(tmp_path: Path):
    with pytest.raises(SensorUnavailableError) as raised:
        meter(tmp_path / "absent")
    assert "does not exist" in raised.value.detail and "virtual machines" in raised.value.detail


def test_root_only_energy_files_are_unavailable_with_the_fix(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [PermissionError(13, "Permission denied")]})
    with pytest.raises(SensorUnavailableError) as raised:
        meter(tmp_path, reader)
    assert "root only" in raised.value.detail and "5.10" in raised.value.detail
    assert "chmod" in raised.value.fix and "udev" in raised.value.fix


def test_subzones_know_their_package(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:1", "package-1")
    make_zone(tmp_path, "intel-rapl:1:0", "dram")
    make_zone(tmp_path, "intel-rapl:10", "package-10")
    zones = find_rapl_zones(tmp_path, ScriptedReader())
    assert [(z.zone_id, z.domain, z.package) for z in zones] == [
        ("intel-rapl:1", "package", 1), ("intel-rapl:1:0", "dram", 1), ("intel-rapl:10", "package", 10)]
    assert [z.zone_id for z in plan_rapl_zones(zones, ScriptedReader()).counted] == [
        "intel-rapl:1", "intel-rapl:1:0", "intel-rapl:10"]


# -- wrap-around, resets and failed reads -----------------------------------------------------------

def test_poll_interval_follows_the_range_and_the_assumed_power():
    assert poll_interval_for(INTEL_RANGE_UJ) == 60.0  # 262 s to wrap at 1000 W: capped at 60 s
    assert poll_interval_for(AMD_RANGE_UJ) == pytest.approx(65.713 / 4, rel=1e-3)
    assert poll_interval_for(None) == 1.0
    assert poll_interval_for(1_000_000) == 0.05  # floor


def test_single_wrap_is_unwrapped(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    start = INTEL_RANGE_UJ - 1_000_000  # 1 J before the wrap
    reader = ScriptedReader({"intel-rapl:0": [start, 4_000_000]})
    reading = window(meter(tmp_path, reader), [0.0, 10.0])["cpu:package-0"]
    assert reading.energy_j == pytest.approx(5.0) and reading.warnings == ()


def amd_trace(start_uj: int, power_w: float, times: list[float]) -> list[int]:
    return [int(start_uj + power_w * 1e6 * t) % AMD_RANGE_UJ for t in times]


def test_double_wrap_is_right_when_polled(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", max_range_uj=AMD_RANGE_UJ)
    m0 = meter(tmp_path)
    times = [i * m0.poll_interval_s for i in range(int(300 / m0.poll_interval_s) + 1)] + [300.0]
    trace = amd_trace(50_000_000_000, 500.0, times)  # 150 kJ: more than two ranges of 65.7 kJ
    reader = ScriptedReader({"intel-rapl:0": trace})
    m = meter(tmp_path, reader)
    reading = window(m, times)["cpu:package-0"]
    assert reading.energy_j == pytest.approx(150_000.0, rel=1e-6)
    assert reading.warnings == ()


def test_double_wrap_without_polls_is_declared_invalid_not_guessed(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", max_range_uj=AMD_RANGE_UJ)
    trace = amd_trace(50_000_000_000, 500.0, [0.0, 300.0])
    reader = ScriptedReader({"intel-rapl:0": trace})
    reading = window(meter(tmp_path, reader), [0.0, 300.0])["cpu:package-0"]
    assert reading.energy_j is None
    assert any("may have gone unseen" in w for w in reading.warnings)


def test_counter_reset_invalidates_the_window(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [100_000_000_000, 2_000_000]})
    reading = window(meter(tmp_path, reader), [0.0, 1.0])["cpu:package-0"]
    assert reading.energy_j is None and any("reset" in w for w in reading.warnings)


def test_a_failed_read_mid_window_is_covered_by_the_next(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [0, OSError(5, "Input/output error"), 2_000_000, 3_000_000]})
    reading = window(meter(tmp_path, reader), [0.0, 1.0, 2.0, 3.0])["cpu:package-0"]
    assert reading.energy_j == pytest.approx(3.0)
    assert any("poll" in w and "failed" in w for w in reading.warnings)


def test_a_failed_read_at_the_end_gives_no_energy(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [0, OSError(5, "Input/output error")]})
    reading = window(meter(tmp_path, reader), [0.0, 1.0])["cpu:package-0"]
    assert reading.energy_j is None and any("end of the window" in w for w in reading.warnings)


def test_a_counter_that_does_not_move_is_not_zero_joules(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [5_000_000]})
    reading = window(meter(tmp_path, reader), [0.0, 0.004])["cpu:package-0"]
    assert reading.energy_j is None
    assert any("did not advance" in w and "shorter than its update interval" in w for w in reading.warnings)


def test_a_counter_without_range_that_goes_backwards_is_invalid():
    counter = WrappingCounter(5_000, 0.0, None)
    counter.advance(4_000, 1.0)
    assert counter.invalid and "max_energy_range_uj" in counter.invalid


def test_short_windows_and_busy_neighbours_are_flagged(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    busy = QuietCpu([CpuSample(process_cpu_s=10.0, host_busy_cpu_s=100.0),
                     CpuSample(process_cpu_s=10.001, host_busy_cpu_s=100.004)])
    reader = ScriptedReader({"intel-rapl:0": [0, 30_000]})
    reading = window(meter(tmp_path, reader, process_cpu=busy), [0.0, 0.002])["cpu:package-0"]
    assert reading.energy_j == pytest.approx(0.03)
    assert any("quantise" in w for w in reading.warnings)
    assert any("other processes kept 1.50 logical CPUs busy" in w for w in reading.warnings)


def test_the_background_thread_polls_the_counter(tmp_path: Path):
    # a tiny range makes the derived poll interval the 50 ms floor
    make_zone(tmp_path, "intel-rapl:0", "package-0", max_range_uj=10_000_000)
    reader = ScriptedReader({"intel-rapl:0": [0]})
    m = meter(tmp_path, reader, assumed_max_power_w=50.0)
    assert m.poll_interval_s == 0.05
    em = EnergyMeter([m])
    reader.started = True
    with em.window() as w:
        time.sleep(0.4)
    assert reader.reads["intel-rapl:0"] >= 1 + 4 + 1  # start, >= 4 polls, end
    # the fake counter never moves: that is "not measured", never 0 J
    assert w.result.energy_j is None and any("did not advance" in x for x in w.result.warnings)


# -- a package shared by several device processes of one execution ---------------------------------

def test_a_package_shared_with_peer_device_processes_is_split_by_their_cpu_time(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:0:0", "dram")
    # This process used 1.5 CPU-s in the window, its two peers 3.0 and 1.5: it is charged 1.5 / 6 of the package.
    cpu = QuietCpu([CpuSample(10.0, 100.0, peer_cpu_s={11: 5.0, 12: 7.0}),
                    CpuSample(11.5, 106.0, peer_cpu_s={11: 8.0, 12: 8.5})])
    reader = ScriptedReader({"intel-rapl:0": [0, 40_000_000], "intel-rapl:0:0": [0, 8_000_000]})
    readings = window(meter(tmp_path, reader, process_cpu=cpu), [0.0, 1.0])
    package, dram = readings["cpu:package-0"], readings["dram:package-0"]
    assert package.energy_j == pytest.approx(40.0 * 0.25) and dram.energy_j == pytest.approx(8.0 * 0.25)
    assert package.method == "rapl-package split by CPU time between device processes"
    assert "0.250 of the reading" in package.detail and "2 other device processes" in package.detail
    # The peers' CPU time is theirs, not "other processes" contaminating the reading.
    assert not any("other processes kept" in w for w in package.warnings)


def test_without_peers_the_whole_package_is_charged(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    reader = ScriptedReader({"intel-rapl:0": [0, 40_000_000]})
    package = window(meter(tmp_path, reader), [0.0, 1.0])["cpu:package-0"]
    assert package.energy_j == pytest.approx(40.0) and package.method == "rapl-package"


def test_an_idle_window_shared_with_idle_peers_is_split_equally(tmp_path: Path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    cpu = QuietCpu([CpuSample(10.0, 100.0, peer_cpu_s={11: 5.0}), CpuSample(10.0, 100.0, peer_cpu_s={11: 5.0})])
    reader = ScriptedReader({"intel-rapl:0": [0, 30_000_000]})
    package = window(meter(tmp_path, reader, process_cpu=cpu), [0.0, 1.0])["cpu:package-0"]
    assert package.energy_j == pytest.approx(15.0)
