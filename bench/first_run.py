"""The first run, timed: wall time and the cross-validated error each demo model's fits reach.

    .venv/bin/python bench/first_run.py [--runs 3] [--budget-s 115] [--folder DIR]

Each run registers the demo models in a fresh database and runs the first run
(:func:`engine.firstrun.run_first_run`: each demo model's adaptive profiling job in its
own worker process, then the fits) exactly as the Home page's button does, in this
process. Printed per run: the machine's load average before and after (the VM's cores are
shared: under contention every figure is worse), the wall time, and per model the job's
time, trials and points, the fits' CV MAPE (energy, runtime), the noise floor (the MAPE of
predicting each trial by its own point's mean: no surface can beat it), the adaptive
rounds, and why the job stopped. Every run is printed, never only the best.

``bench/fidelity.py`` runs the same first run (:func:`first_run`, :func:`describe`) before
it plans and executes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from _common import load_average, machine, percent

from engine import catalog, firstrun  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR  # noqa: E402
from engine.profiling import jobs  # noqa: E402
from engine.store import Store  # noqa: E402


@dataclass
class FirstRun:
    """One timed first run: its database, state, wall time (s), load averages around it, and per-model report
    (:func:`engine.firstrun.first_run_report`)."""

    store: Store
    state: firstrun.FirstRunState
    wall_s: float
    budget_s: float
    load_before: str
    load_after: str
    report: pd.DataFrame

    @property
    def worst_energy_cv(self) -> float | None:
        """The largest energy CV MAPE of the demo models' fits (None when any fit has none)."""
        values = self.report["energy_cv_mape"]
        return None if values.empty or values.isna().any() else float(values.max())


def first_run(folder: Path, budget_s: float) -> FirstRun:
    """Register the demo models in a fresh database under ``folder`` and run the first run in this process."""
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(folder / "planner.duckdb")
    catalog.register_demo_models(store, ensure_demo_models(DEFAULT_MODELS_DIR))
    load_before = load_average()
    started = time.monotonic()
    state = firstrun.run_first_run(store, os.getpid(), budget_s=budget_s)
    wall_s = time.monotonic() - started
    return FirstRun(store, state, wall_s, budget_s, load_before, load_average(), firstrun.first_run_report(store))


def describe(run: FirstRun, say=print) -> None:
    """The first run's lines: wall time, load, and per model its job, fits' CV error, noise floor and rounds."""
    say(f"first run {run.state.status} in {run.wall_s:.0f} s (budget {run.budget_s:g} s); load average before "
        f"{run.load_before}, after {run.load_after}")
    say("  model        job s  trials  points  CV energy  CV runtime  noise energy  noise runtime  unconverged")
    for row in run.report.itertuples():
        say(f"  {row.model:<11} {row.elapsed_s:6.0f}  {row.trials:6d}  {row.points:6d}  {percent(row.energy_cv_mape):>9}"
            f"  {percent(row.runtime_cv_mape):>10}  {percent(row.energy_noise_mape):>12}  "
            f"{percent(row.runtime_noise_mape):>13}  {row.unconverged_points!s:>11}")
    for row in run.report.itertuples():
        rounds = jobs.adaptive_rounds(run.store, row.job_id)
        steps = ", ".join(f"{r.elapsed_s:.0f} s: {percent(r.energy_cv_mape)}/{percent(r.runtime_cv_mape)}"
                          for r in rounds.itertuples())
        say(f"  {row.model} rounds (CV energy/runtime): {steps}")
        say(f"  {row.model}: {row.job_reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=firstrun.FIRST_RUN_BUDGET_S)
    parser.add_argument("--folder", type=Path, help="where the runs' databases go (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="first-run-"))
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {machine()}; databases in {folder}")
    for number in range(1, args.runs + 1):
        print(f"run {number}:")
        describe(first_run(folder / f"run{number}", args.budget_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
