#!/usr/bin/env python3
"""Check the energy meters on an NVIDIA host, in about two minutes (always under four).

    .venv/bin/python scripts/gpu_check.py [--seconds 20] [--json results.json]

Prints, for cuda:0:

1. what NVML offers on this GPU and what one reading costs;
2. a table of the same windows read four ways at once: the energy counter, instant
   power integrated at 10 ms and at 50 ms (the meter's default), and the power
   reading (a 1 s average on Ampere and newer except GA100) integrated at 100 ms,
   for an idle window, a constant matmul load and a square-wave load (matmuls on for
   50 ms, off for 50 ms), ``--seconds`` each;
3. the tiny demo model (data/models/demo-small-hf) profiled on cuda:0 through
   ``engine.backends.open_backend`` and ``engine.energy.open_meter``: idle baseline,
   then a few (input, output) points, each repeated in one window of at least 1 s.

Needs an NVIDIA GPU, its driver, and a CUDA build of torch. Without them it says why
in one sentence and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.energy.nvml import import_pynvml, nvml_error_message  # noqa: E402

EXIT_NO_GPU = 2
TIME_BUDGET_S = 225.0  # stop starting new steps past this, to finish under 4 minutes
DEMO_POINTS = ((8, 8), (128, 8), (32, 32), (32, 128))


def no_gpu_reason() -> str | None:
    """Why this host cannot run the check, or ``None`` when it can."""
    nvml = import_pynvml()
    if nvml is None:
        return "nvidia-ml-py (pynvml) is not installed"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return nvml_error_message(nvml, exc)[0]
    try:
        if nvml.nvmlDeviceGetCount() == 0:
            return "NVML found no NVIDIA GPU"
    finally:
        nvml.nvmlShutdown()
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"torch {torch.__version__} ({build}) sees no CUDA GPU"
    return None


# -- loads -------------------------------------------------------------------------------------

class MatmulLoad:
    """bf16 matmuls on cuda:0 in batches of about 5 ms, so on/off edges are sharp."""

    def __init__(self, torch, size: int = 8192):
        self.torch = torch
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.a = torch.randn(size, size, device="cuda:0", dtype=dtype)
        self.b = torch.randn(size, size, device="cuda:0", dtype=dtype)
        self.out = torch.empty_like(self.a)
        for _ in range(3):
            torch.matmul(self.a, self.b, out=self.out)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            torch.matmul(self.a, self.b, out=self.out)
        torch.cuda.synchronize()
        self.matmul_s = (time.perf_counter() - started) / 10
        self.batch = max(1, int(0.005 / self.matmul_s))
        self.tflops = 2 * size ** 3 / self.matmul_s / 1e12

    def busy(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(self.batch):
                self.torch.matmul(self.a, self.b, out=self.out)
            self.torch.cuda.synchronize()

    def square_wave(self, seconds: float, half_period_s: float = 0.05) -> float:
        """On for ``half_period_s``, off for as long; returns the share of time it was on."""
        end, on_s = time.perf_counter() + seconds, 0.0
        while time.perf_counter() < end:
            started = time.perf_counter()
            self.busy(half_period_s)
            on_s += time.perf_counter() - started
            time.sleep(half_period_s)
        return on_s / seconds


# -- the comparison --------------------------------------------------------------------------

def reading_costs_us(nvml, handle, repeats: int = 200) -> dict[str, float | None]:
    from engine.energy.nvml import read_energy_counter_mj, read_instant_power_w, read_power_usage_w

    costs = {}
    for name, read in (("counter", read_energy_counter_mj), ("instant power", read_instant_power_w),
                       ("power usage", read_power_usage_w)):
        try:
            started = time.perf_counter()
            for _ in range(repeats):
                read(nvml, handle)
            costs[name] = (time.perf_counter() - started) / repeats * 1e6
        except nvml.NVMLError:
            costs[name] = None
    return costs


def compare_sources(seconds: float, load) -> list[dict]:
    """One window per load, read by every source at once."""
    from engine.energy.errors import SensorUnavailableError
    from engine.energy.meter import Poller
    from engine.energy.nvml import NvmlGpuMeter

    meters = {}
    for label, mode, interval in (("counter", "counter", None), ("instant@10ms", "power-instant", 0.01),
                                  ("instant@50ms", "power-instant", 0.05), ("usage@100ms", "power-usage", 0.1)):
        try:
            meters[label] = NvmlGpuMeter(0, mode=mode, sample_interval_s=interval)
        except SensorUnavailableError as exc:
            print(f"  {label}: not available ({exc.detail})")
    if "usage@100ms" in meters and meters["usage@100ms"].averaged:
        meters["1s-avg@100ms"] = meters.pop("usage@100ms")
    rows = []
    try:
        for name, work in (("idle", lambda s: time.sleep(s)), ("constant", load.busy),
                           ("square 50/50 ms", load.square_wave)):
            poller = Poller(list(meters.values()))
            start_s = time.monotonic()
            for meter in meters.values():
                meter.begin(start_s)
            poller.start(start_s)
            on_share = work(seconds)
            poller.stop()
            end_s = time.monotonic()
            readings = {label: meter.end(end_s)[0] for label, meter in meters.items()}
            rows.append({"load": name, "seconds": end_s - start_s,
                         "on_share": on_share if isinstance(on_share, float) else None,
                         "energy_j": {k: r.energy_j for k, r in readings.items()},
                         "warnings": {k: list(r.warnings) for k, r in readings.items() if r.warnings}})
    finally:
        for meter in meters.values():
            meter.close()
    return rows


def print_comparison(rows: list[dict]) -> None:
    labels = list(rows[0]["energy_j"]) if rows else []
    reference = "counter" if "counter" in labels else (labels[0] if labels else None)
    head = f"{'load':18} {'s':>6} " + " ".join(f"{label + ' J':>16}" for label in labels) + f" {'mean W':>8}"
    print(head)
    for row in rows:
        ref = row["energy_j"].get(reference)
        cells = []
        for label in labels:
            value = row["energy_j"][label]
            if value is None:
                cells.append(f"{'n/a':>16}")
            elif label == reference or not ref:
                cells.append(f"{value:16.1f}")
            else:
                cells.append(f"{value:8.1f} ({100 * (value - ref) / ref:+5.1f}%)")
        mean_w = f"{ref / row['seconds']:8.1f}" if ref else f"{'n/a':>8}"
        on = f"  (on {100 * row['on_share']:.0f}% of the time)" if row["on_share"] else ""
        print(f"{row['load']:18} {row['seconds']:6.1f} " + " ".join(cells) + f" {mean_w}{on}")
        for label, warnings in row["warnings"].items():
            for warning in warnings:
                print(f"{'':26}{label}: {warning}")


# -- the demo model ----------------------------------------------------------------------------

def profile_demo_model() -> dict:
    from engine.backends import open_backend
    from engine.demo_models import ensure_demo_models
    from engine.energy import measure_idle_power, open_meter
    from engine.paths import DEFAULT_MODELS_DIR

    ensure_demo_models(DEFAULT_MODELS_DIR, progress=lambda line: print(f"  demo models: {line}"))
    backend = open_backend("transformers", DEFAULT_MODELS_DIR / "demo-small-hf", device="cuda:0")
    backend.load()
    try:
        backend.generate(8, 8)  # warm-up: CUDA kernels, allocator
        meter = open_meter("cuda:0")
        print(f"  meter: {meter.description}")
        for note in meter.notes:
            print(f"  note: {note}")
        idle = measure_idle_power(meter, 3.0)
        print(f"  idle (model loaded): {idle.idle_power_w:.1f} W in all, "
              + ", ".join(f"{d} {w:.1f} W" for d, w in idle.power_w.items() if w is not None))
        print(f"  {'in':>5} {'out':>5} {'reps':>5} {'s/req':>8} {'J/req':>9} {'GPU J/req':>10} {'CPU J/req':>10} "
              f"{'dyn J/req':>10}  source")
        points = []
        for input_tokens, output_tokens in DEMO_POINTS:
            single = backend.generate(input_tokens, output_tokens)
            assert (single.input_tokens, single.output_tokens) == (input_tokens, output_tokens)
            reps = max(1, math.ceil(1.0 / max(single.runtime_s, 1e-3)))
            with meter.window() as window:
                for _ in range(reps):
                    backend.generate(input_tokens, output_tokens)
            r = window.result
            dynamic = r.dynamic_energy_j(idle)

            def per(value):
                return None if value is None else value / reps

            def cell(value, width=10):
                return f"{value:{width}.3f}" if value is not None else f"{'n/a':>{width}}"

            print(f"  {input_tokens:5d} {output_tokens:5d} {reps:5d} {r.duration_s / reps:8.4f} "
                  f"{cell(per(r.energy_j), 9)} {cell(per(r.gpu_energy_j))} {cell(per(r.cpu_energy_j))} "
                  f"{cell(per(dynamic))}  {r.energy_source}")
            for warning in r.warnings:
                print(f"        warning: {warning}")
            points.append({"input_tokens": input_tokens, "output_tokens": output_tokens, "reps": reps,
                           **r.measurement_columns(idle), "runtime_s_per_request": r.duration_s / reps})
        meter.close()
        return {"idle": idle.to_dict(), "points": points}
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the energy meters on an NVIDIA host.")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each comparison window (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    started = time.monotonic()

    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: no usable NVIDIA GPU here: {reason}. Run it on a host with an NVIDIA GPU, its driver "
              "and a CUDA build of torch.", file=sys.stderr)
        return EXIT_NO_GPU

    import torch

    from engine.energy.discovery import discover_sensors
    from engine.energy.nvml import probe_gpu, resolve_cuda_device

    nvml = import_pynvml()
    nvml.nvmlInit()
    torch.cuda.init()
    identity, handle = resolve_cuda_device(0, nvml)
    caps = probe_gpu(nvml, handle, identity.name)
    driver = nvml.nvmlSystemGetDriverVersion()
    costs = reading_costs_us(nvml, handle)
    print(f"GPU cuda:0 = NVML {identity.nvml_index}: {identity.name} ({identity.uuid}), {identity.architecture}, "
          f"driver {driver.decode() if isinstance(driver, bytes) else driver}, torch {torch.__version__}")
    print(f"  counter: {caps.counter}; instant power field: {caps.instant_power}; power usage: {caps.power_usage} "
          f"(1 s average: {caps.usage_is_1s_average})")
    print("  cost per reading: " + ", ".join(f"{k} {v:.0f} µs" if v is not None else f"{k} n/a"
                                             for k, v in costs.items()))
    for status in discover_sensors():
        print(f"  sensors: {status.status:9} {status.source:13} {status.device:16} {status.detail}")
    nvml.nvmlShutdown()

    results: dict = {"gpu": {"name": identity.name, "uuid": identity.uuid, "architecture": identity.architecture,
                             "counter": caps.counter, "instant_power": caps.instant_power,
                             "usage_is_1s_average": caps.usage_is_1s_average, "reading_cost_us": costs}}
    load = MatmulLoad(torch)
    print(f"\nLoad: {load.tflops:.0f} TFLOP/s per matmul, batches of {load.batch} (~5 ms)")
    print(f"Energy of the same window, read four ways ({args.seconds:g} s each; Δ against the counter):")
    rows = compare_sources(args.seconds, load)
    print_comparison(rows)
    results["comparison"] = rows
    del load
    torch.cuda.empty_cache()

    if time.monotonic() - started < TIME_BUDGET_S - 60:
        print("\nDemo model on cuda:0 (per request; each point repeated in one window of >= 1 s):")
        results["demo_model"] = profile_demo_model()
    else:
        print("\nDemo model skipped: not enough of the 4-minute budget left.")
    elapsed = time.monotonic() - started
    print(f"\ngpu_check finished in {elapsed:.0f} s")
    results["elapsed_s"] = elapsed
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
