"""Does execution measure what the plan predicted? The whole loop of a new user, N times.

    .venv/bin/python bench/fidelity.py [--runs 3] [--note TEXT]      # the README's figures
    .venv/bin/python bench/fidelity.py --quick                         # a smoke run: does it work at all?

Each run starts from nothing, as a new user does:
1. a fresh database in a temporary folder, the demo models registered;
2. the first run (:func:`engine.firstrun.run_first_run`, what the Home page's button runs:
   each demo model's adaptive, time-budgeted profiling job in its own worker process,
   then the fits), timed as ``bench/first_run.py`` times it;
3. the first plan: ``data/workloads/sample_50.csv`` planned with what the Plan page
   offers after the first run, untouched (:func:`plan_like_the_page`: every demo option
   ticked, the accuracy target at the options' mean score rounded to 0.01, per-query
   accuracy, a 60-minute deadline per device, least energy, total energy, no load costs,
   128 output tokens where the workload gives none, a 30 s solver limit);
4. the plan executed through the run lifecycle (:func:`engine.execution.create_execution`
   and ``start_worker``: the worker process the Execute page starts), then compared
   with its prediction (:func:`engine.execution.compare`, what the Execute page shows).

Printed per run: ``uptime`` before it; the first run's wall time, each model's fits' CV
error (energy, runtime) and the noise floor under it; the time to the first plan (first
run + reading and planning the workload); predicted and measured total energy, their
error, the per-query errors (median, mean absolute), whether the measured total fell in
the plan's energy band; runtime predicted and measured; and each target of issue 15 met
or not: total within ±10%, per-query mean absolute error ≤ 20%, every demo model's
energy fit with a CV error ≤ 15%, the first plan within 2 minutes. Then every run in a
table and a summary line (min / median / max). Every run is printed and kept, never only
the best. The whole report is appended, dated, to ``bench/results/fidelity.txt``.

**Energy on a host without sensors.** Where the CPU's energy counters (RAPL) cannot be
read, energy is the estimate from the measured processes' CPU time × watts per CPU, in
profiling and execution alike: predicted against measured then compares CPU time, not
energy. The report says at its top which it is, and labels every energy figure
"estimated (CPU time)" when it is.

Figures depend on the machine and on what else runs on it (the load averages are printed
for that reason): quote them with the date, the machine and the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from _common import RESULTS, ROOT, Report, machine, percent, spread, uptime
from first_run import FirstRun, describe, first_run

from engine import execution, firstrun  # noqa: E402
from engine.catalog import list_models  # noqa: E402
from engine.energy.discovery import discover_sensors  # noqa: E402
from engine.errors import PlannerError  # noqa: E402
from engine.formatting import format_energy  # noqa: E402
from engine.planning import PlanSettings, load_options, plan_workload, read_workload  # noqa: E402
from engine.planning.output_lengths import fill_learned_output_lengths  # noqa: E402
from engine.planning.summary import option_table  # noqa: E402
from engine.store import Store  # noqa: E402

SAMPLE = ROOT / "data" / "workloads" / "sample_50.csv"
RESULTS_FILE = RESULTS / "fidelity.txt"

#: Issue 15's targets.
TOTAL_ERROR_MAX = 0.10
PER_QUERY_MAE_MAX = 0.20
ENERGY_CV_MAX = 0.15
FIRST_PLAN_MAX_S = 120.0
#: Issue 13's target for an executed batched plan (--batching).
BATCHED_ERROR_MAX = 0.15

#: The Plan page's defaults (pages/plan.py), as a new user finds them after the first run.
PAGE_DEADLINE_S = 60 * 60.0
PAGE_DEFAULT_OUTPUT_TOKENS = 128
PAGE_SOLVER_LIMIT_S = 30.0

#: --quick: one run, a short first run, the first queries of the sample only. Its figures prove
#: that the loop works, nothing about fidelity.
QUICK = {"runs": 1, "budget_s": 45.0, "queries": 12}


# -- the steps -------------------------------------------------------------------------------------

def energy_label(store: Store | None = None, execution_id: int | None = None) -> str:
    """``estimated (CPU time)`` or ``measured (<method>)``: from an execution's results, else from this host's sensors."""
    if store is not None and execution_id is not None:
        results = execution.execution_results(store, execution_id)
        sources = set(results["energy_source"].dropna())
        if sources == {"estimated"}:
            return "estimated (CPU time)"
        if sources:
            methods = "; ".join(sorted(set(results["energy_method"].dropna())))
            return f"{'/'.join(sorted(sources))} ({methods})"
        return "unknown (no energy stored)"
    cpu = [s for s in discover_sensors(nvml=None) if s.device == "cpu"]
    return "estimated (CPU time)" if any(s.status == "estimated" for s in cpu) else "measured (RAPL)"


def sample_workload(queries: int | None, folder: Path):
    """The sample workload, or its first ``queries`` rows (written to ``folder`` so they are read the same way)."""
    if queries is None:
        return read_workload(SAMPLE)
    rows = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False).head(queries)
    path = folder / f"sample_first_{queries}.csv"
    rows.to_csv(path, index=False)
    return read_workload(path)


def plan_like_the_page(store: Store, workload):
    """Plan ``workload`` as the Plan page does with its defaults untouched (see the module docstring)."""
    options, _ = load_options(store, "total")
    catalog = list_models(store)
    table = option_table(options, set(catalog.name[catalog.is_demo.astype(bool)]))
    chosen = table.loc[table["use"].astype(bool), "option"].tolist()
    accuracies = [o.accuracy for o in {o.pair: o for o in options if o.pair in set(chosen)}.values()]
    learned = execution.learned_output_lengths(store)  # none in a fresh database; the page would offer them
    filled, fill = fill_learned_output_lengths(workload, learned)
    if fill is not None:
        workload = filled
    settings = PlanSettings(accuracy_target=round(float(np.mean(accuracies)), 2), accuracy_mode="query",
                            deadline_s=PAGE_DEADLINE_S, objective="energy", energy_scope="total",
                            time_limit_s=PAGE_SOLVER_LIMIT_S)
    return plan_workload(store, workload, settings, default_output_tokens=PAGE_DEFAULT_OUTPUT_TOKENS, only=chosen)


def execute(store: Store, plan_id: int, timeout_s: float) -> tuple[int, float]:
    """Execute a plan through the run lifecycle (its own worker process); its id and wall time (s).

    Past ``timeout_s`` the execution is cancelled (what it measured is kept and compared).
    """
    run = execution.create_execution(store, plan_id)
    started = time.monotonic()
    worker = execution.start_worker(store, run.id, watch=False)
    while worker.poll() is None:
        if time.monotonic() - started > timeout_s:
            execution.cancel_execution(store, run.id)
            break
        time.sleep(0.5)
    wall_s = time.monotonic() - started
    execution.reconcile_executions(store)  # a worker that died without closing its run: failed, with why
    return run.id, wall_s


# -- one run ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One run's figures (None where a step did not get that far)."""

    number: int
    load_before: str
    first_run_s: float | None = None
    energy_cv: dict[str, float | None] = field(default_factory=dict)
    runtime_cv: dict[str, float | None] = field(default_factory=dict)
    first_plan_s: float | None = None
    predicted_j: float | None = None
    measured_j: float | None = None
    error: float | None = None
    per_query_mae: float | None = None
    per_query_median: float | None = None
    in_band: bool | None = None
    queries_run: int = 0
    queries_failed: int = 0
    execution_s: float | None = None
    failure: str | None = None
    batching: "Batching | None" = None

    @property
    def worst_energy_cv(self) -> float | None:
        values = list(self.energy_cv.values())
        return None if not values or any(v is None or v != v for v in values) else max(values)

    def targets(self) -> dict[str, bool | None]:
        """Issue 15's targets, met or not (None: not reached)."""
        def check(value, limit, absolute=False):
            return None if value is None else (abs(value) if absolute else value) <= limit

        return {"total ±10%": check(self.error, TOTAL_ERROR_MAX, absolute=True),
                "per-query MAE ≤20%": check(self.per_query_mae, PER_QUERY_MAE_MAX),
                "first-run energy CV ≤15%": check(self.worst_energy_cv, ENERGY_CV_MAX),
                "first plan ≤2 min": check(self.first_plan_s, FIRST_PLAN_MAX_S)}


