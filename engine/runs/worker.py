"""What every worker process does around its own work: read its arguments, and close its run.

A worker is ``python -m MODULE --db PATH <id flag> ID`` (see :mod:`engine.runs.local`). Its
exit code tells the watcher how it ended: 0 done or cancelled, 1 failed (the reason stored).
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from pathlib import Path

from engine.errors import PlannerError
from engine.runs.kinds import RunKind
from engine.runs.lifecycle import cancelled_reason, failure_reason, set_status
from engine.store import Store


class RunCancelled(Exception):
    """The run was asked to stop (its worker got SIGTERM)."""


def worker_main(kind: RunKind, work: Callable[[Store, int], None], argv: list[str] | None = None) -> int:
    """Parse a worker's arguments, run ``work(store, run_id)`` and record how it ended.

    ``work`` closes the run as done itself; a :class:`RunCancelled` closes it as cancelled,
    any other exception as failed with the reason in words (and, for an unexpected one,
    the traceback in the worker's log).
    """
    parser = argparse.ArgumentParser(description=f"Run one {kind.noun} (started by the app or the CLI).")
    parser.add_argument("--db", required=True)
    parser.add_argument(kind.id_flag, dest="run_id", type=int, required=True)
    args = parser.parse_args(argv)
    store = Store(Path(args.db), busy_timeout_s=30)
    try:
        work(store, args.run_id)
    except RunCancelled:
        set_status(store, kind, args.run_id, "cancelled", cancelled_reason(store, kind, args.run_id))
        return 0
    except Exception as exc:  # noqa: BLE001 (every failure is recorded in words)
        if isinstance(exc, PlannerError):
            why = str(exc)
        else:
            traceback.print_exc()
            why = f"{type(exc).__name__}: {exc}"
        set_status(store, kind, args.run_id, "failed", failure_reason(store, kind, args.run_id, why))
        return 1
    return 0
