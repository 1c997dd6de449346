"""engine/execution: the worker against fake backends and a replay meter, executions' states,
schedules imported from CSV, predicted against measured, learned output lengths, executed
queries in refits, a real worker killed and resumed on the demo models, and the CLI.

Expectations are derived from the schedule itself (run order, counts, predictions) or
computed by hand (the comparison's arithmetic is in the comments).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog, cli
from engine.backends.base import GenerationResult, TextResult
from engine.energy import EnergyMeter, ReplayMeter
from engine.energy.load_cost import WARMUP_RUNS, WARMUP_SHAPE, stored_load_costs
from engine.errors import InputError, ModelLoadError, PlannerError
from engine.execution import (
    cancel_execution,
    compare,
    create_execution,
    execution_progress,
    execution_results,
    get_execution,
    import_schedule,
    learned_output_lengths,
    plan_queries,
    reconcile_executions,
    resume_execution,
    start_worker,
)
from engine.execution.worker import ExecutionCancelled, ResultSink, queries_left, run_devices, run_execution
from engine.fitting import fit_all, save_fits
from engine.planning import PlanSettings, plan_workload, workload_from_frame
from engine.runs import host_name
from engine.store import Store, append_frame

#: The demo models' files, as the fake backends see them, and the catalog names they stand for.
MODEL_OF_FILE = {"demo-small-hf": "demo-small", "demo-large.gguf": "demo-large"}
IDLE_S = 0.02


# -- fakes ---------------------------------------------------------------------------------------

class FakeHost:
    """Backends that answer at once and log every call, shared across devices (threads).

    ``fail`` maps a request (its input_tokens, or its prompt) to the exception to raise;
    ``stop`` is set once ``stop_after`` requests were answered, as SIGTERM would mid-run;
    the ``broken`` model fails to load. Warm-up requests (of WARMUP_SHAPE, after each load)
    are logged apart, in ``warmups``.
    """

    def __init__(self, fail: dict | None = None, stop: threading.Event | None = None, stop_after: int | None = None,
                 broken: str | None = None):
        self.fail, self.broken = fail or {}, broken
        self.stop, self.stop_after = stop, stop_after
        self.loads: list[tuple[str, str]] = []  # (device, model)
        self.requests: list[tuple] = []  # (device, model, kind, first, max_or_output)
        self.closed: list[tuple[str, str]] = []
        self.warmups: list[tuple[str, str]] = []  # (device, model)
        self.answered = 0
        self._lock = threading.Lock()

    def backend(self, backend: str, path, device: str = "cpu", **options) -> "FakeBackend":
        return FakeBackend(self, MODEL_OF_FILE[Path(path).name], device)

    def request(self, backend: "FakeBackend", kind: str, first, second) -> None:
        if kind == "tokens" and (first, second) == WARMUP_SHAPE:
            with self._lock:
                self.warmups.append((backend.device, backend.model))
            return
        with self._lock:
            self.requests.append((backend.device, backend.model, kind, first, second))
        failure = self.fail.get(first)
        if failure is not None:
            raise failure
        time.sleep(0.002)  # so that the replayed power gives every query some energy
        with self._lock:
            self.answered += 1
            if self.stop is not None and self.answered == self.stop_after:
                self.stop.set()

    def order(self, device: str) -> list:
        """The requests' first argument (input tokens or prompt) on ``device``, in the order they ran."""
        return [r[3] for r in self.requests if r[0] == device]


class FakeBackend:
    name = "fake"

    def __init__(self, host: FakeHost, model: str, device: str):
        self.host, self.model, self.device = host, model, device

    def load(self) -> None:
        self.host.loads.append((self.device, self.model))
        if self.model == self.host.broken:
            raise ModelLoadError(f"{self.model}: the weights are truncated")

    def close(self) -> None:
        self.host.closed.append((self.device, self.model))

    @property
    def settings(self) -> dict:
        return {"backend": "fake", "device": self.device}

    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        self.host.request(self, "tokens", input_tokens, output_tokens)
        return GenerationResult(input_tokens, output_tokens, 0.001 * output_tokens, None)

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        """The answer is the prompt's words backwards, one token a word, cut at the cap."""
        self.host.request(self, "text", prompt, max_output_tokens)
        words = prompt.split()[::-1][:max_output_tokens]
        stopped = "output cap" if len(words) == max_output_tokens else "end of answer"
        return TextResult(" ".join(words), len(prompt.split()) + 1, len(words), 0.001 * len(words), stopped)


def replay_meter(device: str) -> EnergyMeter:
    """The CPU's energy is estimated (10 W); a GPU's replays NVML counters (200 W), so it is measured."""
    if device == "cpu":
        return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="estimated: replay at 10 W")])
    return EnergyMeter([ReplayMeter(device, "gpu", 200.0)])


def run(store: Store, execution_id: int, host: FakeHost, stop: threading.Event | None = None) -> None:
    run_execution(store, execution_id, stop or threading.Event(), backend_factory=host.backend,
                  meter_factory=replay_meter, idle_s=IDLE_S)


# -- fixtures: the demo models in the catalog, with fits on the CPU --------------------------------

def synthetic_measurements(model: str, scale: float) -> pd.DataFrame:
    rows = []
    for i in (8, 32, 128):
        for o in (4, 16, 64):
            for trial, wobble in enumerate((0.98, 1.0, 1.02), start=1):
                runtime = scale * (0.01 + 0.0001 * i + 0.005 * o) * wobble
                rows.append({"origin": "imported", "model": model, "device": "cpu", "input_tokens": i,
                             "output_tokens": o, "runtime_s": runtime, "energy_j": 20 * runtime,
                             "energy_source": "estimated", "trial": trial})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fitted_db(tmp_path_factory, demo_models) -> Path:
    """A database file with both demo models, 27 imported trials each on cpu, and their fits (built once)."""
    path = tmp_path_factory.mktemp("fitted") / "planner.duckdb"
    store = Store(path)
    catalog.register_demo_models(store, list(demo_models.values()))
    with store.transaction() as con:
        append_frame(con, "measurements", pd.concat([synthetic_measurements("demo-small", 1.0),
                                                     synthetic_measurements("demo-large", 3.0)]))
    save_fits(store, fit_all(store))
    return path


