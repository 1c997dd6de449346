"""engine/overview: the state of a database at a glance, counted from what is stored."""

from __future__ import annotations

import pandas as pd

from engine import catalog
from engine.overview import read_overview
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
