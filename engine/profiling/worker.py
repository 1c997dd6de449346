"""The worker process of a profiling job: ``python -m engine.profiling.worker --db PATH --job ID``.

It loads the model, measures the idle baseline, discards warm-up runs (load and warm-up
measured, as execution does: :mod:`engine.energy.load_cost`), then runs the job's points
in their seeded random order, repeating each until the stop rule is met.
Points already complete from an earlier run of the same job are skipped (resume). Each
point's outcome (converged, or stopped at its trial cap with a wide interval) is
recorded, and the job's finish reason counts the points that did not converge.

An adaptive job (design ``adaptive``) measures its starting grid a few trials a point,
then alternates fitting and measuring where the fits are least sure until its time
budget is spent or the cross-validated error stops improving
(:mod:`engine.profiling.adaptive` decides; :func:`_measure_adaptive` measures).

The measuring (:func:`measure_job`) never touches the database: it is given the trials
stored before and hands every new trial to a :class:`TrialSink` the moment it is
measured. Here the sink writes it to the database (:class:`StoreTrialSink`, one
transaction a trial), so a kill loses at most the trial in flight. SIGTERM (cancel) stops
the worker at the next safe point: never in the middle of a write.
"""

from __future__ import annotations

import abc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine import __version__, catalog, runs
from engine.backends import open_backend
from engine.backends.base import Backend
from engine.backends.batch import ExactRequest
from engine.energy import EnergyMeter, IdleBaseline, measure_idle_power, open_meter
from engine.energy.load_cost import LoadCost, measure_window, warm_up
from engine.energy.waiting import WAIT_POLICY_ENV, apply_passive_waiting
from engine.errors import PlannerError
from engine.profiling.design import Design, DesignPoint, run_order
from engine.profiling.jobs import DEFAULT_BUDGET_S, Job, adaptive_rounds, get_job
from engine.profiling.stopping import PointOutcome, point_complete, point_outcome, unconverged_summary
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

    @abc.abstractmethod
    def point_finished(self, outcome: PointOutcome) -> None:
        """Keep how a point's trials ended (converged or not); replaces what was kept for that point."""

    @abc.abstractmethod
    def design_changed(self, design: Design) -> None:
        """An adaptive job added points: keep the job's design as it now is."""

    @abc.abstractmethod
    def round_done(self, record: Any) -> None:
        """Keep one fit-and-decide round of an adaptive job (an :class:`~engine.profiling.adaptive.RoundRecord`)."""


class StoreTrialSink(TrialSink):
    """Writes each trial to the database as it comes, in a transaction of its own."""

    def __init__(self, store: Store, job_id: int) -> None:
        self.store, self.job_id = store, job_id

    def add_trial(self, row: dict[str, Any]) -> None:
        with self.store.transaction() as con:
            append_frame(con, "measurements", pd.DataFrame([row]))

    def point_done(self, points_done: int) -> None:
        self.store.execute("UPDATE profiling_jobs SET points_done = ? WHERE id = ?", [points_done, self.job_id])

    def point_finished(self, outcome: PointOutcome) -> None:
        row = outcome.to_row()
        self.store.execute(
            f"INSERT OR REPLACE INTO profiling_points (job_id, {', '.join(row)}) VALUES (?{', ?' * len(row)})",
            [self.job_id, *row.values()])

    def design_changed(self, design: Design) -> None:
        self.store.execute("UPDATE profiling_jobs SET design = ?, points_total = ? WHERE id = ?",
                           [json.dumps(design.to_dict()), len(design.points), self.job_id])

    def round_done(self, record: Any) -> None:
        row = record.to_row()
        self.store.execute(
            f"INSERT OR REPLACE INTO profiling_rounds (job_id, {', '.join(row)}) VALUES (?{', ?' * len(row)})",
            [self.job_id, *row.values()])


def stored_trials(store: Store, job_id: int) -> pd.DataFrame:
    """The trials this job has stored so far (for resume)."""
    return store.query_df("SELECT input_tokens, output_tokens, coalesce(batch_size, 1) AS batch_size, trial, runtime_s, "
                          "energy_j FROM measurements WHERE job_id = ? ORDER BY id", [int(job_id)])