def _met(value: bool | None) -> str:
    return "not reached" if value is None else "met" if value else "MISSED"


@dataclass
class Measured:
    """A plan executed and compared with its prediction."""

    wall_s: float
    predicted_j: float | None
    measured_j: float | None
    error: float | None
    per_query_mae: float | None
    per_query_median: float | None
    in_band: bool | None
    queries_run: int
    queries_failed: int
    failure: str | None


def execute_and_compare(store: Store, plan, timeout_s: float, say) -> Measured:
    """Execute a plan (:func:`execute`) and print predicted against measured, as the Execute page compares them."""
    execution_id, wall_s = execute(store, plan.plan_id, timeout_s)
    state = execution.get_execution(store, execution_id)
    comparison = execution.compare(execution.execution_results(store, execution_id),
                                   execution.execution_energy_scope(store, execution_id))
    label = energy_label(store, execution_id)
    band = plan.energy_band
    predicted, measured = comparison.predicted_energy_j, comparison.measured_energy_j
    in_band = band.contains(measured, predicted) if band is not None and None not in (measured, predicted) else None
    say(f"  execution #{execution_id}: {state.status}" + (f" ({state.reason})" if state.reason else "")
        + f" in {wall_s:.0f} s; {comparison.n_run} queries ran, {comparison.n_failed} failed")
    say(f"  energy, {label}: predicted {format_energy(predicted)}, measured {format_energy(measured)}: error "
        f"{percent(comparison.energy_error, signed=True)}; per query median "
        f"{percent(comparison.per_query_energy_error_median, signed=True)}, mean absolute "
        f"{percent(comparison.per_query_energy_error_mean_abs)}; {comparison.outside_band} of {comparison.with_band} "
        "queries outside their 90% band; total "
        + ("inside" if in_band else "outside" if in_band is not None else "without") + " the plan's band")
    say(f"  runtime: predicted {comparison.predicted_runtime_s or float('nan'):.1f} s, measured "
        f"{comparison.measured_runtime_s:.1f} s: error {percent(comparison.runtime_error, signed=True)}")
    for row in comparison.per_option.itertuples():
        say(f"    {row.option}: {row.queries} queries, predicted {format_energy(row.predicted_energy_j)}, measured "
            f"{format_energy(row.measured_energy_j)} ({percent(row.energy_error, signed=True)}); per query "
            f"median {percent(row.median_energy_error, signed=True)}")
    return Measured(wall_s, predicted, measured, comparison.energy_error, comparison.per_query_energy_error_mean_abs,
                    comparison.per_query_energy_error_median, in_band, comparison.n_run, comparison.n_failed,
                    None if state.status == "done" else f"execution {state.status}: {state.reason}")


