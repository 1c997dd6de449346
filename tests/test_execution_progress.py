"""engine.execution.execution_progress and the readers the Execute page uses: elapsed time across
runs, the plan's energy scope, and whether a plan can run on this host at all."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from engine import catalog, runs
from engine.errors import DeviceUnavailableError
from engine.execution import execution_energy_scope, execution_progress, why_plan_cannot_run_here
from engine.store import Store, append_frame


def make_execution(store: Store, *, status: str, started_ago_s: float | None,
                   results: list[tuple[str, str, float, float]], energy_scope: str = "total") -> int:
    """A plan of 4 queries (a, b on cpu; c, d on cuda:0) and an execution with results
    (query, device, runtime s, started how many seconds ago)."""
    now = pd.Timestamp.now(tz="UTC")
    with store.transaction() as con:
        plan_id = int(con.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', ?, 'optimal') "
                                  "RETURNING id", [energy_scope]).fetchone()[0])
        append_frame(con, "plan_assignments", pd.DataFrame({
            "plan_id": plan_id, "query_id": ["a", "b", "c", "d"], "model": "m",
            "device": ["cpu", "cpu", "cuda:0", "cuda:0"], "input_tokens": 8, "output_tokens": 4,
            "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0, "accuracy": 0.5,
            "device_start_s": [0.0, 1.0, 0.0, 1.0]}))
        execution_id = int(con.execute(
            "INSERT INTO executions (plan_id, host, status, queries_total, queries_done, settings, started_at) "
            "VALUES (?, 'elsewhere', ?, 4, ?, ?, ?) RETURNING id",
            [plan_id, status, len(results), json.dumps({"devices": ["cpu", "cuda:0"]}),
             None if started_ago_s is None else now - pd.Timedelta(seconds=started_ago_s)]).fetchone()[0])
        if results:
            append_frame(con, "execution_results", pd.DataFrame([{
                "execution_id": execution_id, "query_id": query, "model": "m", "device": device, "input_tokens": 8,
                "output_tokens": 4, "runtime_s": runtime, "energy_j": 12.0, "energy_source": "estimated",
                "started_at": now - pd.Timedelta(seconds=ago), "position": i, "prompt_kind": "tokens"}
                for i, (query, device, runtime, ago) in enumerate(results)]))
    return execution_id


def test_elapsed_adds_the_earlier_runs_busiest_device(store: Store):
    # An earlier run (an hour ago) ran a and b on cpu (3 + 4 s) and c on cuda:0 (5 s), in parallel: 7 s.
    execution_id = make_execution(store, status="running", started_ago_s=20, results=[
        ("a", "cpu", 3.0, 3600), ("b", "cpu", 4.0, 3595), ("c", "cuda:0", 5.0, 3600), ("d", "cuda:0", 2.0, 10)])
    progress = execution_progress(store, execution_id)
    assert progress.elapsed_s == pytest.approx(20 + 7, abs=3)
    assert (progress.done, progress.total) == (4, 4)


def test_elapsed_before_a_resumed_run_starts_is_the_earlier_runs(store: Store):
    execution_id = make_execution(store, status="queued", started_ago_s=None,
                                  results=[("a", "cpu", 3.0, 600), ("c", "cuda:0", 1.0, 600)])
    assert execution_progress(store, execution_id).elapsed_s == pytest.approx(3.0)
    fresh = make_execution(store, status="queued", started_ago_s=None, results=[])
    assert execution_progress(store, fresh).elapsed_s is None


def test_the_energy_scope_of_an_executions_plan(store: Store):
    assert execution_energy_scope(store, make_execution(store, status="done", started_ago_s=5, results=[],
                                                        energy_scope="dynamic")) == "dynamic"


def test_a_plan_of_a_model_without_local_files_cannot_run_here(store: Store):
    catalog.add_model(store, name="m", accuracy=0.5, backend="external")
    make_execution(store, status="done", started_ago_s=5, results=[])
    problems = why_plan_cannot_run_here(store, 1)
    assert problems and all(p.column in ("model", "device") for p in problems)
    assert any("has no local weights here" in p.message for p in problems)
    try:
        runs.check_device("cuda:0")
        has_gpu = True
    except DeviceUnavailableError:
        has_gpu = False
    assert any("cuda:0" in p.message for p in problems) == (not has_gpu)
