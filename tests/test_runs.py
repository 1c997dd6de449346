"""engine/runs: the lifecycle of a long run against real worker processes, the busy rule
across profiling jobs and executions, and how a worker process is recognised.

The worker here is tests/run_worker.py: the profiling worker with a backend that answers
in milliseconds, so a real process is started, killed and resumed in seconds. Stand-ins
for other workers are sleeping processes whose command line ends like a worker's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import catalog, runs
from engine.errors import InputError, PlannerError
from engine.execution import create_execution, get_execution, import_schedule
from engine.profiling import jobs
from engine.runs.local import LocalProcessLauncher
from engine.store import Store
from tests import run_worker

KIND = run_worker.KIND
# 4 points x 3 trials, with a pause after each trial so the test can kill the worker part-way.
SETTINGS = jobs.ProfileSettings(min_trials=3, max_trials=3, warmup_runs=1, idle_s=0.5, cooldown_s=0.15)
TOTAL_TRIALS = 12


@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


def new_job(store: Store) -> int:
    return jobs.create_job(store, "demo-small", "cpu", "custom", inputs=[8, 16], outputs=[8, 16],
                           settings=SETTINGS).id


def trials(store: Store, job_id: int) -> int:
    return store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job_id])[0]


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def look_alike(module: str, flag: str, run_id: int, seconds: int = 60) -> subprocess.Popen:
    """A sleeping process whose command line ends like the worker of a run: ``module ... flag run_id``."""
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})", module, flag, str(run_id)])


def mark_running(store: Store, kind: runs.RunKind, run_id: int, pid: int) -> None:
    store.execute(f"UPDATE {kind.table} SET status = 'running', pid = ? WHERE id = ?", [pid, run_id])


@pytest.fixture
def processes():
    """Processes a test starts; each is ended afterwards, by its own pid."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


# -- the lifecycle against a real worker -------------------------------------------------------------

def test_a_worker_runs_its_job_to_the_end(demo_store: Store, processes):
    job_id = new_job(demo_store)
    handle = runs.start(demo_store, KIND, job_id, watch=False)
    processes.append(handle)
    assert handle.wait(timeout=60) == 0
    job = jobs.get_job(demo_store, job_id)
    assert (job.status, job.points_done, job.reason) == ("done", 4, None)
    assert trials(demo_store, job_id) == TOTAL_TRIALS
    assert demo_store.query_one(f"SELECT pid FROM {KIND.table} WHERE id = ?", [job_id])[0] == handle.pid
    assert runs.worker_log_path(demo_store, KIND, job_id).read_text().count("point ") == 4  # its progress lines


def test_a_killed_worker_is_found_by_reconcile_and_resume_runs_only_what_is_left(demo_store: Store, processes):
    job_id = new_job(demo_store)
    handle = runs.start(demo_store, KIND, job_id, watch=False)  # nobody watches: only reconcile can notice
    processes.append(handle)
    assert wait_for(lambda: trials(demo_store, job_id) >= 2), "the worker stored no two trials in time"
    handle.kill()
    assert handle.wait() == -9
    kept = demo_store.query_df("SELECT id, input_tokens, output_tokens, trial, started_at FROM measurements "
                               "WHERE job_id = ? ORDER BY id", [job_id])
    assert 2 <= len(kept) < TOTAL_TRIALS
    assert jobs.get_job(demo_store, job_id).status == "running"  # nothing noticed yet

    runs.reconcile(demo_store, (KIND,))
    failed = jobs.get_job(demo_store, job_id)
    assert failed.status == "failed" and failed.finished_at is not None
    assert f"the worker process {handle.pid} ended unexpectedly" in failed.reason
    assert f"the {len(kept)} trials measured so far are stored" in failed.reason
    assert trials(demo_store, job_id) == len(kept)

    runs.check_resumable(demo_store, KIND, job_id)
    runs.requeue(demo_store, KIND, job_id)
    assert jobs.get_job(demo_store, job_id).status == "queued"
    handle = runs.start(demo_store, KIND, job_id, watch=False)
    processes.append(handle)
    assert handle.wait(timeout=60) == 0
    assert jobs.get_job(demo_store, job_id).status == "done"
    stored = demo_store.query_df("SELECT id, input_tokens, output_tokens, trial, started_at FROM measurements "
                                 "WHERE job_id = ? ORDER BY id", [job_id])
    assert len(stored) == TOTAL_TRIALS
    assert not stored[["input_tokens", "output_tokens", "trial"]].duplicated().any()  # nothing ran twice
    assert stored.head(len(kept)).equals(kept)  # what ran before the kill was kept as it was


