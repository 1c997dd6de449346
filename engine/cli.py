"""The command line: ``python -m engine SUBCOMMAND``.

Exit codes: 0 success; 2 bad input, one line per problem on stderr; 1 any other
failure, one sentence on stderr. ``--json`` prints one JSON document on stdout and
nothing else there. Set ``PLANNER_DEBUG=1`` to see the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from engine import catalog
from engine.cluster import commands as cluster_commands
from engine.errors import InputError, PlannerError, Problem
from engine.formatting import format_duration, format_energy, format_percent, json_safe
from engine.paths import DEFAULT_MODELS_DIR
from engine.profiling.design import ALL_DESIGN_KINDS
from engine.store import Store

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="database file (default data/planner.duckdb, or $PLANNER_DB)")
    cluster_commands.add_address_option(common)
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = _common()
    parser = argparse.ArgumentParser(prog="python -m engine", parents=[common],
                                     description="Joule Planner: profile, fit, plan and execute LLM batch work for least energy.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    sensors = sub.add_parser("sensors", parents=[common], help="energy sources found or missing on this host, and why")
    sensors.add_argument("--json", action="store_true", help="print JSON")
    sensors.set_defaults(handler=cmd_sensors)

    status = sub.add_parser("status", parents=[common], help="what the database holds")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)

    models = sub.add_parser("models", parents=[common], help="the model catalog")
    models_sub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", parents=[common], help="list the catalog")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=cmd_models_list)
    add = models_sub.add_parser("add", parents=[common], help="add a model")
    add.add_argument("name", help="a name for the model, e.g. llama-2-7b")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--path", help="a Hugging Face model directory or a .gguf file")
    where.add_argument("--hub-id", help="a model hub id owner/name (transformers; needs network when loaded)")
    add.add_argument("--backend", choices=catalog.BACKENDS, help="default: inferred from the path; external without one")
    add.add_argument("--accuracy", required=True, help="a fraction in [0, 1] (0.645) or a percentage (64.5%%)")
    add.add_argument("--source", help="where the accuracy score came from")
    add.add_argument("--params-b", help="parameters in billions (default: counted from the weights)")
    add.add_argument("--notes")
    add.add_argument("--trust-remote-code", action="store_true",
                     help="allow this model's own Python code to run when it is loaded (off by default)")
    add.set_defaults(handler=cmd_models_add)
    set_acc = models_sub.add_parser("set-accuracy", parents=[common], help="set a model's accuracy score")
    set_acc.add_argument("name")
    set_acc.add_argument("accuracy", help="a fraction in [0, 1] or a percentage with %%")
    set_acc.add_argument("--source", required=True, help="where the score came from")
    set_acc.set_defaults(handler=cmd_models_set_accuracy)
    remove = models_sub.add_parser("remove", parents=[common], help="remove a model (its measurements are kept)")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_models_remove)

    imp = sub.add_parser("import-catalog", parents=[common], help="add models from a catalog CSV (all or nothing)")
    imp.add_argument("file", help="CSV with columns model, accuracy[, backend, path, params_b, notes]")
    imp.set_defaults(handler=cmd_import_catalog)

    profile = sub.add_parser("profile", parents=[common], help="measure a model's energy and runtime over a design")
    profile.add_argument("--model", help="a model from the catalog")
    profile.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    profile.add_argument("--design", choices=ALL_DESIGN_KINDS, help="default: quick, or custom when --inputs/--outputs are "
                         "given, or adaptive with --budget-s")
    profile.add_argument("--inputs", help="input token counts, e.g. 8,32,128 (custom design; range for space-filling)")
    profile.add_argument("--outputs", help="output token counts, e.g. 8,32 (custom design; range for space-filling)")
    profile.add_argument("--points", type=int, default=16, help="points of a space-filling design (default 16)")
    profile.add_argument("--budget-s", type=float, help="adaptive design: seconds from loading the model to the last "
                         "trial (default 120); it stops sooner when the fits stop improving")
    profile.add_argument("--max-trials", type=int, default=25, help="most trials per point (default 25)")
    profile.add_argument("--min-trials", type=int, default=3, help="fewest trials per point (default 3)")
    profile.add_argument("--rel-ci", type=float, default=0.05,
                         help="stop a point when its 95%% CI is within this fraction of the mean (default 0.05)")
    profile.add_argument("--warmup", type=int, default=2, help="warm-up runs, discarded (default 2)")
    profile.add_argument("--cooldown-s", type=float, default=0.0, help="pause after each trial (default 0)")
    profile.add_argument("--idle-s", type=float, default=5.0, help="idle baseline window (default 5 s)")
    profile.add_argument("--seed", type=int, default=0, help="seed of the run order (default 0)")
    profile.add_argument("--batch-size", type=int, default=1,
                         help="identical requests run together (transformers only; default 1); stored with the data")
    profile.add_argument("--resume", type=int, metavar="JOB", help="continue a failed or cancelled job")
    profile.add_argument("--json", action="store_true", help="print JSON")
    profile.set_defaults(handler=cmd_profile)

    imp_m = sub.add_parser("import-measurements", parents=[common],
                           help="add measurements taken elsewhere from a CSV (all or nothing)")
    imp_m.add_argument("file", help="CSV: model, device, input_tokens, output_tokens, runtime_s, energy_j[, ...]")
    imp_m.add_argument("--allow-duplicates", action="store_true", help="import rows identical to stored ones anyway")
    imp_m.add_argument("--json", action="store_true", help="print JSON")
    imp_m.set_defaults(handler=cmd_import_measurements)
    exp_m = sub.add_parser("export-measurements", parents=[common], help="write measurements to a CSV")
    exp_m.add_argument("file")
    exp_m.add_argument("--model", help="only this model")
    exp_m.add_argument("--device", help="only this device")
    exp_m.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp_m.set_defaults(handler=cmd_export_measurements)

    fit = sub.add_parser("fit", parents=[common], help="fit energy and runtime surfaces per model and device")
    fit.add_argument("--model", help="only this model")
    fit.add_argument("--device", help="only this device")
    fit.add_argument("--energy-scope", choices=("total", "dynamic"), default="total",
                     help="total energy, or dynamic (total minus idle power x runtime); default total")
    fit.add_argument("--energy-source", choices=("measured", "estimated"),
                     help="use only trials whose energy was measured (or estimated)")
    fit.add_argument("--include-executed", action="store_true",
                     help="also learn from the queries measured while executing plans")
    fit.add_argument("--json", action="store_true", help="print JSON")
    fit.set_defaults(handler=cmd_fit)

    predict = sub.add_parser("predict", parents=[common], help="predicted energy and runtime for (model, device, tokens)")
    predict.add_argument("--points", required=True, help="CSV: model, device, input_tokens, output_tokens")
    predict.add_argument("--out", help="write the CSV here (default: stdout); never over --points or the database")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.set_defaults(handler=cmd_predict)

    reference = sub.add_parser("reference-profiles", parents=[common],
                               help="load the paper's published A100 coefficients as labelled reference fits")
    reference.set_defaults(handler=cmd_reference_profiles)

    plan = sub.add_parser("plan", parents=[common], help="the energy-optimal schedule of a workload CSV")
    plan.add_argument("--workload", required=True, help="workload CSV: [id,] prompt | input_tokens [, output_tokens | "
                      "max_output_tokens] [, min_accuracy, category]")
    plan.add_argument("--accuracy-target", type=_number, help="mean accuracy to reach, a fraction (0.55)")
    plan.add_argument("--accuracy-mode", choices=("query", "token"), default="query",
                      help="weight each query once, or by its tokens (the paper's A_K·(τin+τout)); default query")
    plan.add_argument("--deadline-s", type=_number, help="deadline in seconds for every device")
    plan.add_argument("--device-deadline", action="append", default=[], metavar="DEVICE=SECONDS",
                      help="deadline for one device (repeatable; overrides --deadline-s there)")
    plan.add_argument("--zeta", type=_number, help="use the paper's ζ-weighted objective with this ζ in [0, 1] "
                      "instead of total energy")
    plan.add_argument("--min-share", action="append", default=[], metavar="MODEL=FRACTION",
                      help="minimum share of the queries for a model (the paper's γ; repeatable)")
    plan.add_argument("--load-cost", action="append", default=[], metavar="MODEL[@DEVICE]=SECONDS,JOULES",
                      help="count a model's load time and energy once where it is used (repeatable)")
    plan.add_argument("--option", action="append", default=[], metavar="MODEL@DEVICE",
                      help="use only these options (repeatable; default every fitted one)")
    plan.add_argument("--batch-sizes", metavar="B[,B...]",
                      help="batch sizes the plan may use, e.g. 1,4,16 (each within what the model was profiled at; "
                      "default every power of two profiled, plus 1)")
    plan.add_argument("--default-output-tokens", type=int,
                      help="output length for queries with neither output_tokens nor max_output_tokens")
    plan.add_argument("--learned-output-lengths", action="store_true",
                      help="queries without an output length get the one learned from executed prompts (per "
                      "category where known) instead of --default-output-tokens")
    plan.add_argument("--energy-scope", choices=("total", "dynamic"), default="total",
                      help="optimise total energy, or dynamic (total minus idle); default total")
    plan.add_argument("--drop-bad-rows", action="store_true", help="plan the good rows of a workload with bad ones")
    plan.add_argument("--time-limit-s", type=_number, default=30.0, help="solver time limit (default 30 s)")
    plan.add_argument("--out", help="write the schedule CSV here; never over --workload or the database")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    plan.add_argument("--no-save", action="store_true", help="do not store the workload and plan in the database")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(handler=cmd_plan)

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

    jobs = sub.add_parser("jobs", parents=[common], help="profiling jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    jobs_list = jobs_sub.add_parser("list", parents=[common], help="the latest jobs")
    jobs_list.add_argument("--json", action="store_true", help="print JSON")
    jobs_list.set_defaults(handler=cmd_jobs_list)
    jobs_cancel = jobs_sub.add_parser("cancel", parents=[common], help="stop a running job")
    jobs_cancel.add_argument("job", type=int)
    jobs_cancel.set_defaults(handler=cmd_jobs_cancel)

    cluster_commands.add_subcommands(sub, common)

    demo = sub.add_parser("demo-models", parents=[common], help="generate the local demo models and add them to the catalog")
    demo.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where to write them (default data/models)")
    demo.add_argument("--no-register", action="store_true", help="generate only; leave the catalog alone")
    demo.set_defaults(handler=cmd_demo_models)

    backup = sub.add_parser("backup", parents=[common], help="copy the database, read through whole, to a backup file")
    backup.add_argument("--to", metavar="PATH", help="file or folder (default: beside the database, keeping the newest 3)")
    backup.set_defaults(handler=cmd_backup)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        cluster_commands.apply_address(args)
        return args.handler(args) or EXIT_OK
    except InputError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        return EXIT_BAD_INPUT
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: a sentence, not a traceback
        if os.environ.get("PLANNER_DEBUG"):
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (set PLANNER_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def _store(args: argparse.Namespace) -> Store:
    return Store(getattr(args, "db", None))


def _print_json(document: object) -> None:
    print(json.dumps(json_safe(document), indent=2, allow_nan=False))


def _print_table(rows: list[dict], columns: list[str]) -> None:
    # A missing number (None, NaN) is an empty cell, never a number.
    cells = [[("" if json_safe(r.get(c)) is None else str(json_safe(r.get(c)))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- handlers ------------------------------------------------------------------------------

def cmd_sensors(args: argparse.Namespace) -> int:
    from engine.energy import discover_sensors

    statuses = discover_sensors()
    if args.json:
        _print_json([s.to_dict() for s in statuses])
        return EXIT_OK
    source_w = max(len(s.source) for s in statuses)
    device_w = max(len(s.device) for s in statuses)
    for s in statuses:
        print(f"{s.status:9}  {s.source:{source_w}}  {s.device:{device_w}}  {s.detail}")
        if s.fix and s.status != "measured":
            print(f"{'':9}  {'':{source_w}}  {'':{device_w}}  fix: {s.fix}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from engine import runs
    from engine.overview import latest_work, read_overview

    store = _store(args)
    runs.reconcile(store)  # a run whose worker was killed is failed, not "running"
    view = read_overview(store)
    document = {
        "db": view.db_path, "schema_version": view.schema_version,
        "models": json_safe(view.models.to_dict("records")),
        "measurements": view.n_measurements, "measurements_estimated": view.n_measurements_estimated,
        "latest_job": view.latest_job, "latest_fit": view.latest_fit,
        "latest_plan": view.latest_plan, "latest_execution": view.latest_execution,
    }
    if args.json:
        _print_json(document)
        return EXIT_OK
    print(f"database {view.db_path} (schema version {view.schema_version})")
    _print_cluster_line()
    print(f"{len(view.models)} models, {view.n_measurements} measurements "
          f"({view.n_measurements_estimated} with estimated energy)")
    for line in latest_work(view):
        print(f"latest {line.kind.lower()}: {line.text}")
    return EXIT_OK


def _print_cluster_line() -> None:
    from engine.runs.cluster import cluster_address

    address = cluster_address()
    print(f"cluster: {address} (`nodes` lists its nodes)" if address else "cluster: none, everything runs on this host")


def cmd_models_list(args: argparse.Namespace) -> int:
    frame = catalog.list_models(_store(args))
    rows = json_safe(frame.to_dict("records"))
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("The catalog is empty: add a model with `python -m engine models add` or run `make run` for the demo models.")
        return EXIT_OK
    for row in rows:
        row["accuracy"] = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "not set"
        row["params_b"] = f"{row['params_b']:.4g}" if row["params_b"] is not None else ""
        row["demo"] = "demo" if row["is_demo"] else ""
    _print_table(rows, ["name", "backend", "accuracy", "params_b", "demo", "path", "accuracy_source"])
    return EXIT_OK


def cmd_models_add(args: argparse.Namespace) -> int:
    path = f"{catalog.HUB_PREFIX}{args.hub_id}" if args.hub_id else args.path
    entry, warnings = catalog.add_model(
        _store(args), name=args.name, accuracy=args.accuracy, accuracy_source=args.source, backend=args.backend,
        path=path, params_b=args.params_b, notes=args.notes, trust_remote_code=args.trust_remote_code, where="model")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"added {entry.name} ({entry.backend}, accuracy {entry.accuracy:.3f})")
    return EXIT_OK


def cmd_models_set_accuracy(args: argparse.Namespace) -> int:
    entry = catalog.set_accuracy(_store(args), args.name, args.accuracy, args.source)
    print(f"{entry.name}: accuracy {entry.accuracy:.3f} ({entry.accuracy_source})")
    return EXIT_OK


def cmd_models_remove(args: argparse.Namespace) -> int:
    kept = catalog.remove_model(_store(args), args.name)
    note = f"; its {kept} measurements stay in the database and return if you add it again" if kept else ""
    print(f"removed {args.name}{note}")
    return EXIT_OK


def cmd_import_catalog(args: argparse.Namespace) -> int:
    report = catalog.import_catalog(_store(args), Path(args.file))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"added {len(report.added)} models: {', '.join(report.added)}")
    return EXIT_OK


def cmd_demo_models(args: argparse.Namespace) -> int:
    from engine.demo_models import ensure_demo_models

    demos = ensure_demo_models(Path(args.models_dir), progress=lambda line: print(line, file=sys.stderr))
    for demo in demos:
        print(f"{demo.name}: {demo.backend}, {demo.params_b * 1e3:.1f}M parameters, {demo.path}")
    if not args.no_register:
        added = catalog.register_demo_models(_store(args), demos)
        print(f"catalog: added {', '.join(added)}" if added else "catalog: demo models already registered")
    return EXIT_OK


def _progress_line(progress) -> str:
    job = progress.job
    done, total = job.points_done, max(job.points_total, 1)
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    left = f", ~{format_duration(progress.remaining_s)} left" if progress.remaining_s is not None else ""
    return (f"[{bar}] {done}/{job.points_total} points, {progress.trials} trials, "
            f"{format_duration(progress.elapsed_s, unknown='?')} elapsed{left} ({job.status})")


def cmd_profile(args: argparse.Namespace) -> int:
    from engine.profiling import jobs
    from engine.profiling.design import parse_token_list

    store = _store(args)
    if args.resume is not None:
        job = jobs.resume_job(store, args.resume)
    else:
        if not args.model:
            raise InputError([Problem("--model", "is required", None, "a model from `models list` (or --resume JOB)")])
        design = args.design or ("adaptive" if args.budget_s is not None else "custom" if args.inputs or args.outputs
                                 else "quick")
        inputs = parse_token_list(args.inputs, "--inputs") if args.inputs else None
        outputs = parse_token_list(args.outputs, "--outputs") if args.outputs else None
        settings = jobs.ProfileSettings(rel_bound=args.rel_ci, min_trials=args.min_trials, max_trials=args.max_trials,
                                        warmup_runs=args.warmup, cooldown_s=args.cooldown_s, idle_s=args.idle_s,
                                        seed=args.seed, batch_size=args.batch_size, budget_s=args.budget_s)
        job = jobs.create_job(store, args.model, args.device, design, inputs=inputs, outputs=outputs,
                              n_points=args.points, settings=settings)
        for note in job.design.dropped:
            print(f"note: dropped {note}", file=sys.stderr)
    print(f"profiling job {job.id}: {job.model} on {job.device}, {job.points_total} points "
          f"(Ctrl-C cancels; resume with --resume {job.id})", file=sys.stderr)
    process = jobs.start_worker(store, job.id, watch=False)
    interactive = sys.stderr.isatty()
    last = ""
    try:
        while process.poll() is None:
            time.sleep(0.5)
            line = _progress_line(jobs.job_progress(store, job.id))
            if interactive:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif line.split(" points")[0] != last.split(" points")[0]:
                print(line, file=sys.stderr, flush=True)
            last = line
    except KeyboardInterrupt:
        print("\ncancelling…", file=sys.stderr)
        jobs.cancel_job(store, job.id)
        process.wait()
        print(f"cancelled; resume with: python -m engine profile --resume {job.id}", file=sys.stderr)
        return 130
    if interactive:
        print(file=sys.stderr)
    if jobs.get_job(store, job.id).status in jobs.ACTIVE:
        jobs.watch_worker(store, job.id, process)
    progress = jobs.job_progress(store, job.id)
    final = progress.job
    document = {"job": final.id, "model": final.model, "device": final.device, "status": final.status,
                "reason": final.reason, "points_done": final.points_done, "points_total": final.points_total,
                "trials": progress.trials, "elapsed_s": progress.elapsed_s,
                "energy_source": sorted(set(progress.points.energy_source.dropna())) if len(progress.points) else []}
    if args.json:
        _print_json(document)
    else:
        print(f"job {final.id} {final.status}: {final.points_done}/{final.points_total} points, {progress.trials} trials"
              f" in {format_duration(progress.elapsed_s, unknown='?')}" + (f"; energy {', '.join(document['energy_source'])}" if document["energy_source"] else "")
              + (f"; {final.reason}" if final.status == "done" and final.reason else ""))
    if final.status != "done":
        print(f"error: job {final.id} {final.status}: {final.reason}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from engine.profiling import jobs

    store = _store(args)
    jobs.reconcile_jobs(store)
    rows = json_safe(jobs.list_jobs(store).to_dict("records"))
    if args.json:
        _print_json(rows)
    elif not rows:
        print("No profiling jobs yet: start one with `python -m engine profile --model NAME`.")
    else:
        _print_table(rows, ["id", "model", "device", "status", "points_done", "points_total", "trials", "unconverged",
                            "reason"])
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from engine.profiling import jobs

    job = jobs.cancel_job(_store(args), args.job)
    print(f"job {job.id} {job.status}: {job.reason}")
    return EXIT_OK


def cmd_import_measurements(args: argparse.Namespace) -> int:
    from engine.measurements_io import import_measurements

    report = import_measurements(_store(args), Path(args.file), allow_duplicates=args.allow_duplicates)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json({"rows": report.n_rows, "models": report.models, "devices": report.devices,
                     "models_not_in_catalog": report.models_not_in_catalog,
                     "rows_without_energy": report.n_rows_without_energy, "warnings": report.warnings})
    else:
        print(f"imported {report.n_rows} measurements of {', '.join(report.models)} on {', '.join(report.devices)}")
    return EXIT_OK


def cmd_export_measurements(args: argparse.Namespace) -> int:
    from engine.measurements_io import export_measurements

    count = export_measurements(_store(args), Path(args.file), model=args.model, device=args.device,
                                overwrite=args.overwrite)
    print(f"wrote {count} measurements to {args.file}")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from engine.fitting import fit_all, save_fits

    store = _store(args)
    saved = save_fits(store, fit_all(store, args.model, args.device, energy_scope=args.energy_scope,
                                     source_filter=args.energy_source, include_executed=args.include_executed))
    for warning in sorted({w for fit in saved for w in fit.to_json_dict().get("warnings") or []}):
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json([fit.to_json_dict() for fit in saved])
        return EXIT_OK
    rows = []
    for fit in saved:
        rows.append({"model": fit.model, "device": fit.device, "target": fit.target, "form": fit.form,
                     "cv_mape": format_percent(fit.cv_mape, unknown=""),
                     "r2": f"{fit.r2:.3f}" if fit.r2 is not None else "", "points": fit.n_points,
                     "energy": ("estimated" if fit.energy_estimated else "measured") if fit.target == "energy" else ""})
    _print_table(rows, ["model", "device", "target", "form", "cv_mape", "r2", "points", "energy"])
    return EXIT_OK


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _pairs(items: list[str], option: str, expected: str) -> dict[str, str]:
    pairs, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            problems.append(Problem(option, f"{item!r} is not of the form {expected}", None, expected))
        else:
            pairs[key.strip()] = value.strip()
    if problems:
        raise InputError(problems)
    return pairs


#: The flag that sets each plan setting: the engine names a bad setting by its name (the
#: Plan page shows it too); here the problem names the flag that was typed.
_PLAN_SETTING_FLAGS = {"accuracy target": "--accuracy-target", "accuracy mode": "--accuracy-mode",
                       "deadline": "--deadline-s", "device deadline": "--device-deadline", "zeta": "--zeta",
                       "minimum share": "--min-share", "time limit": "--time-limit-s", "batch sizes": "--batch-sizes"}


@contextlib.contextmanager
def _plan_flags():
    """Re-raise an InputError with each plan setting named by its flag."""
    try:
        yield
    except InputError as exc:
        raise InputError([replace(p, where=_PLAN_SETTING_FLAGS.get(p.where, p.where)) for p in exc.problems]) from None


def _plan_settings(args: argparse.Namespace):
    from engine.planning import PlanSettings

    problems = []
    deadlines, shares, loads = {}, {}, {}
    for device, text in _pairs(args.device_deadline, "--device-deadline", "DEVICE=SECONDS").items():
        try:
            deadlines[device] = float(text)
        except ValueError:
            problems.append(Problem("--device-deadline", f"{text!r} for {device} is not a number", None, "seconds"))
    for model, text in _pairs(args.min_share, "--min-share", "MODEL=FRACTION").items():
        try:
            shares[model] = float(text)
        except ValueError:
            problems.append(Problem("--min-share", f"{text!r} for {model} is not a number", None, "a fraction"))
    for key, text in _pairs(args.load_cost, "--load-cost", "MODEL[@DEVICE]=SECONDS,JOULES").items():
        parts = text.split(",")
        try:
            loads[key] = (float(parts[0]), float(parts[1])) if len(parts) == 2 else None
        except ValueError:
            loads[key] = None
        if loads[key] is None:
            problems.append(Problem("--load-cost", f"{text!r} for {key} is not SECONDS,JOULES", None, "e.g. 12.5,3400"))
    if args.default_output_tokens is not None and args.default_output_tokens < 1:
        problems.append(Problem("--default-output-tokens", f"{args.default_output_tokens}", None, "a whole number ≥ 1"))
    if problems:
        raise InputError(problems)
    settings = PlanSettings(accuracy_target=args.accuracy_target, accuracy_mode=args.accuracy_mode,
                            deadline_s=args.deadline_s, deadlines_s=deadlines,
                            objective="zeta" if args.zeta is not None else "energy", zeta=args.zeta, min_share=shares,
                            count_load=bool(loads), energy_scope=args.energy_scope, time_limit_s=args.time_limit_s,
                            batch_sizes=_batch_sizes(args.batch_sizes))
    with _plan_flags():
        settings.validate()
    return settings, loads


def _batch_sizes(text: str | None) -> tuple | None:
    """``--batch-sizes 1,4,16`` as a tuple; items that are not whole numbers are kept as text, so
    that the settings' check names each one (0, -2, 2.5, abc, 300: one problem each)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    return tuple(int(item) if item.lstrip("+-").isdigit() else item for item in items)


