"""The command line: ``python -m engine SUBCOMMAND``.

Exit codes: 0 success; 2 bad input, one line per problem on stderr; 1 any other
failure, one sentence on stderr. ``--json`` prints one JSON document on stdout and
nothing else there. Set ``PLANNER_DEBUG=1`` to see the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from engine import catalog
from engine.errors import InputError, PlannerError
from engine.paths import DEFAULT_MODELS_DIR
from engine.store import Store

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="database file (default data/planner.duckdb, or $PLANNER_DB)")
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

    demo = sub.add_parser("demo-models", parents=[common], help="generate the local demo models and add them to the catalog")
    demo.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where to write them (default data/models)")
    demo.add_argument("--no-register", action="store_true", help="generate only; leave the catalog alone")
    demo.set_defaults(handler=cmd_demo_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
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
    print(json.dumps(document, indent=2, default=_json_default, allow_nan=False))


def _json_default(value: object) -> object:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _clean(value: object) -> object:
    """None for NaN, so JSON and tables never show a missing number as a number."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[("" if _clean(r.get(c)) is None else str(_clean(r.get(c)))) for c in columns] for r in rows]
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
    from engine.overview import read_overview

    view = read_overview(_store(args))
    document = {
        "db": view.db_path, "schema_version": view.schema_version,
        "models": [{k: _clean(v) for k, v in r.items()} for r in view.models.to_dict("records")],
        "measurements": view.n_measurements, "measurements_estimated": view.n_measurements_estimated,
        "latest_job": view.latest_job, "latest_fit": view.latest_fit,
        "latest_plan": view.latest_plan, "latest_execution": view.latest_execution,
    }
    if args.json:
        _print_json(document)
        return EXIT_OK
    print(f"database {view.db_path} (schema version {view.schema_version})")
    print(f"{len(view.models)} models, {view.n_measurements} measurements "
          f"({view.n_measurements_estimated} with estimated energy)")
    for key in ("latest_job", "latest_fit", "latest_plan", "latest_execution"):
        print(f"{key.replace('_', ' ')}: {document[key] or 'none yet'}")
    return EXIT_OK


def cmd_models_list(args: argparse.Namespace) -> int:
    frame = catalog.list_models(_store(args))
    rows = [{k: _clean(v) for k, v in r.items()} for r in frame.to_dict("records")]
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
