"""The Execute page with AppTest after a batched run: the measured total against the plan's
energy band (inside and outside), the share rule in a sentence, and predicted against measured
per batch. The run is stored as the worker stores one (two batches, each member its share); the
expected figures are worked out in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from engine.execution.band_check import SHARE_RULE_SENTENCES
from engine.execution.worker import SHARE_RULE
from engine.planning.band import EnergyBand
from engine.store import Store, append_frame

ROOT = Path(__file__).resolve().parent.parent


def store_batched_run(store: Store, half_width_j: float) -> int:
    """A plan of 6 queries of 10 J predicted each, in batch 1 (4 of size 4) and batch 2 (2 of size 2),
    with a band of ±``half_width_j`` (batch 1's own ±5 J, batch 2's ±1 J); an execution that ran it
    all: batch 1 measured 44 J (+10%, 3 wasted decode steps, 12 padding tokens), batch 2 18 J (−10%).
    Energy estimated. Total 62 J against 60 J."""
    band = EnergyBand(energy_j=60.0, half_width_j=half_width_j, heldout_j=half_width_j, coefficient_j=0.0,
                      noise_j=0.0, schedule_energy_j=60.0, n_queries=6, batch_half_widths_j={1: 5.0, 2: 1.0})
    ids = ["a1", "a2", "a3", "a4", "b1", "b2"]
    batch_of = [1, 1, 1, 1, 2, 2]
    size_of = [4, 4, 4, 4, 2, 2]
    with store.transaction() as con:
        plan_id = int(con.execute(
            "INSERT INTO plans (objective, energy_scope, status, energy_j, params) "
            "VALUES ('energy', 'total', 'optimal', 60.0, ?) RETURNING id",
            [json.dumps({"energy_band": band.to_dict()})]).fetchone()[0])
        append_frame(con, "plan_assignments", pd.DataFrame({
            "plan_id": plan_id, "query_id": ids, "model": "m", "device": "cpu", "input_tokens": 8,
            "output_tokens": 4, "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0, "accuracy": 0.5,
            "device_start_s": [0.0] * 4 + [1.0] * 2, "batch_id": batch_of, "batch_size": size_of}))
        execution_id = int(con.execute(
            "INSERT INTO executions (plan_id, host, status, queries_total, queries_done, settings, started_at, "
            "finished_at) VALUES (?, 'elsewhere', 'done', 6, 6, ?, current_timestamp, current_timestamp) "
            "RETURNING id", [plan_id, json.dumps({"devices": ["cpu"]})]).fetchone()[0])
        append_frame(con, "execution_results", pd.DataFrame({
            "execution_id": execution_id, "query_id": ids, "model": "m", "device": "cpu", "input_tokens": 8,
            "output_tokens": 4, "runtime_s": 1.0, "energy_j": [11.0] * 4 + [9.0] * 2, "energy_source": "estimated",
            "predicted_energy_j": 10.0, "predicted_runtime_s": 1.0, "predicted_energy_uncertainty_j": 5.0,
            "position": list(range(6)), "prompt_kind": "tokens", "batch_id": batch_of, "batch_size": size_of,
            "energy_share": [0.25] * 4 + [0.5] * 2, "wasted_decode_tokens": [0, 1, 1, 1, 0, 0],
            "padding_tokens": [0, 4, 4, 4, 0, 0]}))
        append_frame(con, "execution_batches", pd.DataFrame({
            "execution_id": execution_id, "batch_id": [1, 2], "model": "m", "device": "cpu", "position": [0, 1],
            "batch_size": [4, 2], "members": [4, 2], "query_ids": [json.dumps(ids[:4]), json.dumps(ids[4:])],
            "runtime_s": [1.0, 1.0], "energy_j": [44.0, 18.0], "energy_source": "estimated",
            "predicted_energy_j": [40.0, 20.0], "predicted_runtime_s": [4.0, 2.0], "share_rule": SHARE_RULE,
            "wasted_decode_tokens": [3, 0], "padding_tokens": [12, 0]}))
    return execution_id


def run_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    return at.switch_page("pages/execute.py").run()


def band_message(at: AppTest, kind: str) -> str:
    found = [m.value for m in at.get(kind) if "Against the plan's energy band" in m.value]
    assert len(found) == 1, [m.value for m in at.get(kind)]
    return found[0]


def test_inside_the_band_with_the_share_rule_and_a_row_per_batch(store: Store):
    store_batched_run(store, half_width_j=6.0)  # 54 J to 66 J: 62 J is inside
    at = run_page()
    assert not at.exception, at.exception
    assert band_message(at, "success") == (
        "**Against the plan's energy band:** Measured 62.0 J (estimated), predicted 60.0 J ± 6.0 J (±10.0%): "
        "inside the band (54.0 J to 66.0 J).")
    assert SHARE_RULE_SENTENCES[SHARE_RULE] in [c.value for c in at.caption]
    per_option = next(d.value for d in at.dataframe if "option" in d.value.columns)
    assert per_option.to_dict("records") == [{"option": "m@cpu", "queries": 6, "measured (estimated)": "62.0 J",
                                              "predicted": "60.0 J", "error": "+3.3%"}]
    table = next(d.value for d in at.dataframe if "model@device" in d.value.columns)
    assert table.to_dict("records") == [
        {"batch": "#1", "model@device": "m@cpu", "size": 4, "members": 4, "predicted": "40.0 J",
         "measured": "44.0 J", "error": "+10.0%", "band": "± 5.0 J", "in its band": "inside",
         "wasted decode": "3 tokens", "padding": "12 tokens"},
        {"batch": "#2", "model@device": "m@cpu", "size": 2, "members": 2, "predicted": "20.0 J",
         "measured": "18.0 J", "error": "-10.0%", "band": "± 1.0 J", "in its band": "outside",
         "wasted decode": "0 tokens", "padding": "0 tokens"}]
    assert any(chart.proto.spec and "Energy error per batch (estimated energy)" in chart.proto.spec
               for chart in at.get("plotly_chart"))


def test_outside_the_band_is_a_warning_with_how_far(store: Store):
    store_batched_run(store, half_width_j=1.0)  # 59 J to 61 J: 62 J is 1 J above
    at = run_page()
    assert not at.exception, at.exception
    assert band_message(at, "warning") == (
        "**Against the plan's energy band:** Measured 62.0 J (estimated), predicted 60.0 J ± 1.0 J (±1.7%): "
        "outside the band (59.0 J to 61.0 J), 1.0 J above it.")
    assert not [m for m in at.success if "Against the plan's energy band" in m.value]


def test_learned_output_lengths_are_written_in_tokens_and_percent():
    from ui.execution_view import lengths_table

    lengths = pd.DataFrame([{"model": "m", "category": "(all)", "queries": 4, "median_output_tokens": 14.0,
                             "mean_output_tokens": 20.25, "p90_output_tokens": 60.8, "ended_early": 0.25}])
    assert lengths_table(lengths).to_dict("records") == [
        {"model": "m", "category": "(all)", "queries": 4, "median answer": "14 tokens", "mean answer": "20 tokens",
         "90th percentile": "61 tokens", "ended early": "25%"}]


def test_the_batch_table_puts_batches_of_several_requests_before_single_ones():
    import numpy as np

    from engine.execution import compare
    from ui.execution_view import batches_table

    # Run order: batch 1 (one query), batch 2 (two), batch 3 (one): shown 2, 1, 3.
    results = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "model": "m", "device": "cpu", "batch_id": [1, 2, 2, 3],
        "batch_size": [1, 2, 2, 1], "energy_j": 1.0, "predicted_energy_j": 1.0, "runtime_s": 0.1,
        "predicted_runtime_s": 0.1, "wasted_decode_tokens": 0, "padding_tokens": 0, "error": None,
        "predicted_energy_uncertainty_j": np.nan, "energy_source": "measured", "idle_power_w": np.nan})
    table = batches_table(compare(results), None)
    assert table["batch"].tolist() == ["#2", "#1", "#3"] and table["members"].tolist() == [2, 1, 1]
    assert set(table["band"]) == {"—"} and set(table["in its band"]) == {"—"}  # no band: unknown, not zero