def cmd_plan(args: argparse.Namespace) -> int:
    from engine import safe_write
    from engine.planning import plan_workload, read_workload, write_schedule

    settings, loads = _plan_settings(args)
    store = _store(args)
    out = Path(args.out) if args.out else None
    inputs = {"the workload (--workload)": args.workload, **safe_write.database_inputs(store.path)}
    if out is not None:  # refused now, not after the plan was made
        safe_write.check_destination(out, overwrite=args.overwrite, inputs=inputs, where="--out")
    workload = read_workload(args.workload, drop_bad_rows=args.drop_bad_rows)
    started = time.perf_counter()
    for problem in workload.dropped:
        print(f"dropped: {problem}", file=sys.stderr)
    if args.learned_output_lengths:
        workload = _with_learned_output_lengths(store, workload)
    with _plan_flags():
        result = plan_workload(store, workload, settings, default_output_tokens=args.default_output_tokens,
                               only=args.option or None, load_costs=loads or None, save=not args.no_save,
                               started=started)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if out is not None and result.schedule is not None:
        write_schedule(result.schedule, out, overwrite=args.overwrite, inputs=inputs, where="--out")
        print(f"wrote the schedule of {result.n_queries} queries to {out}", file=sys.stderr)
    if args.json:
        _print_json(result.to_json())
    else:
        estimated = " (estimated energy)" if result.energy_estimated else ""
        print(f"status: {result.status}" + (f" (plan {result.plan_id})" if result.plan_id else ""))
        if result.has_schedule:
            _print_plan_energy(result, estimated)
            print(f"accuracy: {result.accuracy:.4f} ({settings.accuracy_mode}-weighted)")
            print(f"solved in {format_duration(result.solve_s)}; planned in {format_duration(result.plan_s)}")
            for device, seconds in result.per_device_runtime_s.items():
                print(f"{device}: {format_duration(seconds)} of work")
            batched = result.n_batches < sum(result.assignments.values())
            _print_table([{"option": k, "queries": v, "batches": result.batches.get(k)}
                          for k, v in result.assignments.items()], ["option", "queries"] + ["batches"] * batched)
            for cost in result.constraint_costs:
                print(cost.text)
        for line in result.diagnosis:
            print(line)
        if result.baselines:
            print("baselines (same predictions):")
            _print_table([{"name": name, "energy": format_energy(b.energy_j), "accuracy": f"{b.accuracy:.4f}",
                           "makespan": format_duration(b.makespan_s), "meets targets": "yes" if b.feasible else "no"}
                          for name, b in result.baselines.items()],
                         ["name", "energy", "accuracy", "makespan", "meets targets"])
    if not result.has_schedule:
        for line in result.diagnosis or [f"no schedule ({result.status})"]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _with_learned_output_lengths(store: Store, workload):
    """``plan --learned-output-lengths``: fill the queries without an output length, and say what was done."""
    from engine.execution import learned_output_lengths
    from engine.planning.output_lengths import fill_learned_output_lengths, missing_output_lengths

    workload, fill = fill_learned_output_lengths(workload, learned_output_lengths(store))
    if fill is None and missing_output_lengths(workload).any():
        print("warning: no output lengths have been learned yet (execute a plan of prompts first); queries without "
              "one use the default output length", file=sys.stderr)
    return workload


