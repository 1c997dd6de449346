"""The model catalog: ``models list|add|set-accuracy|remove``, ``import-catalog`` and ``demo-models``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import catalog
from engine.cli.common import EXIT_OK, print_json, print_table, store
from engine.formatting import json_safe
from engine.paths import DEFAULT_MODELS_DIR


def add_models(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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


def add_import_catalog(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    imp = sub.add_parser("import-catalog", parents=[common], help="add models from a catalog CSV (all or nothing)")
    imp.add_argument("file", help="CSV with columns model, accuracy[, backend, path, params_b, notes]")
    imp.set_defaults(handler=cmd_import_catalog)


def add_demo_models(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo-models", parents=[common], help="generate the local demo models and add them to the catalog")
    demo.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where to write them (default data/models)")
    demo.add_argument("--no-register", action="store_true", help="generate only; leave the catalog alone")
    demo.set_defaults(handler=cmd_demo_models)


def cmd_models_list(args: argparse.Namespace) -> int:
    frame = catalog.list_models(store(args))
    rows = json_safe(frame.to_dict("records"))
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("The catalog is empty: add a model with `python -m engine models add` or run `make run` for the demo models.")
        return EXIT_OK
    for row in rows:
        row["accuracy"] = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "not set"
        row["params_b"] = f"{row['params_b']:.4g}" if row["params_b"] is not None else ""
        row["demo"] = "demo" if row["is_demo"] else ""
    print_table(rows, ["name", "backend", "accuracy", "params_b", "demo", "path", "accuracy_source"])
    return EXIT_OK


def cmd_models_add(args: argparse.Namespace) -> int:
    path = f"{catalog.HUB_PREFIX}{args.hub_id}" if args.hub_id else args.path
    entry, warnings = catalog.add_model(
        store(args), name=args.name, accuracy=args.accuracy, accuracy_source=args.source, backend=args.backend,
        path=path, params_b=args.params_b, notes=args.notes, trust_remote_code=args.trust_remote_code, where="model")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"added {entry.name} ({entry.backend}, accuracy {entry.accuracy:.3f})")
    return EXIT_OK


def cmd_models_set_accuracy(args: argparse.Namespace) -> int:
    entry = catalog.set_accuracy(store(args), args.name, args.accuracy, args.source)
    print(f"{entry.name}: accuracy {entry.accuracy:.3f} ({entry.accuracy_source})")
    return EXIT_OK


def cmd_models_remove(args: argparse.Namespace) -> int:
    kept = catalog.remove_model(store(args), args.name)
    note = f"; its {kept} measurements stay in the database and return if you add it again" if kept else ""
    print(f"removed {args.name}{note}")
    return EXIT_OK


def cmd_import_catalog(args: argparse.Namespace) -> int:
    report = catalog.import_catalog(store(args), Path(args.file))
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
        added = catalog.register_demo_models(store(args), demos)
        print(f"catalog: added {', '.join(added)}" if added else "catalog: demo models already registered")
    return EXIT_OK