@pytest.fixture
def fitted_store(fitted_db: Path, isolated_db: Path) -> Store:
    for suffix in ("", ".wal"):
        if Path(f"{fitted_db}{suffix}").exists():
            shutil.copy(f"{fitted_db}{suffix}", f"{isolated_db}{suffix}")
    return Store(isolated_db)


def words_counter(entry):
    """A tokenizer stand-in for planning: one token a word plus BOS (as the fake backends count)."""
    return lambda prompts: np.array([len(p.split()) + 1 for p in prompts])


def write_schedule(path: Path, rows: list[str]) -> Path:
    path.write_text("id,model,device,input_tokens,output_tokens,predicted_energy_j,predicted_runtime_s,"
                    "device_start_s\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def queue_execution(store: Store, plan_id: int, devices: list[str]) -> int:
    """An execution row as create_execution writes it, for devices this host lacks (the fakes run them)."""
    with store.connect() as con:
        return int(con.execute(
            "INSERT INTO executions (plan_id, host, status, queries_total, queries_done, settings) VALUES "
            "(?, ?, 'queued', (SELECT count(*) FROM plan_assignments WHERE plan_id = ?), 0, ?) RETURNING id",
            [plan_id, host_name(), plan_id, json.dumps({"devices": devices})]).fetchone()[0])


# The two models alternate on the cpu; the file's order is neither the schedule's nor the run's.
CPU_SCHEDULE = [
    "c3,demo-small,cpu,30,3,3.0,0.3,2.0",
    "c1,demo-large,cpu,10,1,1.0,0.1,0.0",
    "c2,demo-small,cpu,20,2,2.0,0.2,1.0",
    "c4,demo-large,cpu,40,4,4.0,0.4,3.0",
    "c5,demo-small,cpu,50,5,5.0,0.5,4.0",
]


# -- the worker, in-process, against fakes ----------------------------------------------------------

def test_queries_run_in_schedule_order_grouped_by_model_each_model_loaded_once(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", CPU_SCHEDULE))
    execution = create_execution(fitted_store, plan_id)
    host = FakeHost()
    run(fitted_store, execution.id, host)

    # The schedule is c1(L) c2(S) c3(S) c4(L) c5(S): grouped by model in order of first use.
    assert host.order("cpu") == [10, 40, 20, 30, 50]
    assert host.loads == [("cpu", "demo-large"), ("cpu", "demo-small")]
    assert host.closed == host.loads
    # After each load, discarded warm-ups as in profiling: no query runs cold.
    assert host.warmups == [("cpu", "demo-large")] * WARMUP_RUNS + [("cpu", "demo-small")] * WARMUP_RUNS
    # Token-only queries run through generate with exactly the planned counts.
    assert [(r[2], r[3], r[4]) for r in host.requests] == [("tokens", 10 * k, k) for k in (1, 4, 2, 3, 5)]

    assert get_execution(fitted_store, execution.id).status == "done"
    results = execution_results(fitted_store, execution.id)
    assert list(results.id) == ["c1", "c2", "c3", "c4", "c5"]  # listed in schedule order
    assert (results.prompt_kind == "tokens").all() and (results.stopped == "output cap").all()
    assert (results.input_tokens == results.planned_input_tokens).all()
    assert list(results.output_tokens) == [1, 2, 3, 4, 5]
    assert list(results.predicted_energy_j) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert results.error.isna().all() and (results.energy_j > 0).all()
    assert (results.energy_source == "estimated").all() and results.energy_method.str.contains("replay").all()
    assert np.allclose(results.idle_power_w, 10.0)  # the replayed idle baseline
    assert (results.predicted_energy_uncertainty_j > 0).all()  # the 90% band of the current fits

    measured = fitted_store.query_df(
        "SELECT m.origin, m.model, m.device, m.input_tokens, m.output_tokens, m.energy_j, m.library_versions "
        "FROM execution_results r JOIN measurements m ON m.id = r.measurement_id WHERE r.execution_id = ? "
        "ORDER BY r.device, r.position", [execution.id])
    assert len(measured) == 5 and (measured.origin == "executed").all()
    assert list(measured.energy_j) == list(results.energy_j)
    assert list(measured.output_tokens) == list(results.output_tokens)
    assert list(measured.model) == list(results.model)
    assert json.loads(measured.library_versions[0])["execution_id"] == execution.id
    # The load and warm-up were measured, and are the planner's load cost of each model on the device.
    load = json.loads(measured.library_versions[0])["load"]
    assert load["warmup_runs"] == WARMUP_RUNS and load["load_energy_j"] > 0 and load["warmup_energy_j"] > 0
    costs = stored_load_costs(fitted_store)
    assert set(costs) >= {"demo-small@cpu", "demo-large@cpu"}
    seconds, joules = costs["demo-large@cpu"]
    assert seconds == pytest.approx(load["load_s"] + load["warmup_s"]) and joules > 0
    progress = execution_progress(fitted_store, execution.id)
    assert (progress.done, progress.total) == (5, 5) and progress.energy_estimated
    assert progress.predicted_total_j == pytest.approx(15.0)
    assert get_execution(fitted_store, execution.id).queries_done == 5


def test_a_gpu_query_is_measured_and_has_no_band_without_a_fit(fitted_store: Store, tmp_path: Path):
    # This host has no GPU, so the schedule is stored without the host's checks and the execution
    # is queued by hand; the fakes stand in for the GPU.
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", [
        "g2,demo-large,cuda:0,21,2,2.1,0.2,1.0", "g1,demo-large,cuda:0,11,1,1.1,0.1,0.0"]), runnable_here=False)
    execution_id = queue_execution(fitted_store, plan_id, ["cuda:0"])
    host = FakeHost()
    run(fitted_store, execution_id, host)
    assert host.order("cuda:0") == [11, 21] and host.loads == [("cuda:0", "demo-large")]
    results = execution_results(fitted_store, execution_id)
    assert list(results.id) == ["g1", "g2"] and (results.energy_source == "measured").all()
    assert results.predicted_energy_uncertainty_j.isna().all()  # no fit of demo-large on cuda:0