def test_a_watched_worker_killed_is_closed_with_its_signal(demo_store: Store, processes):
    job_id = new_job(demo_store)
    handle = runs.start(demo_store, KIND, job_id)  # watched by a thread of this process
    processes.append(handle)
    assert wait_for(lambda: trials(demo_store, job_id) >= 1)
    handle.kill()
    assert wait_for(lambda: jobs.get_job(demo_store, job_id).status == "failed", 10)
    reason = jobs.get_job(demo_store, job_id).reason
    assert reason.startswith("the worker process was killed (SIGKILL); after ") and "of 4 points" in reason


def test_cancel_stops_a_real_worker_and_keeps_what_it_stored(demo_store: Store, processes):
    job_id = new_job(demo_store)
    handle = runs.start(demo_store, KIND, job_id)
    processes.append(handle)
    assert wait_for(lambda: trials(demo_store, job_id) >= 1)
    started = time.monotonic()
    runs.cancel(demo_store, KIND, job_id, grace_s=5)
    assert time.monotonic() - started < 5
    assert handle.wait(timeout=5) == 0  # SIGTERM: the worker closed its job itself
    kept = trials(demo_store, job_id)
    job = jobs.get_job(demo_store, job_id)
    assert (job.status, job.reason) == ("cancelled", f"cancelled; {kept} trials stored")
    time.sleep(0.5)
    assert trials(demo_store, job_id) == kept
    with pytest.raises(InputError, match=f"profiling job {job_id} is cancelled, not running"):
        runs.cancel(demo_store, KIND, job_id, grace_s=1)


# -- a pid that is not our worker ----------------------------------------------------------------

def test_a_stale_pid_of_another_live_process_is_not_taken_for_the_worker(demo_store: Store, processes):
    stranger = subprocess.Popen(["sleep", "60"])
    processes.append(stranger)
    first = new_job(demo_store)
    mark_running(demo_store, runs.PROFILING, first, stranger.pid)
    runs.reconcile(demo_store)
    closed = jobs.get_job(demo_store, first)
    assert closed.status == "failed" and f"the worker process {stranger.pid} ended unexpectedly" in closed.reason

    second = new_job(demo_store)
    mark_running(demo_store, runs.PROFILING, second, stranger.pid)
    runs.cancel(demo_store, runs.PROFILING, second, grace_s=1)
    assert jobs.get_job(demo_store, second).status == "cancelled"
    assert stranger.poll() is None  # the stranger was not signalled


def test_the_id_must_be_the_last_argument_exactly(processes):
    launcher = LocalProcessLauncher()
    twelve = look_alike("engine.profiling.worker", "--job", 12)
    processes.append(twelve)
    assert wait_for(lambda: launcher.is_alive(runs.PROFILING, 12, twelve.pid), 10)
    assert not launcher.is_alive(runs.PROFILING, 1, twelve.pid)  # job 1 is not job 12
    assert not launcher.is_alive(runs.EXECUTION, 12, twelve.pid)  # nor is execution 12
    launcher.stop(runs.PROFILING, 1, twelve.pid, grace_s=0.5)
    assert twelve.poll() is None  # stopping job 1 left job 12's worker alone
    launcher.stop(runs.PROFILING, 12, twelve.pid, grace_s=2)
    assert twelve.wait(timeout=5) == -15  # SIGTERM ended it
    assert not launcher.is_alive(runs.PROFILING, 12, twelve.pid)
    assert not launcher.is_alive(runs.PROFILING, 12, None)


