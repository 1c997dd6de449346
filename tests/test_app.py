"""AppTest runs of every page: they render without exceptions and show the real state."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import catalog
from engine.store import Store
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


def test_home_shows_demo_models_and_sensors(store: Store, demo_models):
    catalog.register_demo_models(store, list(demo_models.values()))
    at = app().run()
    assert not at.exception
    text = all_text(at)
    for demo in demo_models.values():
        assert demo.name in text
    assert "Energy sensors on this host" in text
    assert "rapl" in text  # the sensor table lists RAPL, found or missing with its reason


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
    at = app().run()
    at.switch_page("pages/profile.py").run()
    at.selectbox(key="profile_model").set_value("demo-small")
    at.radio(key="profile_design").set_value("custom")
    at.text_input(key="profile_inputs").set_value("8")
    at.text_input(key="profile_outputs").set_value("4,8")
    at.number_input(key="profile_max").set_value(3)
    at.number_input(key="profile_idle").set_value(0.5)
    next(b for b in at.button if b.label == "Start profiling").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    job_id = int(store.query_one("SELECT max(id) FROM profiling_jobs")[0])
    deadline = time.monotonic() + 120
    while jobs.get_job(store, job_id).status in jobs.ACTIVE and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.get_job(store, job_id).status == "done"
    at.run()
    assert any("Done: " in s.value for s in at.success)
    assert any(m.label == "Trials" and m.value == "6" for m in at.metric)  # 2 points x 3 trials
    assert any("estimated" in c.value for c in at.caption)


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


def test_models_page_fits_and_shows_surfaces(store: Store, tmp_path: Path):
    from engine.measurements_io import import_measurements

    import_measurements(store, write_grid_csv(tmp_path / "grid.csv", "estimated"))
    at = app().run()
    at.switch_page("pages/models.py").run()
    assert any("No fits yet" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Fit all measured models").click().run()
    assert not at.exception, at.exception
    assert any("Fitted 2 surfaces" in s.value for s in at.success)
    charts = at.get("plotly_chart")
    assert len(charts) >= 4  # two surfaces and two residual plots
    assert any("estimated" in i.value for i in at.info)
    assert any("CV MAPE" in m.value for m in at.markdown)


def test_models_page_loads_the_published_profiles(store: Store):
    at = app().run()
    at.switch_page("pages/models.py").run()
    next(b for b in at.button if b.label == "Load the paper's published A100 profiles").click().run()
    assert not at.exception, at.exception
    assert any("Published coefficients, no measurements" in w.value for w in at.warning)
    assert "llama-2-70b" in catalog.list_models(store).name.tolist()
