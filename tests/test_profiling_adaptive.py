"""engine/profiling/adaptive and the worker's adaptive design: budget, stopping, where trials go.

The worker runs against a simulated backend: each request "takes" a runtime drawn from a
known surface with noise, and advances a clock by it instead of sleeping; the replayed
meter reads the same clock, so energy follows the simulated runtime. A 60 s budget then
runs in a second or two.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog
from engine.backends.base import GenerationResult
from engine.energy import EnergyMeter, ReplayMeter
from engine.errors import InputError
from engine.profiling import adaptive, jobs
from engine.profiling.adaptive import (AdaptiveRules, PointTrials, RoundFit, RoundRecord, fit_round, plan_batch,
                                       settled)
from engine.profiling.design import DesignPoint, build_design
from engine.profiling.stopping import StopRule
from engine.profiling.worker import measure_job, run_job
from engine.store import Store
from tests.test_profiling import ListSink


def runtime_surface(tokens_in: float, tokens_out: float) -> float:
    """Seconds of one request: a fixed cost, prefill and decode, as a small CPU model."""
    return 0.05 + 0.0004 * tokens_in + 0.03 * tokens_out


class SimClock:
    """The real monotonic clock plus the simulated seconds the requests took."""

    def __init__(self) -> None:
        self.simulated_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.simulated_s


class SimBackend:
    """Answers at once, advancing the clock by a noisy runtime from :func:`runtime_surface`.

    ``noise(τin, τout)`` is the relative SD of a trial (lognormal); ``slowness`` scales
    every runtime (a slower model); ``max_total_tokens`` plays the model's context.
    """

    name = "sim"

    def __init__(self, clock: SimClock, noise=lambda i, o: 0.05, seed: int = 0, max_total_tokens: int = 4096,
                 slowness: float = 1.0):
        self.clock, self.noise, self.rng, self.max_total_tokens = clock, noise, np.random.default_rng(seed), max_total_tokens
        self.slowness = slowness
        self.requests: list[tuple[int, int]] = []

    def load(self):
        pass

    def close(self):
        pass

    def check_request(self, input_tokens, output_tokens):
        if input_tokens + output_tokens > self.max_total_tokens:
            raise InputError("beyond the context")

    @property
    def settings(self):
        return {"backend": "sim"}

    def generate(self, input_tokens, output_tokens):
        runtime = self.slowness * runtime_surface(input_tokens, output_tokens) * float(
            self.rng.lognormal(0.0, self.noise(input_tokens, output_tokens)))
        self.clock.simulated_s += runtime
        self.requests.append((input_tokens, output_tokens))
        return GenerationResult(input_tokens, output_tokens, runtime, None)


def sim_meter(clock: SimClock):
    return lambda device="cpu": EnergyMeter([ReplayMeter("cpu", "cpu", 12.0, source="estimated", method="replay")],
                                            clock=clock, background=False)


@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


SETTINGS = jobs.ProfileSettings(min_trials=2, max_trials=12, warmup_runs=1, idle_s=0.5, seed=1, budget_s=60.0)


def run_adaptive(store: Store, backend: SimBackend, clock: SimClock, settings=SETTINGS, **design):
    job = jobs.create_job(store, "demo-small", "cpu", "adaptive", settings=settings, **design)
    sink = ListSink()
    started = clock()
    outcome = measure_job(job, "sim", Path("x"), pd.DataFrame(columns=["input_tokens", "output_tokens", "trial",
                                                                       "runtime_s", "energy_j"]),
                          sink, backend_factory=lambda *a, **k: backend, meter_factory=sim_meter(clock), clock=clock)
    return job, sink, outcome, clock() - started


# -- the design and its settings ---------------------------------------------------------------

def test_the_adaptive_design_starts_from_a_log_grid_over_its_ranges():
    design = build_design("adaptive")
    assert sorted({p.input_tokens for p in design.points}) == [8, 45, 256]
    assert sorted({p.output_tokens for p in design.points}) == [8, 23, 64]
    assert len(build_design("adaptive", inputs=[16, 64], outputs=[8, 32]).points) == 9
    with pytest.raises(InputError, match="needs a range"):
        build_design("adaptive", inputs=[16], outputs=[8, 32])


def test_a_budget_goes_with_the_adaptive_design_only(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "adaptive")
    assert job.settings.budget_s == jobs.DEFAULT_BUDGET_S and job.design.kind == "adaptive"
    with pytest.raises(InputError, match="applies to the adaptive design only"):
        jobs.create_job(demo_store, "demo-small", "cpu", "quick", settings=jobs.ProfileSettings(budget_s=60))
    with pytest.raises(InputError, match="budget"):
        jobs.create_job(demo_store, "demo-small", "cpu", "adaptive", settings=jobs.ProfileSettings(budget_s=1))


def test_cli_profile_adaptive_flags(demo_store: Store, capsys):
    from engine.cli import main

    db = ["--db", str(demo_store.path)]
    assert main(["profile", "--model", "demo-small", "--design", "quick", "--budget-s", "60", *db]) == 2
    assert "applies to the adaptive design only" in capsys.readouterr().err
    assert main(["profile", "--model", "demo-small", "--budget-s", "3", *db]) == 2  # --budget-s alone means adaptive
    assert "budget" in capsys.readouterr().err
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


# -- the worker: budget, stopping, growth ------------------------------------------------------------

def test_the_budget_is_respected_within_one_trial(demo_store: Store, monkeypatch):
    monkeypatch.setattr(adaptive, "RULES", AdaptiveRules(min_improvement=-1.0))  # never settle: only the budget stops
    clock = SimClock()
    backend = SimBackend(clock, noise=lambda i, o: 0.3)
    job, sink, outcome, elapsed = run_adaptive(demo_store, backend, clock)
    longest = max(runtime_surface(i, o) for i, o in backend.requests) * 3  # a slow draw of the longest request
    assert SETTINGS.budget_s * 0.75 < elapsed <= SETTINGS.budget_s + longest
    assert sink.rounds[-1].decision == f"stop: the budget of {SETTINGS.budget_s:g} s is spent"
    assert [r.round for r in sink.rounds] == list(range(1, len(sink.rounds) + 1)) and len(sink.rounds) >= 3
    assert "the budget of 60 s is spent" in outcome.reason and "cross-validated error " in outcome.reason
    # Every trial is of a point in the (grown) design, and every point measured has an outcome.
    final_points = set((sink.designs[-1] if sink.designs else job.design).points)
    measured = {DesignPoint(t["input_tokens"], t["output_tokens"]) for t in sink.trials}
    assert measured <= final_points
    assert {DesignPoint(o.input_tokens, o.output_tokens) for o in sink.outcomes} == measured
    assert all(o.stopped in ("converged", "max-trials", "budget") for o in sink.outcomes)


def test_it_stops_when_the_cross_validated_error_stops_improving(demo_store: Store):
    clock = SimClock()
    backend = SimBackend(clock, noise=lambda i, o: 0.01)  # the forms fit this surface: the first fit is as good as any
    settings = jobs.ProfileSettings(min_trials=2, max_trials=12, warmup_runs=1, idle_s=0.5, budget_s=600.0)
    _, sink, outcome, elapsed = run_adaptive(demo_store, backend, clock, settings)
    last = sink.rounds[-1]
    assert last.decision.startswith("stop: ") and "budget" not in last.decision
    assert elapsed < 0.5 * settings.budget_s
    assert last.energy_cv_mape < 0.05 and last.runtime_cv_mape < 0.05
    assert "adaptive design" in outcome.reason


def test_a_job_stored_through_the_store_keeps_its_rounds_and_grown_design(demo_store: Store):
    clock = SimClock()
    backend = SimBackend(clock, noise=lambda i, o: 0.25 if o < 16 else 0.05)
    settings = jobs.ProfileSettings(min_trials=2, max_trials=12, warmup_runs=1, idle_s=0.5, budget_s=40.0)
    job = jobs.create_job(demo_store, "demo-small", "cpu", "adaptive", settings=settings)
    run_job(demo_store, job, backend_factory=lambda *a, **k: backend, meter_factory=sim_meter(clock), clock=clock)
    done = jobs.get_job(demo_store, job.id)
    rounds = jobs.adaptive_rounds(demo_store, job.id)
    assert done.status == "done" and len(rounds) >= 2 and rounds["round"].tolist() == list(range(1, len(rounds) + 1))
    assert rounds.decision.iloc[-1].startswith("stop: ") and rounds.energy_cv_mape.notna().all()
    stored_points = set(demo_store.query_df("SELECT DISTINCT input_tokens, output_tokens FROM measurements "
                                            "WHERE job_id = ?", [job.id]).itertuples(index=False, name=None))
    assert {(p.input_tokens, p.output_tokens) for p in done.design.points} >= stored_points
    assert done.points_total == len(done.design.points)
    outcomes = jobs.point_outcomes(demo_store, [job.id])
    assert set(zip(outcomes.input_tokens, outcomes.output_tokens)) == stored_points
    assert jobs.job_progress(demo_store, job.id).remaining_s is None  # finished: nothing left


# -- the judgement, on made-up trials ------------------------------------------------------------

def grid_trials(noise_at, n: int = 4, seed: int = 0) -> dict[DesignPoint, PointTrials]:
    rng = np.random.default_rng(seed)
    trials = {}
    for i in (8, 45, 256):
        for o in (8, 23, 64):
            point = DesignPoint(i, o)
            trials[point] = PointTrials()
            for _ in range(n):
                runtime = runtime_surface(i, o) * float(rng.lognormal(0, noise_at(i, o)))
                trials[point].add(runtime, 12 * runtime)
    return trials


def test_trials_go_first_where_a_points_interval_is_widest_per_second():
    trials = grid_trials(lambda i, o: 0.4 if (i, o) == (45, 23) else 0.01)
    batch = plan_batch(trials, RoundFit(), StopRule(rel_bound=0.05, min_trials=2, max_trials=25), batch_s=100.0)
    assert batch[0].point == DesignPoint(45, 23) and not batch[0].new and batch[0].trials == 4
    assert all(not a.new for a in batch)  # without fits, no new point can be judged
    widths = [a.half_width / math.sqrt(runtime_surface(a.point.input_tokens, a.point.output_tokens)) for a in batch]
    assert widths == sorted(widths, reverse=True)
    assert "±" in adaptive.describe_batch(batch[:1])


def test_converged_points_and_points_at_their_cap_get_no_more_trials():
    trials = grid_trials(lambda i, o: 0.001)
    rule = StopRule(rel_bound=0.05, min_trials=2, max_trials=25)
    assert plan_batch(trials, RoundFit(), rule, batch_s=100.0) == []
    noisy = grid_trials(lambda i, o: 0.5, n=4)
    assert plan_batch(noisy, RoundFit(), StopRule(rel_bound=0.05, min_trials=2, max_trials=4), batch_s=100.0) == []


def test_a_batch_fits_its_time():
    trials = grid_trials(lambda i, o: 0.3)
    batch = plan_batch(trials, RoundFit(), StopRule(min_trials=2, max_trials=25), batch_s=3.0)
    seconds = sum(a.trials * np.mean(trials[a.point].runtimes_s) for a in batch)
    assert batch and (seconds <= 3.0 or len(batch) == 1)


def test_new_points_go_where_the_surface_is_unsure_once_the_measured_points_are_settled():
    # Every measured point is tight, but the surface bends in τin where no form can follow:
    # the bootstrap finds the surface unsure between the measured levels.
    rng = np.random.default_rng(1)
    trials = {}
    for i in (8, 45, 256):
        for o in (8, 23, 64):
            trials[DesignPoint(i, o)] = PointTrials()
            for _ in range(4):
                runtime = runtime_surface(i, o) * (1 + 0.8 * (i == 45)) * float(rng.lognormal(0, 0.002))
                trials[DesignPoint(i, o)].add(runtime, 12 * runtime)
    fit = fit_round(trials, "m", "cpu")
    batch = plan_batch(trials, fit, StopRule(rel_bound=0.05, min_trials=2, max_trials=25), batch_s=100.0)
    assert batch and all(a.new for a in batch)
    assert all(8 <= a.point.input_tokens <= 256 and 8 <= a.point.output_tokens <= 64 for a in batch)
    assert all(a.point not in trials for a in batch) and all(a.trials == 2 for a in batch)
    refused = plan_batch(trials, fit, StopRule(rel_bound=0.05, min_trials=2, max_trials=25), batch_s=100.0,
                         can_measure=lambda point: False)
    assert refused == []  # the model's context refuses them all


def test_when_noise_dominates_short_requests_are_left_alone():
    trials = grid_trials(lambda i, o: 0.35, n=3, seed=2)
    fit = fit_round(trials, "m", "cpu")
    assert fit.noise_dominates()
    batch = plan_batch(trials, fit, StopRule(rel_bound=0.05, min_trials=2, max_trials=25), batch_s=100.0)
    median_s = np.median([t.mean_runtime_s for t in trials.values()])
    assert batch and all(adaptive.expected_trial_s(a.point, trials, fit) >= median_s for a in batch)
    assert any(a.point.output_tokens == 8 for a in plan_batch(trials, RoundFit(), StopRule(min_trials=2), 100.0))
    quiet = fit_round(grid_trials(lambda i, o: 0.001, n=3), "m", "cpu")
    assert not quiet.noise_dominates() or quiet.energy_cv_mape < 0.01


def record(number: int, energy: float | None, runtime: float | None) -> RoundRecord:
    return RoundRecord(round=number, elapsed_s=10.0 * number, trials=10 * number, points=9,
                       energy_cv_mape=energy, runtime_cv_mape=runtime)


def test_settled_after_two_rounds_of_less_than_a_point_of_improvement():
    improving = [record(1, 0.30, 0.40), record(2, 0.22, 0.35), record(3, 0.18, 0.33)]
    assert settled(improving) is None
    flat = improving + [record(4, 0.175, 0.33), record(5, 0.172, 0.325)]
    why = settled(flat)
    assert why == "the cross-validated error improved by less than 1% over the last 2 rounds"
    assert settled(flat[:2]) is None  # too few rounds to tell
    one_still_improving = improving + [record(4, 0.175, 0.30), record(5, 0.172, 0.28)]
    assert settled(one_still_improving) is None
    no_energy = [record(1, None, 0.40), record(2, None, 0.399), record(3, None, 0.398)]
    assert settled(no_energy) is not None


def test_a_budget_too_short_for_the_grid_still_measures_every_starting_point_once(demo_store: Store):
    clock = SimClock()
    backend = SimBackend(clock, noise=lambda i, o: 0.05, slowness=3.0)  # the grid's first trials alone take ~28 s
    settings = jobs.ProfileSettings(min_trials=3, max_trials=12, warmup_runs=1, idle_s=0.5, budget_s=10.0)
    job, sink, outcome, elapsed = run_adaptive(demo_store, backend, clock, settings)
    counts = pd.Series([(t["input_tokens"], t["output_tokens"]) for t in sink.trials]).value_counts()
    assert len(counts) == 9 and (counts >= 1).all()  # the grid is fittable, though the budget is spent
    assert elapsed > settings.budget_s and len(sink.rounds) == 1
    assert sink.rounds[0].decision.startswith("stop: the budget of 10 s is spent, overrun by")
    assert sink.rounds[0].energy_cv_mape is not None  # one fit of what there is
    assert "overrun" in outcome.reason


def test_a_cancelled_adaptive_job_resumes_where_it_stopped(demo_store: Store):
    from engine import runs
    from engine.profiling.worker import JobCancelled, _CancelFlag

    clock = SimClock()
    flag = _CancelFlag()

    class CancelledMidway(SimBackend):
        def generate(self, input_tokens, output_tokens):
            if len(self.requests) == 22:  # after the warm-up, the grid (2 trials a point) and a round's first trials
                flag.requested = True
            return super().generate(input_tokens, output_tokens)

    settings = jobs.ProfileSettings(min_trials=2, max_trials=12, warmup_runs=1, idle_s=0.5, budget_s=80.0)
    job = jobs.create_job(demo_store, "demo-small", "cpu", "adaptive", settings=settings)
    first = CancelledMidway(clock, noise=lambda i, o: 0.2)
    with pytest.raises(JobCancelled):
        run_job(demo_store, job, backend_factory=lambda *a, **k: first, meter_factory=sim_meter(clock), clock=clock,
                cancel=flag)
    before = jobs.adaptive_rounds(demo_store, job.id)
    kept = demo_store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job.id])[0]
    assert len(before) >= 1 and kept == len(first.requests) - settings.warmup_runs
    runs.set_status(demo_store, runs.PROFILING, job.id, "cancelled", "test")
    jobs.resume_job(demo_store, job.id)
    second = SimBackend(clock, noise=lambda i, o: 0.2, seed=5)
    run_job(demo_store, jobs.get_job(demo_store, job.id), backend_factory=lambda *a, **k: second,
            meter_factory=sim_meter(clock), clock=clock)
    after = jobs.adaptive_rounds(demo_store, job.id)
    assert jobs.get_job(demo_store, job.id).status == "done"
    assert after["round"].tolist() == list(range(1, len(after) + 1)) and len(after) > len(before)
    assert after.elapsed_s.iloc[len(before)] >= before.elapsed_s.iloc[-1]  # the budget spent before still counts
    trials = demo_store.query_df("SELECT input_tokens, output_tokens, trial FROM measurements WHERE job_id = ?",
                                 [job.id])
    assert not trials.duplicated().any()
    assert len(second.requests) - settings.warmup_runs == len(trials) - kept  # the grid was not measured again


def test_a_batch_never_runs_past_the_budget_left():
    trials = grid_trials(lambda i, o: 0.3)
    rule = StopRule(min_trials=2, max_trials=25)
    roomy = plan_batch(trials, RoundFit(), rule, batch_s=0.1)
    assert len(roomy) == 1  # a round always makes progress, past its own share
    tight = plan_batch(trials, RoundFit(), rule, batch_s=0.1, left_s=0.5)
    assert tight and all(a.trials * np.mean(trials[a.point].runtimes_s) <= 0.5 for a in tight)
    assert plan_batch(trials, RoundFit(), rule, batch_s=10.0, left_s=0.01) == []  # nothing fits: nothing planned