# -- measuring ----------------------------------------------------------------------------------

def run_job(store: Store, job: Job, *, sink: TrialSink | None = None, measure: Callable | None = None,
            **measuring) -> None:
    """Run (or continue) a job to the end, storing every trial. Raises on failure; the caller records it.

    The job ends done; its reason says how many points did not converge and, for an
    adaptive job, why it stopped and the error it reached (None when there is nothing to say).
    ``measuring`` goes to :func:`measure_job` (factories, cancel flag, progress, sleep, clock), or
    to ``measure``, which takes its place and its arguments: the cluster's driver measures
    on a node this way (:mod:`engine.cluster.driver`), given all a resumed job needs.
    """
    entry = catalog.get_model(store, job.model)
    if entry is None:
        raise PlannerError(f"model {job.model} is no longer in the catalog")
    runs.mark_running(store, PROFILING, job.id)
    if job.design.kind == "adaptive":
        measuring.setdefault("earlier_rounds", adaptive_rounds(store, job.id))
    outcome = (measure or measure_job)(job, entry.backend, catalog.resolve_model_path(entry.path),
                                       stored_trials(store, job.id), sink or StoreTrialSink(store, job.id), **measuring)
    runs.set_status(store, PROFILING, job.id, "done", getattr(outcome, "reason", None), only_if=("running",))


@dataclass(frozen=True)
class JobOutcome:
    """How a job's measuring ended: every point's outcome, and (adaptive) why it stopped and what it reached."""

    points: list[PointOutcome] = field(default_factory=list)
    note: str | None = None

    @property
    def reason(self) -> str | None:
        """The finish reason: ``2 of 9 points did not converge (worst ±38% at 25 trials)``, the note, both or None."""
        parts = [part for part in (self.note, unconverged_summary(self.points)) if part]
        return "; ".join(parts) or None


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
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                earlier_rounds: pd.DataFrame | None = None) -> JobOutcome:
    """Measure the points of a job not complete in ``stored`` (the trials kept before), trial by trial into ``sink``.

    Never touches the database. Raises on failure, :class:`JobCancelled` on a cancel.
    ``clock`` (seconds) times an adaptive job's budget, which starts here, as the model
    starts loading; ``earlier_rounds`` are its rounds stored before (resume).
    """
    cancel = cancel or _CancelFlag()
    started_s = clock()
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
                if point.batch_size > 1:  # its batch must fit in the memory left beside the loaded weights
                    backend.check_batch_memory(point.batch_size, point.input_tokens, point.output_tokens)
            progress(f"measuring idle power for {settings.idle_s:g} s")
            idle = measure_idle_power(meter, settings.idle_s)
            cancel.check()
            # Discarded, as execution does after each load: first runs pay one-off costs.
            warmed = measure_window(meter, lambda: warm_up(backend, settings.warmup_runs))
            load = LoadCost.from_windows(loaded, warmed, settings.warmup_runs, idle)
            versions = json.dumps({**backend.settings, "engine": __version__, "meter": meter.description,
                                   "load": load.to_dict(), "omp_wait_policy": os.environ.get(WAIT_POLICY_ENV)})
            bench = _Bench(job, backend, meter, idle, versions)
            if job.design.kind == "adaptive":
                timing = _Timing(clock, started_s, job.settings.budget_s or DEFAULT_BUDGET_S,
                                 _spent_before_s(stored, earlier_rounds))
                return _measure_adaptive(bench, order, stored, earlier_rounds, sink, cancel, sleep, progress, timing)
            if "batch_size" not in stored.columns:  # trials handed in by a caller that predates the batch axis
                stored = stored.assign(batch_size=settings.batch_size)
            by_point = {key: group for key, group in stored.groupby(["input_tokens", "output_tokens", "batch_size"])}
            outcomes = []
            for number, point in enumerate(order, start=1):
                size = settings.trial_batch_size(point)
                previous = by_point.get((point.input_tokens, point.output_tokens, size))
                runtimes, energies = _measure_point(bench, point, previous, sink, cancel, sleep)
                outcomes.append(point_outcome(point.input_tokens, point.output_tokens, runtimes, energies,
                                              settings.stop_rule, batch_size=size))
                with cancel.writing():
                    sink.point_finished(outcomes[-1])
                    sink.point_done(number)
                batch = f", batches of {size}" if size > 1 else ""
                progress(f"point {number}/{len(order)} ({point.input_tokens} in, {point.output_tokens} out{batch}): "
                         f"{len(runtimes)} trials" + ("" if outcomes[-1].converged else ", did not converge"))
            return JobOutcome(outcomes)
        finally:
            backend.close()
    finally:
        meter.close()


