"""First run: profile the demo models with an adaptive design, fit them, so a newcomer can plan.

``python -m engine.firstrun --db PATH`` runs the steps one after another in its own process
(profiling jobs on one device must not overlap): each demo model's adaptive profiling job
(a worker process of its own, as from the Profile page), then one fit of every demo model.
Its state lives in the ``settings`` table under :data:`STATE_KEY`, so the Home page can
follow it and a restarted app finds it again.

**Time.** The whole first run aims to end within :data:`FIRST_RUN_BUDGET_S` of wall time.
Each job gets an equal share of what is left when it starts (so a model that finished
early leaves its time to the next), less what starting its worker and the final fits
take. Within its budget the adaptive design (:mod:`engine.profiling.adaptive`) measures a
3 x 3 grid over the sample workloads' range, then adds trials and points where the fits
are least sure, until the time is spent or the cross-validated error stops improving.
The fixed design with at most 5 trials a point it replaces left fits with a CV error of
27-36% (energy) here; :func:`first_run_report` gives the error each model reached.

**Batch size 1, then batching.** The first run measures one request at a time (the
adaptive design has no batch axis), so its fits plan batch size 1 only, and the plan says
so. Its second step, **measuring batching** (``python -m engine.firstrun --db PATH
--batching``, the Home page's button once the first run is done), profiles each demo model
over :data:`BATCHING_INPUTS` × :data:`BATCHING_OUTPUTS` × :data:`BATCHING_SIZES` (the design
``bench/batching.py`` measures its figures with), a fixed :data:`BATCHING_SETTINGS` trials a
point, and fits every demo model again: with the first run's points, the fits get a batch
axis and plans can batch. Its state lives under :data:`BATCHING_KEY`, as the first run's does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import pandas as pd

from engine import runs
from engine.errors import PlannerError
from engine.runs.local import is_process_of, log_path, spawn
from engine.store import Store

STATE_KEY = "first_run"
MODULE = "engine.firstrun"
DEVICE = "cpu"
#: Wall time the first run aims to end within: both demo models profiled and fitted.
FIRST_RUN_BUDGET_S = 115.0
#: Per job, outside its budget: starting the worker process and importing its libraries.
WORKER_START_S = 8.0
#: Kept back for the final fits of every model.
FIT_RESERVE_S = 6.0
FIRST_RUN_SETTINGS = {"min_trials": 2, "max_trials": 12, "idle_s": 2.0, "warmup_runs": 1}
#: The batching step: where its state lives, and its design (a 2 x 2 grid over the sample
#: workloads' range at three batch sizes) and settings.
BATCHING_KEY = "first_run_batching"
BATCHING_INPUTS, BATCHING_OUTPUTS, BATCHING_SIZES = [16, 256], [8, 64], (1, 4, 16)
BATCHING_SETTINGS = {"min_trials": 2, "max_trials": 2, "idle_s": 2.0, "warmup_runs": 1}
BATCHING_FLAG = "--batching"


@dataclass
class FirstRunState:
    """status: running | done | failed. step: what it is doing, in words. jobs: model -> job id.

    ``load_at_start``/``load_at_end``: the host's 1-minute load average when the run
    started and ended (None before then): on a machine whose cores other programs keep
    busy, trials spread widely and every figure of the first run is worse; the page can say so.
    """

    status: str
    step: str
    pid: int | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    started: float = 0.0
    finished: float | None = None
    load_at_start: float | None = None
    load_at_end: float | None = None
    #: model -> {target: fit id} of the fits this step saved (its report shows those, not later ones).
    fits: dict[str, dict[str, int]] = field(default_factory=dict)


def read_state(store: Store, key: str = STATE_KEY) -> FirstRunState | None:
    """The first run's state, or with ``key=BATCHING_KEY`` its batching step's (None before any);
    a running one whose process is gone is stored as failed."""
    row = store.query_one("SELECT value FROM settings WHERE key = ?", [key])
    if row is None:
        return None
    state = FirstRunState(**json.loads(row[0]))
    if state.status == "running" and not is_process_of(state.pid, MODULE, _arguments(store, key)):
        step = "measuring batching" if key == BATCHING_KEY else "the first run"
        state.status, state.reason = "failed", f"the process of {step} ended unexpectedly; start it again"
        write_state(store, state, key)
    return state


def write_state(store: Store, state: FirstRunState, key: str = STATE_KEY) -> None:
    """Store the state under ``key`` (the first run's, or its batching step's), replacing the one before."""
    store.execute("INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?, ?, current_timestamp)",
                  [key, json.dumps(asdict(state))])


def _arguments(store: Store, key: str = STATE_KEY) -> list[str]:
    """The process's arguments; the last ones tell it apart from another database's, and the batching
    step from the first run."""
    return ["--db", str(store.path.resolve())] + ([BATCHING_FLAG] if key == BATCHING_KEY else [])


def demo_model_names(store: Store) -> list[str]:
    """The demo models in the catalog, smallest first."""
    return list(store.query_df("SELECT name FROM models WHERE is_demo ORDER BY params_b NULLS LAST, name")["name"])


def start_first_run(store: Store, *, batching: bool = False) -> FirstRunState:
    """Start the first run (or, with ``batching``, its batching step) in its own process; refuses
    while either runs or without demo models."""
    for key in (STATE_KEY, BATCHING_KEY):
        state = read_state(store, key)
        if state is not None and state.status == "running":
            what = "Measuring batching" if key == BATCHING_KEY else "The first run"
            raise PlannerError(f"{what} is already going; its progress is on the Home page.")
    if not demo_model_names(store):
        raise PlannerError("There are no demo models in the catalog; run `make run` (it generates them) or add a "
                           "model on the Models page.")
    key = BATCHING_KEY if batching else STATE_KEY
    process = spawn(MODULE, _arguments(store, key), log_path(store, "first-run-batching" if batching else "first-run"))
    state = FirstRunState("running", "starting", pid=process.pid, started=time.time())
    write_state(store, state, key)
    return state


def demo_fits_batched(store: Store) -> bool:
    """True when every demo model's latest measured energy fit on the CPU has a batch axis (its
    plans can batch already: nothing for the batching step to add)."""
    from engine.fitting import load_latest_fits

    models = demo_model_names(store)
    fits = {f.model: f for f in load_latest_fits(store, device=DEVICE, energy_scope="total", source="measured")
            if f.target == "energy"}
    return bool(models) and all(model in fits and fits[model].has_batch_axis for model in models)


def batching_estimate_s(store: Store) -> float | None:
    """About how long the batching step takes at most, from the demo models' runtimes so far (a
    batch counted as its requests one after another, unless batches were measured); None
    without them."""
    from engine.profiling import jobs
    from engine.profiling.design import build_design

    settings = jobs.ProfileSettings(**BATCHING_SETTINGS, batch_sizes=BATCHING_SIZES)
    design = build_design("custom", inputs=BATCHING_INPUTS, outputs=BATCHING_OUTPUTS, batch_sizes=BATCHING_SIZES)
    total = 0.0
    for model in demo_model_names(store):
        estimate = jobs.estimate_duration_s(store, model, DEVICE, design, settings)
        if estimate is None:
            return None
        total += estimate[1] + WORKER_START_S
    return total + FIT_RESERVE_S


def job_budget_s(left_s: float, models_left: int) -> float:
    """The budget of the next job: an equal share of the time left, less its worker's start and the final fits."""
    from engine.profiling.jobs import MIN_BUDGET_S

    share = (left_s - FIT_RESERVE_S) / max(models_left, 1) - WORKER_START_S
    return round(max(share, MIN_BUDGET_S), 1)


