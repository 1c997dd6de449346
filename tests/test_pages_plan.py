"""The Plan page (Streamlit's AppTest through app.py's navigation): options, planning in the
background, the schedule and baselines, uploads with problems, and demo against published models.
The same planning through ``python -m engine plan`` is tests/test_cli_plan.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from engine.fitting import load_reference_profiles
from engine.formatting import format_energy
from engine.planning import list_plans, load_plan
from engine.store import Store
from tests.apptest_wait import has_metric, run_until
from tests.test_cli_plan import MALFORMED

ROOT = Path(__file__).resolve().parent.parent


def plan_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/plan.py").run()
    assert not at.exception, at.exception
    return at


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def option_table(at: AppTest) -> pd.DataFrame:
    """The Plan page's table of options (model, device, source, accuracy, use)."""
    return next(d.value for d in at.data_editor if "source" in d.value.columns)


def target_input(at: AppTest):
    return next(n for n in at.number_input if n.label == "Accuracy target (fraction)")


def use_sample_workload(at: AppTest) -> None:
    source = at.radio(key="plan_source")
    source.set_value(next(o for o in source.options if o.startswith("Sample workload"))).run()
    assert not at.exception, at.exception


def upload(at: AppTest, name: str, text: str) -> None:
    at.file_uploader(key="workload_upload").set_value((name, text.encode(), "text/csv"))
    at.run()
    assert not at.exception, at.exception


def test_page_on_an_empty_database_offers_the_reference_profiles(store: Store):
    at = plan_page()
    assert any("Nothing to plan with yet" in i.value for i in at.info)
    assert not at.metric
    button(at, "Load the published A100 reference profiles").click().run()
    assert not at.exception, at.exception
    at.run()
    assert not at.exception, at.exception
    assert not any("Nothing to plan with yet" in i.value for i in at.info)
    table = option_table(at)
    assert len(table) == 7 and "llama-2-70b" in set(table.model)
    assert set(table.source) == {"published"} and table.use.all()


def test_page_plans_the_sample_workload(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    use_sample_workload(at)
    assert any("50 queries read from" in s.value for s in at.success)
    target = target_input(at).value
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))  # the plan is made in the background
    assert not at.error, [e.value for e in at.error]

    metrics = {m.label: m.value for m in at.metric}
    assert {"Energy", "Per query", "Mean accuracy", "Proven gap"} <= set(metrics)
    plans = list_plans(store)
    assert len(plans) == 1 and plans.status.iloc[0] == "optimal"
    stored = plans.iloc[0]
    assert metrics["Energy"] == format_energy(stored.energy_j)
    assert metrics["Per query"] == format_energy(stored.energy_j / 50)  # the headline's unit, not Wh
    assert metrics["Mean accuracy"] == f"{stored.accuracy:.4f}"
    assert float(metrics["Mean accuracy"]) >= target - 5e-5
    assert metrics["Proven gap"] == f"{stored.gap:.4%}"

    downloads = at.get("download_button")
    assert any(d.label == "Download the schedule (CSV)" for d in downloads)
    listed = next(d.value for d in at.dataframe if "solved in" in d.value.columns).iloc[0]  # the stored plans, in words
    assert (listed.plan, listed.energy, listed.queries) == ("#1", format_energy(stored.energy_j), "50")
    assert listed.gap == f"{stored.gap:.4%}" and "T" not in listed.created
    baselines = next(d.value for d in at.dataframe if "schedule" in d.value.columns)
    names = set(baselines.schedule)
    assert {"round-robin", "random", "greedy cheapest-first"} <= names
    assert sum(name.startswith("only ") for name in names) == 7
    verdicts = baselines["meets the targets"]
    assert (verdicts == "yes").any() and (verdicts != "yes").any()
    for verdict in verdicts[verdicts != "yes"]:  # a baseline that misses says why
        assert verdict.startswith("no: ") and ("below the target" in verdict or "deadline" in verdict
                                               or "minimum accuracy" in verdict), verdict


def test_the_trade_off_curves_are_drawn_in_the_background(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    use_sample_workload(at)
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))
    button(at, "Draw energy against the accuracy target and the deadline").click().run()
    run_until(at, lambda a: any(c.proto.spec and "Energy against the deadline" in c.proto.spec
                                for c in a.get("plotly_chart")))
    charts = {c.key if hasattr(c, "key") else None: c for c in at.get("plotly_chart")}
    deadline = next(c for c in at.get("plotly_chart") if "Energy against the deadline" in c.proto.spec)
    spec = json.loads(deadline.proto.spec)
    assert spec["layout"]["yaxis"]["rangemode"] == "tozero"  # no negative energy axis
    assert all(text[0].isdigit() for text in spec["layout"]["xaxis"]["ticktext"])  # "30 s", "2 min 00 s"
    assert charts