def _measure_point(bench: _Bench, point: DesignPoint, previous: pd.DataFrame | None, sink: TrialSink,
                   cancel: _CancelFlag, sleep: Callable[[float], None]) -> tuple[list[float], list[float | None]]:
    """Run trials of one point until the stop rule holds (counting the trials stored before).

    Returns all its trials' runtimes and energies, the earlier ones first.
    """
    settings = bench.job.settings
    runtimes = [] if previous is None else previous.runtime_s.tolist()
    energies = [] if previous is None else [None if pd.isna(e) else e for e in previous.energy_j]
    while not point_complete(runtimes, energies, settings.stop_rule):
        runtime_s, energy_j = _measure_trial(bench, point, len(runtimes) + 1, sink, cancel, sleep)
        runtimes.append(runtime_s)
        energies.append(energy_j)
    return runtimes, energies


def _measure_trial(bench: _Bench, point: DesignPoint, trial: int, sink: TrialSink, cancel: _CancelFlag,
                   sleep: Callable[[float], None]) -> tuple[float, float | None]:
    """Run and keep one trial (number ``trial`` of its point); returns its runtime and energy.

    A point of batch size B > 1 is one batch of B identical requests of its shape, run
    together by the backend's ``generate_batch``: the row's runtime and energy are the
    whole batch's (energy per request is a B-th of it), its token counts per request, as
    the library ran them. At batch size 1 a trial is one ``generate`` call, as ever.
    """
    settings = bench.job.settings
    cancel.check()
    if point.batch_size > 1:
        with bench.meter.window() as window:
            batch = bench.backend.generate_batch([ExactRequest(point.input_tokens, point.output_tokens)]
                                                 * point.batch_size)
        # Exact requests are held to their counts by the backend (it raises otherwise): one shape for all.
        tokens_in, tokens_out = batch.requests[0].input_tokens, batch.requests[0].output_tokens
        runtime_s, size = batch.runtime_s, batch.batch_size
    else:
        with bench.meter.window() as window:
            result = bench.backend.generate(point.input_tokens, point.output_tokens)
        tokens_in, tokens_out, runtime_s, size = (result.input_tokens, result.output_tokens, result.runtime_s,
                                                  settings.batch_size)
    columns = window.result.measurement_columns(bench.idle)
    row = {
        "job_id": bench.job.id, "origin": "profiled", "model": bench.job.model, "device": bench.job.device,
        "host": runs.host_name(), "input_tokens": tokens_in, "output_tokens": tokens_out,
        "batch_size": size, "trial": trial, "runtime_s": runtime_s,
        "library_versions": bench.versions, "started_at": window.result.started_at,
        "finished_at": window.result.finished_at, **columns,
    }
    with cancel.writing():
        sink.add_trial(row)
    if settings.cooldown_s:
        sleep(settings.cooldown_s)
    return runtime_s, columns["energy_j"]


# -- the adaptive design ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Timing:
    """An adaptive job's clock: its budget, and what an earlier run of it (resume) spent already."""

    clock: Callable[[], float]
    started_s: float
    budget_s: float
    spent_before_s: float = 0.0

    def elapsed_s(self) -> float:
        return self.clock() - self.started_s + self.spent_before_s

    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s()


def _spent_before_s(stored: pd.DataFrame, earlier_rounds: pd.DataFrame | None) -> float:
    """Budget an earlier run of the job used: its last round's time, or at least its trials' runtimes."""
    spent = float(stored.runtime_s.sum()) if len(stored) else 0.0
    if earlier_rounds is not None and len(earlier_rounds):
        spent = max(spent, float(earlier_rounds.elapsed_s.max()))
    return spent


