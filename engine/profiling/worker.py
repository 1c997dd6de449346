"""The worker process of a profiling job: ``python -m engine.profiling.worker --db PATH --job ID``.

It loads the model, measures the idle baseline, discards warm-up runs (load and warm-up
measured, as execution does: :mod:`engine.energy.load_cost`), then runs the job's points
in their seeded random order, repeating each until the stop rule is met.
Points already complete from an earlier run of the same job are skipped (resume).

The measuring (:func:`measure_job`) never touches the database: it is given the trials
stored before and hands every new trial to a :class:`TrialSink` the moment it is
measured. Here the sink writes it to the database (:class:`StoreTrialSink`, one
transaction a trial), so a kill loses at most the trial in flight. SIGTERM (cancel) stops
the worker at the next safe point: never in the middle of a write.
"""

from __future__ import annotations

import abc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from engine import __version__, catalog, runs
from engine.backends import open_backend
from engine.backends.base import Backend
from engine.energy import EnergyMeter, IdleBaseline, measure_idle_power, open_meter
from engine.energy.load_cost import LoadCost, measure_window, warm_up
from engine.energy.waiting import WAIT_POLICY_ENV, apply_passive_waiting
from engine.errors import PlannerError
from engine.profiling.design import DesignPoint, run_order
from engine.profiling.jobs import Job, get_job
from engine.profiling.stopping import point_complete
from engine.runs import PROFILING
from engine.store import Store, append_frame


class JobCancelled(runs.RunCancelled):
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


# -- where trials go ----------------------------------------------------------------------------

class TrialSink(abc.ABC):
    """Where a job's trials go, one at a time, the moment each is measured."""

    @abc.abstractmethod
    def add_trial(self, row: dict[str, Any]) -> None:
        """Keep one trial: a row of the measurements table (column name to value)."""

    @abc.abstractmethod
    def point_done(self, points_done: int) -> None:
        """The first ``points_done`` points of the run order are complete."""


class StoreTrialSink(TrialSink):
    """Writes each trial to the database as it comes, in a transaction of its own."""

    def __init__(self, store: Store, job_id: int) -> None:
        self.store, self.job_id = store, job_id

    def add_trial(self, row: dict[str, Any]) -> None:
        with self.store.transaction() as con:
            append_frame(con, "measurements", pd.DataFrame([row]))

    def point_done(self, points_done: int) -> None:
        self.store.execute("UPDATE profiling_jobs SET points_done = ? WHERE id = ?", [points_done, self.job_id])


def stored_trials(store: Store, job_id: int) -> pd.DataFrame:
    """The trials this job has stored so far (for resume)."""
    return store.query_df("SELECT input_tokens, output_tokens, trial, runtime_s, energy_j FROM measurements "
                          "WHERE job_id = ? ORDER BY id", [int(job_id)])


# -- measuring ----------------------------------------------------------------------------------

def run_job(store: Store, job: Job, *, sink: TrialSink | None = None, measure: Callable | None = None,
            **measuring) -> None:
    """Run (or continue) a job to the end, storing every trial. Raises on failure; the caller records it.

    ``measuring`` goes to :func:`measure_job` (factories, cancel flag, progress, sleep), or
    to ``measure``, which takes its place and its arguments: the cluster's driver measures
    on a node this way (:mod:`engine.cluster.driver`), given all a resumed job needs.
    """
    entry = catalog.get_model(store, job.model)
    if entry is None:
        raise PlannerError(f"model {job.model} is no longer in the catalog")
    runs.mark_running(store, PROFILING, job.id)
    (measure or measure_job)(job, entry.backend, catalog.resolve_model_path(entry.path),
                             stored_trials(store, job.id), sink or StoreTrialSink(store, job.id), **measuring)
    runs.mark_done(store, PROFILING, job.id)


@dataclass(frozen=True)
class _Bench:
    """What every trial of a job needs: the loaded model, the meter, the idle baseline."""

    job: Job
    backend: Backend
    meter: EnergyMeter
    idle: IdleBaseline
    versions: str  # the measurements' library_versions