def run_first_run(store: Store, pid: int, *, budget_s: float = FIRST_RUN_BUDGET_S) -> FirstRunState:
    """Profile every demo model on the CPU with the adaptive design within ``budget_s`` in all, then fit them."""
    from engine.profiling import jobs

    deadline = time.monotonic() + budget_s

    def adaptive_job(model: str, number: int, count: int):
        settings = jobs.ProfileSettings(**FIRST_RUN_SETTINGS,
                                        budget_s=job_budget_s(deadline - time.monotonic(), count - number))
        return jobs.create_job(store, model, DEVICE, "adaptive", settings=settings), f"profiling {model}"

    return _profile_then_fit(store, pid, STATE_KEY, adaptive_job)


def run_batching_step(store: Store, pid: int) -> FirstRunState:
    """Profile every demo model on the CPU over the batching design, then fit them all again."""
    from engine.profiling import jobs

    settings = jobs.ProfileSettings(**BATCHING_SETTINGS, batch_sizes=BATCHING_SIZES)
    sizes = ", ".join(map(str, BATCHING_SIZES))

    def batching_job(model: str, number: int, count: int):
        job = jobs.create_job(store, model, DEVICE, "custom", inputs=BATCHING_INPUTS, outputs=BATCHING_OUTPUTS,
                              settings=settings)
        return job, f"profiling {model} at batch sizes {sizes}"

    return _profile_then_fit(store, pid, BATCHING_KEY, batching_job)


