"""AppTest runs of every page: they render without exceptions and show the real state."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine import catalog, runs
from engine.energy import discover_sensors
from engine.store import Store
from tests.apptest_wait import run_until
from tests.conftest import write_grid_csv

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["pages/home.py", "pages/models.py", "pages/profile.py", "pages/plan.py", "pages/execute.py"]


def app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)


def all_text(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "title", "subheader", "success", "warning", "info", "error")
             for e in getattr(at, kind)]
    for frame in list(at.dataframe) + list(at.table):
        parts.append(frame.value.to_string())
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_database(page: str):
    at = app().run()
    at.switch_page(page).run()
    assert not at.exception, at.exception


def sensor_rows(at: AppTest) -> pd.DataFrame:
    return next(t.value for t in at.table if "Source" in t.value.columns)


def test_home_shows_demo_models_and_sensors(store: Store, demo_models):
    catalog.register_demo_models(store, list(demo_models.values()))
    at = app().run()
    assert not at.exception
    text = all_text(at)
    for demo in demo_models.values():
        assert demo.name in text
    assert "Energy sensors on this host" in text
    # What the page says about RAPL is what this host has, with the reason (missing on a VM or container).
    expected = {s.source: (s.status, s.detail) for s in discover_sensors() if s.source.startswith("rapl")}
    rows = sensor_rows(at).set_index("Source")
    assert expected and {source: tuple(rows.loc[source, ["Status", "Detail"]]) for source in expected} == expected
    assert all(detail for _status, detail in expected.values())  # found or missing, always with the reason
    no_cpu_sensor = all(status == "missing" for status, _detail in expected.values())
    assert no_cpu_sensor == any("No CPU energy sensor here" in w.value for w in at.warning)


def test_home_says_rapl_is_missing_and_why(store: Store, monkeypatch, tmp_path: Path):
    """A host without a powercap tree (a VM): RAPL missing with the reason, CPU energy estimated."""
    import engine.energy

    monkeypatch.setattr(engine.energy, "discover_sensors",
                        partial(engine.energy.discover_sensors, powercap_root=tmp_path / "powercap", nvml=None))
    at = app().run()
    assert not at.exception, at.exception
    rows = sensor_rows(at).set_index("Source")
    assert rows.loc["rapl", "Status"] == "missing"
    assert rows.loc["rapl", "Detail"].startswith(f"{tmp_path / 'powercap'} does not exist")
    assert "kernel modules" in rows.loc["rapl", "How to fix"]
    assert rows.loc["estimate", "Status"] == "estimated"
    assert any("No CPU energy sensor here" in w.value for w in at.warning)
    assert not at.success


def test_home_says_rapl_measures_where_the_kernel_exposes_it(store: Store, monkeypatch, tmp_path: Path):
    import engine.energy
    from tests.test_energy_rapl import make_zone

    make_zone(tmp_path, "intel-rapl:0", "package-0")
    monkeypatch.setattr(engine.energy, "discover_sensors",
                        partial(engine.energy.discover_sensors, powercap_root=tmp_path, nvml=None))
    at = app().run()
    assert not at.exception, at.exception
    rows = sensor_rows(at).set_index("Source")
    assert rows.loc["rapl-package", "Status"] == "measured" and "estimate" not in rows.index
    assert rows.loc["rapl-dram", "Status"] == "missing" and "no DRAM domain" in rows.loc["rapl-dram", "Detail"]
    assert [s.value for s in at.success] == ["1 energy sensor measures here: rapl-package"]
    assert not any("No CPU energy sensor here" in w.value for w in at.warning)


def test_home_after_a_run_keeps_the_start_box_and_shows_formatted_figures(store: Store, demo_models, tmp_path: Path):
    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements

    catalog.register_demo_models(store, list(demo_models.values()))
    import_measurements(store, write_grid_csv(tmp_path / "grid.csv", "estimated"))
    save_fits(store, fit_all(store))
    with store.transaction() as con:
        con.execute("INSERT INTO plans (objective, energy_scope, status, energy_j, accuracy) "
                    "VALUES ('energy', 'total', 'optimal', 292.76300189240584, 0.5612345)")
    at = app().run()
    assert not at.exception, at.exception
    assert any(s.value == "Start here" for s in at.subheader)
    labels = [b.label for b in at.button]
    assert "Plan the sample workload" in labels and "Explore the paper's published A100 profiles" in labels
    assert "Profile the demo models and plan" not in labels
    latest = "\n".join(m.value for m in at.markdown if m.value.startswith("**"))
    assert "**Plan:** #1 optimal: 292.8 J predicted (total energy), mean accuracy 0.5612" in latest
    assert "**Fit:** #2 sim on gpu0, runtime: form " in latest and "CV MAPE " in latest and "%" in latest
    assert "292.763" not in latest and "0.5612345" not in latest and "cv_mape" not in latest
    pairs = next(d.value for d in at.dataframe if "trials" in d.value.columns)
    assert all(len(text) == len("2024-05-01 14:00") for text in pairs["first"])  # to the minute, no ISO "T"


def test_models_page_adds_a_model(store: Store):
    at = app().run()
    at.switch_page("pages/models.py").run()
    at.text_input(key="add_name").input("Mistral 7B")
    at.radio(key="add_kind").set_value("External (measurements only)")
    at.text_input(key="add_accuracy").input("60.97%")
    at.text_input(key="add_source").input("Open LLM Leaderboard")
    next(b for b in at.button if b.label == "Add model").click().run()
    assert not at.exception
    assert catalog.get_model(store, "Mistral 7B").accuracy == pytest.approx(0.6097)
    assert any("Added Mistral 7B" in s.value for s in at.success)


def test_models_page_shows_bad_input_and_changes_nothing(store: Store):
    at = app().run()
    at.switch_page("pages/models.py").run()
    at.text_input(key="add_name").input("m")
    at.radio(key="add_kind").set_value("Local path")
    at.text_input(key="add_location").input("/no/such/model.gguf")
    at.text_input(key="add_accuracy").input("1.5")
    next(b for b in at.button if b.label == "Add model").click().run()
    assert not at.exception
    errors = "\n".join(e.value for e in at.error)
    assert "outside [0, 1]" in errors and "does not exist" in errors
    assert catalog.list_models(store).empty


def test_profile_page_starts_a_job_and_shows_its_progress(store: Store, demo_models):
    import time

    from engine.profiling import jobs

    catalog.register_demo_models(store, list(demo_models.values()))
    earlier = jobs.create_job(store, "demo-small", "cpu", "custom", inputs=[8], outputs=[4])
    runs.set_status(store, runs.PROFILING, earlier.id, "done")
    at = app().run()
    at.switch_page("pages/profile.py").run()
    assert at.selectbox(key="profile_watch").value == earlier.id  # the panel shows the earlier, finished job
    assert not any(b.label == "Cancel job" for b in at.button)
    at.selectbox(key="profile_model").set_value("demo-small")
    at.radio(key="profile_design").set_value("custom")
    at.text_input(key="profile_inputs").set_value("8")
    at.text_input(key="profile_outputs").set_value("4,8")
    assert at.text_input(key="profile_batch_sizes").value == "1,2,4,8,16,32"  # the batch axis by default
    at.text_input(key="profile_batch_sizes").set_value("4,1")
    at.number_input(key="profile_max").set_value(3)
    at.number_input(key="profile_idle").set_value(0.5)
    next(b for b in at.button if b.label == "Start profiling").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    job_id = int(store.query_one("SELECT max(id) FROM profiling_jobs")[0])
    # At once: the panel shows the new job, with Cancel, and the list has it.
    assert job_id != earlier.id and at.selectbox(key="profile_watch").value == job_id
    assert any(b.label == "Cancel job" for b in at.button)
    listed = next(d.value for d in at.dataframe if "job" in d.value.columns).set_index("job")
    assert listed.loc[f"#{job_id}", "status"] in jobs.ACTIVE
    deadline = time.monotonic() + 120
    while jobs.get_job(store, job_id).status in jobs.ACTIVE and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.get_job(store, job_id).status == "done"
    at.run()
    assert any("Done: 12 trials over 4 points" in s.value for s in at.success)
    assert any(m.label == "Trials" and m.value == "12" for m in at.metric)  # 2 shapes x 2 batch sizes x 3 trials
    # Per batch in the table; per request in the chart, one panel per batch size.
    points = next(d.value for d in at.dataframe if "batch_size" in d.value.columns)
    assert sorted(points.batch_size.tolist()) == [1, 1, 4, 4]
    (chart,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert {a["text"] for a in chart["layout"]["annotations"]} == {"batch=batch 1", "batch=batch 4"}
    from tests.test_pages_models_batches import values

    per_request = sorted(float(y) for trace in chart["data"] for y in values(trace["y"]))
    by_hand = sorted((points.energy_j / points.batch_size).tolist())
    assert per_request == pytest.approx(by_hand)
    assert any(m.label == "Remaining" and m.value == "—" for m in at.metric)
    assert any("estimated" in c.value for c in at.caption)
    # The selector names the job without a status that could go stale; the list agrees with the panel.
    assert at.selectbox(key="profile_watch").options[0] == f"#{job_id} demo-small on cpu"
    listed = next(d.value for d in at.dataframe if "job" in d.value.columns).set_index("job")
    assert listed.loc[f"#{job_id}", "status"] == "done" and listed.loc[f"#{job_id}", "points"] == "4 / 4"


def test_profile_page_reports_bad_input_and_starts_nothing(store: Store, demo_models):
    catalog.register_demo_models(store, list(demo_models.values()))
    at = app().run()
    at.switch_page("pages/profile.py").run()
    at.radio(key="profile_design").set_value("custom")
    at.text_input(key="profile_inputs").set_value("8,abc")
    next(b for b in at.button if b.label == "Start profiling").click().run()
    assert not at.exception
    assert "'abc' is not a number" in "\n".join(e.value for e in at.error)
    assert store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_profile_page_checks_the_default_batch_axis_and_refuses_bad_batch_sizes(store: Store, demo_models):
    catalog.register_demo_models(store, list(demo_models.values()))
    at = app().run()
    at.switch_page("pages/profile.py").run()
    at.selectbox(key="profile_model").set_value("demo-small")
    next(b for b in at.button if b.label == "Check the design").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(i.value.startswith("54 points (9 shapes × batch sizes 1, 2, 4, 8, 16, 32)") for i in at.info)
    at.text_input(key="profile_batch_sizes").set_value("1,0,abc,2.5")
    next(b for b in at.button if b.label == "Start profiling").click().run()
    assert not at.exception
    errors = "\n".join(e.value for e in at.error)
    assert "Batch sizes" in errors and "'abc'" in errors and "'2.5'" in errors
    assert "0 is not allowed: a batch holds at least one request" in errors
    assert store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_models_page_fits_and_shows_surfaces(store: Store, tmp_path: Path):
    from engine.measurements_io import import_measurements

    import_measurements(store, write_grid_csv(tmp_path / "grid.csv", "estimated"))
    at = app().run()
    at.switch_page("pages/models.py").run()
    assert any("No fits yet" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Fit all measured models").click().run()
    run_until(at, lambda a: bool(a.success))  # fitting runs in the background
    assert any("Fitted 2 surfaces" in s.value for s in at.success)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (surface,) = [spec for spec in specs if spec["data"][0]["type"] == "surface"]  # one 3-D chart at a time
    assert "energy (J, estimated)" in surface["layout"]["title"]["text"]  # energy first
    assert sum(spec["data"][0]["type"] == "scatter" for spec in specs) == 2  # the two residual plots
    assert any("estimated" in i.value for i in at.info)
    assert any("CV MAPE" in m.value for m in at.markdown)
    at.get("segmented_control")[0].set_value("runtime").run()
    assert not at.exception, at.exception
    surface = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                   if json.loads(c.proto.spec)["data"][0]["type"] == "surface")
    assert "runtime (s)" in surface["layout"]["title"]["text"]


def test_models_page_loads_the_published_profiles(store: Store):
    at = app().run()
    at.switch_page("pages/models.py").run()
    next(b for b in at.button if b.label == "Load the paper's published A100 profiles").click().run()
    assert not at.exception, at.exception
    assert any("Published coefficients, no measurements" in w.value for w in at.warning)
    assert "llama-2-70b" in catalog.list_models(store).name.tolist()


def test_profile_page_marks_points_that_did_not_converge(store: Store, demo_models):
    from tests.test_profiling import _old_job_with_trials

    catalog.register_demo_models(store, list(demo_models.values()))
    job_id = _old_job_with_trials(store, {(8, 8): [1.0, 3.0, 1.0, 3.0, 1.0], (8, 32): [2.0, 2.0, 2.0]})
    at = app().run()
    at.switch_page("pages/profile.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="profile_watch").value == job_id
    assert any("1 point of 2 did not converge" in w.value for w in at.warning)
    points = next(d.value for d in at.dataframe if "point" in d.value.columns).set_index(
        ["input_tokens", "output_tokens"])
    assert points.loc[(8, 8), "point"].startswith("not converged (±") and points.loc[(8, 32), "point"] == "converged"
    listed = next(d.value for d in at.dataframe if "job" in d.value.columns).set_index("job")
    assert listed.loc[f"#{job_id}", "points not converged"] == "1"


def test_home_says_what_the_first_run_reached(store: Store, monkeypatch):
    from engine import firstrun

    report = pd.DataFrame([{"model": "demo-small", "job_id": 1, "job_status": "done",
                            "job_reason": "the error stopped improving", "elapsed_s": 61.0, "trials": 40, "points": 9,
                            "energy_cv_mape": 0.0812, "runtime_cv_mape": 0.05, "energy_noise_mape": 0.041,
                            "runtime_noise_mape": None, "unconverged_points": 2, "batch_sizes": None}])
    state = firstrun.FirstRunState("done", "done", started=0.0, finished=61.0, load_at_start=0.1,
                                   load_at_end=50.0)
    monkeypatch.setattr(firstrun, "first_run_report", lambda _store: report)
    monkeypatch.setattr(firstrun, "read_state", lambda _store, key=firstrun.STATE_KEY:
                        state if key == firstrun.STATE_KEY else None)
    at = app().run()
    assert not at.exception, at.exception
    reached = next(t.value for t in at.table if "Energy error (CV)" in t.value.columns).iloc[0]
    assert reached["Energy error (CV)"] == "8.1% (noise floor 4.1%)" and reached["Runtime error (CV)"] == "5.0%"
    assert reached["Time"] == "1 min 01 s" and reached["Points not converged"] == "2"
    assert reached["Batch sizes fitted"] == "1 only"
    assert any("The machine was busy during this run (load 50.0" in w.value for w in at.warning)


def test_home_offers_to_measure_batching_after_the_first_run_and_reports_what_it_reached(store: Store, demo_models,
                                                                                           tmp_path: Path):
    from engine import firstrun
    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements

    catalog.register_demo_models(store, list(demo_models.values()))
    import_measurements(store, write_grid_csv(tmp_path / "grid.csv", "estimated"))
    save_fits(store, fit_all(store))
    firstrun.write_state(store, firstrun.FirstRunState("done", "done", started=0.0, finished=60.0))
    at = app().run()
    assert not at.exception, at.exception
    assert any("**Measure batching** profiles both demo models at batch sizes 1, 4, 16" in m.value
               for m in at.markdown)
    (button,) = [b for b in at.button if b.label == "Measure batching, then plan"]
    assert not button.disabled
    # Demo fits that batch already (profiled with a batch axis on the Profile page, say): nothing to offer.
    from unittest import mock

    with mock.patch.object(firstrun, "demo_fits_batched", lambda _store: True):
        at = app().run()
    assert not at.exception and not [b for b in at.button if b.label == "Measure batching, then plan"]
    # Once it is done: no offer, and what it reached, with the batch axis of its fits.
    report = pd.DataFrame([{"model": "demo-small", "job_id": 3, "job_status": "done", "job_reason": None,
                            "elapsed_s": 15.0, "trials": 24, "points": 12, "energy_cv_mape": 0.09,
                            "runtime_cv_mape": 0.08, "energy_noise_mape": None, "runtime_noise_mape": None,
                            "unconverged_points": 0, "batch_sizes": (1, 16)}])
    firstrun.write_state(store, firstrun.FirstRunState("done", "done", jobs={"demo-small": 3}, started=0.0,
                                                       finished=15.0), firstrun.BATCHING_KEY)
    with mock.patch.object(firstrun, "batching_report", lambda _store: report):
        at = app().run()
    assert not at.exception, at.exception
    assert not [b for b in at.button if b.label == "Measure batching, then plan"]
    tables = [t.value for t in at.table if "Batch sizes fitted" in t.value.columns]
    assert any((t["Batch sizes fitted"] == "1 to 16").any() for t in tables)
    assert any(e.label == "What measuring batching reached" for e in at.expander)


def test_models_page_flags_points_that_did_not_converge(store: Store, demo_models):
    from engine.fitting import fit_all, save_fits
    from tests.test_profiling import _old_job_with_trials

    catalog.register_demo_models(store, list(demo_models.values()))
    steady = {(i, o): [0.001 * (i + 4 * o)] * 3 for i in (8, 32, 128) for o in (8, 32, 128)}
    steady[(8, 8)] = [0.04, 0.12, 0.04, 0.12, 0.04]  # reached the 5-trial cap, ±50%
    _old_job_with_trials(store, steady)
    fits = fit_all(store)
    assert any(f.unconverged_points == [[8, 8]] for f in fits)
    save_fits(store, fits)
    at = app().run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    assert any("1 measured point (input×output tokens: 8×8) did not converge" in w.value for w in at.warning)