@dataclass
class Batching:
    """The Home page's second step, after the first plan: measure batching, plan again, execute."""

    step_s: float | None = None
    measured: Measured | None = None
    ratio: float | None = None  # measured J per query, the first (batch 1) plan over the batched one
    failure: str | None = None


def batching_step(store: Store, workload, outcome: Outcome, timeout_s: float, say) -> Batching:
    """Run the batching step as the Home page's button does (:func:`engine.firstrun.run_batching_step`, in this
    process), plan the same workload again as the page would, execute it, and compare it with its prediction and
    with the first plan's measured energy per query."""
    result = Batching()
    started = time.monotonic()
    state = firstrun.run_batching_step(store, os.getpid())
    result.step_s = time.monotonic() - started
    report = firstrun.batching_report(store)
    say(f"  batching step {state.status} in {result.step_s:.0f} s (batch sizes "
        f"{', '.join(map(str, firstrun.BATCHING_SIZES))}); fits: " + "; ".join(
            f"{r.model} energy CV {percent(r.energy_cv_mape)}, runtime CV {percent(r.runtime_cv_mape)}, batch axis "
            f"{r.batch_sizes}" for r in report.itertuples()))
    plan = plan_like_the_page(store, workload)
    if not plan.has_schedule:
        result.failure = f"the batched plan: {plan.status}"
        return result
    say(f"  batched plan #{plan.plan_id}: {format_energy(plan.energy_j)} predicted, mean accuracy "
        f"{plan.accuracy:.3f}, per option {plan.assignments}")
    result.measured = execute_and_compare(store, plan, timeout_s, say)
    result.failure = result.measured.failure
    first, again = outcome.measured_j, result.measured.measured_j
    if first and again and outcome.queries_run and result.measured.queries_run:
        result.ratio = (first / outcome.queries_run) / (again / result.measured.queries_run)
        say(f"  measured energy per query, first plan / batched plan: {result.ratio:.2f}x")
    return result


