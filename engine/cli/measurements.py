"""Measurements taken elsewhere: ``import-measurements`` and ``export-measurements`` (CSV)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import EXIT_OK, print_json, store


def add_import_measurements(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    imp_m = sub.add_parser("import-measurements", parents=[common],
                           help="add measurements taken elsewhere from a CSV (all or nothing)")
    imp_m.add_argument("file", help="CSV: model, device, input_tokens, output_tokens, runtime_s, energy_j[, ...]")
    imp_m.add_argument("--allow-duplicates", action="store_true", help="import rows identical to stored ones anyway")
    imp_m.add_argument("--json", action="store_true", help="print JSON")
    imp_m.set_defaults(handler=cmd_import_measurements)


def add_export_measurements(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    exp_m = sub.add_parser("export-measurements", parents=[common], help="write measurements to a CSV")
    exp_m.add_argument("file")
    exp_m.add_argument("--model", help="only this model")
    exp_m.add_argument("--device", help="only this device")
    exp_m.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp_m.set_defaults(handler=cmd_export_measurements)


def cmd_import_measurements(args: argparse.Namespace) -> int:
    from engine.measurements_io import import_measurements

    report = import_measurements(store(args), Path(args.file), allow_duplicates=args.allow_duplicates)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print_json({"rows": report.n_rows, "models": report.models, "devices": report.devices,
                    "models_not_in_catalog": report.models_not_in_catalog,
                    "rows_without_energy": report.n_rows_without_energy, "warnings": report.warnings})
    else:
        print(f"imported {report.n_rows} measurements of {', '.join(report.models)} on {', '.join(report.devices)}")
    return EXIT_OK


def cmd_export_measurements(args: argparse.Namespace) -> int:
    from engine.measurements_io import export_measurements

    count = export_measurements(store(args), Path(args.file), model=args.model, device=args.device,
                                overwrite=args.overwrite)
    print(f"wrote {count} measurements to {args.file}")
    return EXIT_OK
