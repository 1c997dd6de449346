"""The CPU estimate, on this machine: real CPU time of real processes, labelled estimated."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.energy import open_meter
from engine.energy.cpu_time import ProcessTreeCpu
from engine.energy.estimate import (DEFAULT_WATTS_PER_CPU, CpuEstimateMeter, CpuPowerModel, cpu_power_model)
from engine.errors import InputError

ONE_WATT = CpuPowerModel(1.0, "test CPU", "1 W per CPU for the test")  # energy_j == CPU-seconds


def spin(cpu_seconds: float) -> None:
    """Burn this much CPU time (not wall time: a shared VM may give us half a core)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


BURN = "import time\nwhile time.process_time() < {s}: pass\n"


# -- the watts per CPU ----------------------------------------------------------------------------

def test_a_known_cpu_uses_its_tdp_per_logical_cpu():
    model = cpu_power_model("AMD EPYC 7742 64-Core Processor", env={})
    assert model.watts_per_cpu == pytest.approx(225 / 128)
    assert "TDP 225 W / 128 logical CPUs" in model.method


def test_an_unknown_cpu_uses_the_documented_default_and_says_how_to_set_it():
    model = cpu_power_model("AMD EPYC", env={})
    assert model.watts_per_cpu == DEFAULT_WATTS_PER_CPU
    assert model.method.startswith("estimated:")
    assert "10 W per logical CPU" in model.method and "PLANNER_CPU_WATTS_PER_CPU" in model.method


def test_the_user_sets_watts_per_cpu_or_the_tdp():
    assert cpu_power_model("AMD EPYC 7742", env={"PLANNER_CPU_WATTS_PER_CPU": "3.5"}).watts_per_cpu == 3.5
    assert cpu_power_model("AMD EPYC 7742", env={"PLANNER_CPU_TDP_W": "256"}).watts_per_cpu == pytest.approx(2.0)
    assert cpu_power_model("x", env={}, watts_per_cpu=7.0).method.startswith("estimated: process CPU-seconds × 7 W")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_bad_settings_are_refused_with_the_variable_named(value):
    with pytest.raises(InputError) as raised:
        cpu_power_model("AMD EPYC", env={"PLANNER_CPU_TDP_W": value})
    assert "PLANNER_CPU_TDP_W" in str(raised.value) and "positive" in str(raised.value)


# -- the estimate on this machine ------------------------------------------------------------------

def test_a_busy_window_on_this_host_is_estimated_and_not_zero(tmp_path: Path):
    meter = open_meter("cpu", powercap_root=tmp_path / "no-powercap", env={})
    assert any("estimated" in note for note in meter.notes)
    with meter.window() as w:
        spin(0.2)
    result = w.result
    assert result.energy_source == "estimated"
    assert "W per logical CPU" in result.energy_method
    (reading,) = result.readings
    assert reading.source == "estimated" and reading.estimated
    # 0.2 CPU-seconds at the default 10 W
    assert result.cpu_energy_j == result.energy_j
    assert result.energy_j >= 0.2 * DEFAULT_WATTS_PER_CPU
    assert result.energy_j <= (result.duration_s + 0.05) * DEFAULT_WATTS_PER_CPU


def test_an_idle_window_costs_little_and_is_never_negative():
    meter = CpuEstimateMeter(ONE_WATT)
    meter.begin(0.0)
    time.sleep(0.2)
    (reading,) = meter.end(0.2)
    assert reading.energy_j is not None and 0.0 <= reading.energy_j < 0.05


def test_a_child_process_counts(tmp_path: Path):
    meter = CpuEstimateMeter(ONE_WATT)
    meter.begin(0.0)
    subprocess.run([sys.executable, "-c", BURN.format(s=0.3)], check=True)
    (reading,) = meter.end(1.0)
    assert reading.energy_j >= 0.3  # the child's 0.3 CPU-seconds, reaped into our children times