def _print_plan_energy(result, estimated: str) -> None:
    """The plan's energy and its band, and which problem its bound and gap are for when batches were formed."""
    from engine.planning.band import band_sentence, uncertainty_against_gap

    print(f"energy: {format_energy(result.energy_j)} {result.energy_scope}{estimated}")
    print("  " + band_sentence(result.energy_band).replace("Expected", "expected"))
    batched = any(size > 1 for sizes in result.batch_sizes.values() for size in sizes)
    if batched:
        overhead = result.formation_overhead_j or 0.0
        print(f"  in {result.n_batches} batches; the assignment counted {format_energy(result.assignment_energy_j)} "
              f"(per-request shares), forming the batches adds {format_energy(overhead)}")
    if result.lower_bound_j is not None:
        scope = " (of the assignment)" if batched else ""
        print(f"lower bound{scope}: {format_energy(result.lower_bound_j)}  gap: {format_percent(result.gap, 4)}")
    comparison = uncertainty_against_gap(result.energy_band, result.gap)
    if comparison:
        print(comparison)
    for device, seconds in result.assignment_deadlines_s.items():
        print(f"  for the batches on {device} to meet its deadline, the assignment held its per-request shares there "
              f"to {format_duration(seconds)} (gap against the deadlines as asked: "
              f"{format_percent(result.gap_as_asked, 4)})")
    if result.batching_saving is not None:
        print(f"batching saves {format_percent(result.batching_saving, 1)} against the same plan at batch 1")


