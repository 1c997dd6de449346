"""The Plan page shows the batching lever and how sure its prediction is (AppTest through app.py).

The fits with a batch axis are the hand-made ones of tests/test_planning_batches.py (with a known
held-out error and 90% bands, tests/test_planning_band.py), put where the planner loads fits
from; everything else (the catalog, the stored plan) is real.
"""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from engine import catalog
from engine.formatting import format_energy
from engine.planning import list_plans
from engine.planning.service import stored_energy_band
from engine.store import Store
from tests.apptest_wait import has_metric, page_text, run_until
from tests.test_pages_plan import ROOT, button, option_table, upload
from tests.test_planning_band import band_fit

WORKLOAD = "id,input_tokens,output_tokens\n" + "".join(f"q{i},{20 + 7 * i},{10 + (13 * i) % 90}\n" for i in range(40))


def fitted(store: Store, monkeypatch: pytest.MonkeyPatch, batches=(1, 16)) -> None:
    """Models a (accuracy 0.5) and b (0.7, twice a's energy) on cpu, with energy fits of known
    held-out error (10% and 20%); with a batch axis over ``batches`` (None: batch size 1 only)."""
    for name, accuracy in (("a", 0.5), ("b", 0.7)):
        catalog.add_model(store, name=name, accuracy=accuracy, backend="external")
    fits = []
    for model, cv, scale in (("a", 0.10, 1.0), ("b", 0.20, 2.0)):
        for target, size in (("energy", scale), ("runtime", 0.01 * scale)):
            fit = band_fit(model, target, cv, scale=size)
            if batches is None:
                fit.domain.pop("batch_size")
            fits.append(fit)
    monkeypatch.setattr("engine.planning.options.load_latest_fits", lambda store_, energy_scope=None: fits)


def planned_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/plan.py").run()
    assert not at.exception, at.exception
    upload(at, "w.csv", WORKLOAD)
    assert at.number_input(key="plan_target_0.60").value == pytest.approx(0.6)  # the two models' mean score
    button(at, "Plan").click().run()
    run_until(at, has_metric("Energy"))
    assert not at.error, [e.value for e in at.error]
    return at


def test_the_plan_page_shows_batch_sizes_the_saving_and_the_best_single_option_at_its_best_size(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    fitted(store, monkeypatch)
    at = planned_page()
    table = option_table(at)
    assert table["batch sizes"].tolist() == ["1, 2, 4, 8, 16", "1, 2, 4, 8, 16"]
    text = page_text(at)
    plan_id = int(list_plans(store).id.iloc[0])
    stored = json.loads(store.query_one("SELECT CAST(params AS VARCHAR) FROM plans WHERE id = ?", [plan_id])[0])
    saving = stored["batching_saving"]
    assert saving > 0.5
    assert any(m.value.startswith(f"Batching saves **{saving:.1%}** against the same plan at batch 1")
               for m in at.markdown)
    assert "The best a user could do by hand: batch everything on b at B=16: " in text
    assert "optimal for per-request costs (proven" in text and "; forming the batches from the queries' real " \
        "lengths adds" in text
    usage = next(d.value for d in at.dataframe if "batch size" in d.value.columns)
    assert set(usage["batch size"]) == {"16"} and usage["queries"].sum() == 40
    assert usage["batches"].sum() == sum(stored["batches"].values())
    # The baselines: each model alone at its best batch size; every other size in the expander.
    baselines = next(d.value for d in at.dataframe if "schedule" in d.value.columns and "plan saves" in d.value.columns)
    assert "only b@cpu at B=16 (its best batch size)" in set(baselines.schedule)
    assert not any(name.startswith("only b@cpu×") for name in baselines.schedule)
    # The timeline: one bar per batch, ending where the busiest device does.
    chart = next(c for c in at.get("plotly_chart") if "batch by batch" in c.proto.spec)
    spec = json.loads(chart.proto.spec)
    bars = sum(len(trace["x"]) for trace in spec["data"])
    assert bars == sum(stored["batches"].values())


def test_the_headline_gives_the_band_and_says_it_is_far_larger_than_the_gap(store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch):
    fitted(store, monkeypatch)
    at = planned_page()
    band = stored_energy_band(store, int(list_plans(store).id.iloc[0]))
    assert band is not None and band.relative > 0.1  # the held-out errors alone are 10% and 20%
    energy = next(m for m in at.metric if m.label == "Energy")
    assert energy.value == format_energy(band.energy_j) and energy.delta == f"±{band.relative:.1%} expected"
    headline = next(m.value for m in at.markdown if m.value.startswith("Expected to measure between"))
    assert headline.startswith(f"Expected to measure between {format_energy(band.low_j)} and "
                               f"{format_energy(band.high_j)} (±{band.relative:.1%})")
    assert f"The prediction's uncertainty (±{band.relative:.1%}) is far larger than the proof's gap" in headline


def test_without_a_batch_axis_one_line_says_plans_are_at_batch_size_one(store: Store,
                                                                         monkeypatch: pytest.MonkeyPatch):
    fitted(store, monkeypatch, batches=None)
    at = planned_page()
    assert option_table(at)["batch sizes"].tolist() == ["1 (profiled at batch size 1 only)"] * 2
    text = page_text(at)
    assert "Plans here are at batch size 1: no model was profiled at several batch sizes" in text
    assert "--batch-sizes 1,2,4,8" in text and "Batching saves" not in text
    assert "the optimum of its predictions (proven" in text
    usage = next(d.value for d in at.dataframe if "batch size" in d.value.columns)
    assert set(usage["batch size"]) == {"1"} and "formed" not in usage.columns