def test_named_processes_are_polled_and_kept_when_they_exit():
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.4)])
    time.sleep(0.05)  # let it start: CPU time it spends before the window is not ours to count
    try:
        meter = CpuEstimateMeter(ONE_WATT, process_cpu=ProcessTreeCpu([child.pid]))
        assert meter.poll_interval_s == 1.0
        meter.begin(0.0)
        while child.poll() is None:
            meter.poll(0.5)
            time.sleep(0.02)
    finally:
        child.wait()
    (reading,) = meter.end(1.0)
    assert 0.2 <= reading.energy_j <= 0.45  # most of its 0.4 CPU-seconds; the tail after the last poll is lost
    assert any(str(child.pid) in w and "exited" in w for w in reading.warnings)


def test_own_process_estimate_needs_no_polling():
    assert CpuEstimateMeter(ONE_WATT).poll_interval_s is None


def test_a_named_idle_process_in_a_tiny_window_is_unknown_not_zero():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # past its start-up
        meter = CpuEstimateMeter(ONE_WATT, process_cpu=ProcessTreeCpu([sleeper.pid]))
        meter.begin(0.0)
        (reading,) = meter.end(0.005)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert reading.energy_j is None and any("10 ms ticks" in w for w in reading.warnings)


# -- the estimate under a busy neighbour ---------------------------------------------------------------

ONE_REQUEST_PER_LINE = """
import json, sys
from engine.backends import open_backend
from engine.energy import open_meter
from engine.energy.estimate import CpuPowerModel
from engine.energy.load_cost import warm_up
meter = open_meter("cpu", cpu_model=CpuPowerModel(1.0, "any", "1 W per CPU: joules are CPU-seconds"))
backend = open_backend("llama.cpp", sys.argv[1], "cpu")
backend.load()
warm_up(backend)
print(json.dumps({"method": meter.meters[0].method}), flush=True)
for line in sys.stdin:
    with meter.window() as window:
        backend.generate(32, 16)
    print(json.dumps({"cpu_s": window.result.energy_j, "wall_s": window.result.duration_s}), flush=True)
"""


@pytest.mark.slow
def test_the_estimate_of_a_real_inference_does_not_count_waiting_beside_a_busy_neighbour(demo_models):
    """A worker's inference (passive waiting) costs about the same CPU-seconds with a CPU-heavy process beside it.

    Requests alternate between quiet and loaded (one busy-loop process per logical CPU), two requests
    a side, so that drifts of this shared host hit both alike; the median of 7 pairs' ratios must stay
    under ×1.4. With OpenMP's default (spinning) waiting, bench/fidelity_causes.py measured ×3.0 under the
    same load, so losing passive waiting fails here. What remains is real work made slower by the
    neighbour (shared caches, a sibling hyperthread), which the estimate rightly counts: the quiet VM
    gave medians ×1.07 and ×1.09, a CI machine ×1.17 (pairs ×1.15 to ×1.21). How close the estimate
    holds is a figure for bench/, not a target for a test.
    """
    from engine.energy.waiting import PASSIVE_NOTE, worker_environment

    worker = subprocess.Popen([sys.executable, "-c", ONE_REQUEST_PER_LINE, str(demo_models["llama.cpp"].path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_environment(),
                              cwd=Path(__file__).resolve().parent.parent)

    def request() -> float:
        worker.stdin.write("go\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())["cpu_s"]

    ratios = []
    try:
        assert json.loads(worker.stdout.readline())["method"].endswith(PASSIVE_NOTE)
        for pair in range(7):
            quiet_first = pair % 2 == 0
            costs = {}
            for loaded in ((False, True) if quiet_first else (True, False)):
                neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                              for _ in range(os.cpu_count() or 1)] if loaded else []
                try:
                    if loaded:
                        time.sleep(0.3)  # the neighbours are running
                    costs[loaded] = request() + request()
                finally:
                    for neighbour in neighbours:
                        neighbour.kill()
                        neighbour.wait()
            ratios.append(costs[True] / costs[False])
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    print(f"loaded/quiet CPU-seconds: median ×{statistics.median(ratios):.2f}, pairs {[round(r, 2) for r in ratios]}")
    assert 0.7 < statistics.median(ratios) < 1.4, ratios
