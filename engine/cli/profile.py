"""Profiling: ``profile`` (measure a model on a device, following the job's worker) and
``jobs list|cancel``."""

from __future__ import annotations

import argparse
import sys
import time

from engine.cli.common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, print_json, print_table, store
from engine.errors import InputError, Problem
from engine.formatting import format_duration, json_safe
from engine.profiling.design import ALL_DESIGN_KINDS


def add_profile(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    profile = sub.add_parser("profile", parents=[common], help="measure a model's energy and runtime over a design")
    profile.add_argument("--model", help="a model from the catalog")
    profile.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    profile.add_argument("--design", choices=ALL_DESIGN_KINDS, help="default: quick, or custom when --inputs/--outputs are "
                         "given, or adaptive with --budget-s")
    profile.add_argument("--inputs", help="input token counts, e.g. 8,32,128 (custom design; range for space-filling)")
    profile.add_argument("--outputs", help="output token counts, e.g. 8,32 (custom design; range for space-filling)")
    profile.add_argument("--points", type=int, default=16, help="(input, output) shapes of a space-filling design, "
                         "each measured at every batch size (default 16)")
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
    profile.add_argument("--batch-sizes", metavar="B[,B...]",
                         help="a batch axis: measure every point at each batch size, one trial being one batch of B "
                              "requests (default for a fixed design: 1,2,4,8,16,32, less the sizes whose largest batch "
                              "does not fit in the device's free memory; 1 for the adaptive design, on a cluster "
                              "node's device, or with --batch-size 2 or more). Two or more sizes give the fits a batch "
                              "axis; 1 measures one request at a time")
    profile.add_argument("--resume", type=int, metavar="JOB", help="continue a failed or cancelled job")
    profile.add_argument("--json", action="store_true", help="print JSON")
    profile.set_defaults(handler=cmd_profile)


def add_jobs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", parents=[common], help="profiling jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    jobs_list = jobs_sub.add_parser("list", parents=[common], help="the latest jobs")
    jobs_list.add_argument("--json", action="store_true", help="print JSON")
    jobs_list.set_defaults(handler=cmd_jobs_list)
    jobs_cancel = jobs_sub.add_parser("cancel", parents=[common], help="stop a running job")
    jobs_cancel.add_argument("job", type=int)
    jobs_cancel.set_defaults(handler=cmd_jobs_cancel)


def cmd_profile(args: argparse.Namespace) -> int:
    from engine.profiling import jobs

    db = store(args)
    job = jobs.resume_job(db, args.resume) if args.resume is not None else _create_job(db, args)
    print(f"profiling job {job.id}: {job.model} on {job.device}, {job.points_total} points "
          f"(Ctrl-C cancels; resume with --resume {job.id})", file=sys.stderr)
    process = jobs.start_worker(db, job.id, watch=False)
    try:
        _follow_job(db, job.id, process)
    except KeyboardInterrupt:
        print("\ncancelling…", file=sys.stderr)
        jobs.cancel_job(db, job.id)
        process.wait()
        print(f"cancelled; resume with: python -m engine profile --resume {job.id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if jobs.get_job(db, job.id).status in jobs.ACTIVE:
        jobs.watch_worker(db, job.id, process)
    return _report_job(jobs.job_progress(db, job.id), args.json)


def _create_job(db, args: argparse.Namespace):
    """A new profiling job from the options (the design named, or the one they imply)."""
    from engine.profiling import jobs
    from engine.profiling.design import parse_batch_sizes, parse_token_list

    if not args.model:
        raise InputError([Problem("--model", "is required", None, "a model from `models list` (or --resume JOB)")])
    design = args.design or ("adaptive" if args.budget_s is not None else "custom" if args.inputs or args.outputs
                             else "quick")
    inputs = parse_token_list(args.inputs, "--inputs") if args.inputs else None
    outputs = parse_token_list(args.outputs, "--outputs") if args.outputs else None
    named = args.batch_sizes is not None
    batch_sizes = parse_batch_sizes(args.batch_sizes, "--batch-sizes") if named else (1,)
    settings = jobs.ProfileSettings(rel_bound=args.rel_ci, min_trials=args.min_trials, max_trials=args.max_trials,
                                    warmup_runs=args.warmup, cooldown_s=args.cooldown_s, idle_s=args.idle_s,
                                    seed=args.seed, batch_size=args.batch_size, budget_s=args.budget_s,
                                    batch_sizes=batch_sizes)
    job = jobs.create_job(db, args.model, args.device, design, inputs=inputs, outputs=outputs,
                          n_points=args.points, settings=settings, default_batch_axis=not named)
    for note in job.design.dropped:
        print(f"note: dropped {note}", file=sys.stderr)
    return job


def _follow_job(db, job_id: int, process) -> None:
    """Show the job's progress on stderr until its worker exits: one line redrawn on a terminal,
    else a line each time a point is done."""
    from engine.profiling import jobs

    interactive = sys.stderr.isatty()
    last = ""
    while process.poll() is None:
        time.sleep(0.5)
        line = _progress_line(jobs.job_progress(db, job_id))
        if interactive:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif line.split(" points")[0] != last.split(" points")[0]:
            print(line, file=sys.stderr, flush=True)
        last = line
    if interactive:
        print(file=sys.stderr)


def _progress_line(progress) -> str:
    job = progress.job
    done, total = job.points_done, max(job.points_total, 1)
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    left = f", ~{format_duration(progress.remaining_s)} left" if progress.remaining_s is not None else ""
    return (f"[{bar}] {done}/{job.points_total} points, {progress.trials} trials, "
            f"{format_duration(progress.elapsed_s, unknown='?')} elapsed{left} ({job.status})")


def _report_job(progress, as_json: bool) -> int:
    """The finished job on stdout (a line, or JSON); exit 1 with the reason on stderr unless it is done."""
    final = progress.job
    document = {"job": final.id, "model": final.model, "device": final.device, "status": final.status,
                "reason": final.reason, "points_done": final.points_done, "points_total": final.points_total,
                "trials": progress.trials, "elapsed_s": progress.elapsed_s,
                "energy_source": sorted(set(progress.points.energy_source.dropna())) if len(progress.points) else []}
    if as_json:
        print_json(document)
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

    db = store(args)
    jobs.reconcile_jobs(db)
    rows = json_safe(jobs.list_jobs(db).to_dict("records"))
    if args.json:
        print_json(rows)
    elif not rows:
        print("No profiling jobs yet: start one with `python -m engine profile --model NAME`.")
    else:
        print_table(rows, ["id", "model", "device", "status", "points_done", "points_total", "trials", "unconverged",
                           "reason"])
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from engine.profiling import jobs

    job = jobs.cancel_job(store(args), args.job)
    print(f"job {job.id} {job.status}: {job.reason}")
    return EXIT_OK
