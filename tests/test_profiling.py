"""Profiling: designs, the stop rule, jobs run in-process against fakes, and real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from engine import catalog, runs
from engine.backends.base import GenerationResult
from engine.energy import EnergyMeter, ReplayMeter
from engine.errors import InputError, PlannerError, TokenCountMismatchError
from engine.profiling import jobs
from engine.profiling.design import DesignPoint, build_design, parse_token_list, run_order
from engine.profiling.stopping import StopRule, point_complete, relative_half_width
from engine.profiling.worker import JobCancelled, TrialSink, _CancelFlag, measure_job, run_job
from engine.store import Store

ROOT = Path(__file__).resolve().parent.parent


# -- designs and the stop rule ---------------------------------------------------------------

def test_designs():
    assert len(build_design("quick").points) == 9
    assert len(build_design("paper-grid").points) == 81
    sweeps = build_design("paper-sweeps", context_length=4096)
    assert DesignPoint(2048, 32) in sweeps.points and DesignPoint(32, 2048) in sweeps.points
    assert DesignPoint(32, 4096) not in sweeps.points
    assert any("(32, 4096)" in note and "context of 4096" in note for note in sweeps.dropped)
    custom = build_design("custom", inputs=[8, 64], outputs=[16])
    assert custom.points == (DesignPoint(8, 16), DesignPoint(64, 16))
    a = build_design("space-filling", inputs=[8, 1024], outputs=[8, 256], n_points=12, seed=3)
    assert a == build_design("space-filling", inputs=[8, 1024], outputs=[8, 256], n_points=12, seed=3)
    assert all(8 <= p.input_tokens <= 1024 and 8 <= p.output_tokens <= 256 for p in a.points)
    assert len({p.input_tokens for p in a.points}) >= 10  # one per stratum, give or take rounding


def test_run_order_is_seeded_and_complete():
    points = build_design("quick").points
    assert run_order(points, 1) == run_order(points, 1)
    assert run_order(points, 1) != run_order(points, 2)
    assert sorted(run_order(points, 1)) == sorted(points)


@pytest.mark.parametrize("text, fragment", [("8,abc", "'abc' is not a number"), ("8,0", "from 1"),
                                            ("8.5", "whole number"), ("", "is empty")])
def test_bad_token_lists(text: str, fragment: str):
    with pytest.raises(InputError, match=fragment):
        parse_token_list(text, "--inputs")


def test_design_that_does_not_fit_the_context():
    with pytest.raises(InputError, match="no point fits the model's context"):
        build_design("custom", inputs=[4000], outputs=[200], context_length=4096)


def test_stop_rule():
    rule = StopRule(rel_bound=0.05, min_trials=3, max_trials=6)
    assert not point_complete([1.0, 1.0], [2.0, 2.0], rule)  # fewer than min_trials
    assert point_complete([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], rule)
    assert not point_complete([1.0, 2.0, 1.0], [2.0, 2.0, 2.0], rule)  # runtime too noisy
    assert not point_complete([1.0, 1.0, 1.0], [1.0, 3.0, 2.0], rule)  # energy too noisy
    assert point_complete([1.0, 1.0, 1.0], [None, None, None], rule)  # unmeasured energy: runtime decides
    assert point_complete([1.0, 2.0] * 3, [1.0] * 6, rule)  # max_trials reached
    assert relative_half_width([10.0, 10.0]) == 0.0
    assert relative_half_width([1.0]) == float("inf")


# -- jobs against fakes --------------------------------------------------------------------

class FakeBackend:
    """A backend that 'generates' by sleeping in proportion to the tokens; it can fail on cue."""

    name = "fake"

    def __init__(self, backend, path, device="cpu", fail_after: int | None = None, **options):
        self.path, self.device, self.fail_after, self.calls = Path(path), device, fail_after, 0
        self.loaded = self.closed = False

    def load(self):
        self.loaded = True

    def close(self):
        self.closed = True

    def check_request(self, input_tokens, output_tokens):
        if input_tokens + output_tokens > 4096:
            raise InputError("beyond context")

    @property
    def settings(self):
        return {"backend": "fake", "device": self.device}

    def generate(self, input_tokens, output_tokens):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise TokenCountMismatchError("the fake backend produced one token too few")
        time.sleep(0.001 * (1 + output_tokens / 8))
        return GenerationResult(input_tokens, output_tokens, 0.001 * (1 + output_tokens / 8), 0.0005)


def replay_meter(device="cpu"):
    return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="estimated: replay at 10 W")])


@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


FAST = jobs.ProfileSettings(min_trials=3, max_trials=5, warmup_runs=1, idle_s=0.5, seed=7)


def test_run_job_stores_every_trial_with_provenance(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8, 16], settings=FAST)
    backends = []

    def factory(*args, **kwargs):
        backends.append(FakeBackend(*args, **kwargs))
        return backends[-1]

    run_job(demo_store, job, backend_factory=factory, meter_factory=replay_meter)
    stored = demo_store.query_df("SELECT * FROM measurements WHERE job_id = ?", [job.id])
    finished = jobs.get_job(demo_store, job.id)
    assert finished.status == "done" and finished.points_done == 4
    per_point = stored.groupby(["input_tokens", "output_tokens"]).trial.agg(["count", "max"])
    assert len(per_point) == 4 and (per_point["count"] >= 3).all() and (per_point["count"] <= 5).all()
    assert (per_point["count"] == per_point["max"]).all()  # trials numbered 1..n per point
    assert backends[0].calls == len(stored) + FAST.warmup_runs  # warm-ups ran and were not stored
    assert backends[0].closed
    assert (stored.energy_source == "estimated").all() and (stored.energy_j > 0).all()
    assert stored.energy_method.str.contains("replay").all()
    assert stored.idle_power_w.notna().all() and (stored.origin == "profiled").all()
    assert json.loads(stored.library_versions.iloc[0])["backend"] == "fake"
    assert stored.started_at.notna().all() and stored.host.notna().all()


def test_failure_mid_job_keeps_the_trials_and_resume_completes(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8], settings=FAST)
    with pytest.raises(TokenCountMismatchError):
        run_job(demo_store, job, backend_factory=lambda *a, **k: FakeBackend(*a, fail_after=4, **k),
                meter_factory=replay_meter)
    kept = demo_store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job.id])[0]
    assert kept == 3  # 1 warm-up + 3 stored trials, then the fourth request failed
    runs.set_status(demo_store, runs.PROFILING, job.id, "failed", "test")
    jobs.resume_job(demo_store, job.id)
    resumed = FakeBackend("fake", "x")
    run_job(demo_store, jobs.get_job(demo_store, job.id), backend_factory=lambda *a, **k: resumed,
            meter_factory=replay_meter)
    assert jobs.get_job(demo_store, job.id).status == "done"
    counts = demo_store.query_df("SELECT input_tokens, count(*) AS n FROM measurements WHERE job_id = ? GROUP BY 1",
                                 [job.id]).set_index("input_tokens").n
    assert (counts >= 3).all() and len(counts) == 2
    # The complete first point was skipped: only the second point's trials were run again.
    assert resumed.calls == FAST.warmup_runs + int(counts.sum()) - 3


def test_cancel_stops_between_trials_and_keeps_what_was_measured(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8], settings=FAST)
    flag = _CancelFlag()

    class CancellingBackend(FakeBackend):
        def generate(self, input_tokens, output_tokens):
            if self.calls == 3:
                flag.requested = True  # as the SIGTERM handler would, mid-request
            return super().generate(input_tokens, output_tokens)

    with pytest.raises(JobCancelled):
        run_job(demo_store, job, backend_factory=CancellingBackend, meter_factory=replay_meter, cancel=flag)
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job.id])[0] == 3


class ListSink(TrialSink):
    """Keeps what the measuring hands over, in memory."""

    def __init__(self):
        self.trials, self.points_done, self.outcomes, self.designs, self.rounds = [], [], [], [], []

    def add_trial(self, row):
        self.trials.append(row)

    def point_done(self, points_done):
        self.points_done.append(points_done)

    def point_finished(self, outcome):
        self.outcomes.append(outcome)

    def design_changed(self, design):
        self.designs.append(design)

    def round_done(self, record):
        self.rounds.append(record)


def test_measuring_hands_every_trial_to_its_sink_and_never_touches_the_database(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8], settings=FAST)
    stored_before = pd.DataFrame({"input_tokens": [8] * 3, "output_tokens": [8] * 3, "trial": [1, 2, 3],
                                  "runtime_s": [0.002] * 3, "energy_j": [0.02] * 3})  # (8, 8) is complete
    sink, backend = ListSink(), FakeBackend("fake", "x")
    demo_store.path.rename(demo_store.path.with_suffix(".away"))  # any use of the database would now fail
    measure_job(job, "fake", Path("x"), stored_before, sink, backend_factory=lambda *a, **k: backend,
                meter_factory=replay_meter)
    assert {(t["input_tokens"], t["output_tokens"]) for t in sink.trials} == {(32, 8)}  # only what was left
    assert [t["trial"] for t in sink.trials] == list(range(1, len(sink.trials) + 1))
    assert 3 <= len(sink.trials) <= 5 and backend.calls == FAST.warmup_runs + len(sink.trials)
    assert sink.points_done == [1, 2]
    assert all(t["job_id"] == job.id and t["energy_source"] == "estimated" for t in sink.trials)
    assert not demo_store.path.exists()


# -- points that did not converge ---------------------------------------------------------------

class SwingingBackend(FakeBackend):
    """Runtimes that swing by a factor of 3 from one trial to the next (as under load): no interval gets tight."""

    def generate(self, input_tokens, output_tokens):
        self.calls += 1
        return GenerationResult(input_tokens, output_tokens, 0.001 * (3.0 if self.calls % 2 else 1.0), 0.0005)


def swinging_meter(device="cpu"):
    return EnergyMeter([ReplayMeter("cpu", "cpu", [5.0, 30.0], source="estimated", method="estimated: replay")])


def test_a_point_that_reached_max_trials_without_converging_is_marked_and_listed(demo_store: Store, capsys):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8], settings=FAST)
    run_job(demo_store, job, backend_factory=SwingingBackend, meter_factory=swinging_meter)
    finished = jobs.get_job(demo_store, job.id)
    assert finished.status == "done"
    assert finished.reason.startswith("2 of 2 points did not converge (worst ±") and "at 5 trials)" in finished.reason
    outcomes = jobs.point_outcomes(demo_store, [job.id])
    assert len(outcomes) == 2 and not outcomes.converged.any() and outcomes.unconverged.all()
    assert set(outcomes.stopped) == {"max-trials"} and (outcomes.trials == FAST.max_trials).all()
    assert (outcomes.runtime_ci_rel > FAST.rel_bound).all() and set(outcomes.assessed) == {"stored"}
    assert jobs.list_jobs(demo_store).set_index("id").loc[job.id, "unconverged"] == 2
    points = jobs.job_progress(demo_store, job.id).points  # what the Profile page draws, with each point's outcome
    assert points.unconverged.all() and (points.stopped == "max-trials").all() and (points.ci_rel > 0.05).all()

    from engine.cli import main

    assert main(["jobs", "list", "--db", str(demo_store.path)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "unconverged" in header.split()
    cells = row.split()
    assert cells[header.split().index("unconverged")] == "2" and "did not converge" in row
    assert main(["jobs", "list", "--json", "--db", str(demo_store.path)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["unconverged"] == 2


def test_converged_points_are_recorded_as_such(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 32], outputs=[8], settings=FAST)

    class SteadyBackend(FakeBackend):
        def generate(self, input_tokens, output_tokens):
            self.calls += 1
            return GenerationResult(input_tokens, output_tokens, 0.002, 0.0005)

    def steady_meter(device="cpu"):  # energy in proportion to a fake clock that ticks 2 ms a window
        ticks = iter(range(10**6))
        return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="replay")],
                           clock=lambda: next(ticks) * 0.001, background=False)

    run_job(demo_store, job, backend_factory=SteadyBackend, meter_factory=steady_meter)
    finished = jobs.get_job(demo_store, job.id)
    assert finished.status == "done" and finished.reason is None
    outcomes = jobs.point_outcomes(demo_store, [job.id])
    assert outcomes.converged.all() and set(outcomes.stopped) == {"converged"} and (outcomes.trials == 3).all()
    assert jobs.list_jobs(demo_store).set_index("id").loc[job.id, "unconverged"] == 0


def _old_job_with_trials(store: Store, runtimes_by_point: dict) -> int:
    """A finished job as an older version left it: trials, no recorded point outcomes."""
    settings = json.dumps({"min_trials": 3, "max_trials": 5, "rel_bound": 0.05})
    job_id = store.query_one("INSERT INTO profiling_jobs (model, device, host, design, settings, status, points_total) "
                             "VALUES ('demo-small', 'cpu', 'h', '{\"kind\": \"custom\", \"points\": []}', ?, "
                             "'done', ?) RETURNING id", [settings, len(runtimes_by_point)])[0]
    rows = [{"job_id": job_id, "origin": "profiled", "model": "demo-small", "device": "cpu", "input_tokens": i,
             "output_tokens": o, "trial": n + 1, "runtime_s": r, "energy_j": 10 * r, "energy_source": "estimated"}
            for (i, o), runtimes in runtimes_by_point.items() for n, r in enumerate(runtimes)]
    from engine.store import append_frame

    with store.transaction() as con:
        append_frame(con, "measurements", pd.DataFrame(rows))
    return job_id


def test_jobs_from_before_outcomes_were_recorded_are_judged_from_their_trials(store: Store):
    job_id = _old_job_with_trials(store, {(8, 8): [1.0, 3.0, 1.0, 3.0, 1.0], (8, 32): [2.0, 2.0, 2.0],
                                          (32, 8): [1.0, 1.0]})  # (32, 8): cut short, not judged
    outcomes = jobs.point_outcomes(store, [job_id]).set_index(["input_tokens", "output_tokens"])
    assert set(outcomes.index) == {(8, 8), (8, 32)} and set(outcomes.assessed) == {"from trials"}
    assert not outcomes.loc[(8, 8), "converged"] and outcomes.loc[(8, 8), "stopped"] == "max-trials"
    assert outcomes.loc[(8, 8), "unconverged"] and not outcomes.loc[(8, 32), "unconverged"]
    assert outcomes.loc[(8, 32), "converged"]
    assert jobs.list_jobs(store).set_index("id").loc[job_id, "unconverged"] == 1
    assert jobs.point_outcomes(store, model="other").empty


def test_an_old_database_migrates_and_its_jobs_are_judged(tmp_path: Path):
    import duckdb

    from engine.store import MIGRATIONS, migrate

    path = tmp_path / "version4.duckdb"
    with duckdb.connect(str(path)) as con:
        assert migrate(con, MIGRATIONS[:4]) == 4
    before = Store(path, migrations=MIGRATIONS[:4])
    job_id = _old_job_with_trials(before, {(8, 8): [1.0, 3.0, 1.0, 3.0, 1.0], (8, 32): [2.0, 2.0, 2.0]})
    store = Store(path)
    assert store.schema_version() == MIGRATIONS[-1].version
    assert store.query_one("SELECT count(*) FROM profiling_points")[0] == 0  # nothing invented on upgrade
    assert store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job_id])[0] == 8
    assert jobs.list_jobs(store).set_index("id").loc[job_id, "unconverged"] == 1
    assert jobs.adaptive_rounds(store, job_id).empty


def test_job_refusals(demo_store: Store):
    catalog.add_model(demo_store, name="remote", accuracy=0.5)
    cases = [
        (dict(model="ghost", device="cpu"), "no model named 'ghost'"),
        (dict(model="remote", device="cpu"), "no local weights"),
        (dict(model="demo-small", device="cuda:0"), "no usable NVIDIA GPU"),
        (dict(model="demo-small", device="tpu"), "Unknown device"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InputError, match=fragment):
            jobs.create_job(demo_store, **kwargs)
    with pytest.raises(InputError, match="exceed the model's context|no point fits"):
        jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[4090], outputs=[64])
    with pytest.raises(InputError, match="maximum trials"):
        jobs.create_job(demo_store, "demo-small", "cpu", settings=jobs.ProfileSettings(min_trials=5, max_trials=2))
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_a_second_job_on_a_busy_device_is_refused(demo_store: Store):
    first = jobs.create_job(demo_store, "demo-small", "cpu", settings=FAST)
    demo_store.execute("UPDATE profiling_jobs SET status = 'running', pid = ? WHERE id = ?", [0, first.id])
    # A running job whose worker is gone is closed, not counted as busy.
    second = jobs.create_job(demo_store, "demo-large", "cpu", settings=FAST)
    assert jobs.get_job(demo_store, first.id).status == "failed"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "engine.profiling.worker",
                                "--job", str(second.id)])
    try:
        demo_store.execute("UPDATE profiling_jobs SET status = 'running', pid = ? WHERE id = ?", [sleeper.pid, second.id])
        with pytest.raises(PlannerError, match=f"job {second.id} is already running on cpu"):
            jobs.create_job(demo_store, "demo-small", "cpu", settings=FAST)
    finally:
        sleeper.kill()
        sleeper.wait()


# -- real worker processes -----------------------------------------------------------------

def wait_for(predicate, timeout_s: float = 120.0, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def trials(store: Store, job_id: int) -> int:
    return store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job_id])[0]


SLOW = jobs.ProfileSettings(min_trials=3, max_trials=3, warmup_runs=1, idle_s=0.5, cooldown_s=0.3)


def test_kill_9_mid_job_marks_it_failed_and_resume_completes(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 16], outputs=[8, 16], settings=SLOW)
    process = jobs.start_worker(demo_store, job.id)
    assert wait_for(lambda: trials(demo_store, job.id) >= 2), "the worker stored no trial in time"
    process.kill()
    assert wait_for(lambda: jobs.get_job(demo_store, job.id).status == "failed", 30)
    failed = jobs.get_job(demo_store, job.id)
    kept = trials(demo_store, job.id)
    assert "SIGKILL" in failed.reason and f"the {kept} trials" in failed.reason and kept >= 2
    jobs.resume_job(demo_store, job.id)
    process = jobs.start_worker(demo_store, job.id, watch=False)
    assert process.wait(timeout=180) == 0
    done = jobs.get_job(demo_store, job.id)
    assert done.status == "done" and trials(demo_store, job.id) == 12
    stored = demo_store.query_df("SELECT input_tokens, output_tokens, trial FROM measurements WHERE job_id = ?", [job.id])
    assert not stored.duplicated().any()  # resume added the missing trials, repeated none


def test_cancel_a_real_worker_within_seconds(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[8, 16], outputs=[8, 16], settings=SLOW)
    process = jobs.start_worker(demo_store, job.id)
    assert wait_for(lambda: trials(demo_store, job.id) >= 1)
    started = time.monotonic()
    cancelled = jobs.cancel_job(demo_store, job.id)
    assert time.monotonic() - started < 6
    assert cancelled.status == "cancelled"
    assert process.wait(timeout=10) == 0  # it stopped itself at the SIGTERM (not killed: that would be -9)
    kept = trials(demo_store, job.id)
    time.sleep(1)
    assert trials(demo_store, job.id) == kept  # nothing written after the cancel


def test_cli_profiles_both_demo_models_with_exact_counts(demo_store: Store):
    for model in ("demo-small", "demo-large"):
        result = subprocess.run(
            [sys.executable, "-m", "engine", "profile", "--model", model, "--inputs", "8,32", "--outputs", "4,8",
             "--batch-sizes", "1", "--max-trials", "3", "--idle-s", "0.5", "--warmup", "1", "--json", "--db",
             str(demo_store.path)],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["status"] == "done" and document["points_done"] == 4
        assert document["energy_source"] == ["estimated"]
    stored = demo_store.query_df("SELECT model, input_tokens, output_tokens, energy_j, energy_source FROM measurements")
    assert set(stored.model) == {"demo-small", "demo-large"}
    assert set(zip(stored.input_tokens, stored.output_tokens)) == {(8, 4), (8, 8), (32, 4), (32, 8)}
    assert (stored.energy_j > 0).all() and (stored.energy_source == "estimated").all()


def test_cli_profile_bad_input_exits_2(demo_store: Store):
    result = subprocess.run([sys.executable, "-m", "engine", "profile", "--model", "demo-small", "--device", "cuda:3",
                             "--inputs", "8,-1", "--db", str(demo_store.path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert "--inputs" in result.stderr and "Traceback" not in result.stderr


def test_a_fixed_trial_count_is_not_called_unconverged():
    from engine.profiling.stopping import point_outcome

    swinging = [1.0, 3.0, 1.0]
    fixed = point_outcome(8, 8, swinging, [None] * 3, StopRule(min_trials=3, max_trials=3))
    capped = point_outcome(8, 8, swinging, [None] * 3, StopRule(min_trials=2, max_trials=3))
    assert (fixed.stopped, fixed.unconverged, fixed.converged) == ("fixed-trials", False, False)
    assert (capped.stopped, capped.unconverged) == ("max-trials", True)
    assert fixed.runtime_ci_rel == capped.runtime_ci_rel > 1.0
