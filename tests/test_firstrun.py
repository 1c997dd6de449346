"""engine/firstrun: its state in the database, how a dead first run is noticed, and its refusals.

A first run's process is recognised like a worker: by its module and its last arguments
(``--db`` and this database's path). Stand-ins are sleeping processes whose command line
ends that way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from engine import catalog, firstrun, runs
from engine.errors import PlannerError
from engine.execution import create_execution, import_schedule
from engine.firstrun import FirstRunState, read_state, start_first_run, write_state
from engine.store import Store


@pytest.fixture
def processes():
    """Processes a test starts; each is ended afterwards, by its own pid."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def look_alike(arguments: list[str]) -> subprocess.Popen:
    """A sleeping process whose command line ends with ``arguments``."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *arguments])


def first_run_of(store: Store, processes: list) -> subprocess.Popen:
    """A stand-in for the first run of this database, recorded as running."""
    process = look_alike([firstrun.MODULE, "--db", str(store.path.resolve())])
    processes.append(process)
    write_state(store, FirstRunState("running", "profiling demo-small (job 1)", pid=process.pid, started=time.time()))
    return process


def stored_state(store: Store) -> dict:
    return json.loads(store.query_one("SELECT value FROM settings WHERE key = ?", [firstrun.STATE_KEY])[0])


def test_no_state_before_a_first_run(store: Store):
    assert read_state(store) is None


def test_state_is_written_and_read_back(store: Store):
    state = FirstRunState("done", "done", pid=None, jobs={"demo-small": 1, "demo-large": 2}, started=10.0,
                          finished=70.5)
    write_state(store, state)
    assert read_state(store) == state
    state.status, state.reason = "failed", "profiling demo-large failed"
    write_state(store, state)  # replaces, never adds a second row
    assert read_state(store).reason == "profiling demo-large failed"
    assert store.query_one("SELECT count(*) FROM settings WHERE key = ?", [firstrun.STATE_KEY])[0] == 1


def test_a_live_first_run_is_reported_running(store: Store, processes):
    first_run_of(store, processes)
    time.sleep(0.2)  # let the stand-in's command line be in place
    assert read_state(store).status == "running"
    assert stored_state(store)["status"] == "running"


def test_a_dead_first_run_is_reported_failed_and_the_failure_stored(store: Store):
    ended = subprocess.Popen(["true"])
    ended.wait()
    write_state(store, FirstRunState("running", "fitting", pid=ended.pid, started=time.time()))
    state = read_state(store)
    assert state.status == "failed" and "ended unexpectedly" in state.reason
    assert stored_state(store)["status"] == "failed"


@pytest.mark.parametrize("arguments", [["sleep-of-some-other-program"],
                                       [firstrun.MODULE, "--db", "/elsewhere/another.duckdb"]])
def test_a_pid_now_of_another_process_is_not_taken_for_the_first_run(store: Store, processes, arguments):
    # A live process holds the recorded pid: a stranger, or the first run of another database.
    stranger = look_alike(arguments)
    processes.append(stranger)
    write_state(store, FirstRunState("running", "fitting", pid=stranger.pid, started=time.time()))
    time.sleep(0.2)
    assert read_state(store).status == "failed"
    assert stranger.poll() is None  # noticed, not touched


def test_start_is_refused_while_a_first_run_is_going(store: Store, demo_models, processes):
    catalog.register_demo_models(store, list(demo_models.values()))
    first_run_of(store, processes)
    time.sleep(0.2)
    with pytest.raises(PlannerError, match="already going"):
        start_first_run(store)
    assert store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_start_is_refused_without_demo_models(store: Store):
    catalog.add_model(store, name="mine", accuracy=0.5)  # a model, but not a demo one
    with pytest.raises(PlannerError, match="no demo models in the catalog"):
        start_first_run(store)
    assert read_state(store) is None  # nothing started, nothing recorded


def test_the_first_run_refuses_a_cpu_that_an_execution_holds(store: Store, demo_models, tmp_path, processes):
    catalog.register_demo_models(store, list(demo_models.values()))
    schedule = tmp_path / "schedule.csv"
    schedule.write_text("id,model,device,input_tokens,output_tokens\nq1,demo-small,cpu,8,2\n", encoding="utf-8")
    execution = create_execution(store, import_schedule(store, schedule))
    worker = look_alike(["engine.execution.worker", "--execution", str(execution.id)])
    processes.append(worker)
    store.execute("UPDATE executions SET status = 'running', pid = ? WHERE id = ?", [worker.pid, execution.id])
    time.sleep(0.2)
    assert runs.run_on_device(store, "cpu") == runs.BusyRun(runs.EXECUTION, execution.id)
    with pytest.raises(PlannerError, match=f"execution {execution.id} is running on cpu"):
        firstrun.run_first_run(store, pid=0)
    assert store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0  # no job was started beside it


def test_each_job_gets_an_equal_share_of_the_time_left():
    share = firstrun.job_budget_s(firstrun.FIRST_RUN_BUDGET_S, 2)
    assert share == pytest.approx((firstrun.FIRST_RUN_BUDGET_S - firstrun.FIT_RESERVE_S) / 2 - firstrun.WORKER_START_S,
                                  abs=0.1)
    assert 2 * (share + firstrun.WORKER_START_S) + firstrun.FIT_RESERVE_S <= firstrun.FIRST_RUN_BUDGET_S + 0.1
    assert firstrun.job_budget_s(80.0, 1) > share  # the last model gets what the first left
    assert firstrun.job_budget_s(0.0, 1) == 10.0   # never below the smallest budget a job takes


def test_the_first_run_profiles_adaptively_within_its_budget_and_reports_the_error_reached(store: Store, demo_models,
                                                                                         monkeypatch):
    from engine.profiling import jobs, worker
    from tests.test_profiling_adaptive import SimBackend, SimClock, sim_meter

    catalog.register_demo_models(store, list(demo_models.values()))
    clock = SimClock()

    class InProcess:
        """Runs the job here, against the simulated backend, instead of starting its worker."""

        def __init__(self, store, job_id, watch=True):
            worker.run_job(store, jobs.get_job(store, job_id), clock=clock, meter_factory=sim_meter(clock),
                           backend_factory=lambda *a, **k: SimBackend(clock, noise=lambda i, o: 0.1))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(jobs, "start_worker", InProcess)
    state = firstrun.run_first_run(store, pid=0, budget_s=200.0)  # simulated seconds, mostly
    assert state.status == "done" and set(state.jobs) == {"demo-small", "demo-large"}
    made = [jobs.get_job(store, job_id) for job_id in state.jobs.values()]
    assert all(job.design.kind == "adaptive" and job.status == "done" for job in made)
    assert firstrun.job_budget_s(150.0, 2) <= made[0].settings.budget_s <= firstrun.job_budget_s(200.0, 2)
    assert made[1].settings.budget_s <= 200.0 - firstrun.FIT_RESERVE_S - firstrun.WORKER_START_S
    report = firstrun.first_run_report(store).set_index("model")
    assert set(report.index) == {"demo-small", "demo-large"}
    assert report.energy_cv_mape.notna().all() and report.runtime_cv_mape.notna().all()
    assert (report.energy_noise_mape > 0).all() and report.job_reason.str.contains("adaptive design").all()
    assert (report.trials >= 9).all() and (report.points >= 9).all()
    assert state.load_at_start is not None and state.load_at_end is not None


# -- the batching step -------------------------------------------------------------------------------

def test_the_batching_step_is_told_apart_from_the_first_run_and_neither_starts_while_the_other_goes(
        store: Store, demo_models, processes):
    catalog.register_demo_models(store, list(demo_models.values()))
    first_run_of(store, processes)
    time.sleep(0.2)
    with pytest.raises(PlannerError, match="The first run is already going"):
        start_first_run(store, batching=True)
    # The first run's process is not the batching step's: a batching state naming it reads as failed.
    write_state(store, FirstRunState("running", "fitting", pid=processes[0].pid, started=time.time()),
                firstrun.BATCHING_KEY)
    assert read_state(store, firstrun.BATCHING_KEY).status == "failed"
    assert "measuring batching ended unexpectedly" in read_state(store, firstrun.BATCHING_KEY).reason
    assert read_state(store).status == "running"  # the first run's own state is untouched
    # A batching step's look-alike (its flag last) counts as running, and stops a first run from starting.
    batching = look_alike([firstrun.MODULE, "--db", str(store.path.resolve()), firstrun.BATCHING_FLAG])
    processes.append(batching)
    processes[0].kill()
    write_state(store, FirstRunState("running", "profiling", pid=batching.pid, started=time.time()),
                firstrun.BATCHING_KEY)
    time.sleep(0.2)
    assert read_state(store, firstrun.BATCHING_KEY).status == "running" and read_state(store).status == "failed"
    with pytest.raises(PlannerError, match="Measuring batching is already going"):
        start_first_run(store)
    assert store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_the_batching_step_profiles_the_batch_design_and_fits_a_batch_axis(store: Store, demo_models, monkeypatch):
    from engine.profiling import jobs, worker
    from tests.test_profiling import replay_meter
    from tests.test_profiling_batch import FakeBatchBackend

    catalog.register_demo_models(store, list(demo_models.values()))

    class InProcess:
        """Runs the job here, against a fake batching backend, instead of starting its worker."""

        def __init__(self, store, job_id, watch=True):
            worker.run_job(store, jobs.get_job(store, job_id), backend_factory=FakeBatchBackend,
                           meter_factory=replay_meter)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(jobs, "start_worker", InProcess)
    assert firstrun.batching_estimate_s(store) is None  # nothing measured yet to go by
    assert not firstrun.demo_fits_batched(store)
    state = firstrun.run_batching_step(store, pid=0)
    assert state.status == "done" and set(state.jobs) == {"demo-small", "demo-large"}
    assert read_state(store, firstrun.BATCHING_KEY) == state and read_state(store) is None
    for job_id in state.jobs.values():
        job = jobs.get_job(store, job_id)
        assert job.status == "done" and job.design.batch_sizes == firstrun.BATCHING_SIZES
        assert {(p.input_tokens, p.output_tokens) for p in job.design.points} == {
            (i, o) for i in firstrun.BATCHING_INPUTS for o in firstrun.BATCHING_OUTPUTS}
        assert job.settings.min_trials == job.settings.max_trials == firstrun.BATCHING_SETTINGS["max_trials"]
    stored = store.query_df("SELECT model, batch_size, count(*) AS n FROM measurements GROUP BY ALL")
    assert set(stored.batch_size) == set(firstrun.BATCHING_SIZES) and (stored.n == 4 * 2).all()
    report = firstrun.batching_report(store).set_index("model")
    assert set(report.index) == {"demo-small", "demo-large"}
    assert all(sizes == (1, 16) for sizes in report.batch_sizes) and report.energy_cv_mape.notna().all()
    assert {model: set(fits) for model, fits in state.fits.items()} == {
        "demo-small": {"energy", "runtime"}, "demo-large": {"energy", "runtime"}}
    # Now there are batches to go by: the estimate is a figure; and the demo fits batch already.
    assert firstrun.batching_estimate_s(store) > 0
    assert firstrun.demo_fits_batched(store)
