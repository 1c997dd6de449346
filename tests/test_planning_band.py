"""engine.planning.band: the range a plan's measured total is expected in, worked by hand from
fits whose held-out error, standard error and trial noise are known; stored with the plan, in
``plan --json`` (DESIGN.md's ``energy_band_j``) and in words beside the proven gap."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog
from engine.cli import main
from engine.fitting.result import Z_90
from engine.planning import PlanSettings, make_plan, store_plan
from engine.planning.band import EnergyBand, band_sentence, plan_energy_band, uncertainty_against_gap
from engine.planning.service import stored_energy_band
from engine.store import Store
from tests.conftest import write_grid_csv
from tests.test_planning_batches import BatchFit, batch_fit, entry, no_memory, predict, queries
from engine.planning import options_from_fits

ROOT = Path(__file__).resolve().parent.parent


class BandFit(BatchFit):
    """A :class:`BatchFit` whose standard error is known: ``se_per_input_token`` J per token of
    the prompt it is asked at (so the test can tell which prompt the band used)."""

    def standard_error(self, input_tokens, output_tokens, batch_size=None):
        tin, _, _ = np.broadcast_arrays(np.asarray(input_tokens, dtype=float), np.asarray(output_tokens, dtype=float),
                                        np.asarray(1 if batch_size is None else batch_size, dtype=float))
        return (self.details["se_per_input_token"] * tin).reshape(-1)


def band_fit(model: str, target: str, cv_mape: float | None, noise_rel_sd: float | None = 0.05,
             se_per_input_token: float = 0.001, scale: float = 1.0) -> BandFit:
    base = batch_fit(model, "cpu", target, scale)
    return BandFit(**{**base.__dict__, "cv_mape": cv_mape, "noise_rel_sd": noise_rel_sd,
                      "coef_cov": None if noise_rel_sd is None else [[0.0]],
                      "details": {"se_per_input_token": se_per_input_token}})


def option_of(model: str, cv_mape: float | None, backend: str | None = None, **fit):
    energy = band_fit(model, "energy", cv_mape, **fit)
    runtime = band_fit(model, "runtime", cv_mape, scale=0.01)
    options, _ = options_from_fits([energy, runtime], {model: entry(model, 0.5)}, memory_rules=no_memory)
    return [replace(o, backend=backend) for o in options]


def schedule(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (model, batch_id, input_tokens, output_tokens, predicted_energy_j), on cpu."""
    return pd.DataFrame(rows, columns=["model", "batch_id", "input_tokens", "output_tokens", "predicted_energy_j"]
                        ).assign(device="cpu")


def test_the_band_adds_held_out_error_and_coefficient_error_and_noise_in_quadrature():
    options = option_of("a", cv_mape=0.10) + option_of("b", cv_mape=0.20)
    plan = schedule([("a", 1, 100, 50, 30.0), ("a", 1, 40, 20, 10.0),   # a batch of two: 40 J, longest prompt 100
                     ("a", 2, 10, 10, 20.0),                            # a batch of one
                     ("b", 3, 200, 30, 50.0)])
    band = plan_energy_band(plan, options, energy_j=110.0)
    assert band.heldout_j == pytest.approx(0.10 * 60.0 + 0.20 * 50.0)
    # Padded (the default rule): the standard error at the batch's longest prompt, summed over batches.
    assert band.coefficient_j == pytest.approx(Z_90 * 0.001 * (100 + 10 + 200))
    assert band.noise_j == pytest.approx(Z_90 * 0.05 * math.sqrt(40.0 ** 2 + 20.0 ** 2 + 50.0 ** 2))
    assert band.half_width_j == pytest.approx(band.heldout_j + band.coefficient_j + band.noise_j)
    assert (band.low_j, band.high_j) == pytest.approx((110.0 - band.half_width_j, 110.0 + band.half_width_j))
    assert band.relative == pytest.approx(band.half_width_j / 110.0)
    assert band.schedule_energy_j == 110.0 and band.n_queries == 4 and band.batches_without_interval == 0
    # Each batch's own band: its pair's held-out error on its energy plus its 90% half-width.
    assert band.batch_half_widths_j[1] == pytest.approx(0.10 * 40 + Z_90 * math.hypot(0.001 * 100, 0.05 * 40))
    assert band.batch_half_widths_j[3] == pytest.approx(0.20 * 50 + Z_90 * math.hypot(0.001 * 200, 0.05 * 50))


