"""The Execute page with AppTest: progress before any result, and predicted against measured after."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from engine.store import Store, append_frame

ROOT = Path(__file__).resolve().parent.parent


def make_plan_and_execution(store: Store, results: int) -> int:
    """A stored plan of 4 queries on cpu and an execution that has ``results`` of them done."""
    with store.transaction() as con:
        plan_id = int(con.execute("INSERT INTO plans (objective, energy_scope, status, energy_j) "
                                  "VALUES ('energy', 'total', 'optimal', 40.0) RETURNING id").fetchone()[0])
        append_frame(con, "plan_assignments", pd.DataFrame({
            "plan_id": plan_id, "query_id": ["a", "b", "c", "d"], "model": "m", "device": "cpu",
            "input_tokens": 8, "output_tokens": 4, "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0,
            "accuracy": 0.5, "device_start_s": [0.0, 1.0, 2.0, 3.0]}))
        execution_id = int(con.execute(
            "INSERT INTO executions (plan_id, host, status, queries_total, queries_done, settings, started_at) "
            "VALUES (?, 'elsewhere', 'running', 4, ?, ?, current_timestamp) RETURNING id",
            [plan_id, results, json.dumps({"devices": ["cpu"]})]).fetchone()[0])
        if results:
            append_frame(con, "execution_results", pd.DataFrame({
                "execution_id": execution_id, "query_id": ["a", "b", "c", "d"][:results], "model": "m",
                "device": "cpu", "input_tokens": 8, "output_tokens": 4, "runtime_s": 1.2, "energy_j": 12.0,
                "energy_source": "estimated", "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0,
                "predicted_energy_uncertainty_j": 1.0, "position": list(range(results)), "prompt_kind": "tokens"}))
    return execution_id


def run_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    return at.switch_page("pages/execute.py").run()


def test_progress_renders_before_any_query_is_done(store: Store):
    make_plan_and_execution(store, results=0)
    at = run_page()
    assert not at.exception, at.exception
    assert any("0 of 4 queries" in p.proto.text for p in at.get("progress"))
    assert "Results appear here as queries finish." in [c.value for c in at.caption]


def test_predicted_against_measured(store: Store):
    make_plan_and_execution(store, results=2)
    at = run_page()
    assert not at.exception, at.exception
    metrics = {m.label: m for m in at.metric}
    # 2 queries of 12 J measured (estimated) against 10 J predicted each: +20%.
    assert metrics["Energy (estimated)"].value == "24.0 J"
    assert metrics["Energy (estimated)"].delta == "+20.0% vs predicted"
    assert metrics["Queries outside their 90% interval"].value == "2 of 2"


def store_plan_of(store: Store, model: str, device: str = "cpu") -> int:
    with store.transaction() as con:
        plan_id = int(con.execute("INSERT INTO plans (objective, energy_scope, status, energy_j) "
                                  "VALUES ('energy', 'total', 'optimal', 20.0) RETURNING id").fetchone()[0])
        append_frame(con, "plan_assignments", pd.DataFrame({
            "plan_id": plan_id, "query_id": ["a", "b"], "model": model, "device": device, "input_tokens": 8,
            "output_tokens": 4, "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0, "accuracy": 0.5,
            "device_start_s": [0.0, 1.0]}))
    return plan_id


def test_the_default_plan_is_the_newest_that_can_run_here(store: Store, demo_models):
    from engine import catalog

    catalog.register_demo_models(store, list(demo_models.values()))
    catalog.add_model(store, name="llama-2-70b", accuracy=0.6, backend="external")
    runnable = store_plan_of(store, "demo-small")
    store_plan_of(store, "llama-2-70b")  # newer, but its model has no files here
    at = run_page()
    assert not at.exception, at.exception
    plan = at.selectbox(key="execute_plan")
    assert plan.value == runnable
    assert plan.options[0].endswith("— cannot run here") and not plan.options[1].endswith("cannot run here")
    assert not next(b for b in at.button if b.label == "Execute this plan").disabled
    plan.set_value(runnable + 1).run()
    assert any("cannot run on this host" in w.value and "has no local weights here" in w.value for w in at.warning)
    assert next(b for b in at.button if b.label == "Execute this plan").disabled


def test_one_device_has_one_progress_bar(store: Store):
    make_plan_and_execution(store, results=3)
    at = run_page()
    texts = [p.proto.text for p in at.get("progress")]
    assert texts == ["running: 3 of 4 queries on cpu"]
