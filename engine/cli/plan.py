"""``plan``: the energy-optimal schedule of a workload CSV, printed, stored and optionally written."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.cli.common import (EXIT_FAILURE, EXIT_OK, batch_sizes, number, pairs, plan_flags, print_json, print_table,
                               store)
from engine.errors import InputError, Problem
from engine.formatting import format_duration, format_energy, format_percent
from engine.store import Store


def add_plan(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    plan = sub.add_parser("plan", parents=[common], help="the energy-optimal schedule of a workload CSV")
    plan.add_argument("--workload", required=True, help="workload CSV: [id,] prompt | input_tokens [, output_tokens | "
                      "max_output_tokens] [, min_accuracy, category]")
    plan.add_argument("--accuracy-target", type=number, help="mean accuracy to reach, a fraction (0.55)")
    plan.add_argument("--accuracy-mode", choices=("query", "token"), default="query",
                      help="weight each query once, or by its tokens (the paper's A_K·(τin+τout)); default query")
    plan.add_argument("--deadline-s", type=number, help="deadline in seconds for every device")
    plan.add_argument("--device-deadline", action="append", default=[], metavar="DEVICE=SECONDS",
                      help="deadline for one device (repeatable; overrides --deadline-s there)")
    plan.add_argument("--zeta", type=number, help="use the paper's ζ-weighted objective with this ζ in [0, 1] "
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
    plan.add_argument("--time-limit-s", type=number, default=30.0, help="solver time limit (default 30 s)")
    plan.add_argument("--out", help="write the schedule CSV here; never over --workload or the database")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    plan.add_argument("--no-save", action="store_true", help="do not store the workload and plan in the database")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(handler=cmd_plan)


def _plan_settings(args: argparse.Namespace):
    from engine.planning import PlanSettings

    problems = []
    deadlines, shares, loads = {}, {}, {}
    for device, text in pairs(args.device_deadline, "--device-deadline", "DEVICE=SECONDS").items():
        try:
            deadlines[device] = float(text)
        except ValueError:
            problems.append(Problem("--device-deadline", f"{text!r} for {device} is not a number", None, "seconds"))
    for model, text in pairs(args.min_share, "--min-share", "MODEL=FRACTION").items():
        try:
            shares[model] = float(text)
        except ValueError:
            problems.append(Problem("--min-share", f"{text!r} for {model} is not a number", None, "a fraction"))
    for key, text in pairs(args.load_cost, "--load-cost", "MODEL[@DEVICE]=SECONDS,JOULES").items():
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
                            batch_sizes=batch_sizes(args.batch_sizes))
    with plan_flags():
        settings.validate()
    return settings, loads


def cmd_plan(args: argparse.Namespace) -> int:
    from engine import safe_write
    from engine.planning import plan_workload, read_workload, write_schedule

    settings, loads = _plan_settings(args)
    db = store(args)
    out = Path(args.out) if args.out else None
    inputs = {"the workload (--workload)": args.workload, **safe_write.database_inputs(db.path)}
    if out is not None:  # refused now, not after the plan was made
        safe_write.check_destination(out, overwrite=args.overwrite, inputs=inputs, where="--out")
    workload = read_workload(args.workload, drop_bad_rows=args.drop_bad_rows)
    started = time.perf_counter()
    for problem in workload.dropped:
        print(f"dropped: {problem}", file=sys.stderr)
    if args.learned_output_lengths:
        workload = _with_learned_output_lengths(db, workload)
    with plan_flags():
        result = plan_workload(db, workload, settings, default_output_tokens=args.default_output_tokens,
                               only=args.option or None, load_costs=loads or None, save=not args.no_save,
                               started=started)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if out is not None and result.schedule is not None:
        write_schedule(result.schedule, out, overwrite=args.overwrite, inputs=inputs, where="--out")
        print(f"wrote the schedule of {result.n_queries} queries to {out}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
    else:
        _print_plan(result, settings)
    if not result.has_schedule:
        for line in result.diagnosis or [f"no schedule ({result.status})"]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _with_learned_output_lengths(db: Store, workload):
    """``plan --learned-output-lengths``: fill the queries without an output length, and say what was done."""
    from engine.execution import learned_output_lengths
    from engine.planning.output_lengths import fill_learned_output_lengths, missing_output_lengths

    workload, fill = fill_learned_output_lengths(workload, learned_output_lengths(db))
    if fill is None and missing_output_lengths(workload).any():
        print("warning: no output lengths have been learned yet (execute a plan of prompts first); queries without "
              "one use the default output length", file=sys.stderr)
    return workload


def _print_plan(result, settings) -> None:
    """The plan for people: status, energy, accuracy, time per device, options used, constraints' costs,
    diagnosis and baselines."""
    estimated = " (estimated energy)" if result.energy_estimated else ""
    print(f"status: {result.status}" + (f" (plan {result.plan_id})" if result.plan_id else ""))
    if result.has_schedule:
        _print_plan_energy(result, estimated)
        print(f"accuracy: {result.accuracy:.4f} ({settings.accuracy_mode}-weighted)")
        print(f"solved in {format_duration(result.solve_s)}; planned in {format_duration(result.plan_s)}")
        for device, seconds in result.per_device_runtime_s.items():
            print(f"{device}: {format_duration(seconds)} of work")
        batched = result.n_batches < sum(result.assignments.values())
        print_table([{"option": k, "queries": v, "batches": result.batches.get(k)}
                     for k, v in result.assignments.items()], ["option", "queries"] + ["batches"] * batched)
        for cost in result.constraint_costs:
            print(cost.text)
    for line in result.diagnosis:
        print(line)
    if result.baselines:
        print("baselines (same predictions):")
        print_table([{"name": name, "energy": format_energy(b.energy_j), "accuracy": f"{b.accuracy:.4f}",
                      "makespan": format_duration(b.makespan_s), "meets targets": "yes" if b.feasible else "no"}
                     for name, b in result.baselines.items()],
                    ["name", "energy", "accuracy", "makespan", "meets targets"])


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
