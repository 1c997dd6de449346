"""``execute``: run a plan (stored, or a schedule CSV) on this host or the cluster, follow it, and
compare what it cost with what was predicted; or resume or cancel an execution."""

from __future__ import annotations

import argparse
import sys
import time

from engine.cli import cluster as cluster_commands
from engine.cli.common import EXIT_FAILURE, EXIT_OK, print_json, store
from engine.errors import InputError, Problem
from engine.formatting import format_duration, format_energy, format_percent


def add_execute(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    execute = sub.add_parser("execute", parents=[common], help="run a plan on this host and measure what it costs")
    what = execute.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", type=int, help="a stored plan's id")
    what.add_argument("--schedule", help="a schedule CSV (as written by plan --out)")
    what.add_argument("--resume", type=int, metavar="EXECUTION", help="run what is left of a stopped execution")
    what.add_argument("--cancel", type=int, metavar="EXECUTION", help="stop a running execution")
    cluster_commands.add_move_option(execute)
    execute.add_argument("--detach", action="store_true", help="start the worker and return at once")
    execute.add_argument("--json", action="store_true", help="print JSON")
    execute.set_defaults(handler=cmd_execute)


def cmd_execute(args: argparse.Namespace) -> int:
    from engine import execution

    db = store(args)
    if args.cancel is not None:
        done = execution.cancel_execution(db, args.cancel)
        print(f"execution {done.id}: {done.status} ({done.reason})", file=sys.stderr)
        return EXIT_OK
    run = _start_or_resume(db, args)
    process = execution.start_worker(db, run.id, watch=False)
    print(f"execution {run.id} of plan {run.plan_id}: {run.queries_total} queries; worker pid {process.pid}; "
          f"log {execution.worker_log_path(db, run.id)}", file=sys.stderr)
    if args.detach:
        if args.json:
            print_json({"execution_id": run.id, "plan_id": run.plan_id, "status": "running", "pid": process.pid})
        return EXIT_OK
    _follow_execution(db, run.id, process)
    execution.reconcile_executions(db)
    progress = execution.execution_progress(db, run.id)
    scope = db.query_one("SELECT energy_scope FROM plans WHERE id = ?", [run.plan_id])[0]
    comparison = execution.compare(execution.execution_results(db, run.id), scope)
    band_check = execution.execution_band_check(db, run.id, comparison)
    if args.json:
        print_json(_execution_document(run, progress, comparison, band_check))
    else:
        _print_execution(run, progress, comparison, band_check)
    return EXIT_OK if progress.execution.status == "done" else EXIT_FAILURE


def _start_or_resume(db, args: argparse.Namespace):
    """The execution to run: a stopped one resumed (its devices moved first with ``--move``), or a
    new one of a stored plan or of a schedule CSV."""
    from engine import execution

    if args.move and args.resume is None:
        raise InputError(Problem("--move", "moves a device of a stopped execution", None, "--resume EXECUTION"))
    if args.resume is not None:
        if args.move:
            cluster_commands.move_before_resume(db, args.resume, args.move)
        return execution.resume_execution(db, args.resume)
    plan_id = args.plan if args.plan is not None else execution.import_schedule(db, args.schedule)
    return execution.create_execution(db, plan_id)


def _follow_execution(db, execution_id: int, process) -> None:
    """A line on stderr each time more queries are done, until the worker exits; Ctrl-C cancels."""
    from engine import execution

    try:
        last = -1
        while process.poll() is None:
            progress = execution.execution_progress(db, execution_id)
            if progress.done != last:
                last = progress.done
                print(f"{progress.done}/{progress.total} queries", file=sys.stderr)
            time.sleep(0.5)
    except KeyboardInterrupt:
        execution.cancel_execution(db, execution_id)
        raise


def _execution_document(run, progress, comparison, band_check) -> dict:
    """``execute --json``: the execution's outcome, measured against predicted."""
    state = progress.execution
    return {"execution_id": run.id, "plan_id": run.plan_id, "status": state.status, "reason": state.reason,
            "queries_done": progress.done, "queries_total": progress.total, "queries_failed": comparison.n_failed,
            "measured_energy_j": comparison.measured_energy_j, "predicted_energy_j": comparison.predicted_energy_j,
            "energy_error": comparison.energy_error, "energy_estimated": comparison.energy_estimated,
            "measured_runtime_s": comparison.measured_runtime_s,
            "predicted_runtime_s": comparison.predicted_runtime_s, "runtime_error": comparison.runtime_error,
            "per_query_energy_error_median": comparison.per_query_energy_error_median,
            "per_query_energy_error_mean_abs": comparison.per_query_energy_error_mean_abs,
            "outside_band": comparison.outside_band, "with_band": comparison.with_band,
            "batches_run": comparison.n_batches, "batches_failed": comparison.n_batches_failed,
            "per_batch_energy_error_median": comparison.per_batch_energy_error_median,
            "per_batch_energy_error_mean_abs": comparison.per_batch_energy_error_mean_abs,
            "per_batch_energy_error_p10_p90": comparison.per_batch_energy_error_p10_p90,
            "per_option": comparison.per_option.to_dict("records"), "energy_band": band_check.to_json()}


def _print_execution(run, progress, comparison, band_check) -> None:
    """The execution's outcome for people: status, queries, energy and runtime against predicted, batches."""
    state = progress.execution
    label = " (estimated)" if comparison.energy_estimated else ""
    print(f"execution {run.id}: {state.status}" + (f" ({state.reason})" if state.reason else ""))
    print(f"queries: {progress.done} of {progress.total} run, {comparison.n_failed} failed")
    if comparison.measured_energy_j is not None:
        error = format_percent(comparison.energy_error, signed=True, unknown="")
        print(f"energy{label}: {format_energy(comparison.measured_energy_j)} measured vs "
              f"{format_energy(comparison.predicted_energy_j)} predicted" + (f" ({error})" if error else ""))
    else:
        print("energy: not measured")
    print(f"band: {band_check.sentence()}")
    print(f"runtime: {format_duration(comparison.measured_runtime_s)} vs {format_duration(comparison.predicted_runtime_s)} predicted")
    print(_batch_errors_line(comparison))


def _batch_errors_line(comparison) -> str:
    """``batches: 12 run, 0 failed; energy error per batch: median +3.1%, 80% of batches within [-4.0%, +9.8%],
    mean |error| 5.2%``."""
    line = f"batches: {comparison.n_batches} run, {comparison.n_batches_failed} failed"
    if comparison.per_batch_energy_error_median is None:
        return line + "; energy error per batch: unknown (no batch with both a measurement and a prediction)"
    low, high = comparison.per_batch_energy_error_p10_p90
    median = format_percent(comparison.per_batch_energy_error_median, signed=True)
    return (f"{line}; energy error per batch: median {median}, 80% of batches within "
            f"[{format_percent(low, signed=True)}, {format_percent(high, signed=True)}], "
            f"mean |error| {format_percent(comparison.per_batch_energy_error_mean_abs)}")
