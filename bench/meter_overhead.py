"""The energy meter's own CPU cost while a window is open, as % of one core.

    .venv/bin/python bench/meter_overhead.py [--seconds 5]

For each meter set-up, opens one window of ``--seconds`` while this process sleeps,
so all CPU time the process uses in it is the meter's (its background poller). Also
times a start+stop pair, which every profiling trial pays once. Target: under 1% of
one core while polling.

Set-ups: this host as ``open_meter("cpu")`` builds it (here: the CPU estimate); the
estimate following a named process (polled every second); a fake RAPL tree (two
sockets with DRAM) at its derived poll interval and forced to the 50 ms floor (the
worst case: a counter with a tiny range); and NVML power sampling every 50 ms against
an in-process fake (the Python side of sampling; a real driver call adds its own cost,
see scripts/gpu_check.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pynvml  # noqa: E402

from engine.energy import EnergyMeter, open_meter  # noqa: E402
from engine.energy.cpu_time import ProcessTreeCpu  # noqa: E402
from engine.energy.estimate import CpuEstimateMeter  # noqa: E402
from engine.energy.nvml import NvmlGpuMeter  # noqa: E402
from engine.energy.rapl import RaplMeter  # noqa: E402


def fake_rapl_tree(root: Path) -> Path:
    for socket in (0, 1):
        for zone, name in ((f"intel-rapl:{socket}", f"package-{socket}"), (f"intel-rapl:{socket}:0", "dram")):
            path = root / zone
            path.mkdir(parents=True)
            (path / "name").write_text(name + "\n")
            (path / "energy_uj").write_text(f"{123456789 + socket}\n")
            (path / "max_energy_range_uj").write_text("262143328850\n")
    return root


class FakeNvml:
    """A Hopper answering instant power, to time the sampler's own Python work."""

    def __getattr__(self, name):
        if name.startswith(("NVMLError", "NVML_")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return object()
    def nvmlDeviceGetName(self, h): return "Fake H100"
    def nvmlDeviceGetUUID(self, h): return "GPU-fake"
    def nvmlDeviceGetArchitecture(self, h): return pynvml.NVML_DEVICE_ARCH_HOPPER
    def nvmlDeviceGetTotalEnergyConsumption(self, h): return 1_000_000
    def nvmlDeviceGetPowerUsage(self, h): return 300_000
    def nvmlDeviceGetComputeRunningProcesses(self, h): return []

    def nvmlDeviceGetFieldValues(self, h, ids):
        return [SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=300_000))]


def measure(meter: EnergyMeter, seconds: float) -> dict:
    # start+stop cost, averaged over a few empty windows
    t0 = time.process_time()
    for _ in range(20):
        meter.start()
        meter.stop()
    start_stop_ms = (time.process_time() - t0) / 20 * 1e3
    cpu0, wall0 = time.process_time(), time.perf_counter()
    meter.start()
    time.sleep(seconds)
    result = meter.stop()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    intervals = [m.poll_interval_s for m in meter.meters if m.poll_interval_s]
    return {"poll_s": min(intervals) if intervals else None, "cpu_ms": cpu_s * 1e3,
            "percent": 100 * cpu_s / wall_s, "start_stop_ms": start_stop_ms, "energy_j": result.energy_j}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured window")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = fake_rapl_tree(Path(tmp) / "powercap")
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            setups = [
                ("this host: open_meter('cpu')", lambda: open_meter("cpu")),
                ("estimate following a named pid", lambda: EnergyMeter(
                    [CpuEstimateMeter(process_cpu=ProcessTreeCpu([sleeper.pid]))])),
                ("fake RAPL, 2 sockets + DRAM, derived interval", lambda: EnergyMeter([RaplMeter(tree)])),
                ("fake RAPL, forced to the 50 ms floor", lambda: EnergyMeter(
                    [RaplMeter(tree, assumed_max_power_w=1e9)])),
                ("fake NVML instant power @50 ms", lambda: EnergyMeter(
                    [NvmlGpuMeter(0, nvml=FakeNvml(), env={}, mode="power-instant")])),
            ]
            for name, build in setups:
                meter = build()
                try:
                    rows.append((name, measure(meter, args.seconds)))
                finally:
                    meter.close()
        finally:
            sleeper.kill()
            sleeper.wait()

    print(f"Meter overhead over {args.seconds:g} s windows (this process sleeping; target < 1% of one core)")
    print(f"{'set-up':48} {'poll':>8} {'CPU ms':>8} {'% core':>7} {'start+stop ms':>14}")
    for name, r in rows:
        poll = "none" if r["poll_s"] is None else f"{r['poll_s']:.2f} s"
        print(f"{name:48} {poll:>8} {r['cpu_ms']:8.2f} {r['percent']:7.3f} {r['start_stop_ms']:14.3f}")
    worst = max(r["percent"] for _, r in rows)
    print(f"worst: {worst:.3f}% of one core -> {'OK' if worst < 1.0 else 'OVER the 1% target'}")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