def test_a_ragged_batch_is_banded_at_its_members_own_prompts():
    options = option_of("a", cv_mape=0.10, backend="llama.cpp")
    plan = schedule([("a", 1, 100, 50, 30.0), ("a", 1, 40, 20, 10.0)])
    band = plan_energy_band(plan, options, energy_j=40.0)
    assert band.coefficient_j == pytest.approx(Z_90 * 0.001 * (100 + 40) / 2)


def test_load_energy_moves_the_centre_not_the_width():
    options = option_of("a", cv_mape=0.10)
    plan = schedule([("a", 1, 100, 50, 30.0)])
    without = plan_energy_band(plan, options, energy_j=30.0)
    loaded = plan_energy_band(plan, options, energy_j=45.0)  # 15 J of load energy, the planner's own figure
    assert loaded.half_width_j == pytest.approx(without.half_width_j)
    assert loaded.high_j == pytest.approx(without.high_j + 15.0)
    assert loaded.schedule_energy_j == 30.0
    assert loaded.around(30.0) == pytest.approx((without.low_j, without.high_j))


def test_no_held_out_error_means_no_band_and_no_interval_is_counted():
    plan = schedule([("a", 1, 100, 50, 30.0), ("b", 2, 10, 10, 5.0)])
    published_like = option_of("a", cv_mape=0.10) + option_of("b", cv_mape=None)
    assert plan_energy_band(plan, published_like, energy_j=35.0) is None
    no_repeats = option_of("a", cv_mape=0.10) + option_of("b", cv_mape=0.30, noise_rel_sd=None)
    band = plan_energy_band(plan, no_repeats, energy_j=35.0)
    assert band.batches_without_interval == 1
    assert band.heldout_j == pytest.approx(0.10 * 30 + 0.30 * 5)
    assert band.coefficient_j == pytest.approx(Z_90 * 0.001 * 100)  # batch 2 counts by its held-out error only
    assert band.batch_half_widths_j[2] == pytest.approx(0.30 * 5)
    assert plan_energy_band(plan.iloc[:0], no_repeats, energy_j=0.0) is None


def test_the_band_is_worded_beside_the_gap():
    band = EnergyBand(energy_j=100.0, half_width_j=12.0, heldout_j=10.0, coefficient_j=1.0, noise_j=1.0,
                      schedule_energy_j=100.0, n_queries=3)
    assert band_sentence(band) == ("Expected to measure between 88.0 J and 112.0 J (±12.0%), from the fits' "
                                   "held-out error and their 90% bands.")
    assert ", estimated energy)" in band_sentence(band, estimated=True) and ") (" not in band_sentence(band, estimated=True)
    assert "unknown" in band_sentence(None)
    assert uncertainty_against_gap(band, 1e-5).startswith(
        "The prediction's uncertainty (±12.0%) is far larger than the proof's gap (0.0010%)")
    assert uncertainty_against_gap(band, 0.05) == "The prediction's uncertainty (±12.0%) is larger than the proof's gap (5.0000%)."
    assert uncertainty_against_gap(band, 0.2).startswith("The proof's gap (20.0000%) is larger than")
    assert uncertainty_against_gap(None, 1e-5).startswith("Only the proof's gap (0.0010%) is known")


# -- with the plan -------------------------------------------------------------------------------

