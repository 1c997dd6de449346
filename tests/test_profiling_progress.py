"""engine.profiling.jobs.job_progress: elapsed time across runs, and a remaining time that never
reads 0 while a point is left."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import pytest

from engine.profiling.design import build_design, run_order
from engine.profiling.jobs import ProfileSettings, job_progress
from engine.store import Store, append_frame

SETTINGS = ProfileSettings(min_trials=3, max_trials=5, seed=7)
DESIGN = build_design("custom", inputs=[8, 32, 128], outputs=[4], seed=SETTINGS.seed)
ORDER = run_order(DESIGN.points, SETTINGS.seed)
TRIAL_S = 2.0  # every trial's runtime
COST_S = TRIAL_S * 1.1  # with the overhead around each trial


def make_job(store: Store, *, status: str, points_done: int, started_ago_s: float | None,
             trials: list[tuple[int, int, float]], finished_ago_s: float | None = None) -> int:
    """A job of 3 points and its trials: (index in the run order, how many, started how many seconds ago)."""
    now = pd.Timestamp.now(tz="UTC")
    with store.transaction() as con:
        job_id = int(con.execute(
            "INSERT INTO profiling_jobs (model, device, host, design, settings, status, points_total, points_done, "
            "started_at, finished_at) VALUES ('m', 'cpu', 'h', ?, ?, ?, 3, ?, ?, ?) RETURNING id",
            [json.dumps(DESIGN.to_dict()), json.dumps(asdict(SETTINGS)), status, points_done,
             None if started_ago_s is None else now - pd.Timedelta(seconds=started_ago_s),
             None if finished_ago_s is None else now - pd.Timedelta(seconds=finished_ago_s)]).fetchone()[0])
        rows = [{"job_id": job_id, "origin": "profiled", "model": "m", "device": "cpu",
                 "input_tokens": ORDER[point].input_tokens, "output_tokens": ORDER[point].output_tokens,
                 "trial": trial + 1, "runtime_s": TRIAL_S, "energy_j": 20.0, "energy_source": "estimated",
                 "started_at": now - pd.Timedelta(seconds=ago - 3 * trial)}
                for point, count, ago in trials for trial in range(count)]
        if rows:
            append_frame(con, "measurements", pd.DataFrame(rows))
    return job_id


def test_remaining_counts_the_points_left_less_the_point_in_progress(store: Store):
    job_id = make_job(store, status="running", points_done=1, started_ago_s=100,
                      trials=[(0, 3, 60), (1, 2, 20)])
    progress = job_progress(store, job_id)
    assert progress.trials == 5
    # A complete point took 3 trials: the 2 points left take 6, of which 2 are done.
    assert progress.remaining_s == pytest.approx(6 * COST_S - 2 * COST_S)
    assert progress.elapsed_s == pytest.approx(100, abs=5)


def test_the_last_point_never_reads_zero_while_it_runs(store: Store):
    # The last point has taken more trials than a typical point: still at least one trial to go.
    job_id = make_job(store, status="running", points_done=2, started_ago_s=100,
                      trials=[(0, 3, 90), (1, 3, 60), (2, 4, 30)])
    assert job_progress(store, job_id).remaining_s == pytest.approx(COST_S)
    # Every point complete, the worker closing: nothing left to estimate.
    closing = make_job(store, status="running", points_done=3, started_ago_s=100,
                       trials=[(0, 3, 90), (1, 3, 60), (2, 3, 30)])
    assert job_progress(store, closing).remaining_s is None


def test_before_any_point_is_complete_the_fewest_trials_are_assumed(store: Store):
    job_id = make_job(store, status="running", points_done=0, started_ago_s=30, trials=[(0, 1, 10)])
    assert job_progress(store, job_id).remaining_s == pytest.approx(3 * 3 * COST_S - COST_S)
    nothing_yet = make_job(store, status="running", points_done=0, started_ago_s=5, trials=[])
    assert job_progress(store, nothing_yet).remaining_s is None


def test_elapsed_adds_the_measuring_of_earlier_runs_after_a_resume(store: Store):
    # 4 trials measured by a run an hour ago; this run started 10 s ago and measured 1 more.
    job_id = make_job(store, status="running", points_done=1, started_ago_s=10,
                      trials=[(0, 3, 3600), (1, 1, 3590), (1, 1, 5)])
    progress = job_progress(store, job_id)
    assert progress.elapsed_s == pytest.approx(10 + 4 * TRIAL_S, abs=3)
    # Queued again (not started yet): the earlier runs' measuring time, not 0 and not None.
    queued = make_job(store, status="queued", points_done=1, started_ago_s=None, trials=[(0, 3, 3600)])
    assert job_progress(store, queued).elapsed_s == pytest.approx(3 * TRIAL_S)


def test_a_finished_job_has_its_run_time_and_no_remaining(store: Store):
    job_id = make_job(store, status="done", points_done=3, started_ago_s=100, finished_ago_s=40,
                      trials=[(0, 3, 90), (1, 3, 70), (2, 3, 50)])
    progress = job_progress(store, job_id)
    assert progress.elapsed_s == pytest.approx(60, abs=2) and progress.remaining_s is None
    assert set(progress.points.columns) >= {"input_tokens", "output_tokens", "trials", "runtime_s", "energy_j"}
