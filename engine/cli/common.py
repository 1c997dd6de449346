"""What every command module of the CLI shares: the exit codes, the options every subcommand
takes, printing JSON and tables, turning errors into sentences and exit codes, and reading the
plan settings' flags (``plan``'s options, named by their flag when they are wrong)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from dataclasses import replace

from engine.cli.cluster import add_address_option, apply_address
from engine.errors import InputError, PlannerError, Problem
from engine.formatting import json_safe
from engine.store import Store

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130


def shared_options() -> argparse.ArgumentParser:
    """The options every subcommand takes (``--db``, ``--ray-address``), as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="database file (default data/planner.duckdb, or $PLANNER_DB)")
    add_address_option(common)
    return common


def run(args: argparse.Namespace) -> int:
    """Run the subcommand's handler; returns the exit code. Errors become sentences on stderr:
    bad input one line per problem (exit 2), anything else one sentence (exit 1)."""
    try:
        apply_address(args)
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
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: a sentence, not a traceback
        if os.environ.get("PLANNER_DEBUG"):
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (set PLANNER_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def store(args: argparse.Namespace) -> Store:
    """The database the subcommand works on (``--db``, else ``$PLANNER_DB``, else the default)."""
    return Store(getattr(args, "db", None))


def print_json(document: object) -> None:
    print(json.dumps(json_safe(document), indent=2, allow_nan=False))


def print_table(rows: list[dict], columns: list[str]) -> None:
    # A missing number (None, NaN) is an empty cell, never a number.
    cells = [[("" if json_safe(r.get(c)) is None else str(json_safe(r.get(c)))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- reading options -----------------------------------------------------------------------

def number(text: str) -> float:
    """An argparse ``type``: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def pairs(items: list[str], option: str, expected: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options as a dict, or InputError naming each item of another form."""
    found, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            problems.append(Problem(option, f"{item!r} is not of the form {expected}", None, expected))
        else:
            found[key.strip()] = value.strip()
    if problems:
        raise InputError(problems)
    return found


def batch_sizes(text: str | None) -> tuple | None:
    """``--batch-sizes 1,4,16`` as a tuple; items that are not whole numbers are kept as text, so
    that the settings' check names each one (0, -2, 2.5, abc, 300: one problem each)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    return tuple(int(item) if item.lstrip("+-").isdigit() else item for item in items)


#: The flag that sets each plan setting: the engine names a bad setting by its name (the
#: Plan page shows it too); here the problem names the flag that was typed.
PLAN_SETTING_FLAGS = {"accuracy target": "--accuracy-target", "accuracy mode": "--accuracy-mode",
                      "deadline": "--deadline-s", "device deadline": "--device-deadline", "zeta": "--zeta",
                      "minimum share": "--min-share", "time limit": "--time-limit-s", "batch sizes": "--batch-sizes"}


@contextlib.contextmanager
def plan_flags():
    """Re-raise an InputError with each plan setting named by its flag."""
    try:
        yield
    except InputError as exc:
        raise InputError([replace(p, where=PLAN_SETTING_FLAGS.get(p.where, p.where)) for p in exc.problems]) from None