def test_two_devices_run_in_parallel_to_the_end(fitted_store: Store, tmp_path: Path):
    rows = [f"c{i:02d},demo-small,cpu,{10 + i},2,1,0.1,{i}" for i in range(10)] + \
        [f"g{i:02d},demo-large,cuda:0,{10 + i},2,1,0.1,{i}" for i in range(10)]
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", rows), runnable_here=False)
    execution_id = queue_execution(fitted_store, plan_id, ["cpu", "cuda:0"])
    host = FakeHost()
    run(fitted_store, execution_id, host)
    assert host.order("cpu") == host.order("cuda:0") == list(range(10, 20))
    assert sorted(host.loads) == [("cpu", "demo-small"), ("cuda:0", "demo-large")]
    assert len(execution_results(fitted_store, execution_id)) == 20
    assert get_execution(fitted_store, execution_id).status == "done"


def prompt_plan(store: Store) -> int:
    """A planned workload of prompts (with categories) and token-only queries; returns the plan id."""
    frame = pd.DataFrame({
        "id": ["p1", "p2", "p3", "t1", "t2"],
        "prompt": ["one two three four five six", "alpha beta gamma", "a b c d e f g h", None, None],
        "input_tokens": [None, None, None, 24, 48],
        "output_tokens": [4, 20, 8, 6, 3],
        "category": ["chat", "chat", "code", None, None],
    })
    result = plan_workload(store, workload_from_frame(frame, "mixed"), PlanSettings(accuracy_target=0.5),
                           tokenizer_factory=words_counter)
    assert result.status == "optimal"
    return result.plan_id


def test_prompts_are_answered_capped_at_the_planned_output_and_stored_with_their_text(fitted_store: Store):
    plan_id = prompt_plan(fitted_store)
    planned = plan_queries(fitted_store, plan_id).set_index("query_id")
    execution = create_execution(fitted_store, plan_id)
    assert (execution.status, execution.queries_total) == ("queued", 5)
    host = FakeHost()
    run(fitted_store, execution.id, host)

    calls = {r[3]: r for r in host.requests}
    assert calls["one two three four five six"][2:] == ("text", "one two three four five six", 4)
    assert calls["alpha beta gamma"][2:] == ("text", "alpha beta gamma", 20)
    assert calls[24][2:] == ("tokens", 24, 6)
    assert calls[48][2:] == ("tokens", 48, 3)
    assert sorted(host.loads) == sorted({("cpu", m) for m in planned.model})

    results = execution_results(fitted_store, execution.id).set_index("id")
    assert results.loc["p1", "generated_text"] == "six five four three"  # cut at the planned 4 tokens
    assert (results.loc["p1", "output_tokens"], results.loc["p1", "stopped"]) == (4, "output cap")
    assert results.loc["p2", "generated_text"] == "gamma beta alpha"
    assert (results.loc["p2", "output_tokens"], results.loc["p2", "stopped"]) == (3, "end of answer")
    assert (results.loc["p2", "planned_output_tokens"], results.loc["p2", "input_tokens"]) == (20, 4)
    assert list(results.loc[["p1", "p2", "p3"], "category"]) == ["chat", "chat", "code"]
    assert list(results.prompt_kind) == ["text" if i.startswith("p") else "tokens" for i in results.index]
    assert results.loc[["t1", "t2"], "generated_text"].isna().all()
    assert np.allclose(results.predicted_energy_j, planned.loc[results.index, "predicted_energy_j"])
    assert (results.predicted_energy_uncertainty_j > 0).all()
    executed = fitted_store.query_df("SELECT * FROM measurements WHERE origin = 'executed'")
    assert len(executed) == 5 and sorted(executed.output_tokens) == [3, 3, 4, 6, 8]

    lengths = learned_output_lengths(fitted_store)
    every = lengths[lengths.category == "(all)"]
    assert every.queries.sum() == 3  # prompts only: token-count queries were forced to their length


def test_a_query_that_fails_alone_is_stored_with_its_error_and_the_run_goes_on(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", [
        "a,demo-small,cpu,10,2,1,0.1,0", "b,demo-small,cpu,20,2,1,0.1,1", "c,demo-small,cpu,30,2,1,0.1,2",
        "d,demo-small,cpu,40,2,1,0.1,3"]))
    execution = create_execution(fitted_store, plan_id)
    host = FakeHost(fail={20: MemoryError("out of memory"), 30: RuntimeError("CUDA out of memory. Tried to allocate")})
    run(fitted_store, execution.id, host)

    assert host.order("cpu") == [10, 20, 30, 40]
    assert get_execution(fitted_store, execution.id).status == "done"
    results = execution_results(fitted_store, execution.id).set_index("id")
    assert results.loc["b", "error"] == "MemoryError: out of memory"
    assert results.loc["c", "error"].startswith("RuntimeError: CUDA out of memory")
    assert results.loc[["a", "d"], "error"].isna().all() and (results.loc[["a", "d"], "energy_j"] > 0).all()
    assert (results.loc[["b", "c"], "output_tokens"] == 0).all()
    assert results.loc[["b", "c"], "energy_j"].isna().all()
    stored = fitted_store.query_df("SELECT input_tokens FROM measurements WHERE origin = 'executed' ORDER BY 1")
    assert list(stored.input_tokens) == [10, 40]  # a failed query teaches the fits nothing
    comparison = compare(execution_results(fitted_store, execution.id))
    assert (comparison.n_run, comparison.n_failed) == (2, 2)