def measure_job(job: Job, backend_name: str, model_path: Path, stored: pd.DataFrame, sink: TrialSink, *,
                backend_factory: Callable = open_backend, meter_factory: Callable = open_meter,
                cancel: _CancelFlag | None = None, progress: Callable[[str], None] = lambda line: None,
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Measure the points of a job not complete in ``stored`` (the trials kept before), trial by trial into ``sink``.

    Never touches the database. Raises on failure, :class:`JobCancelled` on a cancel.
    """
    cancel = cancel or _CancelFlag()
    settings = job.settings
    order = run_order(job.design.points, settings.seed)
    progress(f"loading {job.model} ({backend_name}) on {job.device}")
    backend = backend_factory(backend_name, model_path, job.device, batch_size=settings.batch_size,
                              **settings.backend_options)
    meter = meter_factory(job.device)  # before the load: the load and warm-up are measured (a plan's load cost)
    try:
        loaded = measure_window(meter, backend.load)
        try:
            for point in order:  # fail before measuring anything when a point cannot run
                backend.check_request(point.input_tokens, point.output_tokens)
            progress(f"measuring idle power for {settings.idle_s:g} s")
            idle = measure_idle_power(meter, settings.idle_s)
            cancel.check()
            # Discarded, as execution does after each load: first runs pay one-off costs.
            warmed = measure_window(meter, lambda: warm_up(backend, settings.warmup_runs))
            load = LoadCost.from_windows(loaded, warmed, settings.warmup_runs, idle)
            versions = json.dumps({**backend.settings, "engine": __version__, "meter": meter.description,
                                   "load": load.to_dict(), "omp_wait_policy": os.environ.get(WAIT_POLICY_ENV)})
            bench = _Bench(job, backend, meter, idle, versions)
            by_point = {key: group for key, group in stored.groupby(["input_tokens", "output_tokens"])}
            for number, point in enumerate(order, start=1):
                previous = by_point.get((point.input_tokens, point.output_tokens))
                trials = _measure_point(bench, point, previous, sink, cancel, sleep)
                with cancel.writing():
                    sink.point_done(number)
                progress(f"point {number}/{len(order)} ({point.input_tokens} in, {point.output_tokens} out): "
                         f"{trials} trials")
        finally:
            backend.close()
    finally:
        meter.close()


def _measure_point(bench: _Bench, point: DesignPoint, previous: pd.DataFrame | None, sink: TrialSink,
                   cancel: _CancelFlag, sleep: Callable[[float], None]) -> int:
    """Run trials of one point until the stop rule holds (counting the trials stored before); returns its trials."""
    settings = bench.job.settings
    runtimes = [] if previous is None else previous.runtime_s.tolist()
    energies = [] if previous is None else [None if pd.isna(e) else e for e in previous.energy_j]
    while not point_complete(runtimes, energies, settings.stop_rule):
        cancel.check()
        with bench.meter.window() as window:
            result = bench.backend.generate(point.input_tokens, point.output_tokens)
        columns = window.result.measurement_columns(bench.idle)
        row = {
            "job_id": bench.job.id, "origin": "profiled", "model": bench.job.model, "device": bench.job.device,
            "host": runs.host_name(), "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
            "batch_size": settings.batch_size, "trial": len(runtimes) + 1, "runtime_s": result.runtime_s,
            "library_versions": bench.versions, "started_at": window.result.started_at,
            "finished_at": window.result.finished_at, **columns,
        }
        with cancel.writing():
            sink.add_trial(row)
        runtimes.append(result.runtime_s)
        energies.append(columns["energy_j"])
        if settings.cooldown_s:
            sleep(settings.cooldown_s)
    return len(runtimes)


# -- the process ----------------------------------------------------------------------------------

def work_on_job(store: Store, job_id: int, **measuring) -> None:
    """What the worker process does: hold the job's device, run the job, and stop at a SIGTERM.

    ``measuring`` goes to :func:`measure_job` (a test's worker passes its fakes here).
    """
    cancel = _CancelFlag()
    signal.signal(signal.SIGTERM, cancel.handler)
    job = get_job(store, job_id)
    with runs.device_lock(store, job.device):
        run_job(store, job, cancel=cancel, progress=lambda line: print(line, flush=True), **measuring)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process; its exit code tells the watcher how it ended."""
    apply_passive_waiting()  # started by the launcher it already is; by hand, before torch loads
    return runs.worker_main(PROFILING, work_on_job, argv)


if __name__ == "__main__":
    sys.exit(main())
