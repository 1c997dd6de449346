"""Physical bounds of one measurement: values no real request batch can have.

One place for every path a measurement takes (import, profiling, execution) and for the
fitter, which leaves out stored rows outside them. The bounds are wide on purpose: they
catch unit mistakes and corrupt numbers (``1e200`` J, ``1e-200`` J, a runtime in
microseconds typed as seconds), not unusual hardware.

- **runtime_s** in [1 µs, 10⁶ s]: no request completes in under a microsecond (a single
  decode step of the smallest model takes far longer), and a batch that runs for more
  than 11.6 days is not one measurement.
- **energy_j** in [1 nJ, 1 GJ]: below a nanojoule no meter resolves anything (RAPL counts
  in ~15 µJ, NVML in 1 mJ); a gigajoule is an 8-GPU node, which draws under 10 kW, running
  for more than a day on one batch.
- **power** (energy_j / runtime_s) in [1 µW, 100 kW] per device: a GPU draws up to about
  1 kW, a whole 8-GPU node under 10 kW; 100 kW leaves room for a "device" that is a
  whole node or a rack meter, and nothing running a model draws less than a microwatt.
- **idle_power_w** in [0, 100 kW] and the component energies (gpu/cpu/dram_energy_j) in
  [0, 1 GJ], for the same reasons; 0 is allowed there (a DRAM counter can read 0 over a
  short request).
- **token counts** from 1 to 10⁷: the longest context windows hold 10⁶–10⁷ tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bound:
    """An inclusive range ``[low, high]`` of one quantity, in ``unit``.

    ``too_small``/``too_large`` finish the sentence "VALUE is below/above the bound, ...".
    """

    name: str
    low: float
    high: float
    unit: str
    too_small: str
    too_large: str

    def below(self, values) -> np.ndarray:
        """True where a value is a number below ``low`` (NaN, i.e. unknown, never is)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(values, dtype=float) < self.low

    def above(self, values) -> np.ndarray:
        """True where a value is a number above ``high`` (infinity is; NaN is not)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(values, dtype=float) > self.high

    def outside(self, values) -> np.ndarray:
        """True where a value is a number outside ``[low, high]``."""
        return self.below(values) | self.above(values)

    def describe(self) -> str:
        """The range as people read it: ``1e-06 to 1e+06 s``."""
        return f"{self.low:g} to {self.high:g} {self.unit}"


RUNTIME_S = Bound("runtime_s", 1e-6, 1e6, "s", "faster than any request can finish (is it in seconds?)",
                  "longer than one measurement can last (10^6 s is 11.6 days)")
ENERGY_J = Bound("energy_j", 1e-9, 1e9, "J", "less than any energy meter can resolve (is it in joules?)",
                 "more than any request batch uses (an 8-GPU node running for a day uses under 1e9 J)")
COMPONENT_ENERGY_J = Bound("component energy", 0.0, 1e9, "J", "negative", ENERGY_J.too_large)
POWER_W = Bound("power", 1e-6, 1e5, "W", "less than any processor running a model draws",
                "more than one device draws (an 8-GPU node draws under 10 kW)")
IDLE_POWER_W = Bound("idle_power_w", 0.0, 1e5, "W", "negative", POWER_W.too_large)
TOKENS = Bound("tokens", 1, 10_000_000, "tokens", "fewer than one token",
               "more than any model's context holds")

#: The bound of each numeric column of the measurements table.
COLUMN_BOUNDS = {
    "input_tokens": TOKENS, "output_tokens": TOKENS, "runtime_s": RUNTIME_S, "energy_j": ENERGY_J,
    "gpu_energy_j": COMPONENT_ENERGY_J, "cpu_energy_j": COMPONENT_ENERGY_J, "dram_energy_j": COMPONENT_ENERGY_J,
    "idle_power_w": IDLE_POWER_W,
}


def power_w(energy_j, runtime_s) -> np.ndarray:
    """Mean power of each measurement; NaN where either value is unknown or the runtime is not > 0."""
    energy = np.asarray(energy_j, dtype=float)
    runtime = np.asarray(runtime_s, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.where(runtime > 0, energy / np.where(runtime > 0, runtime, 1.0), np.nan)