def test_page_lists_every_problem_of_an_uploaded_malformed_csv(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    assert at.radio(key="plan_source").value == "Upload a CSV"
    upload(at, "bad.csv", MALFORMED)
    assert any("The workload has 4 problems" in e.value and "Fix them, or tick" in e.value for e in at.error)
    problems = next(d.value for d in at.dataframe if "where" in d.value.columns)
    assert list(problems["where"]) == ["bad.csv:2", "bad.csv:3", "bad.csv:4", "bad.csv:5"]
    assert list(problems["column"]) == ["input_tokens", "input_tokens", "", "output_tokens"]
    assert button(at, "Plan").disabled
    assert list_plans(store).empty


def test_one_problem_is_one_and_a_ticked_box_is_not_asked_for_again(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    upload(at, "one.csv", "id,input_tokens,output_tokens\na,10,5\nb,-1,5\n")
    assert [e.value for e in at.error if "problem" in e.value] == [
        "The workload has 1 problem; nothing was planned. Fix it, or tick *Drop bad rows* to plan the rest."]
    at.checkbox(key="plan_drop_bad").check().run()
    assert not at.error and any("1 query read from one" in s.value for s in at.success)
    assert any("1 bad row dropped" in w.value for w in at.warning)
    upload(at, "ragged.csv", "id,input_tokens\na,10,5,6\n")  # a row the reader cannot split refuses the file
    message = next(e.value for e in at.error if "problem" in e.value)
    assert "or tick" not in message and "even with *Drop bad rows* ticked" in message


def test_a_new_upload_hides_the_plan_of_the_old_one(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    upload(at, "first.csv", "id,input_tokens,output_tokens\na,100,50\nb,200,80\n")
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))
    assert any(h.value.startswith("4. The schedule (plan #1)") for h in at.subheader)
    upload(at, "second.csv", "id,input_tokens,output_tokens\nx,30,20\ny,40,20\nz,50,20\n")
    assert not at.metric and not any(h.value.startswith("4. The schedule") for h in at.subheader)
    assert not any(d.label == "Download the schedule (CSV)" for d in at.get("download_button"))
    assert any("The workload changed after plan #1 (2 queries of first)" in i.value for i in at.info)
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))
    assert any(h.value.startswith("4. The schedule (plan #2)") for h in at.subheader)


def test_pressing_enter_in_a_field_of_the_targets_does_not_plan(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    form = next(f for f in at.get("form") if f.proto.form.form_id.endswith("plan_settings"))
    assert form.proto.form.enter_to_submit is False


def register_fitted_demo(store: Store, demo_models, tmp_path: Path) -> None:
    """demo-small in the catalog with fitted surfaces on cpu (from a known synthetic grid)."""
    from engine import catalog
    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements
    from tests.conftest import write_grid_csv

    catalog.register_demo_models(store, list(demo_models.values()))
    grid = write_grid_csv(tmp_path / "grid.csv", "estimated")
    grid.write_text(grid.read_text().replace("sim,gpu0,", "demo-small,cpu,"))
    import_measurements(store, grid)
    save_fits(store, fit_all(store, model="demo-small"))


def test_demo_models_are_not_mixed_with_published_ones_and_the_target_change_is_said(store: Store, demo_models,
                                                                                   tmp_path: Path):
    register_fitted_demo(store, demo_models, tmp_path)
    at = plan_page()
    table = option_table(at)
    assert table[["model", "source"]].values.tolist() == [["demo-small", "demo"]] and table.use.all()
    demo_target = target_input(at).value

    load_reference_profiles(store)  # the published A100 profiles arrive (the Home or Models page)
    at.run()
    table = option_table(at).set_index("model")
    assert table.loc["demo-small", "source"] == "demo" and not table.loc["demo-small", "use"]
    assert table.drop(index="demo-small").use.all() and len(table) == 8
    new_target = target_input(at).value
    assert new_target != demo_target
    assert any(f"Accuracy target set to {new_target:.3f}" in i.value and f"(it was {demo_target:.3f})" in i.value
               for i in at.info)

    upload(at, "w.csv", "id,input_tokens,output_tokens\n" + "".join(f"q{i},{50 + i},20\n" for i in range(20)))
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))
    schedule = load_plan(store, int(list_plans(store).id.iloc[0]))[1]
    assert "demo-small" not in set(schedule.model)