def test_a_queued_run_without_a_worker_is_given_time_then_closed(demo_store: Store):
    job_id = new_job(demo_store)
    runs.reconcile(demo_store)
    assert jobs.get_job(demo_store, job_id).status == "queued"
    demo_store.execute("UPDATE profiling_jobs SET created_at = current_timestamp - INTERVAL 5 MINUTE WHERE id = ?",
                       [job_id])
    runs.reconcile(demo_store)
    job = jobs.get_job(demo_store, job_id)
    assert job.status == "failed" and job.reason.startswith("no worker process was started; after 0 of 4 points")


# -- one run per device, whatever its kind -----------------------------------------------------------

def schedule_on_cpu(store: Store, tmp_path: Path) -> int:
    path = tmp_path / "schedule.csv"
    path.write_text("id,model,device,input_tokens,output_tokens\nq1,demo-small,cpu,8,2\n", encoding="utf-8")
    return import_schedule(store, path)


def test_a_profiling_job_on_the_cpu_makes_an_execution_there_refuse(demo_store: Store, tmp_path: Path, processes):
    plan_id = schedule_on_cpu(demo_store, tmp_path)
    job_id = new_job(demo_store)
    worker = look_alike("engine.profiling.worker", "--job", job_id)
    processes.append(worker)
    mark_running(demo_store, runs.PROFILING, job_id, worker.pid)
    assert wait_for(lambda: runs.run_on_device(demo_store, "cpu") == runs.BusyRun(runs.PROFILING, job_id), 10)
    with pytest.raises(InputError, match=f"profiling job {job_id} is running on cpu"):
        create_execution(demo_store, plan_id)
    assert demo_store.query_one("SELECT count(*) FROM executions")[0] == 0
    assert runs.run_on_device(demo_store, "cuda:0") is None


def test_an_execution_on_the_cpu_makes_a_profiling_job_there_refuse(demo_store: Store, tmp_path: Path, processes):
    execution = create_execution(demo_store, schedule_on_cpu(demo_store, tmp_path))
    worker = look_alike("engine.execution.worker", "--execution", execution.id)
    processes.append(worker)
    mark_running(demo_store, runs.EXECUTION, execution.id, worker.pid)
    assert wait_for(lambda: runs.run_on_device(demo_store, "cpu") == runs.BusyRun(runs.EXECUTION, execution.id), 10)
    with pytest.raises(PlannerError, match=f"Execution {execution.id} is already running on cpu"):
        new_job(demo_store)
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0
    # Its worker gone, the execution is closed and the device is free again.
    worker.kill()
    worker.wait()
    assert runs.run_on_device(demo_store, "cpu") is None
    assert get_execution(demo_store, execution.id).status == "failed"
    assert new_job(demo_store) > 0


def test_the_device_lock_is_held_by_one_run_at_a_time(store: Store):
    with runs.device_lock(store, "cpu"):
        with pytest.raises(PlannerError, match="another run holds cpu on this host"):
            with runs.device_lock(store, "cpu"):
                pass
        with runs.device_lock(store, "cuda:0"):  # another device is another lock
            pass
    with runs.device_lock(store, "cpu"):  # released
        pass


def test_check_device():
    assert runs.check_device("cpu") == "cpu"
    assert runs.check_device("CPU") == "cpu"
    with pytest.raises(PlannerError, match="NVIDIA GPU"):  # no host here has a hundred GPUs
        runs.check_device("cuda:99")
    with pytest.raises(PlannerError, match="Unknown device"):
        runs.check_device("tpu")
