"""One lifecycle for every long run: queued, running, then done, failed or cancelled.

A run's worker stores every result the moment it is measured and closes its run itself
(done, failed with the reason, or cancelled). When the worker dies before that, whoever
started it and watches it (:func:`watch_until_done`) closes the run with how the worker
ended; a run whose worker is gone while nobody watched (the app restarted) is found by
:func:`reconcile`. Nothing stored is ever lost: a failed or cancelled run is queued again
(:func:`check_resumable`, then :func:`requeue`), and its worker runs only what is left.

One device runs one run at a time, whatever its kind (:func:`run_on_device`): a profiling
job and an execution on one device would measure each other.

Every function takes the kind of run (:mod:`engine.runs.kinds`); where the worker
executes is the launcher's business (:mod:`engine.runs.launcher`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pandas as pd

from engine.errors import InputError, Problem
from engine.runs.devices import host_name
from engine.runs.kinds import ACTIVE, FINISHED, RUN_KINDS, RunKind
from engine.runs.cluster import RayLauncher, cluster_address
from engine.runs.launcher import RunHandle, RunLauncher, exit_reason
from engine.runs.local import LocalProcessLauncher
from engine.store import Store

#: A queued run without a worker is left alone this long: its starter is about to record the worker.
START_GRACE_S = 30.0

_LOCAL = LocalProcessLauncher()


def current_launcher() -> RunLauncher:
    """Where runs execute: worker processes on this host, and with a cluster address
    (``PLANNER_RAY_ADDRESS``) the runs on cluster devices through a driver process."""
    address = cluster_address()
    return RayLauncher(address) if address else _LOCAL


def _placeholders(values: tuple) -> str:
    return ", ".join("?" * len(values))


# -- state ---------------------------------------------------------------------------------------

def set_status(store: Store, kind: RunKind, run_id: int, status: str, reason: str | None = None, *,
               only_if: tuple[str, ...] = ()) -> bool:
    """Move a run to a status (a finished one gets its finish time); returns whether it changed.

    With ``only_if``, only a run in one of those statuses moves (so a late writer never
    overwrites a closed run).
    """
    finished = "current_timestamp" if status in FINISHED else "finished_at"
    condition = f" AND status IN ({_placeholders(only_if)})" if only_if else ""
    with store.connect() as con:
        changed = con.execute(
            f"UPDATE {kind.table} SET status = ?, reason = ?, finished_at = {finished} WHERE id = ?{condition} "
            "RETURNING id", [status, reason, int(run_id), *only_if]).fetchall()
    return bool(changed)


def mark_running(store: Store, kind: RunKind, run_id: int) -> None:
    """What a worker does first: the run is running, and its clock starts (unless this run started it already)."""
    set_status(store, kind, run_id, "running", None, only_if=("queued", "running"))
    store.execute(f"UPDATE {kind.table} SET started_at = coalesce(started_at, current_timestamp) WHERE id = ?",
                  [int(run_id)])


def mark_done(store: Store, kind: RunKind, run_id: int) -> None:
    """What a worker does last when everything ran."""
    set_status(store, kind, run_id, "done", None, only_if=("running",))


def _row(store: Store, kind: RunKind, run_id: int) -> dict:
    done, total = kind.progress_columns
    frame = store.query_df(f"SELECT status, pid, coalesce({done}, 0) AS done, coalesce({total}, 0) AS total "
                           f"FROM {kind.table} WHERE id = ?", [int(run_id)])
    if frame.empty:
        raise InputError(Problem(kind.noun, f"no {kind.label(run_id)}", None, f"the id of a {kind.noun}"))
    row = frame.iloc[0].to_dict()
    row["pid"] = None if pd.isna(row["pid"]) else int(row["pid"])
    return row


def stored_count(store: Store, kind: RunKind, run_id: int) -> int:
    """How many results (trials, queries) the run has stored."""
    return int(store.query_one(kind.stored_count_sql, [int(run_id)])[0])


def cancelled_reason(store: Store, kind: RunKind, run_id: int) -> str:
    """``cancelled; 4 trials stored``."""
    return f"cancelled; {stored_count(store, kind, run_id)} {kind.stored_noun} stored"


def failure_reason(store: Store, kind: RunKind, run_id: int, why: str) -> str:
    """Why a run failed, how far it got, and that what it measured is kept."""
    row = _row(store, kind, run_id)
    return (f"{why.rstrip('. ')}; after {row['done']} of {row['total']} {kind.progress_noun}, the "
            f"{stored_count(store, kind, run_id)} {kind.stored_noun} measured so far are stored: resume to run the rest")


def close_orphan(store: Store, kind: RunKind, run_id: int, why: str) -> None:
    """Close a run whose worker ended without closing it: cancelled when a cancel was asked, else failed."""
    if _row(store, kind, run_id)["status"] == "cancelling":
        set_status(store, kind, run_id, "cancelled", cancelled_reason(store, kind, run_id), only_if=("cancelling",))
    else:
        set_status(store, kind, run_id, "failed", failure_reason(store, kind, run_id, why),
                   only_if=("queued", "running"))


# -- workers ---------------------------------------------------------------------------------------

def start(store: Store, kind: RunKind, run_id: int, *, watch: bool = True) -> RunHandle:
    """Start the worker of a queued run; with ``watch``, a thread records how it ended."""
    handle = current_launcher().start(kind, store, run_id)
    store.execute(f"UPDATE {kind.table} SET pid = ? WHERE id = ?", [handle.pid, int(run_id)])
    if watch:
        threading.Thread(target=watch_until_done, args=(store, kind, run_id, handle), daemon=True,
                         name=f"watch-{kind.log_prefix}-{run_id}").start()
    return handle


def watch_until_done(store: Store, kind: RunKind, run_id: int, handle: RunHandle) -> None:
    """Wait for a worker; if it ended without closing its run, close it with the reason."""
    close_orphan(store, kind, run_id, exit_reason(handle.wait()))


def reconcile(store: Store, kinds: tuple[RunKind, ...] = RUN_KINDS) -> None:
    """Close the active runs of this host whose worker is gone (killed while nobody watched)."""
    launcher = current_launcher()
    for kind in kinds:
        frame = store.query_df(f"SELECT id, pid, created_at FROM {kind.table} WHERE host = ? "
                               f"AND status IN ({_placeholders(ACTIVE)})", [host_name(), *ACTIVE])
        for row in frame.itertuples():
            why = _why_orphaned(kind, row, launcher)
            if why is not None:
                close_orphan(store, kind, int(row.id), why)


def _why_orphaned(kind: RunKind, row, launcher: RunLauncher) -> str | None:
    """Why an active run has no worker, or None while it has one (or may be about to)."""
    if pd.isna(row.pid):
        created = pd.Timestamp(row.created_at)
        if (pd.Timestamp.now(tz=created.tz) - created).total_seconds() < START_GRACE_S:
            return None
        return "no worker process was started"
    if launcher.is_alive(kind, int(row.id), int(row.pid)):
        return None
    return f"the worker process {int(row.pid)} ended unexpectedly (killed or crashed)"


def cancel(store: Store, kind: RunKind, run_id: int, *, grace_s: float) -> None:
    """Stop a run within seconds: ask its worker to stop, end it if it does not; what it stored is kept."""
    row = _row(store, kind, run_id)
    if row["status"] not in ACTIVE:
        raise InputError(Problem(kind.noun, f"{kind.label(run_id)} is {row['status']}, not running", None,
                                 f"a running {kind.noun}"))
    set_status(store, kind, run_id, "cancelling", "cancel requested", only_if=ACTIVE)
    current_launcher().stop(kind, run_id, row["pid"], grace_s)
    set_status(store, kind, run_id, "cancelled", cancelled_reason(store, kind, run_id),
               only_if=("cancelling", "queued", "running"))


def check_resumable(store: Store, kind: RunKind, run_id: int) -> None:
    """InputError unless the run is failed or cancelled (a run whose worker is gone counts as failed)."""
    reconcile(store, (kind,))
    status = _row(store, kind, run_id)["status"]
    if status not in ("failed", "cancelled"):
        raise InputError(Problem(kind.noun, f"{kind.label(run_id)} is {status}", None,
                                 f"a failed or cancelled {kind.noun}"))


def requeue(store: Store, kind: RunKind, run_id: int) -> None:
    """Queue a failed or cancelled run again (see :func:`check_resumable`); its worker skips what is stored.

    Its clock restarts: elapsed and remaining time are about this run, not the pause before it.
    """
    store.execute(f"UPDATE {kind.table} SET status = 'queued', reason = NULL, pid = NULL, finished_at = NULL, "
                  "started_at = NULL, created_at = current_timestamp WHERE id = ?", [int(run_id)])


# -- devices ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BusyRun:
    """The run that holds a device."""

    kind: RunKind
    run_id: int

    def __str__(self) -> str:
        return self.kind.label(self.run_id)


def run_on_device(store: Store, device: str) -> BusyRun | None:
    """The run of any kind that holds a device of this host, if one does.

    Runs whose worker is gone are closed first, so they do not count.
    """
    reconcile(store)
    for kind in RUN_KINDS:
        row = store.query_one(
            f"SELECT id FROM {kind.table} WHERE host = ? AND status IN ({_placeholders(ACTIVE)}) "
            f"AND list_contains({kind.devices_sql}, ?) ORDER BY id LIMIT 1", [host_name(), *ACTIVE, device])
        if row is not None:
            return BusyRun(kind, int(row[0]))
    return None
