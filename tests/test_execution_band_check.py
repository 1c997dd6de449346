"""engine/execution/band_check.py: an execution's measured total against its plan's energy band,
per execution and per batch, and the share rule, each in one sentence.

The comparisons are built by :func:`engine.execution.compare` from hand-made results; every
expected figure is worked out in the comments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.execution import check_band, compare, share_rule_sentence, with_batch_bands
from engine.execution.band_check import BATCH_BANDS, PLAN_BAND, SHARE_RULE_SENTENCES
from engine.execution.worker import SHARE_RULE
from engine.planning.band import EnergyBand

COLUMNS = ["id", "model", "device", "batch_id", "batch_size", "energy_j", "predicted_energy_j", "runtime_s",
           "predicted_runtime_s", "wasted_decode_tokens", "padding_tokens", "error"]


def results(rows: list[tuple], source: str = "measured") -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.assign(predicted_energy_uncertainty_j=np.nan, energy_source=source, idle_power_w=np.nan)


def six_queries(batch_1_j: float = 11.0, batch_2_j: float = 9.0, failed: bool = False) -> list[tuple]:
    """Batch 1: four queries of 10 J predicted; batch 2: two of 10 J. Measured: each member's share."""
    rows = [(f"a{i}", "m", "cpu", 1, 4, batch_1_j, 10.0, 0.1, 0.1, 0, 0, None) for i in range(4)]
    error = "MemoryError: out of memory" if failed else None
    energy = np.nan if failed else batch_2_j
    rows += [(f"b{i}", "m", "cpu", 2, 2, energy, 10.0, 0.1, 0.1, 0, 0, error) for i in range(2)]
    return rows


def band(half_width_j: float, batch_half_widths_j: dict[int, float] | None = None, n_queries: int = 6,
         energy_j: float = 65.0) -> EnergyBand:
    """A plan's band: its energy 65 J includes 5 J of model loads, which an execution does not measure."""
    return EnergyBand(energy_j=energy_j, half_width_j=half_width_j, heldout_j=half_width_j, coefficient_j=0.0,
                      noise_j=0.0, schedule_energy_j=60.0, n_queries=n_queries,
                      batch_half_widths_j=batch_half_widths_j or {})


def test_inside_the_band_around_the_prediction_of_what_ran_not_the_plans_energy():
    # Measured 4 × 11 + 2 × 9 = 62 J against 60 J predicted; the band ±6 J around 60 J: 54 J to 66 J
    # (around the plan's 65 J, which includes loads, it would be 59 J to 71 J).
    check = check_band(compare(results(six_queries())), band(6.0))
    assert (check.inside, check.scope, check.n_compared, check.n_planned) == (True, PLAN_BAND, 6, 6)
    assert (check.low_j, check.high_j) == pytest.approx((54.0, 66.0))
    assert check.sentence() == ("Measured 62.0 J, predicted 60.0 J ± 6.0 J (±10.0%): inside the band "
                                "(54.0 J to 66.0 J).")


def test_outside_the_band_above_and_below_says_by_how_much():
    above = check_band(compare(results(six_queries(batch_1_j=13.0))), band(6.0))  # 52 + 18 = 70 J
    assert above.inside is False
    assert above.sentence() == ("Measured 70.0 J, predicted 60.0 J ± 6.0 J (±10.0%): outside the band "
                                "(54.0 J to 66.0 J), 4.0 J above it.")
    below = check_band(compare(results(six_queries(batch_1_j=8.0, batch_2_j=7.0))), band(6.0))  # 32 + 14 = 46 J
    assert below.inside is False
    assert below.sentence().endswith("outside the band (54.0 J to 66.0 J), 8.0 J below it.")


def test_estimated_energy_is_labelled_in_the_sentence_and_the_json():
    check = check_band(compare(results(six_queries(), source="estimated")), band(6.0))
    assert check.sentence().startswith("Measured 62.0 J (estimated), predicted 60.0 J")
    document = check.to_json()
    assert document["estimated"] is True and document["inside"] is True
    assert document["low_j"] == pytest.approx(54.0) and document["sentence"] == check.sentence()


