"""The worker process of a profiling job: ``python -m engine.profiling.worker --db PATH --job ID``.

It loads the model, measures the idle baseline, discards warm-up runs, then runs the
job's points in their seeded random order, repeating each until the stop rule is met.
Every trial is stored the moment it is measured, so a kill loses at most the trial in
flight. SIGTERM (cancel) stops it at the next safe point: never in the middle of a write.
Points already complete from an earlier run of the same job are skipped (resume).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from engine import __version__, catalog
from engine.backends import open_backend
from engine.energy import measure_idle_power, open_meter
from engine.errors import PlannerError
from engine.profiling.design import run_order
from engine.profiling.jobs import Job, get_job, host_name, set_status
from engine.profiling.stopping import point_complete
from engine.store import Store, append_frame


class JobCancelled(Exception):
    """The job was asked to stop."""


class _CancelFlag:
    """SIGTERM sets the flag; it raises at once unless a write is in progress, else right after it."""

    def __init__(self) -> None:
        self.requested = False
        self._writing = False

    def handler(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.requested = True
        if not self._writing:
            raise JobCancelled()

    @contextmanager
    def writing(self):
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        self.check()

    def check(self) -> None:
        if self.requested:
            raise JobCancelled()


@contextmanager
def device_lock(store: Store, device: str):
    """Hold the lock file of a device while a job runs on it (released by the OS if we die)."""
    folder = store.path.resolve().parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{host_name()}-{device.replace(':', '_')}.lock"
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PlannerError(f"another job holds {device} on this host; two jobs on one device would measure each other")
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def stored_trials(store: Store, job_id: int) -> pd.DataFrame:
    """The trials this job has stored so far (for resume)."""
    return store.query_df("SELECT input_tokens, output_tokens, trial, runtime_s, energy_j FROM measurements "
                          "WHERE job_id = ? ORDER BY id", [int(job_id)])


def run_job(store: Store, job: Job, *, backend_factory: Callable = open_backend, meter_factory: Callable = open_meter,
            cancel: _CancelFlag | None = None, progress: Callable[[str], None] = lambda line: None,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Run (or continue) a job to the end, storing every trial. Raises on failure; the caller records it."""
    cancel = cancel or _CancelFlag()
    entry = catalog.get_model(store, job.model)
    if entry is None:
        raise PlannerError(f"model {job.model} is no longer in the catalog")
    settings = job.settings
    rule = settings.stop_rule
    set_status(store, job.id, "running", None, only_if=("queued", "running"))
    store.execute("UPDATE profiling_jobs SET started_at = coalesce(started_at, current_timestamp) WHERE id = ?", [job.id])

    done = stored_trials(store, job.id)
    by_point = {key: group for key, group in done.groupby(["input_tokens", "output_tokens"])}
    order = run_order(job.design.points, settings.seed)

    progress(f"loading {job.model} ({entry.backend}) on {job.device}")
    backend = backend_factory(entry.backend, catalog.resolve_model_path(entry.path), job.device,
                              batch_size=settings.batch_size, **settings.backend_options)
    backend.load()
    for point in order:  # fail before measuring anything when a point cannot run
        backend.check_request(point.input_tokens, point.output_tokens)
    meter = meter_factory(job.device)
    try:
        progress(f"measuring idle power for {settings.idle_s:g} s")
        idle = measure_idle_power(meter, settings.idle_s)
        cancel.check()
        for _ in range(settings.warmup_runs):  # discarded: first runs pay one-off costs
            backend.generate(order[0].input_tokens, order[0].output_tokens)
        versions = json.dumps({**backend.settings, "engine": __version__, "meter": meter.description})
        points_done = 0
        for number, point in enumerate(order, start=1):
            key = (point.input_tokens, point.output_tokens)
            previous = by_point.get(key)
            runtimes = [] if previous is None else previous.runtime_s.tolist()
            energies = [] if previous is None else [None if pd.isna(e) else e for e in previous.energy_j]
            while not point_complete(runtimes, energies, rule):
                cancel.check()
                with meter.window() as window:
                    result = backend.generate(point.input_tokens, point.output_tokens)
                columns = window.result.measurement_columns(idle)
                row = {
                    "job_id": job.id, "origin": "profiled", "model": job.model, "device": job.device,
                    "host": host_name(), "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
                    "batch_size": settings.batch_size, "trial": len(runtimes) + 1, "runtime_s": result.runtime_s,
                    "library_versions": versions, "started_at": window.result.started_at,
                    "finished_at": window.result.finished_at, **columns,
                }
                with cancel.writing():
                    with store.transaction() as con:
                        append_frame(con, "measurements", pd.DataFrame([row]))
                runtimes.append(result.runtime_s)
                energies.append(columns["energy_j"])
                if settings.cooldown_s:
                    sleep(settings.cooldown_s)
            points_done += 1
            with cancel.writing():
                store.execute("UPDATE profiling_jobs SET points_done = ? WHERE id = ?", [points_done, job.id])
            progress(f"point {number}/{len(order)} ({point.input_tokens} in, {point.output_tokens} out): "
                     f"{len(runtimes)} trials")
    finally:
        meter.close()
        backend.close()
    set_status(store, job.id, "done", None, only_if=("running",))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process; its exit code tells the watcher how it ended."""
    parser = argparse.ArgumentParser(description="Run one profiling job (started by the app or the CLI).")
    parser.add_argument("--db", required=True)
    parser.add_argument("--job", type=int, required=True)
    args = parser.parse_args(argv)
    store = Store(Path(args.db), busy_timeout_s=30)
    cancel = _CancelFlag()
    signal.signal(signal.SIGTERM, cancel.handler)
    job = get_job(store, args.job)
    try:
        with device_lock(store, job.device):
            run_job(store, job, cancel=cancel, progress=lambda line: print(line, flush=True))
    except JobCancelled:
        trials = store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job.id])[0]
        set_status(store, job.id, "cancelled", f"cancelled; {trials} trials stored")
        return 0
    except PlannerError as exc:
        set_status(store, job.id, "failed", _failure(store, job.id, str(exc)))
        return 1
    except Exception as exc:
        traceback.print_exc()
        set_status(store, job.id, "failed", _failure(store, job.id, f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


def _failure(store: Store, job_id: int, why: str) -> str:
    job = get_job(store, job_id)
    trials = store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job_id])[0]
    return (f"{why} (after {job.points_done} of {job.points_total} points; the {trials} trials measured before "
            "are stored; resume to complete the rest)")


if __name__ == "__main__":
    sys.exit(main())