def one_run(number: int, folder: Path, budget_s: float, queries: int | None, timeout_s: float, say,
            batching: bool = False) -> Outcome:
    outcome = Outcome(number, uptime())
    say(f"run {number}: before it, {outcome.load_before}")
    try:
        started = time.monotonic()
        first: FirstRun = first_run(folder, budget_s)
        outcome.first_run_s = first.wall_s
        describe(first, lambda line: say("  " + line))
        if first.state.status != "done":
            raise PlannerError(f"the first run ended {first.state.status}: {first.state.reason}")
        outcome.energy_cv = dict(zip(first.report.model, first.report.energy_cv_mape))
        outcome.runtime_cv = dict(zip(first.report.model, first.report.runtime_cv_mape))
        store = first.store

        planning_started = time.monotonic()
        workload = sample_workload(queries, folder)
        plan = plan_like_the_page(store, workload)
        outcome.first_plan_s = time.monotonic() - started
        band = plan.energy_band
        say(f"  first plan #{plan.plan_id}: {plan.status}, {plan.n_queries} queries of {workload.name}, "
            f"{format_energy(plan.energy_j)} predicted"
            + (f" (band {format_energy(band.low_j)} to {format_energy(band.high_j)}, ±{band.relative:.1%})" if band else "")
            + f", mean accuracy {plan.accuracy:.3f}, per option {plan.assignments}; planning "
            f"{time.monotonic() - planning_started:.1f} s; time to the first plan {outcome.first_plan_s:.0f} s "
            "(first run + planning)" if plan.has_schedule else f"  first plan: {plan.status}: {plan.diagnosis}")
        if not plan.has_schedule:
            raise PlannerError(f"the sample workload has no plan ({plan.status})")

        measured = execute_and_compare(store, plan, timeout_s, say)
        outcome.execution_s = measured.wall_s
        outcome.predicted_j, outcome.measured_j = measured.predicted_j, measured.measured_j
        outcome.error, outcome.per_query_mae = measured.error, measured.per_query_mae
        outcome.per_query_median, outcome.in_band = measured.per_query_median, measured.in_band
        outcome.queries_run, outcome.queries_failed = measured.queries_run, measured.queries_failed
        if measured.failure:
            outcome.failure = measured.failure
        elif batching:
            outcome.batching = batching_step(store, workload, outcome, timeout_s, say)
            if outcome.batching.failure:
                outcome.failure = outcome.batching.failure
    except PlannerError as exc:  # a step that failed ends this run, not the benchmark
        outcome.failure = str(exc)
        say(f"  FAILED: {exc}")
    say("  targets: " + "; ".join(f"{name} {_met(met)}" for name, met in outcome.targets().items()))
    if outcome.batching is not None and outcome.batching.measured is not None:
        error = outcome.batching.measured.error
        say(f"  batched plan within ±{BATCHED_ERROR_MAX:.0%} (issue 13's target): "
            f"{_met(None if error is None else abs(error) <= BATCHED_ERROR_MAX)}")
    return outcome


# -- the report ------------------------------------------------------------------------------------

def table(outcomes: list[Outcome]) -> pd.DataFrame:
    rows = []
    for o in outcomes:
        rows.append({
            "run": o.number, "first run s": o.first_run_s, "first plan s": o.first_plan_s,
            **{f"CV energy {m}": v for m, v in o.energy_cv.items()},
            **{f"CV runtime {m}": v for m, v in o.runtime_cv.items()},
            "predicted J": o.predicted_j, "measured J": o.measured_j, "error": o.error,
            "per-query MAE": o.per_query_mae, "in band": o.in_band, "queries": o.queries_run,
            "failed": o.queries_failed,
            **({"batching step s": o.batching.step_s,
                "batched error": o.batching.measured.error if o.batching.measured else None,
                "J/query first ÷ batched": o.batching.ratio} if o.batching is not None else {}),
        })
    frame = pd.DataFrame(rows)
    for column in frame.columns:
        if column.startswith("CV ") or column in ("error", "per-query MAE", "batched error"):
            frame[column] = [percent(v, signed=column.endswith("error")) for v in frame[column]]
    return frame


