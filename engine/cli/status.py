"""``sensors`` (the energy sources of this host) and ``status`` (what the database holds)."""

from __future__ import annotations

import argparse

from engine.cli.common import EXIT_OK, print_json, store
from engine.formatting import json_safe


def add_sensors(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sensors = sub.add_parser("sensors", parents=[common], help="energy sources found or missing on this host, and why")
    sensors.add_argument("--json", action="store_true", help="print JSON")
    sensors.set_defaults(handler=cmd_sensors)


def add_status(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="what the database holds")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)


def cmd_sensors(args: argparse.Namespace) -> int:
    from engine.energy import discover_sensors

    statuses = discover_sensors()
    if args.json:
        print_json([s.to_dict() for s in statuses])
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

    db = store(args)
    runs.reconcile(db)  # a run whose worker was killed is failed, not "running"
    view = read_overview(db)
    document = {
        "db": view.db_path, "schema_version": view.schema_version,
        "models": json_safe(view.models.to_dict("records")),
        "measurements": view.n_measurements, "measurements_estimated": view.n_measurements_estimated,
        "latest_job": view.latest_job, "latest_fit": view.latest_fit,
        "latest_plan": view.latest_plan, "latest_execution": view.latest_execution,
    }
    if args.json:
        print_json(document)
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
