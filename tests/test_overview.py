"""engine/overview: the state of a database at a glance, counted from what is stored."""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

from engine import catalog
from engine.overview import count_executed_measurements, data_version, latest_work, read_overview
from engine.store import Store, append_frame
from engine.store.migrations import LATEST_VERSION


def test_an_empty_database(store: Store):
    view = read_overview(store)
    assert view.db_path == str(store.path)
    assert view.schema_version == LATEST_VERSION
    assert view.models.empty and view.measured_pairs.empty
    assert (view.n_measurements, view.n_measurements_estimated) == (0, 0)
    assert (view.latest_job, view.latest_fit, view.latest_plan, view.latest_execution) == (None, None, None, None)


def measurement(model: str, device: str, source: str) -> dict:
    return {"origin": "imported", "model": model, "device": device, "input_tokens": 8, "output_tokens": 8,
            "runtime_s": 1.0, "energy_j": 10.0, "energy_source": source}


def test_counts_pairs_and_the_latest_of_each_kind(store: Store):
    catalog.add_model(store, name="b-model", accuracy=0.6)
    catalog.add_model(store, name="a-model", accuracy=0.4)
    rows = [measurement("a-model", "cpu", "estimated")] * 3 + [measurement("a-model", "cuda:0", "measured")] * 2 + \
        [measurement("b-model", "cpu", "measured")]
    with store.transaction() as con:
        append_frame(con, "measurements", pd.DataFrame(rows))
        for model in ("a-model", "b-model"):
            con.execute("INSERT INTO profiling_jobs (model, device, host, design, status) "
                        "VALUES (?, 'cpu', 'h', '{}', 'done')", [model])
        con.execute("INSERT INTO fits (model, device, energy_scope, target, form, coefficients, cv_mape) "
                    "VALUES ('a-model', 'cpu', 'total', 'energy', 'linear', '{}', 0.05)")
        for energy_j in (100.0, 80.0):
            con.execute("INSERT INTO plans (objective, energy_scope, status, energy_j) VALUES ('energy', 'total', "
                        "'optimal', ?)", [energy_j])
        con.execute("INSERT INTO executions (plan_id, host, status, reason) VALUES (2, 'h', 'failed', 'killed')")

    view = read_overview(store)
    assert list(view.models.name) == ["a-model", "b-model"]  # by name
    assert (view.n_measurements, view.n_measurements_estimated) == (6, 3)
    pairs = view.measured_pairs.set_index(["model", "device"]).trials.to_dict()
    assert pairs == {("a-model", "cpu"): 3, ("a-model", "cuda:0"): 2, ("b-model", "cpu"): 1}
    assert (view.latest_job["id"], view.latest_job["model"]) == (2, "b-model")
    assert (view.latest_fit["form"], view.latest_fit["cv_mape"]) == ("linear", 0.05)
    assert (view.latest_plan["id"], view.latest_plan["energy_j"]) == (2, 80.0)
    assert (view.latest_execution["plan_id"], view.latest_execution["status"]) == (2, "failed")
    assert view.latest_execution["reason"] == "killed"


@pytest.fixture
def utc():
    """Local time is UTC for the test (times are shown in local time)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_latest_work_in_words_with_units_and_local_times(store: Store, utc):
    test_counts_pairs_and_the_latest_of_each_kind(store)
    with store.transaction() as con:
        con.execute("INSERT INTO fits (model, device, energy_scope, target, form, coefficients, cv_mape, created_at) "
                    "VALUES ('a-model', 'cpu', 'total', 'energy', 'paper', '{}', 0.38335186395666027, "
                    "TIMESTAMPTZ '2024-05-01 14:00:05.123456+00')")
        con.execute("UPDATE plans SET energy_j = 292.76300189240584, accuracy = 0.5612345 WHERE id = 2")
        con.execute("UPDATE executions SET queries_done = 7, queries_total = 30")
    lines = {line.kind: line.text for line in latest_work(read_overview(store))}
    assert lines["Fit"] == "#2 a-model on cpu, energy (total): form paper, CV MAPE 38.3%; 2024-05-01 14:00"
    assert lines["Plan"].startswith("#2 optimal: 292.8 J predicted (total energy), mean accuracy 0.5612; ")
    assert lines["Execution"].startswith("#1 of plan #2, failed (7 of 30 queries): killed; started ")
    assert lines["Profiling job"].startswith("#2 b-model on cpu, done")
    text = " ".join(lines.values())
    assert "0.3833518" not in text and "292.763" not in text and ".123456" not in text and "T14" not in text


def test_latest_work_of_an_empty_database_is_none_yet(store: Store):
    assert [(w.kind, w.text) for w in latest_work(read_overview(store))] == [
        ("Profiling job", "none yet"), ("Fit", "none yet"), ("Plan", "none yet"), ("Execution", "none yet")]


def test_data_version_changes_with_measurements_fits_and_models(store: Store):
    first = data_version(store)
    assert data_version(store) == first
    catalog.add_model(store, name="m", accuracy=0.5)
    second = data_version(store)
    assert second != first
    catalog.update_model(store, "m", accuracy="0.6")
    third = data_version(store)
    assert third != second
    with store.transaction() as con:
        append_frame(con, "measurements", pd.DataFrame([measurement("m", "cpu", "measured")]))
    assert data_version(store) != third
    assert count_executed_measurements(store) == 0
    with store.transaction() as con:
        append_frame(con, "measurements", pd.DataFrame([{**measurement("m", "cpu", "measured"), "origin": "executed"}]))
    assert count_executed_measurements(store) == 1


def test_has_measured_fits_ignores_published_coefficients(store: Store):
    from engine.fitting import load_reference_profiles

    load_reference_profiles(store)
    assert not read_overview(store).has_measured_fits
    with store.transaction() as con:
        con.execute("INSERT INTO fits (model, device, energy_scope, target, form, coefficients) "
                    "VALUES ('m', 'cpu', 'total', 'energy', 'linear', '{}')")
    assert read_overview(store).has_measured_fits


def test_status_reports_a_killed_execution_as_failed_not_running(store: Store, capsys):
    """`python -m engine status` closes runs whose worker is gone before it reads them."""
    import subprocess

    from engine import runs
    from engine.cli import main

    gone = subprocess.Popen(["true"])
    gone.wait()
    with store.transaction() as con:
        con.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', 'total', 'optimal')")
        con.execute("INSERT INTO executions (plan_id, host, status, pid, queries_total, queries_done, settings, "
                    "started_at, created_at) VALUES (1, ?, 'running', ?, 30, 7, '{\"devices\": [\"cpu\"]}', "
                    "current_timestamp - INTERVAL 5 MINUTE, current_timestamp - INTERVAL 5 MINUTE)",
                    [runs.host_name(), gone.pid])
    assert main(["status", "--db", str(store.path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latest execution:"))
    assert line.startswith("latest execution: #1 of plan #1, failed (7 of 30 queries): the worker process")
    assert "ended unexpectedly" in line