def test_queries_done_counts_a_failed_last_query(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", [
        "a,demo-small,cpu,10,2,1,0.1,0", "b,demo-small,cpu,20,2,1,0.1,1"]))
    execution = create_execution(fitted_store, plan_id)
    run(fitted_store, execution.id, FakeHost(fail={20: MemoryError("out of memory")}))
    assert len(execution_results(fitted_store, execution.id)) == 2
    assert get_execution(fitted_store, execution.id).queries_done == 2


def test_a_model_that_cannot_load_stops_the_run_and_keeps_what_ran(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", CPU_SCHEDULE))
    execution = create_execution(fitted_store, plan_id)
    host = FakeHost(broken="demo-small")
    with pytest.raises(ModelLoadError, match="truncated"):
        run(fitted_store, execution.id, host)
    assert host.order("cpu") == [10, 40]  # demo-large's queries ran before demo-small failed to load
    assert sorted(execution_results(fitted_store, execution.id).id) == ["c1", "c4"]
    assert ("cpu", "demo-large") in host.closed


def test_stop_after_k_queries_keeps_them_and_resume_runs_only_the_rest(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv",
                                                            CPU_SCHEDULE))
    execution = create_execution(fitted_store, plan_id)
    stop = threading.Event()
    first = FakeHost(stop=stop, stop_after=3)
    with pytest.raises(ExecutionCancelled):
        run(fitted_store, execution.id, first, stop)
    stored = execution_results(fitted_store, execution.id)
    assert first.order("cpu") == [10, 40, 20]  # the run order stopped after its third query
    assert sorted(stored.id) == ["c1", "c2", "c4"]
    assert fitted_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 3

    cancelled = cancel_execution(fitted_store, execution.id)  # the worker's state after SIGTERM
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled; 3 queries stored")
    assert resume_execution(fitted_store, execution.id).status == "queued"
    second = FakeHost()
    run(fitted_store, execution.id, second)
    assert second.order("cpu") == [30, 50]
    assert second.loads == [("cpu", "demo-small")]  # demo-large has nothing left to run
    results = execution_results(fitted_store, execution.id)
    assert list(results.id) == ["c1", "c2", "c3", "c4", "c5"]
    assert fitted_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 5
    assert get_execution(fitted_store, execution.id).status == "done"


class ListSink(ResultSink):
    """Keeps what the measuring hands over, in memory: each member of a batch with the batch's measurement."""

    def __init__(self):
        self.results = []
        self.batches = []

    def add_batch(self, batch, results, measurement):
        self.batches.append(batch)
        self.results += [({**result, "device": batch["device"]}, measurement) for result in results]

    def add_result(self, result, measurement):
        self.results.append((result, measurement))