def test_a_run_of_part_of_the_plan_is_judged_by_the_bands_of_its_batches():
    # Batch 2 failed: batch 1 alone, 44 J against 40 J, its own band ±5 J: 35 J to 45 J, inside.
    comparison = compare(results(six_queries(failed=True)))
    check = check_band(comparison, band(6.0, {1: 5.0, 2: 1.0}))
    assert (check.inside, check.scope, check.n_compared) == (True, BATCH_BANDS, 4)
    totals = (check.measured_energy_j, check.predicted_energy_j, check.half_width_j)
    assert totals == pytest.approx((44.0, 40.0, 5.0))
    assert check.sentence() == ("Measured 44.0 J, predicted 40.0 J ± 5.0 J (±12.5%): inside the band "
                                "(35.0 J to 45.0 J). Only 4 of 6 queries were measured, so the band is that of "
                                "the batches that ran (each batch's own band, added).")
    # Without the batches' own bands the plan's band (for all six) says nothing about four: unknown.
    unknown = check_band(comparison, band(6.0))
    assert unknown.inside is None and unknown.half_width_j is None
    assert unknown.sentence() == ("Measured 44.0 J, predicted 40.0 J: only 4 of 6 queries were measured and the "
                                  "plan's band is for all of them, so whether this part lies inside it is unknown.")


def test_without_a_band_or_a_measurement_the_verdict_is_unknown_and_says_why():
    no_band = check_band(compare(results(six_queries())), None)
    assert no_band.inside is None and no_band.n_planned is None
    assert no_band.sentence() == ("Measured 62.0 J, predicted 60.0 J: the plan has no energy band (an imported "
                                  "schedule, a fit without held-out error, or a plan made before bands), so whether "
                                  "this lies inside it is unknown.")
    unmeasured = results(six_queries()).assign(energy_j=np.nan)
    check = check_band(compare(unmeasured), band(6.0))
    assert check.inside is None and check.measured_energy_j is None
    assert "0 J" not in check.sentence() and "unknown" in check.sentence()


def test_each_batch_against_its_own_band():
    # Batch 1: +4 J against ±5 J, inside; batch 2: −2 J against ±1 J, outside; batch 3 has none stored.
    rows = six_queries() + [("c0", "m", "cpu", 3, 1, 3.0, 2.0, 0.1, 0.1, 0, 0, None)]
    frame = with_batch_bands(compare(results(rows)).per_batch, band(6.0, {1: 5.0, 2: 1.0}, n_queries=7))
    assert list(frame.batch_id) == [1, 2, 3]
    assert frame.half_width_j.iloc[:2].tolist() == [5.0, 1.0] and np.isnan(frame.half_width_j.iloc[2])
    assert frame.inside_band.tolist() == [True, False, None]
    assert with_batch_bands(compare(results(rows)).per_batch, None).inside_band.tolist() == [None, None, None]


def test_the_share_rule_reads_as_one_sentence_for_the_rule_the_worker_uses():
    assert SHARE_RULE in SHARE_RULE_SENTENCES
    sentence = share_rule_sentence(pd.Series([SHARE_RULE, SHARE_RULE]))
    assert sentence == SHARE_RULE_SENTENCES[SHARE_RULE]
    assert "tokens it processed" in sentence and sentence.count(".") == 1  # one sentence
    assert share_rule_sentence(pd.Series([], dtype=object)) is None  # no batch of more than one request
    assert share_rule_sentence(["runtime"]) == ("Each request's share of its batch's energy was taken by the rule "
                                                '"runtime".')


def test_cli_execute_prints_the_band_sentence(store, demo_models, capsys):
    """A real run of three tiny queries (a few joules, estimated) against a plan that predicted 100 J
    each with a band of ±1 J: below the band, and the sentence says so."""
    import json
    import re

    from engine import catalog, cli
    from engine.store import append_frame

    catalog.register_demo_models(store, list(demo_models.values()))
    plan_band = EnergyBand(energy_j=300.0, half_width_j=1.0, heldout_j=1.0, coefficient_j=0.0, noise_j=0.0,
                           schedule_energy_j=300.0, n_queries=3, batch_half_widths_j={1: 0.5, 2: 0.5})
    with store.transaction() as con:
        plan_id = int(con.execute("INSERT INTO plans (objective, energy_scope, status, energy_j, params) VALUES "
                                  "('energy', 'total', 'optimal', 300.0, ?) RETURNING id",
                                  [json.dumps({"energy_band": plan_band.to_dict()})]).fetchone()[0])
        append_frame(con, "plan_assignments", pd.DataFrame({
            "plan_id": plan_id, "query_id": ["s1", "s2", "s3"], "model": "demo-small", "device": "cpu",
            "input_tokens": [16, 16, 8], "output_tokens": [4, 4, 2], "predicted_energy_j": 100.0,
            "predicted_runtime_s": 0.1, "accuracy": 0.5, "device_start_s": [0.0, 0.0, 1.0], "batch_id": [1, 1, 2],
            "batch_size": [2, 2, 1]}))
    assert cli.main(["execute", "--plan", str(plan_id)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("band: "))
    assert re.fullmatch(r"band: Measured \d+\.\d+ J( \(estimated\))?, predicted 300\.0 J ± 1\.0 J \(±0\.3%\): "
                        r"outside the band \(299\.0 J to 301\.0 J\), \d+\.\d+ J below it\.", line), line
