"""First run: profile the demo models with a quick design, fit them, so a newcomer can plan.

``python -m engine.firstrun --db PATH`` runs the steps one after another in its own process
(profiling jobs on one device must not overlap): each demo model's quick profiling job (a
worker process of its own, as from the Profile page), then one fit of every demo model.
Its state lives in the ``settings`` table under :data:`STATE_KEY`, so the Home page can
follow it and a restarted app finds it again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from engine import runs
from engine.errors import PlannerError
from engine.runs.local import is_process_of, log_path, spawn
from engine.store import Store

STATE_KEY = "first_run"
MODULE = "engine.firstrun"
DEVICE = "cpu"
QUICK_SETTINGS = {"max_trials": 5, "idle_s": 2.0, "warmup_runs": 1}


@dataclass
class FirstRunState:
    """status: running | done | failed. step: what it is doing, in words. jobs: model -> job id."""

    status: str
    step: str
    pid: int | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    started: float = 0.0
    finished: float | None = None


def read_state(store: Store) -> FirstRunState | None:
    """The first run's state (None before any); a running one whose process is gone is stored as failed."""
    row = store.query_one("SELECT value FROM settings WHERE key = ?", [STATE_KEY])
    if row is None:
        return None
    state = FirstRunState(**json.loads(row[0]))
    if state.status == "running" and not is_process_of(state.pid, MODULE, _arguments(store)):
        state.status, state.reason = "failed", "the first-run process ended unexpectedly; start it again"
        write_state(store, state)
    return state


def write_state(store: Store, state: FirstRunState) -> None:
    """Store the first run's state, replacing the one before."""
    store.execute("INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?, ?, current_timestamp)",
                  [STATE_KEY, json.dumps(asdict(state))])


def _arguments(store: Store) -> list[str]:
    """The first run's arguments; the last ones tell its process apart from another database's."""
    return ["--db", str(store.path.resolve())]


def demo_model_names(store: Store) -> list[str]:
    """The demo models in the catalog, smallest first."""
    return list(store.query_df("SELECT name FROM models WHERE is_demo ORDER BY params_b NULLS LAST, name")["name"])


def start_first_run(store: Store) -> FirstRunState:
    """Start the first run in its own process; refuses while one runs or without demo models."""
    state = read_state(store)
    if state is not None and state.status == "running":
        raise PlannerError("The first run is already going; its progress is on the Home page.")
    if not demo_model_names(store):
        raise PlannerError("There are no demo models in the catalog; run `make run` (it generates them) or add a "
                           "model on the Models page.")
    process = spawn(MODULE, _arguments(store), log_path(store, "first-run"))
    state = FirstRunState("running", "starting", pid=process.pid, started=time.time())
    write_state(store, state)
    return state


def run_first_run(store: Store, pid: int) -> FirstRunState:
    """Profile every demo model on the CPU with the quick design, then fit them."""
    from engine.fitting import fit_all, save_fits
    from engine.profiling import jobs

    state = FirstRunState("running", "starting", pid=pid, started=time.time())
    write_state(store, state)
    models = demo_model_names(store)
    for model in models:
        busy = runs.run_on_device(store, DEVICE)
        if busy is not None:
            raise PlannerError(f"{busy} is running on {DEVICE}; try again when it is done")
        settings = jobs.ProfileSettings(**QUICK_SETTINGS)
        job = jobs.create_job(store, model, DEVICE, "quick", settings=settings)
        state.jobs[model] = job.id
        state.step = f"profiling {model} (job {job.id})"
        write_state(store, state)
        code = jobs.start_worker(store, job.id, watch=False).wait()
        if code != 0:
            reason = jobs.get_job(store, job.id).reason
            raise PlannerError(f"profiling {model} failed: {reason or f'exit code {code}'}")
    state.step = "fitting " + ", ".join(models)
    write_state(store, state)
    for model in models:
        save_fits(store, fit_all(store, model=model, device=DEVICE))
    state.status, state.step, state.finished = "done", "done", time.time()
    write_state(store, state)
    return state


def main(argv: list[str] | None = None) -> int:
    """Entry point of the first run's process; the outcome is in its stored state."""
    parser = argparse.ArgumentParser(description="Profile and fit the demo models (the app's first run).")
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    store = Store(args.db, busy_timeout_s=30)
    try:
        run_first_run(store, os.getpid())
    except Exception as exc:  # noqa: BLE001 (recorded in words for the Home page)
        state = read_state(store) or FirstRunState("failed", "")
        state.status, state.reason, state.finished = "failed", str(exc), time.time()
        write_state(store, state)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