def cmd_execute(args: argparse.Namespace) -> int:
    from engine import execution

    store = _store(args)
    if args.cancel is not None:
        done = execution.cancel_execution(store, args.cancel)
        print(f"execution {done.id}: {done.status} ({done.reason})", file=sys.stderr)
        return EXIT_OK
    if args.move and args.resume is None:
        raise InputError(Problem("--move", "moves a device of a stopped execution", None, "--resume EXECUTION"))
    if args.resume is not None:
        if args.move:
            cluster_commands.move_before_resume(store, args.resume, args.move)
        run = execution.resume_execution(store, args.resume)
    else:
        plan_id = args.plan if args.plan is not None else execution.import_schedule(store, args.schedule)
        run = execution.create_execution(store, plan_id)
    process = execution.start_worker(store, run.id, watch=False)
    print(f"execution {run.id} of plan {run.plan_id}: {run.queries_total} queries; worker pid {process.pid}; "
          f"log {execution.worker_log_path(store, run.id)}", file=sys.stderr)
    if args.detach:
        if args.json:
            _print_json({"execution_id": run.id, "plan_id": run.plan_id, "status": "running", "pid": process.pid})
        return EXIT_OK
    try:
        last = -1
        while process.poll() is None:
            progress = execution.execution_progress(store, run.id)
            if progress.done != last:
                last = progress.done
                print(f"{progress.done}/{progress.total} queries", file=sys.stderr)
            time.sleep(0.5)
    except KeyboardInterrupt:
        execution.cancel_execution(store, run.id)
        raise
    execution.reconcile_executions(store)
    progress = execution.execution_progress(store, run.id)
    scope = store.query_one("SELECT energy_scope FROM plans WHERE id = ?", [run.plan_id])[0]
    comparison = execution.compare(execution.execution_results(store, run.id), scope)
    band_check = execution.execution_band_check(store, run.id, comparison)
    state = progress.execution
    document = {"execution_id": run.id, "plan_id": run.plan_id, "status": state.status, "reason": state.reason,
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
    if args.json:
        _print_json(document)
    else:
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
    return EXIT_OK if state.status == "done" else EXIT_FAILURE


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


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from engine import safe_write
    from engine.csvio import csv_text, read_csv_rows
    from engine.fitting import load_latest_fits, predict

    path = Path(args.points)
    store = _store(args)
    inputs = {"the points file (--points)": path, **safe_write.database_inputs(store.path)}
    if args.out:  # refused before any work
        safe_write.check_destination(Path(args.out), overwrite=args.overwrite, inputs=inputs, where="--out")
    columns = ("model", "device", "input_tokens", "output_tokens")
    rows, warnings = read_csv_rows(path, columns, columns)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    frame = pd.DataFrame([row for _, row in rows], columns=list(columns))
    result = predict(load_latest_fits(store), frame, where=str(path))
    if args.out:
        out = safe_write.write_text(Path(args.out), csv_text(result), overwrite=args.overwrite, inputs=inputs,
                                    where="--out")
        print(f"wrote {len(result)} predictions to {out}", file=sys.stderr)
    else:
        sys.stdout.write(csv_text(result))
    return EXIT_OK


def cmd_reference_profiles(args: argparse.Namespace) -> int:
    from engine.fitting import load_reference_profiles

    added = load_reference_profiles(_store(args))
    print(f"reference profiles loaded (published coefficients, no measurements); catalog: added "
          f"{len(added)} models" + (f" ({', '.join(added)})" if added else ""))
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    print(f"backed up to {_store(args).backup(args.to)}")
    return EXIT_OK
