"""engine/fitting: forms, grouped cross-validation, guardrails, storage, cards, references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from engine.catalog import build_entry
from engine.errors import InputError
from engine.fitting import (
    DEFAULT_FORMS,
    PUBLISHED_DEVICE,
    FitResult,
    FormCandidate,
    ModelForm,
    OverheadKVQuadratic,
    OverheadLinear,
    PaperForm,
    cross_validated_predictions,
    energy_model_card,
    expand_id_ranges,
    fit_all,
    fit_frame,
    fits_from_card,
    id_ranges,
    load_latest_fits,
    load_trials,
    mape,
    measurement_groups,
    point_groups,
    predict,
    published_catalog_rows,
    published_fits,
    residuals,
    save_fits,
    store_published_fits,
    suggest_points,
    surface_grid,
)
from engine.fitting.forms import TERMS
from engine.store import append_frame

GRID = np.array([2 ** k for k in range(3, 12)], dtype=float)  # 8 .. 2048
SMALL_GRID = np.array([8, 32, 128, 512], dtype=float)


def grid_X(levels=GRID, trials: int = 1) -> np.ndarray:
    points = np.array([(i, o) for i in levels for o in levels], dtype=float)
    return np.repeat(points, trials, axis=0)


def true_surface(X: np.ndarray, coefficients: dict[str, float]) -> np.ndarray:
    return sum(c * TERMS[t].values(X[:, 0], X[:, 1]) for t, c in coefficients.items())


#: Plausible costs of a 7B model (joules): each term matters somewhere on the grid.
ENERGY_COEFFICIENTS = {"intercept": 8.0, "input_tokens": 0.05, "input_tokens_sq": 4e-6, "output_tokens": 4.5,
                       "input_x_output": 2e-4, "output_tokens_sq": 1e-4}
RUNTIME_COEFFICIENTS = {k: v / 200.0 for k, v in ENERGY_COEFFICIENTS.items()}


def measurements_frame(model: str = "m", device: str = "gpu", levels=SMALL_GRID, trials: int = 3, noise: float = 0.02,
                       seed: int = 0, energy_source: str = "measured", idle_power_w: float | None = 50.0) -> pd.DataFrame:
    """Trials in the measurements table's columns, from the known surfaces with noise."""
    rng = np.random.default_rng(seed)
    X = grid_X(levels, trials)
    runtime = true_surface(X, RUNTIME_COEFFICIENTS) * np.exp(rng.normal(0, noise, len(X)))
    energy = true_surface(X, ENERGY_COEFFICIENTS) * np.exp(rng.normal(0, noise, len(X)))
    return pd.DataFrame({"origin": "imported", "model": model, "device": device,
                         "input_tokens": X[:, 0].astype(int), "output_tokens": X[:, 1].astype(int),
                         "runtime_s": runtime, "energy_j": energy, "energy_source": energy_source,
                         "idle_power_w": idle_power_w, "trial": np.tile(np.arange(1, trials + 1), len(X) // trials)})


def insert(store, frame: pd.DataFrame) -> None:
    with store.transaction() as con:
        append_frame(con, "measurements", frame)


def n_fits(store) -> int:
    return store.query_one("SELECT count(*) FROM fits")[0]


# -- forms -------------------------------------------------------------------------------

@pytest.mark.parametrize("form_class", DEFAULT_FORMS, ids=lambda c: c.name)
def test_each_form_recovers_known_coefficients(form_class):
    form = form_class()
    rng = np.random.default_rng(1)
    # Coefficients of the form's own terms; the paper's form gets its published signs (α0 < 0).
    truth = {t: ENERGY_COEFFICIENTS[t] for t in form.terms}
    if form_class is PaperForm:
        truth = {"input_tokens": -8.81, "output_tokens": 41.28, "input_x_output": 8.91e-2}
    X = grid_X(trials=1)
    exact = clone(form).fit(X, true_surface(X, truth))
    for term, value in truth.items():
        assert exact.coefficients_[term] == pytest.approx(value, rel=1e-6)

    # With 2% multiplicative noise and 20 trials per point the estimates land close.
    X_noisy = grid_X(trials=20)
    y_noisy = true_surface(X_noisy, truth) * np.exp(rng.normal(0, 0.02, len(X_noisy)))
    noisy = clone(form).fit(X_noisy, y_noisy)
    for term, value in truth.items():
        assert noisy.coefficients_[term] == pytest.approx(value, rel=0.1, abs=1e-9)


def test_forms_are_scikit_learn_estimators():
    form = OverheadKVQuadratic(weighting="relative-trial")
    assert form.get_params() == {"weighting": "relative-trial"}
    copy = clone(form)
    assert copy.weighting == "relative-trial" and not hasattr(copy, "coef_")
    X = grid_X(SMALL_GRID)
    assert form.fit(X, true_surface(X, ENERGY_COEFFICIENTS)) is form
    assert form.n_points_ == 16 and form.domain_ == {"input_tokens": [8, 512], "output_tokens": [8, 512]}


def test_candidate_forms_never_predict_negative_even_when_the_data_asks_for_it():
    # Data from the paper's Falcon 7B energy coefficients (negative α0), made positive where it
    # dips below zero: a least-squares fit with free signs would go negative; NNLS cannot.
    X = grid_X(trials=2)
    y = np.maximum(true_surface(X, {"input_tokens": -8.81, "output_tokens": 41.28, "input_x_output": 8.91e-2}), 50.0)
    wide = grid_X(np.geomspace(1, 100_000, 25))
    for form_class in DEFAULT_FORMS:
        fitted = form_class().fit(X, y)
        if form_class.selectable:
            assert all(c >= 0 for c in fitted.coefficients_.values()), form_class.name
            assert fitted.predict(wide).min() >= 0, form_class.name
    assert PaperForm().fit(X, y).predict(wide).min() < 0  # the paper's form, fitted as published, does


def test_fit_rejects_bad_arrays_with_input_error():
    with pytest.raises(InputError, match="not > 0"):
        OverheadLinear().fit(grid_X(SMALL_GRID), np.full(16, -1.0))
    with pytest.raises(InputError, match="two columns"):
        OverheadLinear().fit(np.ones((4, 3)), np.ones(4))
    y = np.ones(16)
    y[3] = np.nan
    with pytest.raises(InputError, match="missing"):
        OverheadLinear().fit(grid_X(SMALL_GRID), y)


def test_forms_with_too_few_points_are_not_offered():
    X = grid_X(np.array([8.0, 64.0]))  # a 2x2 grid: 4 points
    frame = pd.DataFrame({"model": "m", "device": "d", "input_tokens": X[:, 0], "output_tokens": X[:, 1],
                          "runtime_s": X.sum(axis=1) / 100, "energy_j": X.sum(axis=1)})
    fit = fit_frame(frame)[0]
    offered = {c.form: c.offered for c in fit.candidates}
    assert offered["overhead+linear"] and offered["paper"] and offered["paper-nonneg"]
    assert not offered["overhead+kv"] and not offered["overhead+kv+quadratic"]
    reason = next(c.reason for c in fit.candidates if c.form == "overhead+kv+quadratic")
    assert "at least 7" in reason
    assert fit.form in ("overhead+linear", "paper-nonneg")
    # Three input counts but one output count: τin² and the output terms cannot be told apart.
    assert OverheadKVQuadratic().unsupported_reason(np.array([[8, 8], [16, 8], [32, 8], [64, 8], [128, 8],
                                                              [256, 8], [512, 8], [1024, 8]])) is not None


# -- cross-validation and selection ------------------------------------------------------

class Memorizer(ModelForm):
    """Remembers the mean of every point it saw; elsewhere predicts the overall mean."""

    name = "memorizer"
    terms = ("intercept",)

    def fit(self, X, y, sample_weight=None):
        frame = pd.DataFrame({"i": X[:, 0], "o": X[:, 1], "y": y})
        self.table_ = frame.groupby(["i", "o"])["y"].mean().to_dict()
        self.fallback_ = float(np.mean(y))
        self.coefficients_ = {"intercept": self.fallback_}
        return self

    def predict(self, X):
        return np.array([self.table_.get((i, o), self.fallback_) for i, o in np.asarray(X)])


def test_grouped_cv_does_not_leak_held_out_trials_of_seen_points():
    rng = np.random.default_rng(0)
    X = grid_X(SMALL_GRID, trials=5)
    y = true_surface(X, ENERGY_COEFFICIENTS) * np.exp(rng.normal(0, 0.02, len(X)))
    grouped = mape(y, cross_validated_predictions(Memorizer(), X, y, point_groups(X)))
    per_trial = mape(y, cross_validated_predictions(Memorizer(), X, y, np.arange(len(X))))
    assert per_trial < 0.05  # per-trial folds leak: the memorised point looks perfect
    assert grouped > 1.0     # held-out points: the memoriser is useless, and grouped CV says so
    # Selection uses the grouped folds, so the memoriser is not chosen.
    frame = pd.DataFrame({"model": "m", "device": "d", "input_tokens": X[:, 0], "output_tokens": X[:, 1],
                          "runtime_s": y / 100, "energy_j": y})
    fit = fit_frame(frame, forms=[Memorizer, OverheadLinear, OverheadKVQuadratic], n_bootstrap=0)[0]
    memo = next(c for c in fit.candidates if c.form == "memorizer")
    assert fit.form != "memorizer" and memo.cv_mape > 1.0


def test_selection_prefers_the_physical_form_on_simulated_inference():
    frame = measurements_frame(levels=GRID, trials=3, noise=0.02)
    energy, runtime = fit_frame(frame)
    for fit in (energy, runtime):
        assert fit.cv_mape < 0.05
        paper = next(c for c in fit.candidates if c.form == "paper")
        assert paper.cv_mape > 2 * fit.cv_mape  # no fixed cost, no τout²: the paper's form is worse
        assert fit.form != "paper" and sum(c.chosen for c in fit.candidates) == 1
        assert fit.r2 > 0.99 and 0 < fit.noise_rel_sd < 0.05


def test_uncertainty_band_covers_new_trials_about_90_percent():
    frame = measurements_frame(levels=GRID, trials=4, noise=0.05, seed=3)
    energy, runtime = fit_frame(frame, random_state=3)
    fresh = measurements_frame(levels=GRID, trials=4, noise=0.05, seed=99)
    half = energy.uncertainty(fresh["input_tokens"], fresh["output_tokens"])
    inside = np.abs(fresh["energy_j"] - energy.predict_raw(fresh["input_tokens"], fresh["output_tokens"])) <= half
    assert 0.8 <= inside.mean() <= 0.98
    # The mean surface is far surer than one request, and less sure far outside the domain.
    se_in = energy.standard_error([128], [128])[0]
    se_out = energy.standard_error([100_000], [100_000])[0] / energy.predict_raw([100_000], [100_000])[0]
    assert se_in < half.mean() and se_out > se_in / energy.predict_raw([128], [128])[0]


def test_the_noise_floor_is_a_floor_even_with_long_tailed_trials():
    # Under load a few trials of a point run 10x long: the point's mean is pulled far up,
    # so predicting by the mean is no floor; the best single value per point is.
    frame = measurements_frame(levels=SMALL_GRID, trials=6, noise=0.05, seed=4)
    slow = np.random.default_rng(4).random(len(frame)) < 0.15
    frame.loc[slow, ["runtime_s", "energy_j"]] *= 10
    for fit in fit_frame(frame):
        y = frame["energy_j" if fit.target == "energy" else "runtime_s"].to_numpy()
        points = list(zip(frame.input_tokens, frame.output_tokens))
        best = 0.0
        for point in set(points):
            mine = y[[p == point for p in points]]
            best += min(np.sum(np.abs(mine - c) / mine) for c in mine)  # the optimum is one of the trials
        assert fit.details["noise_mape"] == pytest.approx(best / len(y))
        assert fit.details["noise_mape"] <= fit.cv_mape


# -- points that did not converge when profiled --------------------------------------------------

def _with_a_wild_point(seed: int = 0) -> pd.DataFrame:
    """The known surfaces, 3 trials a point at ±2%; (512, 128) instead has 25 trials spread ±60%, read 40% high."""
    frame = measurements_frame(levels=SMALL_GRID, trials=3, noise=0.02, seed=seed)
    wild = frame[(frame.input_tokens == 512) & (frame.output_tokens == 128)].iloc[[0] * 25].copy()
    swing = 1.4 * np.exp(np.random.default_rng(seed).normal(0, 0.6, len(wild)))
    wild["runtime_s"] *= swing
    wild["energy_j"] *= swing
    frame = pd.concat([frame[~((frame.input_tokens == 512) & (frame.output_tokens == 128))], wild], ignore_index=True)
    frame["unconverged"] = (frame.input_tokens == 512) & (frame.output_tokens == 128)
    return frame


def test_a_fit_flags_unconverged_points_and_weighs_them_by_their_means_information():
    frame = _with_a_wild_point()
    flagged = {f.target: f for f in fit_frame(frame)}
    plain = {f.target: f for f in fit_frame(frame.drop(columns="unconverged"))}
    energy = flagged["energy"]
    assert energy.unconverged_points == [[512, 128]] and plain["energy"].unconverged_points == []
    assert energy.details["unconverged_share"] == pytest.approx(1 / 16)
    assert 0 < energy.details["unconverged_weights"][0] < 0.1  # ±60% against ±2%: a small fraction of its 25 trials
    assert energy.details["cv_mape_converged"] < energy.cv_mape  # the wild trials are in the headline error
    assert not any("did not converge" in w for w in energy.details["warnings"])  # 1 of 16 is no majority
    # Weighed by its information, the wild point no longer drags the surface 40% up at its corner.
    truth = true_surface(np.array([[512.0, 128.0]]), ENERGY_COEFFICIENTS)[0]
    assert abs(energy.predict_raw([512], [128])[0] / truth - 1) < abs(plain["energy"].predict_raw([512], [128])[0]
                                                                       / truth - 1)
    assert energy.to_json_dict()["unconverged_points"] == [[512, 128]]
    assert FitResult.from_row(energy.to_row()).unconverged_points == [[512, 128]]


def test_a_fit_whose_points_mostly_did_not_converge_says_so():
    frame = measurements_frame(levels=SMALL_GRID, trials=3, noise=0.3)
    frame["unconverged"] = frame.output_tokens < 512
    (energy, runtime) = fit_frame(frame)
    assert len(energy.unconverged_points) == 12
    assert any("12 of 16 points did not converge" in w for w in energy.details["warnings"])
    assert any("did not converge" in w for w in runtime.to_json_dict()["warnings"])


def test_fit_all_reads_which_profiled_points_did_not_converge(store):
    frame = _with_a_wild_point().drop(columns="unconverged")
    job_id = store.query_one("INSERT INTO profiling_jobs (model, device, host, design, status, points_total) "
                             "VALUES ('m', 'gpu', 'h', '{}', 'done', 16) RETURNING id")[0]
    frame["job_id"] = job_id
    insert(store, frame)
    store.execute("INSERT INTO profiling_points (job_id, input_tokens, output_tokens, trials, converged, stopped) "
                  "VALUES (?, 512, 128, 25, false, 'max-trials'), (?, 8, 8, 3, true, 'converged')", [job_id, job_id])
    fits = fit_all(store)
    assert all(f.unconverged_points == [[512, 128]] for f in fits)


# -- the store: fit_all, bad input, save and load ---------------------------------------------

def test_fit_all_save_and_load_round_trip(store):
    insert(store, measurements_frame("a", "gpu"))
    insert(store, measurements_frame("b", "cpu", seed=1))
    fits = fit_all(store)
    assert [(f.model, f.target) for f in fits] == [("a", "energy"), ("a", "runtime"), ("b", "energy"), ("b", "runtime")]
    saved = save_fits(store, fits)
    assert all(f.fit_id is not None for f in saved) and n_fits(store) == 4
    loaded = load_latest_fits(store, model="a")
    assert [f.target for f in loaded] == ["energy", "runtime"]
    original = saved[0]
    assert loaded[0].fit_id == original.fit_id and loaded[0].created_at
    for field in ("form", "terms", "coefficients", "r2", "cv_mape", "n_points", "n_trials", "domain", "candidates",
                  "coef_cov", "noise_rel_sd", "energy_source"):
        assert getattr(loaded[0], field) == getattr(original, field), field
    assert loaded[0].details["measurement_id_ranges"] == original.details["measurement_id_ranges"]
    # A newer fit replaces the older one as "latest".
    newer = save_fits(store, fit_all(store, model="a", random_state=1))
    assert {f.fit_id for f in load_latest_fits(store, model="a")} == {f.fit_id for f in newer}


def test_fit_json_has_the_design_contract_keys(store):
    insert(store, measurements_frame())
    document = json.loads(json.dumps([f.to_json_dict() for f in fit_all(store)]))
    assert {item["target"] for item in document} == {"energy", "runtime"}  # the loop below has items to check
    for item in document:
        assert {"model", "device", "target", "form", "coefficients", "r2", "cv_mape", "n_points", "domain"} <= set(item)
        assert item["target"] in ("energy", "runtime") and 0 < item["cv_mape"] < 1
        assert item["domain"] == {"input_tokens": [8, 512], "output_tokens": [8, 512]} and item["n_points"] == 16
        assert set(item["units"]) == set(item["coefficients"])
        assert any(c["chosen"] for c in item["candidates"])


@pytest.mark.parametrize("case", ["empty", "one point", "identical points", "nan energy", "negative energy",
                                  "zero energy", "mixed sources", "no energy", "unknown model"])
def test_bad_input_is_a_clear_input_error_and_nothing_is_stored(store, case):
    if case == "one point":
        insert(store, measurements_frame(levels=np.array([32.0]), trials=1))
    elif case == "identical points":
        insert(store, measurements_frame(levels=np.array([32.0]), trials=10))
    elif case in ("nan energy", "negative energy", "zero energy", "no energy"):
        frame = measurements_frame()
        insert(store, frame)
        value = {"nan energy": "'NaN'::DOUBLE", "negative energy": "-3.0", "zero energy": "0.0",
                 "no energy": "NULL"}[case]
        where = "TRUE" if case == "no energy" else "id IN (2, 5)"
        store.execute(f"UPDATE measurements SET energy_j = {value} WHERE {where}")
    elif case == "mixed sources":
        insert(store, measurements_frame(trials=2))
        insert(store, measurements_frame(trials=1, energy_source="estimated", seed=4))
    elif case == "unknown model":
        insert(store, measurements_frame())
    with pytest.raises(InputError) as caught:
        save_fits(store, fit_all(store, model="nobody" if case == "unknown model" else None))
    message = str(caught.value)
    expected = {"empty": "no measurements", "one point": "1 distinct", "identical points": "1 distinct",
                "nan energy": "NaN", "negative energy": "zero or negative", "zero energy": "zero or negative",
                "mixed sources": "mixes energy sources", "no energy": "no energy measurements",
                "unknown model": "no measurements for model 'nobody'"}[case]
    assert expected in message
    assert "Traceback" not in message and all(p.expected for p in caught.value.problems)
    assert n_fits(store) == 0


@pytest.mark.parametrize("energy_j, runtime_s, reason", [
    (1e200, 1.0, "energy_j outside 1e-09 to 1e+09 J"),
    (1e-200, 1.0, "energy_j outside 1e-09 to 1e+09 J"),
    (5.0, 1e-9, "runtime_s outside 1e-06 to 1e+06 s"),
    (5e8, 1.0, "energy_j / runtime_s outside 1e-06 to 100000 W"),
])
def test_stored_values_outside_the_physical_bounds_are_left_out_with_a_warning(store, energy_j, runtime_s, reason):
    """Rows stored before the import checked bounds (or by another tool) must not stop every fit."""
    insert(store, measurements_frame())
    insert(store, measurements_frame(model="other", seed=3))
    insert(store, pd.DataFrame({"origin": "imported", "model": "m", "device": "gpu", "input_tokens": [64, 64],
                                "output_tokens": [64, 64], "runtime_s": runtime_s, "energy_j": energy_j,
                                "energy_source": "measured", "trial": [1, 2]}))
    bad_ids = store.query_df("SELECT id FROM measurements WHERE input_tokens = 64 ORDER BY id").id.tolist()
    fits = save_fits(store, fit_all(store))
    assert {(f.model, f.target) for f in fits} == {(m, t) for m in ("m", "other") for t in ("energy", "runtime")}
    for fit in fits:
        assert np.isfinite(fit.cv_mape) and fit.cv_mape < 0.2 and np.isfinite(fit.r2)
        assert all(np.isfinite(v) for v in fit.coefficients.values())
    [warning] = {w for f in fits if f.model == "m" for w in f.details["warnings"]}
    assert f"2 trials (ids {bad_ids[0]}, {bad_ids[1]}) left out" in warning and reason in warning
    assert not any(f.details["warnings"] for f in fits if f.model == "other")


def test_a_group_with_only_absurd_values_is_one_clear_problem(store):
    insert(store, measurements_frame().assign(energy_j=1e200))
    with pytest.raises(InputError, match="has no trial within the physical bounds") as caught:
        fit_all(store)
    assert "energy_j outside 1e-09 to 1e+09 J: 48 trials" in str(caught.value) and n_fits(store) == 0


def test_fit_cli_with_an_absurd_stored_value_prints_finite_errors(isolated_db):
    import subprocess
    import sys
    from pathlib import Path

    from engine.store import Store

    store = Store(isolated_db)
    insert(store, measurements_frame())
    insert(store, pd.DataFrame({"origin": "imported", "model": "m", "device": "gpu", "input_tokens": [64],
                                "output_tokens": [64], "runtime_s": [1.0], "energy_j": [1e200],
                                "energy_source": "measured", "trial": [1]}))
    result = subprocess.run([sys.executable, "-m", "engine", "fit", "--db", str(isolated_db)], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert "internal error" not in result.stderr and "inf" not in result.stdout and "left out" in result.stderr
    assert all(len(line) < 120 for line in result.stdout.splitlines())  # no 300-digit numbers


def test_mixed_sources_fit_with_a_source_filter_and_are_labelled(store):
    insert(store, measurements_frame(trials=2))
    insert(store, measurements_frame(trials=2, energy_source="estimated", seed=4))
    energy, runtime = fit_all(store, source_filter="estimated")
    assert energy.energy_source == "estimated" and energy.energy_estimated and energy.n_trials == 32
    assert runtime.n_trials == 64 and not runtime.energy_estimated  # runtime is measured either way
    assert energy.to_json_dict()["energy_estimated"] is True and "estimated" in energy.label
    with pytest.raises(InputError, match="energy source: 'guessed'"):  # the setting's name, not a parameter's
        fit_all(store, source_filter="guessed")


def test_dynamic_scope_subtracts_idle_power_and_needs_it(store):
    insert(store, measurements_frame(idle_power_w=20.0))
    total = fit_all(store)[0]
    dynamic = fit_all(store, energy_scope="dynamic")[0]
    trials = load_trials(store, "m", "gpu", energy_scope="dynamic")
    stored = store.query_df("SELECT id, energy_j, idle_power_w * runtime_s AS idle_j FROM measurements ORDER BY id")
    assert np.allclose(trials.sort_values("id")["energy_j"], stored["energy_j"] - stored["idle_j"])
    assert dynamic.energy_scope == "dynamic"
    assert dynamic.predict_raw([128], [128])[0] < total.predict_raw([128], [128])[0]
    store.execute("UPDATE measurements SET idle_power_w = NULL")
    with pytest.raises(InputError, match="idle power"):
        fit_all(store, energy_scope="dynamic")
    store.execute("UPDATE measurements SET idle_power_w = 1e6")
    with pytest.raises(InputError, match="no dynamic energy remains"):
        fit_all(store, energy_scope="dynamic")


def test_measurement_groups_and_batched_trials(store):
    # Issue 13: batch trials are no longer left out; beside batch size 1 they give the fits a batch axis.
    frame = measurements_frame()
    batched = measurements_frame(trials=1).assign(batch_size=8)
    insert(store, frame)
    insert(store, batched)
    groups = measurement_groups(store)
    assert groups.loc[0, "n_trials"] == 64 and groups.loc[0, "n_points"] == 32 and groups.loc[0, "n_batch_sizes"] == 2
    energy = fit_all(store)[0]
    assert energy.n_trials == 64 and energy.has_batch_axis and energy.domain["batch_size"] == [1, 8]
    assert energy.form.startswith("batch:")


# -- predictions and guardrails ----------------------------------------------------------------

def test_predict_flags_points_outside_the_domain(store):
    insert(store, measurements_frame())
    fits = fit_all(store)
    points = pd.DataFrame({"id": ["q1", "q2", "q3", "q4"], "model": "m", "device": "gpu",
                           "input_tokens": [8, 512, 1024, 100], "output_tokens": [8, 512, 64, 4]})
    out = predict(fits, points)
    assert list(out.columns[:1]) == ["id"]
    assert out["in_domain"].tolist() == [True, True, False, False]
    assert (out["energy_j"] > 0).all() and (out["runtime_s"] > 0).all()
    assert (out["energy_j_uncertainty"] > 0).all() and (out["runtime_s_uncertainty"] > 0).all()
    assert not out["clamped"].any() and not out["energy_estimated"].any()
    assert "outside" in out.loc[2, "warning"] and out.loc[0, "warning"] == ""
    true_energy = true_surface(points[["input_tokens", "output_tokens"]].to_numpy(float), ENERGY_COEFFICIENTS)
    assert np.allclose(out["energy_j"][:2], true_energy[:2], rtol=0.05)


def test_predict_reports_every_row_without_a_fit(store):
    insert(store, measurements_frame())
    fits = fit_all(store)
    points = pd.DataFrame({"model": ["m", "other", "m", "m"], "device": ["gpu", "gpu", "cpu", "gpu"],
                           "input_tokens": [8, 8, 8, 0], "output_tokens": [8, 8, 8, 8]})
    with pytest.raises(InputError) as caught:
        predict(fits, points, where="points.csv")
    wheres = [p.where for p in caught.value.problems]
    assert wheres == ["points.csv:3", "points.csv:4", "points.csv:5"]  # in file order
    assert "no energy or runtime fit for model 'other' on device 'gpu'" in str(caught.value)
    with pytest.raises(InputError, match="lacks the column"):
        predict(fits, points.drop(columns=["device"]))


def test_surface_grid_and_residuals(store):
    insert(store, measurements_frame())
    energy, runtime = fit_all(store)
    grid = surface_grid(energy, n=12, log=True, extend=2.0)
    assert len(grid) == 144 and {"energy_j", "energy_j_raw", "energy_j_uncertainty", "energy_j_per_token",
                                 "in_domain"} <= set(grid.columns)
    assert grid["input_tokens"].min() == pytest.approx(4) and grid["output_tokens"].max() == pytest.approx(1024)
    assert grid["in_domain"].any() and not grid["in_domain"].all()
    assert "runtime_s" in surface_grid(runtime, n=5).columns
    trials = load_trials(store, "m", "gpu")
    table = residuals(energy, trials)
    assert len(table) == 48 and table["relative_residual"].abs().max() < 0.2


def test_suggest_points_are_new_spread_and_where_the_surface_is_least_sure(store):
    insert(store, measurements_frame())
    fits = fit_all(store)
    suggestions = suggest_points(fits, n=3)
    measured = {tuple(p) for p in fits[0].details["points"]}
    chosen = list(zip(suggestions["input_tokens"], suggestions["output_tokens"]))
    assert len(chosen) == 3 and not set(chosen) & measured and suggestions["in_domain"].all()
    assert suggestions["relative_standard_error"].is_monotonic_decreasing
    beyond = suggest_points(fits, n=2, beyond_domain=True)
    assert not beyond["in_domain"].all()  # extrapolation is where uncertainty grows fastest
    with pytest.raises(InputError, match="no uncertainty"):
        suggest_points([f for f in published_fits() if f.model == "falcon-7b"])


# -- cards -------------------------------------------------------------------------------

def test_energy_model_card_round_trips_through_json(store):
    insert(store, measurements_frame())
    fits = save_fits(store, fit_all(store))
    card = energy_model_card(fits)
    text = json.dumps(card, allow_nan=False)
    again = json.loads(text)
    assert again == card
    assert card["model"] == "m" and card["device"] == "gpu" and card["sensor"]["energy_scope"] == "total"
    assert card["targets"]["energy"]["coefficients"]["output_tokens"]["unit"] == "J/token"
    assert card["targets"]["runtime"]["coefficients"]["intercept"]["unit"] == "s"
    assert card["software"]["scikit_learn"] and card["targets"]["energy"]["metrics"]["cv_mape"] > 0
    ids = expand_id_ranges(card["targets"]["energy"]["measurement_id_ranges"])
    assert ids == store.query_df("SELECT id FROM measurements ORDER BY id")["id"].tolist()
    restored = fits_from_card(again)
    points = pd.DataFrame({"model": "m", "device": "gpu", "input_tokens": [8, 300, 4000], "output_tokens": [8, 20, 9]})
    assert predict(restored, points).equals(predict(fits, points))
    with pytest.raises(InputError):
        energy_model_card([fits[0], published_fits()[0]])
    with pytest.raises(InputError):
        fits_from_card({"kind": "something else"})


def test_id_ranges_are_compact_and_exact():
    assert id_ranges([5, 1, 2, 3, 9, 10]) == [[1, 3], [5, 5], [9, 10]]
    assert expand_id_ranges(id_ranges([5, 1, 2, 3, 9, 10])) == [1, 2, 3, 5, 9, 10]


# -- published reference profiles ---------------------------------------------------------------

def test_published_fits_show_their_negative_region_honestly():
    fits = published_fits()
    assert len(fits) == 14 and {f.source for f in fits} == {"published"} and {f.device for f in fits} == {PUBLISHED_DEVICE}
    falcon = [f for f in fits if f.model == "falcon-7b"]
    assert falcon[0].coefficients == {"input_tokens": -8.81, "output_tokens": 41.28, "input_x_output": 8.91e-2}
    points = pd.DataFrame({"model": "falcon-7b", "device": PUBLISHED_DEVICE, "input_tokens": [2048, 32],
                           "output_tokens": [8, 32]})
    out = predict(fits, points)
    assert out.loc[0, "energy_j_raw"] < 0 and out.loc[0, "energy_j"] == 0 and out.loc[0, "clamped"]
    assert "negative" in out.loc[0, "warning"] and "published coefficients" in out.loc[0, "warning"]
    assert out.loc[1, "energy_j"] == pytest.approx(-8.81 * 32 + 41.28 * 32 + 8.91e-2 * 1024)
    assert not out.loc[1, "clamped"] and np.isnan(out.loc[1, "energy_j_uncertainty"])
    json.dumps([f.to_json_dict() for f in fits], allow_nan=False)


def test_mistral_beta2_typo_is_corrected_and_documented():
    mistral = next(f for f in published_fits() if f.model == "mistral-7b" and f.target == "runtime")
    assert mistral.coefficients["input_x_output"] == pytest.approx(8.10e-2 * 3.53e-2 / 31.69)
    (correction,) = mistral.details["corrections"]
    assert correction["printed"] == 8.10e-2 and "typo" in correction["why"]


def test_store_published_fits_is_idempotent(store):
    first = store_published_fits(store)
    second = store_published_fits(store)
    assert n_fits(store) == 14 and [f.fit_id for f in first] == [f.fit_id for f in second]
    loaded = load_latest_fits(store, source="published")
    assert len(loaded) == 14 and all(f.label == "published coefficients, no measurements" for f in loaded)


def test_published_catalog_rows_are_valid_catalog_entries():
    rows = published_catalog_rows()
    assert len(rows) == 7
    for row in rows:
        entry, _ = build_entry(**row)
        assert entry.backend == "external" and 0.4 < entry.accuracy < 0.7
    assert next(r for r in rows if r["name"] == "llama-2-70b")["accuracy"] == pytest.approx(0.6452)


#: What the fits table held for each candidate before FormCandidate: offered forms without
#: a reason, forms not offered without the scores' extra keys.
OLD_OFFERED_KEYS = ("form", "n_terms", "selectable", "offered", "cv_mape", "cv_r2", "cv_total_ratio", "r2",
                    "coefficients", "min_prediction", "chosen")
OLD_NOT_OFFERED_KEYS = ("form", "n_terms", "selectable", "offered", "reason", "cv_mape", "cv_r2", "r2", "chosen")


def test_fits_round_trip_their_typed_candidates_through_the_database_and_cards(store):
    insert(store, measurements_frame(levels=np.array([8.0, 64.0])))  # a 2x2 grid: some forms are not offered
    fits = save_fits(store, fit_all(store))
    loaded = {f.key: f for f in load_latest_fits(store)}
    for fit in fits:
        back = loaded[fit.key]
        assert all(isinstance(c, FormCandidate) for c in back.candidates)
        assert back.candidates == fit.candidates
        assert any(not c.offered and c.reason for c in back.candidates)
        assert sum(c.chosen for c in back.candidates) == 1
        assert next(c for c in back.candidates if c.chosen).form == fit.form
    restored = fits_from_card(json.loads(json.dumps(energy_model_card(fits))))
    assert [f.candidates for f in restored] == [f.candidates for f in fits]


def test_fits_stored_with_candidates_as_old_dicts_still_load(store):
    insert(store, measurements_frame(levels=np.array([8.0, 64.0])))
    (fit, _) = save_fits(store, fit_all(store))
    old = [{key: c.to_dict()[key] for key in (OLD_OFFERED_KEYS if c.offered else OLD_NOT_OFFERED_KEYS)}
           for c in fit.candidates]
    row = fit.to_row()
    row["details"] = json.dumps({**json.loads(row["details"]), "candidates": old})
    back = FitResult.from_row({**row, "id": fit.fit_id, "created_at": fit.created_at})
    assert back.candidates == fit.candidates
    data = fit.to_dict()
    data["candidates"] = old
    assert FitResult.from_dict(data) == fit  # a card written before


def test_fit_json_keeps_its_design_shape():
    frame = measurements_frame(levels=np.array([8.0, 64.0]))
    for fit in fit_frame(frame, n_bootstrap=0):
        document = json.loads(json.dumps(fit.to_json_dict(), allow_nan=False))
        assert {"model", "device", "target", "form", "coefficients", "r2", "cv_mape", "n_points", "domain"} <= \
            set(document)
        assert set(document["domain"]) == {"input_tokens", "output_tokens"}
        for entry, typed in zip(document["candidates"], fit.candidates, strict=True):
            assert set(entry) == {"form", "cv_mape", "r2", "cv_r2", "chosen", "offered"}
            assert entry["form"] == typed.form and entry["chosen"] is typed.chosen
            assert entry["cv_mape"] == typed.cv_mape  # a fraction; None for a form not offered


def test_fit_result_dict_round_trip_is_exact():
    fit = published_fits()[0]
    assert FitResult.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit


def test_an_unconverged_point_among_steady_ones_weighs_one_trial_not_zero():
    from engine.fitting.selection import unconverged_weights

    y = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 3.0, 1.0, 3.0])
    inverse = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    weights = unconverged_weights(y, inverse, np.array([False, False, True]))
    assert np.all(weights[:6] == 1.0) and np.allclose(weights[6:], 0.25)  # s²_ref = 0: a floor of 1/4, not 0
