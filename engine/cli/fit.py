"""Surfaces: ``fit`` (energy and runtime per model and device), ``predict`` (from the latest
fits) and ``reference-profiles`` (the paper's published coefficients)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import EXIT_OK, print_json, print_table, store
from engine.formatting import format_percent


def add_fit(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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


def add_predict(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    predict = sub.add_parser("predict", parents=[common], help="predicted energy and runtime for (model, device, tokens)")
    predict.add_argument("--points", required=True, help="CSV: model, device, input_tokens, output_tokens")
    predict.add_argument("--out", help="write the CSV here (default: stdout); never over --points or the database")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.set_defaults(handler=cmd_predict)


def add_reference_profiles(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    reference = sub.add_parser("reference-profiles", parents=[common],
                               help="load the paper's published A100 coefficients as labelled reference fits")
    reference.set_defaults(handler=cmd_reference_profiles)


def cmd_fit(args: argparse.Namespace) -> int:
    from engine.fitting import fit_all, save_fits

    db = store(args)
    saved = save_fits(db, fit_all(db, args.model, args.device, energy_scope=args.energy_scope,
                                  source_filter=args.energy_source, include_executed=args.include_executed))
    for warning in sorted({w for fit in saved for w in fit.to_json_dict().get("warnings") or []}):
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print_json([fit.to_json_dict() for fit in saved])
        return EXIT_OK
    rows = []
    for fit in saved:
        rows.append({"model": fit.model, "device": fit.device, "target": fit.target, "form": fit.form,
                     "cv_mape": format_percent(fit.cv_mape, unknown=""),
                     "r2": f"{fit.r2:.3f}" if fit.r2 is not None else "", "points": fit.n_points,
                     "energy": ("estimated" if fit.energy_estimated else "measured") if fit.target == "energy" else ""})
    print_table(rows, ["model", "device", "target", "form", "cv_mape", "r2", "points", "energy"])
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from engine import safe_write
    from engine.csvio import csv_text, read_csv_rows
    from engine.fitting import load_latest_fits, predict

    path = Path(args.points)
    db = store(args)
    inputs = {"the points file (--points)": path, **safe_write.database_inputs(db.path)}
    if args.out:  # refused before any work
        safe_write.check_destination(Path(args.out), overwrite=args.overwrite, inputs=inputs, where="--out")
    columns = ("model", "device", "input_tokens", "output_tokens")
    rows, warnings = read_csv_rows(path, columns, columns)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    frame = pd.DataFrame([row for _, row in rows], columns=list(columns))
    result = predict(load_latest_fits(db), frame, where=str(path))
    if args.out:
        out = safe_write.write_text(Path(args.out), csv_text(result), overwrite=args.overwrite, inputs=inputs,
                                    where="--out")
        print(f"wrote {len(result)} predictions to {out}", file=sys.stderr)
    else:
        sys.stdout.write(csv_text(result))
    return EXIT_OK


def cmd_reference_profiles(args: argparse.Namespace) -> int:
    from engine.fitting import load_reference_profiles

    added = load_reference_profiles(store(args))
    print(f"reference profiles loaded (published coefficients, no measurements); catalog: added "
          f"{len(added)} models" + (f" ({', '.join(added)})" if added else ""))
    return EXIT_OK
