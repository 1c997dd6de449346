"""What it costs to get a model ready on a device: loading it, then discarded warm-up runs.

Profiling and execution do the same after a model is loaded, so that every measured
request starts from the same warm state (the first request after a load pays one-off
costs: weights paged in, kernels picked, buffers allocated):

    load (measured) -> idle baseline -> warm-up: WARMUP_RUNS requests of WARMUP_SHAPE (measured, discarded)

The warm-up has a fixed shape, so its cost is the same item wherever it is paid, and
what profiling measured predicts what an execution will pay. Both record the measured
:class:`LoadCost` in the provenance (``library_versions``, key ``load``) of every
measurement they store; :func:`stored_load_costs` reads the latest per model and device
in the form the planner takes (``{"model@device": (seconds, joules)}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from engine.energy.meter import EnergyMeter, IdleBaseline, WindowResult

#: Discarded requests after each load (profiling's default; a job may set its own number).
WARMUP_RUNS = 2
#: (input tokens, output tokens) of a warm-up request: small, and fixed, so that its cost does
#: not depend on which request happens to come first.
WARMUP_SHAPE = (16, 8)


def measure_window(meter: EnergyMeter, work: Callable[[], Any]) -> WindowResult:
    """Run ``work`` inside one window of ``meter``; the window's result (the exception, if any, propagates)."""
    with meter.window() as window:
        work()
    return window.result


def warm_up(backend: Any, runs: int = WARMUP_RUNS) -> None:
    """``runs`` discarded requests of :data:`WARMUP_SHAPE`."""
    for _ in range(runs):
        backend.generate(*WARMUP_SHAPE)


@dataclass(frozen=True)
class LoadCost:
    """Loading a model and warming it up, as measured.

    Attributes:
        load_s, load_energy_j: the load (weights read, model built on the device).
        warmup_runs: discarded requests of :data:`WARMUP_SHAPE` after it.
        warmup_s, warmup_energy_j: all of them together.
        idle_power_w: the idle baseline of the same devices (``None`` without one).
        energy_source, energy_method: as for a measurement (``estimated`` on a host without sensors).
        Energies are ``None`` when a window could not be measured, never 0.
    """

    load_s: float
    load_energy_j: float | None
    warmup_runs: int
    warmup_s: float
    warmup_energy_j: float | None
    idle_power_w: float | None
    energy_source: str
    energy_method: str

    @classmethod
    def from_windows(cls, load: WindowResult, warmup: WindowResult, warmup_runs: int,
                     idle: IdleBaseline | None = None) -> "LoadCost":
        source = "estimated" if "estimated" in (load.energy_source, warmup.energy_source) else "measured"
        return cls(load_s=load.duration_s, load_energy_j=load.energy_j, warmup_runs=int(warmup_runs),
                   warmup_s=warmup.duration_s, warmup_energy_j=warmup.energy_j,
                   idle_power_w=idle.power_for(load.devices) if idle is not None else None,
                   energy_source=source, energy_method=load.energy_method)

    def cost(self, warmup_runs: int = WARMUP_RUNS, energy_scope: str = "total") -> tuple[float, float | None]:
        """(seconds, joules) of a load followed by ``warmup_runs`` warm-ups, scaled from what was measured.

        ``energy_scope="dynamic"`` subtracts idle power over those seconds (``None`` without a
        baseline; a cost, so a noisy negative difference counts as 0).
        """
        per_run_s = self.warmup_s / self.warmup_runs if self.warmup_runs else 0.0
        seconds = self.load_s + per_run_s * warmup_runs
        if self.load_energy_j is None or (self.warmup_energy_j is None and warmup_runs):
            return seconds, None
        per_run_j = self.warmup_energy_j / self.warmup_runs if self.warmup_runs and self.warmup_energy_j else 0.0
        joules = self.load_energy_j + per_run_j * warmup_runs
        if energy_scope == "dynamic":
            if self.idle_power_w is None:
                return seconds, None
            joules = max(joules - self.idle_power_w * seconds, 0.0)
        return seconds, joules

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_load_costs(store: Any, *, energy_scope: str = "total",
                      warmup_runs: int = WARMUP_RUNS) -> dict[str, tuple[float, float]]:
    """The latest measured load cost of each model and device: ``{"model@device": (seconds, joules)}``.

    Read from the provenance of stored measurements (profiled or executed); a model and
    device whose latest load has no energy is left out (the planner then has no load cost
    for it, as before). The form is :func:`engine.planning.options.with_load_costs`'s.
    """
    frame = store.query_df(
        """SELECT model, device, CAST(json_extract(library_versions, '$.load') AS VARCHAR) AS load
           FROM measurements WHERE json_extract(library_versions, '$.load') IS NOT NULL
           QUALIFY row_number() OVER (PARTITION BY model, device ORDER BY finished_at DESC NULLS LAST, id DESC) = 1""")
    costs: dict[str, tuple[float, float]] = {}
    for row in frame.itertuples():
        try:
            measured = LoadCost(**json.loads(row.load))
        except (TypeError, ValueError):
            continue  # written by another version: no load cost rather than a wrong one
        seconds, joules = measured.cost(warmup_runs, energy_scope)
        if joules is not None:
            costs[f"{row.model}@{row.device}"] = (seconds, joules)
    return costs
