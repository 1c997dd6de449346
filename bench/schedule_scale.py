"""How fast the energy-optimal schedule is found, with its proven gap, as the batch grows.

Instance (seeded): 7 models x 2 devices = 14 options.
- Device "a100-swing": the paper's published coefficients (thesis Table 5.2) for its seven
  LLMs, as loaded by ``python -m engine reference-profiles``.
- Device "v100-sim": a *synthetic* second device, made for this benchmark only: the same
  forms with energy coefficients x1.35 and runtime coefficients x2.2 (an older, slower GPU
  that is less efficient per token). It is not a measurement of anything.
- Accuracy: the paper's A_K (Open LLM Leaderboard averages).
- Queries: token counts drawn from lognormal distributions resembling an instruction
  dataset (τin median 24, σ 0.9; τout median 60, σ 1.0; clipped to [8, 2048]); the
  Alpaca dataset itself is not available here.
- Targets: mean accuracy (query-weighted) halfway between the cheapest schedule's and the
  best achievable; a deadline per device of 75% of the time the fastest option of every
  query would take in total, so both deadlines and the accuracy target bind.

Printed per N (200, 5,000, 52,002): options, plan time (from the parsed workload through
predictions, problem building and solving, as the CLI and the page do it), solver time,
status, energy, proven lower bound and gap. Then the same instance at N = 20,000 solved
by the plain formulation: one binary per (query, option), every constraint in one CBC
model, with a time limit (default 300 s), for comparison.

Run: ``.venv/bin/python bench/schedule_scale.py [--sizes 200,5000,52002] [--plain-n 20000]
[--plain-time-limit 300]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mip  # noqa: E402

from engine.catalog import CatalogEntry  # noqa: E402
from engine.fitting import FitResult, published_catalog_rows, published_fits  # noqa: E402
from engine.planning import (  # noqa: E402
    PlanSettings,
    allowed_options,
    make_plan,
    options_from_fits,
    planning_tokens,
    predict_options,
    workload_from_frame,
)
from engine.planning.plan import accuracy_weights, build_problem  # noqa: E402

SIM_DEVICE = "v100-sim"
SIM_ENERGY_FACTOR, SIM_RUNTIME_FACTOR = 1.35, 2.2


def options_14():
    fits = list(published_fits())
    for fit in list(fits):
        factor = SIM_ENERGY_FACTOR if fit.target == "energy" else SIM_RUNTIME_FACTOR
        data = fit.to_dict()
        data.update(device=SIM_DEVICE, coefficients={k: v * factor for k, v in fit.coefficients.items()})
        data["details"] = {**fit.details, "label": "synthetic second device for the benchmark"}
        fits.append(FitResult.from_dict(data))
    catalog = {row["name"]: CatalogEntry(name=row["name"], backend="external", accuracy=row["accuracy"],
                                         accuracy_source=row["accuracy_source"]) for row in published_catalog_rows()}
    options, _ = options_from_fits(fits, catalog, "total")
    return options, [catalog[name] for name in dict.fromkeys(o.model for o in options)]


def workload(n: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens_in = np.clip(np.round(rng.lognormal(np.log(24), 0.9, n)), 8, 2048).astype(int)
    tokens_out = np.clip(np.round(rng.lognormal(np.log(60), 1.0, n)), 8, 2048).astype(int)
    frame = pd.DataFrame({"id": [f"q{i}" for i in range(n)], "input_tokens": tokens_in, "output_tokens": tokens_out})
    return workload_from_frame(frame, f"bench-{n}")


def targets(predictions, allowed):
    n = len(predictions.output_tokens)
    rows = np.arange(n)
    weights = accuracy_weights(predictions, "query")
    cheapest = np.argmin(np.where(allowed, predictions.energy_j, np.inf), axis=1)
    most = np.argmax(np.where(allowed, predictions.accuracy[None, :], -np.inf), axis=1)
    low = float((predictions.accuracy[cheapest] * weights[rows, cheapest]).sum() / n)
    high = float((predictions.accuracy[most] * weights[rows, most]).sum() / n)
    fastest_total = float(predictions.runtime_s.min(axis=1).sum())
    return (low + high) / 2, {d: 0.75 * fastest_total for d in predictions.devices}


def plan_once(n: int, seed: int, options, entries):
    work = workload(n, seed)
    started = time.perf_counter()  # the workload is parsed; from here on it counts
    tokens = planning_tokens(work, entries)
    predictions = predict_options(options, tokens.input_tokens, tokens.output_tokens)
    allowed = allowed_options(predictions, None)
    target, deadlines = targets(predictions, allowed)
    settings = PlanSettings(accuracy_target=target, deadlines_s=deadlines, time_limit_s=60)
    result = make_plan(predictions, settings, explain=False, compare=False, started=started)
    return result, predictions, settings, allowed


def plain_formulation(predictions, settings, allowed, time_limit_s: float):
    """One binary per (query, option), all constraints in one CBC model."""
    started = time.perf_counter()
    problem = build_problem(predictions, settings, allowed)
    n, k = problem.shape
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.threads = 1
    # The same options per query as the planner offers (an option whose prediction was clamped
    # from a negative value is not offered).
    x = [{j: model.add_var(var_type=mip.BINARY, obj=float(problem.cost[i, j])) for j in range(k)
          if problem.allowed[i, j]} for i in range(n)]
    for i in range(n):
        model += mip.xsum(x[i].values()) == 1
    for row in problem.rows:
        expression = mip.xsum(float(row.coef[i, j]) * var for i in range(n) for j, var in x[i].items()
                              if row.coef[i, j])
        model += (expression >= row.rhs) if row.sense == ">=" else (expression <= row.rhs)
    built = time.perf_counter() - started
    status = model.optimize(max_seconds=time_limit_s)
    total = time.perf_counter() - started
    objective = model.objective_value if status in (mip.OptimizationStatus.OPTIMAL,
                                                    mip.OptimizationStatus.FEASIBLE) else None
    bound = model.objective_bound
    gap = (objective - bound) / objective if objective else None
    return {"status": status.name.lower(), "build_s": built, "total_s": total, "energy_j": objective,
            "lower_bound_j": bound, "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,5000,52002")
    parser.add_argument("--plain-n", type=int, default=20_000)
    parser.add_argument("--plain-time-limit", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"python {platform.python_version()}, python-mip {mip.__version__ if hasattr(mip, '__version__') else '?'}")
    options, entries = options_14()
    print(f"options: {len(options)} ({len({o.model for o in options})} models x {len({o.device for o in options})} "
          "devices; a100-swing = published coefficients, v100-sim = synthetic)")
    plan_once(200, args.seed + 1, options, entries)  # warm imports (CBC library, numpy paths)
    header = f"{'N':>7} {'options':>7} {'plan_s':>7} {'solve_s':>7} {'status':>8} {'energy_kJ':>12} " \
             f"{'bound_kJ':>12} {'gap':>9}  method"
    print(header)
    for n in [int(s) for s in args.sizes.split(",")]:
        result, *_ = plan_once(n, args.seed, options, entries)
        print(f"{n:>7} {len(options):>7} {result.plan_s:>7.2f} {result.solve_s:>7.2f} {result.status:>8} "
              f"{result.energy_j / 1e3:>12.3f} {result.lower_bound_j / 1e3:>12.3f} {result.gap:>9.2e}  "
              f"{result.solver['method']} ({result.solver['free_groups']} of {result.solver['groups']} groups free)")
    if args.plain_n:
        result, predictions, settings, allowed = plan_once(args.plain_n, args.seed, options, entries)
        print(f"\nN = {args.plain_n}, decomposition: plan {result.plan_s:.2f} s, energy {result.energy_j / 1e3:.3f} kJ, "
              f"gap {result.gap:.2e}")
        plain = plain_formulation(predictions, settings, allowed, args.plain_time_limit)
        energy = f"{plain['energy_j'] / 1e3:.3f} kJ" if plain["energy_j"] is not None else "none found"
        gap = f"{plain['gap']:.2e}" if plain["gap"] is not None else "n/a"
        print(f"N = {args.plain_n}, plain formulation ({int(allowed.sum()):,} binaries in one CBC model, "
              f"limit {args.plain_time_limit:.0f} s): status {plain['status']}, build {plain['build_s']:.1f} s, "
              f"total {plain['total_s']:.1f} s, energy {energy}, gap {gap}")


if __name__ == "__main__":
    main()