def _profile_then_fit(store: Store, pid: int, key: str, make_job) -> FirstRunState:
    """The steps of the first run and of its batching step, their state stored under ``key``: one
    profiling job per demo model, one after another (``make_job(model, number, count)`` makes it
    and says what it does), each in its worker process; then the fits of every demo model."""
    from engine.fitting import fit_all, save_fits
    from engine.profiling import jobs

    state = FirstRunState("running", "starting", pid=pid, started=time.time(), load_at_start=_load())
    write_state(store, state, key)
    models = demo_model_names(store)
    for number, model in enumerate(models):
        busy = runs.run_on_device(store, DEVICE)
        if busy is not None:
            raise PlannerError(f"{busy} is running on {DEVICE}; try again when it is done")
        job, doing = make_job(model, number, len(models))
        state.jobs[model] = job.id
        state.step = f"{doing} (job {job.id})"
        write_state(store, state, key)
        code = jobs.start_worker(store, job.id, watch=False).wait()
        if code != 0:
            reason = jobs.get_job(store, job.id).reason
            raise PlannerError(f"profiling {model} failed: {reason or f'exit code {code}'}")
    state.step = "fitting " + ", ".join(models)
    write_state(store, state, key)
    for model in models:
        state.fits[model] = {f.target: f.fit_id for f in save_fits(store, fit_all(store, model=model, device=DEVICE))}
    state.status, state.step, state.finished, state.load_at_end = "done", "done", time.time(), _load()
    write_state(store, state, key)
    return state


def _load() -> float | None:
    """The host's 1-minute load average (None where the system does not say)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def first_run_report(store: Store) -> pd.DataFrame:
    """What the first run reached, per demo model: for the Home page.

    One row per model of the last first run (empty before one): model, job_id,
    job_status, job_reason (why the adaptive design stopped, the error it reached, any
    points that did not converge), elapsed_s (the job's wall time), trials, points,
    energy_cv_mape and runtime_cv_mape (the stored fits' cross-validated error, fractions;
    None before the fits), energy_noise_mape and runtime_noise_mape (the floor that
    trial-to-trial noise puts under that error), unconverged_points (how many points the
    energy fit flags), batch_sizes (the energy fit's batch axis, (lo, hi); None without
    one). The fits are those the run saved (the latest, for a run from before they were
    recorded).
    """
    return _report(store, read_state(store))


def batching_report(store: Store) -> pd.DataFrame:
    """What the batching step reached, per demo model, in the columns of :func:`first_run_report`:
    its own jobs, and the fits it made after them from every measurement of the model."""
    return _report(store, read_state(store, BATCHING_KEY))


def _report(store: Store, state: FirstRunState | None) -> pd.DataFrame:
    from engine.fitting import load_fit, load_latest_fits
    from engine.profiling import jobs

    rows = []
    for model, job_id in (state.jobs if state is not None else {}).items():
        try:
            progress = jobs.job_progress(store, job_id)
        except PlannerError:
            continue  # the job was removed since
        saved = state.fits.get(model)
        if saved:
            fits = {target: load_fit(store, fit_id) for target, fit_id in saved.items()}
        else:
            fits = {f.target: f for f in load_latest_fits(store, model=model, device=DEVICE, energy_scope="total",
                                                          source="measured")}
        energy, runtime = fits.get("energy"), fits.get("runtime")
        rows.append({
            "model": model, "job_id": job_id, "job_status": progress.job.status, "job_reason": progress.job.reason,
            "elapsed_s": progress.elapsed_s, "trials": progress.trials, "points": len(progress.points),
            "energy_cv_mape": energy.cv_mape if energy else None,
            "runtime_cv_mape": runtime.cv_mape if runtime else None,
            "energy_noise_mape": energy.details.get("noise_mape") if energy else None,
            "runtime_noise_mape": runtime.details.get("noise_mape") if runtime else None,
            "unconverged_points": len(energy.unconverged_points) if energy else None,
            "batch_sizes": energy.batch_domain if energy and energy.has_batch_axis else None,
        })
    return pd.DataFrame(rows, columns=["model", "job_id", "job_status", "job_reason", "elapsed_s", "trials", "points",
                                       "energy_cv_mape", "runtime_cv_mape", "energy_noise_mape",
                                       "runtime_noise_mape", "unconverged_points", "batch_sizes"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the first run's process; the outcome is in its stored state."""
    parser = argparse.ArgumentParser(description="Profile and fit the demo models (the app's first run).")
    parser.add_argument("--db", required=True)
    parser.add_argument(BATCHING_FLAG, action="store_true", help="the second step: measure batching, fit again")
    args = parser.parse_args(argv)
    store = Store(args.db, busy_timeout_s=30)
    key = BATCHING_KEY if args.batching else STATE_KEY
    try:
        (run_batching_step if args.batching else run_first_run)(store, os.getpid())
    except Exception as exc:  # noqa: BLE001 (recorded in words for the Home page)
        state = read_state(store, key) or FirstRunState("failed", "")
        state.status, state.reason, state.finished = "failed", str(exc), time.time()
        write_state(store, state, key)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
