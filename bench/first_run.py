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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import catalog, firstrun  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR  # noqa: E402
from engine.profiling import jobs  # noqa: E402
from engine.store import Store  # noqa: E402


def percent(value) -> str:
    return "   ?  " if value is None or value != value else f"{value:6.1%}"


def one_run(folder: Path, budget_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(folder / "planner.duckdb")
    catalog.register_demo_models(store, ensure_demo_models(DEFAULT_MODELS_DIR))
    load_before = os.getloadavg()
    started = time.monotonic()
    state = firstrun.run_first_run(store, os.getpid(), budget_s=budget_s)
    wall_s = time.monotonic() - started
    load_after = os.getloadavg()
    print(f"first run {state.status} in {wall_s:.0f} s (budget {budget_s:g} s); load average before "
          f"{load_before[0]:.1f} / {load_before[1]:.1f} (1 / 5 min), after {load_after[0]:.1f} / {load_after[1]:.1f}")
    print("  model        job s  trials  points  CV energy  CV runtime  noise energy  noise runtime  unconverged")
    report = firstrun.first_run_report(store)
    for row in report.itertuples():
        print(f"  {row.model:<11} {row.elapsed_s:6.0f}  {row.trials:6d}  {row.points:6d}  {percent(row.energy_cv_mape)}"
              f"     {percent(row.runtime_cv_mape)}      {percent(row.energy_noise_mape)}        "
              f"{percent(row.runtime_noise_mape)}         {row.unconverged_points}")
    for row in report.itertuples():
        rounds = jobs.adaptive_rounds(store, row.job_id)
        steps = ", ".join(f"{r.elapsed_s:.0f} s: {percent(r.energy_cv_mape).strip()}/{percent(r.runtime_cv_mape).strip()}"
                          for r in rounds.itertuples())
        print(f"  {row.model} rounds (CV energy/runtime): {steps}")
        print(f"  {row.model}: {row.job_reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=firstrun.FIRST_RUN_BUDGET_S)
    parser.add_argument("--folder", type=Path, help="where the runs' databases go (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="first-run-"))
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.uname().nodename}, {os.cpu_count()} CPUs; databases in {folder}")
    for number in range(1, args.runs + 1):
        print(f"run {number}:")
        one_run(folder / f"run{number}", args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
