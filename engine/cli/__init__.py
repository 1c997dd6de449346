"""The command line: ``python -m engine SUBCOMMAND``.

Exit codes: 0 success; 2 bad input, one line per problem on stderr; 1 any other
failure, one sentence on stderr. ``--json`` prints one JSON document on stdout and
nothing else there. Set ``PLANNER_DEBUG=1`` to see the traceback of an internal error.

One module per command group, each adding its own subcommands (``add_*(sub, common)``) and
holding their handlers (``cmd_*``); what they share (exit codes, the options every
subcommand takes, printing, errors as sentences) is in :mod:`engine.cli.common`. This
package is the top layer: nothing else in ``engine`` imports it.
"""

from __future__ import annotations

import argparse

from engine.cli import backup, cluster, execute, fit, measurements, models, plan, profile, status
from engine.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, run, shared_options

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_OK", "build_parser", "main"]

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (
    status.add_sensors, status.add_status, models.add_models, models.add_import_catalog, profile.add_profile,
    measurements.add_import_measurements, measurements.add_export_measurements, fit.add_fit, fit.add_predict,
    fit.add_reference_profiles, plan.add_plan, execute.add_execute, profile.add_jobs,
    cluster.add_subcommands,  # node start, nodes
    models.add_demo_models, backup.add_backup,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = shared_options()
    parser = argparse.ArgumentParser(prog="python -m engine", parents=[common],
                                     description="Joule Planner: profile, fit, plan and execute LLM batch work for least energy.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    return run(build_parser().parse_args(argv))