def summarise(outcomes: list[Outcome], say) -> None:
    def pct(v):
        return percent(v, signed=True)

    say(f"summary over {len(outcomes)} runs (min / median / max): error {spread([o.error for o in outcomes], pct)}; "
        f"per-query MAE {spread([o.per_query_mae for o in outcomes], percent)}; worst energy CV "
        f"{spread([o.worst_energy_cv for o in outcomes], percent)}; first run "
        f"{spread([o.first_run_s for o in outcomes], lambda v: f'{v:.0f} s')}; first plan "
        f"{spread([o.first_plan_s for o in outcomes], lambda v: f'{v:.0f} s')}")
    for name in outcomes[0].targets() if outcomes else ():
        met = [o.targets()[name] for o in outcomes]
        say(f"  {name}: met in {sum(bool(m) for m in met)} of {len(met)} runs")
    steps = [o.batching for o in outcomes if o.batching is not None]
    if steps:
        errors = [b.measured.error if b.measured else None for b in steps]
        say(f"  batching (--batching): step {spread([b.step_s for b in steps], lambda v: f'{v:.0f} s')}; batched "
            f"plan error {spread(errors, pct)}; measured J/query first plan ÷ batched "
            f"{spread([b.ratio for b in steps], lambda v: f'{v:.2f}x')}; within ±{BATCHED_ERROR_MAX:.0%} in "
            f"{sum(e is not None and abs(e) <= BATCHED_ERROR_MAX for e in errors)} of {len(steps)} runs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="how many times the whole loop runs (default 3)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the first run's time budget (default {firstrun.FIRST_RUN_BUDGET_S:g} s, the app's)")
    parser.add_argument("--queries", type=int, default=None, help="plan only the sample's first N queries")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK['runs']} run, a {QUICK['budget_s']:g} s first run, the first "
                             f"{QUICK['queries']} queries (its figures prove the loop works, not its fidelity)")
    parser.add_argument("--batching", action="store_true",
                        help="after the first plan, the Home page's second step too: measure batching "
                             "(engine.firstrun.run_batching_step), plan the same workload again, execute it")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="an execution is cancelled after this long")
    parser.add_argument("--folder", type=Path, help="where the runs' databases go (default: a temporary folder)")
    parser.add_argument("--note", help="a line for the report's header (what else ran on the machine, say)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="the file the report is appended to")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {"runs": 3, "budget_s": firstrun.FIRST_RUN_BUDGET_S, "queries": None}
    runs = args.runs if args.runs is not None else quick["runs"]
    budget_s = args.budget_s if args.budget_s is not None else quick["budget_s"]
    queries = args.queries if args.queries is not None else quick["queries"]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="fidelity-"))

    report = Report()
    say = report.say
    title = (f"bench/fidelity.py --runs {runs} --budget-s {budget_s:g}"
             + (f" --queries {queries}" if queries is not None else "") + (" --batching" if args.batching else "")
             + (" (--quick)" if args.quick else ""))
    say(f"{title}; {machine()}; databases in {folder}")
    label = energy_label()
    if label.startswith("estimated"):
        say("No energy sensor on this host (RAPL unreadable): energy in profiling and execution alike is the "
            "estimate from CPU time (CPU-seconds × watts per CPU), so 'measured' below is estimated (CPU time) "
            "and predicted against measured compares CPU time, not energy.")
    else:
        say(f"Energy: {label}.")
    if args.quick:
        say("QUICK smoke run: a short first run and a part of the sample; its figures say nothing about fidelity.")
    if args.note:
        say(f"Note: {args.note}")
    say(f"Targets (issue 15): executed total within ±{TOTAL_ERROR_MAX:.0%} of predicted, per-query mean absolute "
        f"error ≤ {PER_QUERY_MAE_MAX:.0%}, every demo model's energy fit CV error ≤ {ENERGY_CV_MAX:.0%}, the first "
        f"plan within {FIRST_PLAN_MAX_S / 60:g} minutes of the first run's start.")
    outcomes = []
    for number in range(1, runs + 1):
        say("")
        outcomes.append(one_run(number, folder / f"run{number}", budget_s, queries, args.timeout_s, say,
                                batching=args.batching))
    say("")
    say(table(outcomes).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    summarise(outcomes, say)
    say(f"after: {uptime()}")
    if not args.no_save:
        print(f"appended to {report.append_to(args.out, title)}")
    return 0 if all(o.failure is None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
