"""Fits with a batch axis (issue 13): trials at several batch sizes, fitted in (τin, τout, B)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.catalog import CatalogEntry
from engine.errors import InputError
from engine.fitting import fit_frame
from engine.fitting.forms import BATCH_FORMS, BatchKV
from engine.fitting.predict import residuals
from engine.fitting.result import FitResult
from engine.planning.options import options_from_fits

#: One batch of B requests of (τin, τout): a per-batch fixed cost, a per-request one, prefill per
#: prompt token of each request, per decode step a weights read shared by the batch, and per
#: request and step its own compute and its KV reads over the prompt (J).
LAW = {"intercept": 3.0, "batch_size": 0.4, "batch_x_input": 0.01, "output_tokens": 1.2, "batch_x_output": 0.05,
       "batch_x_input_x_output": 2e-4}
INPUTS, OUTPUTS, SIZES = (8, 32, 128, 512), (8, 32, 128), (1, 2, 4, 8, 16)


def law(tin, tout, size, coefficients=LAW):
    terms = {"intercept": np.ones_like(tin), "batch_size": size, "batch_x_input": size * tin, "output_tokens": tout,
             "batch_x_output": size * tout, "batch_x_input_x_output": size * tin * tout}
    return sum(value * terms[name] for name, value in coefficients.items())


def batch_frame(sizes=SIZES, trials: int = 3, noise: float = 0.02, seed: int = 0, coefficients=LAW) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    grid = np.array([(i, o, b) for i in INPUTS for o in OUTPUTS for b in sizes for _ in range(trials)], dtype=float)
    tin, tout, size = grid.T
    energy = law(tin, tout, size, coefficients) * np.exp(rng.normal(0, noise, len(grid)))
    runtime = law(tin, tout, size, coefficients) / 50 * np.exp(rng.normal(0, noise, len(grid)))
    return pd.DataFrame({"model": "m", "device": "cpu", "input_tokens": tin.astype(int), "output_tokens": tout.astype(int),
                         "batch_size": size.astype(int), "runtime_s": runtime, "energy_j": energy,
                         "energy_source": "estimated"})


def test_a_fit_with_a_batch_axis_recovers_the_physical_law_and_chooses_a_batch_form():
    energy, runtime = fit_frame(batch_frame(), n_bootstrap=20)
    assert energy.has_batch_axis and energy.domain["batch_size"] == [1, 16]
    assert energy.form in {f.name for f in BATCH_FORMS} and "batch_x_input_x_output" in energy.terms
    for term in ("intercept", "batch_x_input", "output_tokens", "batch_x_output", "batch_x_input_x_output"):
        assert energy.coefficients[term] == pytest.approx(LAW[term], rel=0.15), term
    assert energy.cv_mape < 0.05
    # The held-out error is reported per batch size, over design points (τin, τout, B).
    assert set(energy.details["cv_mape_by_batch_size"]) == {"1", "2", "4", "8", "16"}
    assert energy.to_json_dict()["cv_mape_by_batch_size"] == energy.details["cv_mape_by_batch_size"]
    assert "batch_size" in energy.details["cv"]["scheme"] or energy.details["cv"]["scheme"] == "leave-one-point-out"
    assert len(energy.details["points"][0]) == 3
    # The lever: per request, a batch of 16 shares each decode step's weights read 16 ways.
    one, sixteen = energy.predict_raw(64, 64, 1)[0], energy.predict_raw(64, 64, 16)[0] / 16
    assert one == pytest.approx(law(64.0, 64.0, 1.0), rel=0.05)
    assert sixteen == pytest.approx(law(64.0, 64.0, 16.0) / 16, rel=0.05) and one / sixteen > 3
    assert runtime.has_batch_axis and runtime.form.startswith("batch:")


def test_a_law_without_kv_reads_gets_a_form_without_them():
    shared = {"intercept": 3.0, "batch_size": 0.4, "batch_x_input": 0.01, "output_tokens": 1.2}
    energy = fit_frame(batch_frame(coefficients=shared, noise=0.005), n_bootstrap=0)[0]
    assert energy.form in ("batch:shared-decode", "batch:linear") and "batch_x_input_x_output" not in energy.terms
    assert energy.coefficients["output_tokens"] == pytest.approx(1.2, rel=0.05)
    assert energy.coefficients.get("batch_x_output", 0.0) < 0.01  # no per-request decode cost where there is none


def test_a_batch_fit_survives_storage_and_predicts_its_trials():
    energy = fit_frame(batch_frame(), n_bootstrap=20)[0]
    again = FitResult.from_row({**energy.to_row(), "id": 1})
    assert again.has_batch_axis
    assert np.allclose(again.predict_raw([32, 128], [8, 32], [4, 16]), energy.predict_raw([32, 128], [8, 32], [4, 16]))
    assert np.isfinite(again.uncertainty([32], [8], [4])).all()
    frame = batch_frame(trials=1)
    table = residuals(energy, frame.assign(id=np.arange(len(frame))))
    assert len(table) == len(frame) and table.relative_residual.abs().median() < 0.05


def test_batch_size_one_alone_fits_exactly_as_before():
    frame = batch_frame(sizes=(1,))
    with_column = fit_frame(frame, n_bootstrap=10)
    without = fit_frame(frame.drop(columns="batch_size"), n_bootstrap=10)
    for a, b in zip(with_column, without):
        assert not a.has_batch_axis and "batch_size" not in a.domain
        assert a.form == b.form and a.coefficients == b.coefficients and a.cv_mape == b.cv_mape


def test_a_single_batch_size_above_one_is_refused():
    with pytest.raises(InputError, match="batch size 8 only") as info:
        fit_frame(batch_frame(sizes=(8,)), n_bootstrap=0)
    assert "--batch-sizes" in str(info.value)


def test_bad_batch_sizes_in_measurements_are_refused():
    frame = batch_frame()
    frame.loc[3, "batch_size"] = 0
    with pytest.raises(InputError, match="not a whole number >= 1"):
        fit_frame(frame, n_bootstrap=0)


def test_a_batch_form_needs_several_batch_sizes_to_tell_its_terms_apart():
    X = batch_frame(sizes=(1,))[["input_tokens", "output_tokens", "batch_size"]].to_numpy(float)
    assert "batch sizes" in BatchKV().unsupported_reason(X)


def test_a_profile_at_one_batch_size_gives_no_batch_axis_and_the_plan_says_so():
    fits = fit_frame(batch_frame(sizes=(1,)), n_bootstrap=0)
    entry = CatalogEntry(name="m", backend="external", accuracy=0.5, accuracy_source="test")
    options, notes = options_from_fits(fits, {"m": entry}, batch_sizes=[1, 4, 16])
    assert [o.batch_size for o in options] == [1]
    assert any("batch size 1 only" in note and "--batch-sizes" in note for note in notes)
    batched, _ = options_from_fits(fit_frame(batch_frame(), n_bootstrap=0), {"m": entry}, batch_sizes=[1, 4, 16])
    assert [o.batch_size for o in batched] == [1, 4, 16]


def test_measure_next_on_a_batch_axis_suggests_unmeasured_batch_points_where_the_batch_fit_is_least_sure():
    from engine.fitting import suggest_points

    # Measured at batch sizes 1, 4 and 16 only: the sizes between are candidates, as are new shapes.
    fits = fit_frame(batch_frame(sizes=(1, 4, 16)), n_bootstrap=30)
    suggestions = suggest_points(fits, n=4)
    measured = {tuple(p) for p in fits[0].details["points"]}
    chosen = set(zip(suggestions.input_tokens, suggestions.output_tokens, suggestions.batch_size))
    assert len(chosen) == 4 and not chosen & measured
    assert set(suggestions.batch_size) <= {1, 2, 4, 8, 16} and suggestions.in_domain.all()
    # Each is scored as the batch it names: its score is the batch prediction's relative SE.
    first = suggestions.iloc[0]
    tin, tout, size = (np.array([float(first[c])]) for c in ("input_tokens", "output_tokens", "batch_size"))
    expected = max(float(f.standard_error(tin, tout, size)[0] / f.predict_raw(tin, tout, size)[0]) for f in fits)
    assert first.relative_standard_error == pytest.approx(expected)
    # A batch size the fits were never measured at is among the candidates scored.
    everything = suggest_points(fits, n=200)
    assert {2, 8} <= set(everything.batch_size)
    # Fits at batch size 1 only suggest batch size 1.
    single = suggest_points(fit_frame(batch_frame(sizes=(1,)), n_bootstrap=30), n=3)
    assert set(single.batch_size) == {1}


def test_a_batch_fit_names_its_unconverged_points_with_their_batch_size():
    frame = batch_frame()
    frame["unconverged"] = (frame.input_tokens == 512) & (frame.output_tokens == 128) & (frame.batch_size == 16)
    energy = fit_frame(frame, n_bootstrap=0)[0]
    assert energy.has_batch_axis and energy.unconverged_points == [[512, 128, 16]]
    assert FitResult.from_row({**energy.to_row(), "id": 1}).unconverged_points == [[512, 128, 16]]
    assert energy.to_json_dict()["unconverged_points"] == [[512, 128, 16]]


def test_a_decode_step_cost_that_grows_with_the_square_root_of_the_batch_gets_the_sublinear_form():
    # A decode step whose cost is concave in B (1 : 2 : 4 at B = 1 : 4 : 16 for this term), as measured on this VM's
    # CPU (llama.cpp, 1 : 3.2 : 7.3): not a straight line in B.
    sublinear = {"intercept": 3.0, "batch_x_input": 0.01, "output_x_sqrt_batch": 1.2, "batch_x_output": 0.01}
    frame = batch_frame(noise=0.01)  # its grid; the values are replaced below
    grid = frame[["input_tokens", "output_tokens", "batch_size"]].to_numpy(dtype=float)
    terms = {"intercept": 1.0, "batch_x_input": grid[:, 2] * grid[:, 0], "batch_x_output": grid[:, 2] * grid[:, 1],
             "output_x_sqrt_batch": grid[:, 1] * np.sqrt(grid[:, 2])}
    exact = sum(sublinear[name] * value for name, value in terms.items())
    rng = np.random.default_rng(3)
    frame["energy_j"] = exact * np.exp(rng.normal(0, 0.01, len(frame)))
    frame["runtime_s"] = exact / 50 * np.exp(rng.normal(0, 0.01, len(frame)))
    energy = fit_frame(frame, n_bootstrap=0)[0]
    assert energy.form == "batch:kv+sublinear" and energy.cv_mape < 0.03
    assert energy.coefficients["output_x_sqrt_batch"] == pytest.approx(1.2, rel=0.1)
    # The linear forms alone cannot draw it: their best held-out error is several times larger.
    linear = fit_frame(frame, n_bootstrap=0, batch_forms=[f for f in BATCH_FORMS if f.name != "batch:kv+sublinear"])[0]
    assert linear.cv_mape > 2 * energy.cv_mape