def _measure_adaptive(bench: _Bench, order: list[DesignPoint], stored: pd.DataFrame,
                      earlier_rounds: pd.DataFrame | None, sink: TrialSink, cancel: _CancelFlag,
                      sleep: Callable[[float], None], progress: Callable[[str], None], timing: _Timing) -> JobOutcome:
    """The starting grid at a few trials a point, then rounds of fit-and-measure until the budget or the fit says stop."""
    import engine.fitting  # noqa: F401 (its import takes seconds: paid here, not inside the first round's budget check)
    from engine.profiling import adaptive

    history = [adaptive.RoundRecord(**row) for row in (earlier_rounds.to_dict("records")
                                                       if earlier_rounds is not None else [])]
    return _AdaptiveRun(bench, sink, cancel, sleep, progress, timing, adaptive.trials_from_frame(stored),
                        history).run(order)


class _AdaptiveRun:
    """One run of an adaptive job's worker: its trials so far, its latest fit, its clock, where it all goes.

    A trial starts only when it, and a fit after it, are expected to end within the
    budget (so the budget holds to within the misjudgement of one trial), except the
    first trial of each starting point, without which there is nothing to fit: a job on a
    machine too busy for its budget overruns, and says so.
    """

    def __init__(self, bench: _Bench, sink: TrialSink, cancel: _CancelFlag, sleep: Callable[[float], None],
                 progress: Callable[[str], None], timing: _Timing, trials: dict, history: list) -> None:
        from engine.profiling import adaptive

        self.adaptive, self.rules = adaptive, adaptive.RULES
        self.bench, self.sink, self.cancel, self.sleep, self.progress = bench, sink, cancel, sleep, progress
        self.timing, self.trials, self.history = timing, trials, history
        self.rule = bench.job.settings.stop_rule
        self.design = bench.job.design
        self.fit, self.fit_s = adaptive.RoundFit(), 1.0  # a fit's seconds, until the first one is timed
        self.overheads_s: list[float] = []  # per trial: wall time beside the request (metering, storing)
        self.out_of_budget = False

    def run(self, order: list[DesignPoint]) -> JobOutcome:
        self.first_grid(order)
        while batch := self.fit_and_decide():
            for action in batch:
                if action.new and action.point not in self.design.points:
                    self.design = replace(self.design, points=self.design.points + (action.point,))
                    with self.cancel.writing():
                        self.sink.design_changed(self.design)
                if not self.measure(action.point, action.trials):
                    self.out_of_budget = True
                    break
            with self.cancel.writing():
                self.sink.point_done(sum(1 for t in self.trials.values() if t.n))
        return self.finish()

    def measure(self, point: DesignPoint, n: int) -> bool:
        """``n`` more trials at a point (fewer at its cap); False when the budget stopped them."""
        point_trials = self.trials.setdefault(point, self.adaptive.PointTrials())
        for _ in range(n):
            if point_trials.n >= self.rule.max_trials:
                return True
            expected_s = self.adaptive.expected_trial_s(point, self.trials, self.fit) + self.overhead_s
            if expected_s + self.fit_s > self.timing.left_s():
                return False
            self.trial(point)
        return True

    def trial(self, point: DesignPoint) -> None:
        """One trial at a point, kept, and timed for the overhead beside its request."""
        point_trials = self.trials.setdefault(point, self.adaptive.PointTrials())
        started = self.timing.clock()
        runtime_s, energy_j = _measure_trial(self.bench, point, point_trials.n + 1, self.sink, self.cancel, self.sleep)
        point_trials.add(runtime_s, energy_j)
        self.overheads_s.append(max(self.timing.clock() - started - runtime_s, 0.0))

    @property
    def overhead_s(self) -> float:
        """The median wall time a trial took beside its request, so far."""
        return float(np.median(self.overheads_s)) if self.overheads_s else 0.0

    def first_grid(self, order: list[DesignPoint]) -> None:
        """One trial at every starting point whatever the budget, then more up to the first count while it lasts."""
        for number, point in enumerate(order, start=1):
            if not self.trials.setdefault(point, self.adaptive.PointTrials()).n:
                self.trial(point)
            with self.cancel.writing():
                self.sink.point_done(number)
            self.progress(f"point {number}/{len(order)} ({point.input_tokens} in, {point.output_tokens} out): "
                          f"first trial, {self.timing.elapsed_s():.0f} s of {self.timing.budget_s:g} s")
        first_trials = max(2, self.rule.min_trials)
        for point in order:
            if not self.measure(point, first_trials - self.trials[point].n):
                self.out_of_budget = True
                return

    def fit_and_decide(self) -> list:
        """Fit what is measured, record the round, and return the next batch (empty: stop)."""
        adaptive, timing = self.adaptive, self.timing
        fit_started = timing.clock()
        self.fit = adaptive.fit_round(self.trials, self.bench.job.model, self.bench.job.device, rules=self.rules)
        self.fit_s = timing.clock() - fit_started
        record = adaptive.round_record(len(self.history) + 1, timing.elapsed_s(), self.trials, self.fit)
        batch: list = []
        if self.out_of_budget or timing.left_s() <= self.fit_s:
            self.out_of_budget = True
            decision = f"stop: the budget of {timing.budget_s:g} s is spent"
            if timing.left_s() < -1.0:
                decision += (f", overrun by {-timing.left_s():.0f} s to measure every starting point once (the "
                             "machine is busy, or the budget too short)")
        elif (why := adaptive.settled(self.history + [record], self.rules)) is not None:
            decision = f"stop: {why}"
        else:
            batch_s = max(self.rules.min_round_s, self.rules.round_share * timing.budget_s)
            batch = adaptive.plan_batch(self.trials, self.fit, self.rule, batch_s, can_measure=_can_run(self.bench),
                                        rules=self.rules, overhead_s=self.overhead_s,
                                        left_s=timing.left_s() - self.fit_s)
            if batch:
                decision = adaptive.describe_batch(batch)
            elif adaptive.plan_batch(self.trials, self.fit, self.rule, math.inf, rules=self.rules):
                self.out_of_budget = True  # trials would help, but none fits in the time left
                decision = f"stop: the budget of {timing.budget_s:g} s is spent"
            else:
                decision = "stop: no point is left where a trial would help"
        record = replace(record, decision=decision)
        self.history.append(record)
        with self.cancel.writing():
            self.sink.round_done(record)
        self.progress(f"round {record.round} after {record.elapsed_s:.0f} s: {_errors(record)}; {decision}")
        return batch

    def finish(self) -> JobOutcome:
        """Every point's outcome, kept; the job's note: why it stopped and the error it reached."""
        stopped_early = "budget" if self.out_of_budget else "settled"
        outcomes = [point_outcome(p.input_tokens, p.output_tokens, t.runtimes_s, t.energies_j, self.rule,
                                  stopped_early) for p, t in sorted(self.trials.items()) if t.n]
        with self.cancel.writing():
            for outcome in outcomes:
                self.sink.point_finished(outcome)
        last = self.history[-1]
        note = (f"the adaptive design stopped after {last.elapsed_s:.0f} s ({last.decision.removeprefix('stop: ')}); "
                f"{_errors(last)}")
        return JobOutcome(outcomes, note)


def _errors(record) -> str:
    """``cross-validated error 12.0% (energy), 15.1% (runtime); trial noise alone 8.2%, 9.0%``."""
    text = (f"cross-validated error {_percent(record.energy_cv_mape)} (energy), "
            f"{_percent(record.runtime_cv_mape)} (runtime)")
    if record.energy_noise_mape is not None or record.runtime_noise_mape is not None:
        text += f"; trial noise alone {_percent(record.energy_noise_mape)}, {_percent(record.runtime_noise_mape)}"
    return text


def _can_run(bench: _Bench) -> Callable[[DesignPoint], bool]:
    """Whether the loaded model can run a point (its context holds it)."""
    def can_run(point: DesignPoint) -> bool:
        try:
            bench.backend.check_request(point.input_tokens, point.output_tokens)
        except PlannerError:
            return False
        return True
    return can_run


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"


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