def test_measuring_hands_every_result_to_its_sink_and_never_touches_the_database(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", CPU_SCHEDULE))
    execution = create_execution(fitted_store, plan_id)
    left = queries_left(fitted_store, execution.id, plan_id)
    entries = {model: catalog.get_model(fitted_store, model) for model in left.model.unique()}
    fitted_store.path.rename(fitted_store.path.with_suffix(".away"))  # any use of the database would now fail
    sink, host = ListSink(), FakeHost(fail={20: MemoryError("out of memory")})
    run_devices(execution.id, left, entries, sink, threading.Event(), backend_factory=host.backend,
                meter_factory=replay_meter, idle_s=IDLE_S)
    assert [r["query_id"] for r, _ in sink.results] == ["c1", "c4", "c2", "c3", "c5"]  # the run order
    failed = {r["query_id"]: m for r, m in sink.results if r.get("error")}
    assert list(failed) == ["c2"] and failed["c2"] is None  # a failed query has no measurement
    measured = [(r, m) for r, m in sink.results if m is not None]
    assert len(measured) == 4 and all(m["origin"] == "executed" and m["energy_j"] == r["energy_j"] for r, m in measured)
    assert not fitted_store.path.exists()


def test_a_model_gone_from_the_catalog_stops_its_device_when_it_is_reached(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", CPU_SCHEDULE))
    execution = create_execution(fitted_store, plan_id)
    catalog.remove_model(fitted_store, "demo-small")
    host = FakeHost()
    with pytest.raises(PlannerError, match="model demo-small is no longer in the catalog"):
        run(fitted_store, execution.id, host)
    assert sorted(execution_results(fitted_store, execution.id).id) == ["c1", "c4"]  # demo-large's ran first


def test_executed_queries_count_in_a_refit_only_when_asked(fitted_store: Store):
    before = {(f.model, f.target): f.n_trials for f in fit_all(fitted_store)}
    assert set(before.values()) == {27}
    plan_id = prompt_plan(fitted_store)
    execution = create_execution(fitted_store, plan_id)
    run(fitted_store, execution.id, FakeHost())
    per_model = execution_results(fitted_store, execution.id).groupby("model").size()
    assert {(f.model, f.target): f.n_trials for f in fit_all(fitted_store)} == before
    after = {(f.model, f.target): f.n_trials for f in fit_all(fitted_store, include_executed=True)}
    assert after == {(model, target): 27 + int(per_model.get(model, 0)) for model, target in before}
    assert sum(after.values()) > sum(before.values())


# -- jobs: schedules, refusals, states -----------------------------------------------------------

def test_import_schedule_stores_a_plan_with_its_assignments(fitted_store: Store, tmp_path: Path):
    path = tmp_path / "schedule.csv"
    path.write_text("id,model,device,input_tokens,output_tokens,predicted_energy_j,accuracy\n"
                    "q1,demo-small,cpu,12,3,1.5,0.42\nq2,demo-large,cpu,40.0,8,,\nq3,demo-small,cpu,7,2,0.5,\n",
                    encoding="utf-8")
    plan_id = import_schedule(fitted_store, path)
    plan = fitted_store.query_df("SELECT status, energy_j, CAST(params AS VARCHAR) AS params FROM plans WHERE id = ?",
                                 [plan_id]).iloc[0]
    assert plan.status == "imported" and plan.energy_j == pytest.approx(2.0)
    assert json.loads(plan.params)["source_file"] == str(path)
    queries = plan_queries(fitted_store, plan_id).set_index("query_id")
    assert list(queries.index) == ["q1", "q2", "q3"]  # without start times, the file's order
    assert list(queries.device_start_s) == [0.0, 1.0, 2.0]
    assert (queries.loc["q2", "model"], queries.loc["q2", "input_tokens"]) == ("demo-large", 40)
    assert np.isnan(queries.loc["q2", "predicted_energy_j"]) and queries.prompt.isna().all()


def test_import_schedule_reports_every_bad_row_at_once(fitted_store: Store, tmp_path: Path):
    path = write_schedule(tmp_path / "bad.csv", [
        "q1,demo-small,cpu,12,3,,,",
        "q2,ghost,cpu,12,3,,,",
        "q3,demo-small,tpu:0,12,3,,,",
        "q1,demo-small,cpu,12,3,,,",
        "q5,demo-small,cpu,12.5,many,,,",
    ])
    with pytest.raises(InputError) as caught:
        import_schedule(fitted_store, path)
    text = [str(p) for p in caught.value.problems]
    assert len(text) == 5, text
    assert text[0].startswith(f"{path}:3") and "'ghost' is not in the catalog" in text[0]
    assert text[1].startswith(f"{path}:4") and "Unknown device 'tpu:0'" in text[1]
    assert text[2].startswith(f"{path}:5") and "also on line 2" in text[2]
    assert all(t.startswith(f"{path}:6") for t in text[3:]) and "'12.5' is not a token count" in text[3]
    assert "'many' is not a token count" in text[4]
    assert fitted_store.query_one("SELECT count(*) FROM plans")[0] == 0


def test_import_schedule_checks_every_column_as_the_workload_reader_does(fitted_store: Store, tmp_path: Path):
    # The reported schedule: negative predicted energy and runtime, accuracy 7, a negative start.
    path = tmp_path / "bad.csv"
    path.write_text(
        "id,model,device,input_tokens,output_tokens,predicted_energy_j,predicted_runtime_s,accuracy,device_start_s,"
        "in_domain\n"
        "q1,demo-small,cpu,12,3,-4.0,-0.5,7,-1,maybe\n"
        "q2,demo-small,cpu,12,3,nan,inf,-0.1,1e999,\n"
        "q3,demo-small,cpu,12,3,1.5,0.2,64.5%,0,True\n"
        "q4,demo-small,cpu,12,3,lots,,150%,,no\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        import_schedule(fitted_store, path)
    found = {(p.where, p.column) for p in caught.value.problems}
    assert found == {(f"{path}:2", c) for c in ("predicted_energy_j", "predicted_runtime_s", "accuracy",
                                                "device_start_s", "in_domain")} | \
        {(f"{path}:3", c) for c in ("predicted_energy_j", "predicted_runtime_s", "accuracy", "device_start_s")} | \
        {(f"{path}:5", c) for c in ("predicted_energy_j", "accuracy")}
    text = "\n".join(str(p) for p in caught.value.problems)
    assert "'-4.0' is not a number ≥ 0" in text and "'7' is outside [0, 1]" in text and "'maybe'" in text
    assert fitted_store.query_one("SELECT count(*) FROM plans")[0] == 0
    assert fitted_store.query_one("SELECT count(*) FROM plan_assignments")[0] == 0


def test_import_schedule_reads_percentages_booleans_and_empty_cells(fitted_store: Store, tmp_path: Path):
    path = tmp_path / "good.csv"
    path.write_text(
        "id,model,device,input_tokens,output_tokens,predicted_energy_j,predicted_runtime_s,accuracy,device_start_s,"
        "in_domain\n"
        "q1,demo-small,cpu,12,3,0,0,64.5%,0,True\n"
        "q2,demo-small,cpu,12,3,,,,,false\n"
        "q3,demo-small,cpu,12,3,2.5,0.25,0.5,7.5,\n", encoding="utf-8")
    plan_id = import_schedule(fitted_store, path)
    stored = fitted_store.query_df("SELECT query_id, predicted_energy_j, predicted_runtime_s, accuracy, device_start_s, "
                                   "in_domain FROM plan_assignments WHERE plan_id = ? ORDER BY query_id", [plan_id])
    assert stored.accuracy.iloc[0] == pytest.approx(0.645) and np.isnan(stored.accuracy.iloc[1])
    assert list(stored.predicted_energy_j.fillna(-1)) == [0.0, -1, 2.5]  # empty: unknown, never 0
    assert list(stored.device_start_s) == [0.0, 1.0, 7.5]  # a missing start is the row's place on its device
    assert stored.in_domain.tolist()[:2] == [True, False] and pd.isna(stored.in_domain.iloc[2])


def test_a_schedule_that_cannot_run_here_is_refused_by_line_and_stores_nothing(fitted_store: Store, tmp_path: Path):
    # The reported case: a device this host lacks left a plan and its assignments behind, and the
    # message named no file or line. Also a query longer than its model's context (4,096 here).
    catalog.add_model(fitted_store, name="remote", accuracy=0.5)
    path = write_schedule(tmp_path / "s.csv", [
        "q1,demo-small,cpu,8,2,,,",
        "q2,demo-small,cuda:7,8,2,,,",
        "q3,remote,cpu,8,2,,,",
        "q4,demo-large,cpu,4000,200,,,",
        "q5,demo-large,cpu,4000,96,,,",
    ])
    with pytest.raises(InputError) as caught:
        import_schedule(fitted_store, path)
    problems = {(p.where, p.column): p.message for p in caught.value.problems}
    assert set(problems) == {(f"{path}:3", "device"), (f"{path}:4", "model"), (f"{path}:5", "input_tokens")}
    assert problems[(f"{path}:3", "device")].startswith("cuda:7: this host has")
    assert "4,000 + 200 tokens exceed the 4,096-token context demo-large runs with here" in \
        problems[(f"{path}:5", "input_tokens")]
    assert fitted_store.query_one("SELECT count(*) FROM plans")[0] == 0
    assert fitted_store.query_one("SELECT count(*) FROM plan_assignments")[0] == 0


def test_many_rows_refused_for_one_reason_are_listed_then_counted(fitted_store: Store, tmp_path: Path):
    path = write_schedule(tmp_path / "s.csv", [f"q{i},demo-small,cuda:7,8,2,,," for i in range(25)])
    with pytest.raises(InputError) as caught:
        import_schedule(fitted_store, path)
    problems = caught.value.problems
    assert [p.where for p in problems[:-1]] == [f"{path}:{line}" for line in range(2, 22)]
    assert problems[-1].where == str(path)
    assert problems[-1].message.startswith(f"5 more rows ({path}:22 to {path}:26): cuda:7: this host has")


def test_cli_execute_a_schedule_for_a_missing_device_stores_nothing(fitted_store: Store, tmp_path: Path, capsys):
    path = write_schedule(tmp_path / "s.csv", ["q1,demo-small,cuda:7,8,2,1.0,0.1,0"])
    assert cli.main(["execute", "--schedule", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: column device: cuda:7" in err and "Traceback" not in err
    assert fitted_store.query_one("SELECT count(*) FROM plans")[0] == 0
    assert fitted_store.query_one("SELECT count(*) FROM plan_assignments")[0] == 0


def test_import_schedule_refuses_a_token_count_beyond_the_column(fitted_store: Store, tmp_path: Path):
    path = write_schedule(tmp_path / "huge.csv", ["q1,demo-small,cpu,12,3000000000,,,"])
    with pytest.raises(InputError) as caught:
        import_schedule(fitted_store, path)
    assert str(caught.value.problems[0]).startswith(f"{path}:2")


def test_create_execution_refusals(fitted_store: Store, tmp_path: Path, demo_models):
    catalog.add_model(fitted_store, name="remote", accuracy=0.5)
    copy = tmp_path / "copy-of-small"
    shutil.copytree(demo_models["transformers"].path, copy)
    catalog.add_model(fitted_store, name="moved", accuracy=0.4, backend="transformers", path=str(copy))
    copy.rename(tmp_path / "elsewhere")  # the files moved after they were added
    cases = [
        ("remote", "no local weights here (external)"),
        ("moved", f"the files of 'moved' are no longer at {copy}"),
    ]
    for model, fragment in cases:
        # Importing the schedule to run it here refuses it, by line, and stores nothing ...
        path = write_schedule(tmp_path / f"{model}.csv", [f"q1,{model},cpu,8,2,,,"])
        plans = fitted_store.query_one("SELECT count(*) FROM plans")[0]
        with pytest.raises(InputError, match=re.escape(f"{path}:2: column model: ") + ".*" + re.escape(fragment)):
            import_schedule(fitted_store, path)
        assert fitted_store.query_one("SELECT count(*) FROM plans")[0] == plans
        # ... and a plan stored without the host's checks is refused when it is to run.
        plan_id = import_schedule(fitted_store, path, runnable_here=False)
        with pytest.raises(InputError, match=re.escape(f"plan {plan_id}, query q1: column model: ") + ".*"
                           + re.escape(fragment)):
            create_execution(fitted_store, plan_id)
    with pytest.raises(InputError, match="no plan with id 999"):
        create_execution(fitted_store, 999)
    fitted_store.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', 'total', 'infeasible')")
    empty = fitted_store.query_one("SELECT max(id) FROM plans")[0]
    with pytest.raises(InputError, match="has no schedule to run"):
        create_execution(fitted_store, empty)
    assert fitted_store.query_one("SELECT count(*) FROM executions")[0] == 0


def test_a_device_busy_with_a_live_execution_is_refused_a_dead_one_is_closed(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", ["q1,demo-small,cpu,8,2,,,"]))
    first = create_execution(fitted_store, plan_id)
    # A running execution whose worker is gone is closed as failed, not counted as busy.
    fitted_store.execute("UPDATE executions SET status = 'running', pid = 0 WHERE id = ?", [first.id])
    second = create_execution(fitted_store, plan_id)
    closed = get_execution(fitted_store, first.id)
    assert closed.status == "failed" and "ended unexpectedly" in closed.reason and "after 0 of 1" in closed.reason
    # A process whose command line is the worker's, for the second execution.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "engine.execution.worker",
                                "--execution", str(second.id)])
    try:
        fitted_store.execute("UPDATE executions SET status = 'running', pid = ? WHERE id = ?", [sleeper.pid, second.id])
        with pytest.raises(InputError, match=f"execution {second.id} is running on cpu"):
            create_execution(fitted_store, plan_id)
        with pytest.raises(InputError, match=f"execution {second.id} is running"):
            resume_execution(fitted_store, first.id)  # resuming needs the device too
        started = time.monotonic()
        cancelled = cancel_execution(fitted_store, second.id)  # SIGTERM reaches the 'worker'
        assert time.monotonic() - started < 5
        assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled; 0 queries stored")
        assert sleeper.wait(timeout=5) != 0
    finally:
        sleeper.kill()
        sleeper.wait()
    assert create_execution(fitted_store, plan_id).status == "queued"


def test_cancel_and_resume_move_through_the_states(fitted_store: Store, tmp_path: Path):
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", ["q1,demo-small,cpu,8,2,,,"]))
    execution = create_execution(fitted_store, plan_id)
    with pytest.raises(InputError, match="is queued"):
        resume_execution(fitted_store, execution.id)
    # A queued execution without a worker is left alone for 30 s, then closed.
    reconcile_executions(fitted_store)
    assert get_execution(fitted_store, execution.id).status == "queued"
    fitted_store.execute("UPDATE executions SET created_at = current_timestamp - INTERVAL 5 MINUTE WHERE id = ?",
                         [execution.id])
    reconcile_executions(fitted_store)
    failed = get_execution(fitted_store, execution.id)
    assert failed.status == "failed" and "no worker process was started" in failed.reason
    assert failed.finished_at is not None

    resumed = resume_execution(fitted_store, execution.id)
    assert (resumed.status, resumed.reason, resumed.pid) == ("queued", None, None)
    cancelled = cancel_execution(fitted_store, execution.id)
    assert cancelled.status == "cancelled" and cancelled.reason == "cancelled; 0 queries stored"
    with pytest.raises(InputError, match="is cancelled, not running"):
        cancel_execution(fitted_store, execution.id)
    resume_execution(fitted_store, execution.id)
    run(fitted_store, execution.id, FakeHost())
    assert get_execution(fitted_store, execution.id).status == "done"
    with pytest.raises(InputError, match="is done"):
        resume_execution(fitted_store, execution.id)
    with pytest.raises(InputError, match="no execution with id 99"):
        cancel_execution(fitted_store, 99)


# -- report ----------------------------------------------------------------------------------------

def results_frame(rows: list[tuple]) -> pd.DataFrame:
    columns = ["id", "model", "device", "energy_j", "predicted_energy_j", "predicted_energy_uncertainty_j",
               "runtime_s", "predicted_runtime_s", "energy_source", "error"]
    return pd.DataFrame(rows, columns=columns)


def test_compare_totals_errors_band_and_options():
    results = results_frame([
        ("a", "m1", "cpu", 110.0, 100.0, 5.0, 2.0, 1.0, "measured", None),  # +10%, outside ±5 J
        ("b", "m1", "cpu", 90.0, 100.0, 20.0, 1.0, 1.0, "measured", None),  # −10%, inside ±20 J
        ("c", "m2", "cuda:0", 60.0, 50.0, np.nan, 3.0, 2.0, "estimated", None),  # +20%, no band
        ("d", "m2", "cuda:0", np.nan, 40.0, 1.0, np.nan, 1.0, None, "MemoryError: out of memory"),
    ])
    c = compare(results)
    assert (c.n_run, c.n_failed) == (3, 1)
    assert (c.measured_energy_j, c.predicted_energy_j) == (260.0, 250.0)
    assert c.energy_error == pytest.approx(0.04)  # 260 / 250 − 1
    assert (c.measured_runtime_s, c.predicted_runtime_s) == (6.0, 4.0)
    assert c.runtime_error == pytest.approx(0.5)
    assert c.per_query_energy_error_median == pytest.approx(0.1)  # of +0.1, −0.1, +0.2
    assert c.per_query_energy_error_mean_abs == pytest.approx(0.4 / 3)
    assert (c.outside_band, c.with_band) == (1, 2)
    assert c.energy_estimated
    options = c.per_option.set_index("option")
    assert list(options.index) == ["m1@cpu", "m2@cuda:0"]
    assert list(options.queries) == [2, 1]
    assert options.loc["m1@cpu", "energy_error"] == pytest.approx(0.0)  # 200 / 200 − 1
    assert options.loc["m2@cuda:0", "energy_error"] == pytest.approx(0.2)
    assert options.loc["m1@cpu", "median_energy_error"] == pytest.approx(0.0)
    assert list(c.per_query.id) == ["a", "b", "c"]

    measured_only = compare(results.assign(energy_source="measured"))
    assert not measured_only.energy_estimated


def test_compare_per_option_pairs_measured_with_predicted_like_the_totals():
    results = results_frame([
        ("c", "m2", "cuda:0", 60.0, 50.0, np.nan, 3.0, 2.0, "measured", None),
        ("e", "m2", "cuda:0", np.nan, 10.0, np.nan, 1.0, 1.0, None, None),  # ran; its energy could not be read
    ])
    c = compare(results)
    assert c.energy_error == pytest.approx(0.2)  # the totals pair 60 J with its 50 J
    assert c.per_option.set_index("option").loc["m2@cuda:0", "energy_error"] == pytest.approx(0.2)


def test_compare_of_an_execution_where_every_query_failed():
    c = compare(results_frame([("d", "m2", "cpu", np.nan, 40.0, 1.0, np.nan, 1.0, None, "MemoryError: oom")]))
    assert (c.n_run, c.n_failed, c.with_band, c.outside_band) == (0, 1, 0, 0)
    assert c.measured_energy_j is None and c.energy_error is None and c.per_option.empty


def test_learned_output_lengths_per_model_and_category(store: Store):
    rows = [  # (model, prompt_kind, category, output_tokens, stopped, error)
        ("m1", "text", "chat", 10, "end of answer", None),
        ("m1", "text", "chat", 20, "output cap", None),
        ("m1", "text", "code", 30, "end of answer", None),
        ("m1", "text", None, 40, "end of answer", None),
        ("m1", "tokens", None, 1000, "output cap", None),  # forced to its length: not learned from
        ("m1", "text", "chat", 0, None, "MemoryError: oom"),  # failed: not learned from
        ("m2", "text", "chat", 5, "output cap", None),
    ]
    frame = pd.DataFrame([{"execution_id": 1, "query_id": f"q{i}", "model": m, "device": "cpu", "input_tokens": 9,
                           "output_tokens": o, "prompt_kind": kind, "category": category, "stopped": stopped,
                           "error": error} for i, (m, kind, category, o, stopped, error) in enumerate(rows)])
    with store.transaction() as con:
        append_frame(con, "execution_results", frame)
    lengths = learned_output_lengths(store)
    assert list(zip(lengths.model, lengths.category)) == [("m1", "(all)"), ("m1", "chat"), ("m1", "code"),
                                                          ("m2", "(all)"), ("m2", "chat")]
    every = lengths.iloc[0]
    assert (every.queries, every.median_output_tokens, every.mean_output_tokens) == (4, 25.0, 25.0)
    assert every.p90_output_tokens == pytest.approx(37.0)  # 30 + 0.7 · (40 − 30)
    assert every.ended_early == pytest.approx(0.75)
    chat = lengths.iloc[1]
    assert (chat.queries, chat.median_output_tokens, chat.ended_early) == (2, 15.0, 0.5)
    assert chat.p90_output_tokens == pytest.approx(19.0)
    assert lengths.iloc[3].queries == 1 and lengths.iloc[3].median_output_tokens == 5.0


def test_learned_output_lengths_of_no_executions_is_empty(store: Store):
    lengths = learned_output_lengths(store)
    assert lengths.empty and "p90_output_tokens" in lengths.columns


# -- a real worker process on the demo models ----------------------------------------------------

def wait_for(predicate, timeout_s: float = 120.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def test_kill_9_mid_execution_then_resume_runs_each_query_once(fitted_store: Store):
    # Two queries need demo-large's accuracy (llama.cpp is slow on a small CPU: keep them short);
    # the other ten go to demo-small, the cheaper option.
    frame = pd.DataFrame({"id": [f"q{i:02d}" for i in range(12)], "input_tokens": [8 + 4 * i for i in range(12)],
                          "output_tokens": [4 + i % 5 for i in range(12)],
                          "min_accuracy": [0.5, 0.5] + [None] * 10})
    result = plan_workload(fitted_store, workload_from_frame(frame, "tokens"), PlanSettings())
    assert result.status == "optimal"
    planned = plan_queries(fitted_store, result.plan_id)
    assert sorted(planned[planned.model == "demo-large"].query_id) == ["q00", "q01"]
    execution = create_execution(fitted_store, result.plan_id)
    process = start_worker(fitted_store, execution.id, watch=False)
    kept = None

    def kill_after_two() -> bool:
        nonlocal kept
        # While this connection is open the worker cannot store another result, so the count
        # read here is the count at the kill.
        with fitted_store.connect() as con:
            count = con.execute("SELECT count(*) FROM execution_results WHERE execution_id = ?",
                                [execution.id]).fetchone()[0]
            if count >= 2:
                process.kill()
                process.wait()
                kept = count
        return kept is not None

    try:
        assert wait_for(kill_after_two), "the worker stored no two results in time"
    finally:
        process.kill()
        process.wait()
    assert 2 <= kept < 12
    reconcile_executions(fitted_store)
    failed = get_execution(fitted_store, execution.id)
    assert failed.status == "failed"
    assert "killed" in failed.reason and f"after {kept} of 12 queries" in failed.reason
    before = execution_results(fitted_store, execution.id)
    assert len(before) == kept

    resume_execution(fitted_store, execution.id)
    process = start_worker(fitted_store, execution.id, watch=False)
    assert process.wait(timeout=120) == 0
    done = get_execution(fitted_store, execution.id)
    assert done.status == "done", done.reason
    results = execution_results(fitted_store, execution.id)
    assert sorted(results.id) == list(frame.id)  # each query exactly once
    assert results.error.isna().all()
    kept_rows = results.set_index("id").loc[before.id]
    assert list(kept_rows.started_at) == list(before.started_at)  # what ran before the kill was kept, not rerun
    assert (results.output_tokens == results.planned_output_tokens).all()
    assert (results.input_tokens == results.planned_input_tokens).all()
    executed = fitted_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0]
    assert executed == 12


# -- the CLI ----------------------------------------------------------------------------------------

def test_cli_execute_a_bad_schedule_exits_2_naming_each_line(fitted_store: Store, tmp_path: Path, capsys):
    path = write_schedule(tmp_path / "bad.csv", ["q1,ghost,cpu,8,2,,,", "q2,demo-small,cpu,0,2,,,"])
    assert cli.main(["execute", "--schedule", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "'ghost' is not in the catalog" in err
    assert f"{path}:3" in err and "'0' is not a token count" in err
    assert "Traceback" not in err
    assert fitted_store.query_one("SELECT count(*) FROM executions")[0] == 0


def test_cli_execute_an_unknown_plan_exits_2(fitted_store: Store, capsys):
    assert cli.main(["execute", "--plan", "999"]) == 2
    assert "no plan with id 999" in capsys.readouterr().err


def test_schedule_device_names_are_stored_in_one_spelling(fitted_store: Store, tmp_path: Path):
    rows = ["a,demo-small,CPU,10,2,1,0.1,0", "b,demo-small,gpu,10,2,1,0.1,0", "c,demo-small,cuda:1,10,2,1,0.1,0"]
    plan_id = import_schedule(fitted_store, write_schedule(tmp_path / "s.csv", rows), runnable_here=False)
    devices = fitted_store.query_df("SELECT query_id, device FROM plan_assignments WHERE plan_id = ? ORDER BY query_id",
                                    [plan_id])["device"].tolist()
    assert devices == ["cpu", "cuda:0", "cuda:1"]


def test_a_dynamic_energy_plan_is_compared_in_dynamic_energy():
    # Measured 100 J total over 2 s with 20 W idle: 60 J dynamic, exactly the prediction.
    results = pd.DataFrame({"id": ["q"], "model": ["m"], "device": ["cpu"], "runtime_s": [2.0], "energy_j": [100.0],
                            "idle_power_w": [20.0], "predicted_energy_j": [60.0], "predicted_runtime_s": [2.0],
                            "predicted_energy_uncertainty_j": [np.nan], "energy_source": ["measured"],
                            "error": [None]})
    assert compare(results, "dynamic").energy_error == pytest.approx(0.0)
    assert compare(results, "total").energy_error == pytest.approx(100 / 60 - 1)


def test_an_option_with_no_measured_energy_is_not_shown_as_zero():
    results = pd.DataFrame({"id": ["q"], "model": ["m"], "device": ["cpu"], "runtime_s": [1.0], "energy_j": [np.nan],
                            "idle_power_w": [np.nan], "predicted_energy_j": [5.0], "predicted_runtime_s": [1.0],
                            "predicted_energy_uncertainty_j": [np.nan], "energy_source": [None], "error": [None]})
    row = compare(results).per_option.iloc[0]
    assert np.isnan(row["measured_energy_j"]) and compare(results).measured_energy_j is None