def banded_plan(n: int = 30):
    options = option_of("a", cv_mape=0.10) + option_of("b", cv_mape=0.25, scale=2.0)
    options = [replace(o, accuracy=0.7) if o.model == "b" else o for o in options]
    tin, tout = queries(n, seed=4)
    return make_plan(predict(options, tin, tout), PlanSettings(accuracy_target=0.6), explain=False, compare=False)


def test_a_plan_carries_its_band_in_json_and_stores_it_with_each_batch(store: Store):
    result = banded_plan()
    band = result.energy_band
    assert band is not None and band.energy_j == pytest.approx(result.energy_j)
    assert band.schedule_energy_j == pytest.approx(result.schedule.predicted_energy_j.sum())
    assert set(band.batch_half_widths_j) == set(result.schedule.batch_id)
    document = result.to_json()
    assert document["energy_band_j"] == pytest.approx([band.low_j, band.high_j])
    assert document["energy_band_j"][0] < document["energy_j"] < document["energy_band_j"][1]
    assert document["energy_band"]["relative"] == pytest.approx(band.relative)
    json.dumps(document, allow_nan=False)
    for name, accuracy in (("a", 0.5), ("b", 0.7)):
        catalog.add_model(store, name=name, accuracy=accuracy, backend="external")
    plan_id = store_plan(store, result, None)
    stored = stored_energy_band(store, plan_id)
    assert stored == band  # the summary, exactly
    assert stored.batch_half_widths_j == pytest.approx(band.batch_half_widths_j, rel=1e-5)


def test_a_published_plan_has_no_band_and_says_so_in_json(store: Store):
    result = banded_plan()
    unbanded = make_plan(result.predictions.at_batch_size_one(), PlanSettings(accuracy_target=0.6),
                         explain=False, compare=False)
    assert unbanded.energy_band is not None  # batch size 1: the same fits, still banded
    published = [replace(o, energy_fit=replace(o.energy_fit, cv_mape=None)) for o in result.predictions.options]
    tin, tout = queries(30, seed=4)
    plain = make_plan(predict(published, tin, tout), PlanSettings(accuracy_target=0.6), explain=False, compare=False)
    assert plain.energy_band is None and plain.to_json()["energy_band_j"] is None
    plan_id = store_plan(store, plain, None)
    assert stored_energy_band(store, plan_id) is None


def test_plan_json_gives_the_band_of_measured_fits(isolated_db: Path, tmp_path: Path, capfd):
    """DESIGN.md: plan --json has energy_band_j = [low, high] around energy_j; the text says it too."""
    from engine.fitting import load_latest_fits

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["import-measurements", str(write_grid_csv(tmp_path / "grid.csv")), "--db", str(isolated_db)]) == 0
        assert main(["fit", "--db", str(isolated_db)]) == 0
    catalog.add_model(Store(isolated_db), name="sim", accuracy=0.6, backend="external")
    workload = tmp_path / "w.csv"
    workload.write_text("id,input_tokens,output_tokens\n" + "".join(f"q{i},{16 + 8 * i},{8 + 4 * i}\n"
                                                                  for i in range(12)))
    capfd.readouterr()
    assert main(["plan", "--workload", str(workload), "--json", "--db", str(isolated_db)]) == 0
    document = json.loads(capfd.readouterr().out)
    low, high = document["energy_band_j"]
    assert low < document["energy_j"] < high
    energy_fit = next(f for f in load_latest_fits(Store(isolated_db)) if f.target == "energy")
    # One option: the held-out part is its cv_mape × the plan's energy; the 90% bands add to it.
    held_out = energy_fit.cv_mape * document["energy_j"]
    assert document["energy_band"]["heldout_j"] == pytest.approx(held_out)
    assert high - document["energy_j"] > held_out
    assert stored_energy_band(Store(isolated_db), document["plan_id"]).high_j == pytest.approx(high)
    assert main(["plan", "--workload", str(workload), "--db", str(isolated_db)]) == 0
    text = capfd.readouterr().out
    assert "expected to measure between" in text and "far larger than the proof's gap" in text
