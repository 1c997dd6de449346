"""The Models page shows the batching lever of a fit with a batch axis: a batch-size selector
for the surface (with the trials measured at that batch size) and the energy per request
against batch size; a fit without one is drawn as before, with one line on profiling batch
sizes. engine.batch_curves computes what the page draws.

The fits with a batch axis are the hand-made ones of tests/test_planning_batches.py (one batch of B
requests costs fixed + prefill·B·τin + step·τout + request_step·B·τout, so a request's share
falls with B), handed to the page where it loads fits from; their trials are a hand-made
frame with a batch_size column (what fitting with a batch axis reads), handed where the
page loads trials from.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.batch_curves import (batch_size_choices, best_measured_shape, curve_batch_sizes, load_trials_by_batch_size,
                                 measured_per_request, per_request_curve, residuals_by_batch_size, surface_grid_at,
                                 trials_at_batch_size)
from engine.fitting import published_fits, surface_grid
from engine.formatting import format_energy
from engine.measurements_io import import_measurements
from engine.store import Store
from tests.apptest_wait import page_text
from tests.conftest import write_grid_csv
from tests.test_planning_band import BandFit, band_fit

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (64, 32)  # measured at batch sizes 1, 4 and 16
BATCHES = (1, 4, 16)
NOTE = "Measured at batch size 1 only: profile with several batch sizes"


class PageFit(BandFit):
    """A :class:`BandFit` whose coefficients' units the page can show (its terms are its own)."""

    @property
    def units(self) -> dict[str, str]:
        return {term: self.unit for term in self.terms}


def page_fit(target: str, fit_id: int, batches=(1, 16), energy_source: str | None = "estimated") -> PageFit:
    base = band_fit("a", target, cv_mape=0.05, scale=1.0 if target == "energy" else 0.01)
    domain = {"input_tokens": [8, 512], "output_tokens": [8, 128]}
    if batches is not None:
        domain["batch_size"] = list(batches)
    return PageFit(**{**base.__dict__, "domain": domain, "fit_id": fit_id,
                      "energy_source": energy_source if target == "energy" else None})


def hand_trials(fits: dict[str, PageFit]) -> pd.DataFrame:
    """Two trials (±3%) at SHAPE per batch size in BATCHES, and two at (8, 8) at batch size 1:
    energy and runtime of the whole batch, as stored."""
    rows = [(tin, tout, size, wobble) for tin, tout, sizes in ((*SHAPE, BATCHES), (8, 8, (1,)))
            for size in sizes for wobble in (0.97, 1.03)]
    frame = pd.DataFrame(rows, columns=["input_tokens", "output_tokens", "batch_size", "wobble"])
    for target, column in (("energy", "energy_j"), ("runtime", "runtime_s")):
        frame[column] = fits[target].predict_raw(frame.input_tokens, frame.output_tokens,
                                                 frame.batch_size) * frame.wobble
    return frame.drop(columns="wobble").assign(id=np.arange(1, len(frame) + 1))


def serve(monkeypatch: pytest.MonkeyPatch, batches=(1, 16)) -> dict[str, PageFit]:
    fits = {"energy": page_fit("energy", 101, batches), "runtime": page_fit("runtime", 102, batches)}
    trials = hand_trials(fits)
    if not fits["energy"].has_batch_axis:
        trials = trials[trials.batch_size == 1]
    monkeypatch.setattr("ui.surfaces.load_latest_fits", lambda store: list(fits.values()))
    monkeypatch.setattr("engine.batch_curves.load_trials", lambda store, model, device, energy_scope: trials)
    return fits


def models_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def surface_spec(at: AppTest) -> dict:
    (surface,) = [s for s in charts(at) if s["data"][0]["type"] == "surface"]
    return surface


def curve_spec(at: AppTest) -> dict | None:
    return next((s for s in charts(at) if "per request against batch size" in s["layout"]["title"]["text"]), None)


def trace(spec: dict, name: str) -> dict:
    return next(t for t in spec["data"] if t.get("name", "").startswith(name))


def values(data) -> np.ndarray:
    """A trace's array: a list, or plotly's typed array ({dtype, bdata (base64), shape})."""
    if isinstance(data, dict):
        array = np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
        return array.reshape([int(n) for n in str(data["shape"]).split(",")]) if "shape" in data else array
    return np.asarray(data, dtype=float)


# -- the page ------------------------------------------------------------------------------------------------

def test_a_batched_fit_gets_a_batch_size_selector_that_redraws_the_surface_at_that_size(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    fits = serve(monkeypatch)
    at = models_page()
    selector = at.select_slider(key="fit_batch_a@cpu")
    assert selector.options == ["1", "2", "4", "8", "16"] and selector.value == 1
    assert NOTE not in page_text(at)
    assert at.radio(key="fit_view_batched").options == ["per request", "per token", "per batch"]
    surface = surface_spec(at)
    assert "on cpu, batches of 1: energy (J per request, estimated)" in surface["layout"]["title"]["text"]

    selector.set_value(16).run()
    assert not at.exception, at.exception
    surface = surface_spec(at)
    assert "on cpu, batches of 16: energy (J per request, estimated)" in surface["layout"]["title"]["text"]
    # The surface is a request's share of a batch of 16 (x and y are log10 tokens on log axes).
    fitted = surface["data"][0]
    tokens_in, tokens_out = 10 ** values(fitted["x"]), 10 ** values(fitted["y"])
    expected = fits["energy"].predict_raw(tokens_in.ravel(), tokens_out.ravel(), 16) / 16
    assert np.allclose(values(fitted["z"]).ravel(), expected.ravel())
    # Only the trials measured at batch size 16, each its batch's energy / 16.
    points = trace(surface, "measured trials at batch size 16")
    trials = hand_trials(fits)
    at_16 = trials[trials.batch_size == 16]
    assert sorted(values(points["z"])) == pytest.approx(sorted(at_16.energy_j / 16))
    assert any("red points are measured trials at batch size 16." in c.value for c in at.caption)
    selector.set_value(8).run()  # offered (a power of two), but no trial was measured there
    assert not any(t.get("name", "").startswith("measured") for t in surface_spec(at)["data"])
    assert any("no trial was measured at batch size 8 (measured at 1, 4, 16), so no red points." in c.value
               for c in at.caption)
    selector.set_value(16).run()

    at.radio(key="fit_view_batched").set_value("per batch").run()
    surface = surface_spec(at)
    assert "on cpu, batches of 16: energy (J per batch, estimated)" in surface["layout"]["title"]["text"]
    assert sorted(values(trace(surface, "measured trials")["z"])) == pytest.approx(sorted(at_16.energy_j))


def test_a_batched_fit_draws_energy_per_request_against_batch_size_with_the_measured_points(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    fits = serve(monkeypatch)
    at = models_page()
    assert "Energy per request against batch size" in [s.value for s in at.subheader]
    # The shape measured at the most batch sizes is the default.
    assert (at.number_input(key="fit_curve_in_a@cpu").value, at.number_input(key="fit_curve_out_a@cpu").value) == SHAPE
    spec = curve_spec(at)
    assert spec is not None and f"{SHAPE[0]} in, {SHAPE[1]} out" in spec["layout"]["title"]["text"]
    assert spec["layout"]["yaxis"]["title"]["text"] == "J per request, estimated"
    line = trace(spec, "fitted, estimated")
    sizes, per_request = values(line["x"]), values(line["y"])
    assert sizes.tolist() == list(range(1, 17))
    assert np.allclose(per_request, fits["energy"].predict_raw(*SHAPE, sizes) / sizes)
    assert (np.diff(per_request) < 0).all()  # a request's share falls with every request added
    measured = trace(spec, "measured trials, estimated")
    trials = hand_trials(fits)
    at_shape = trials[(trials.input_tokens == SHAPE[0]) & (trials.output_tokens == SHAPE[1])]
    assert sorted(values(measured["x"])) == sorted(at_shape.batch_size.tolist())
    assert sorted(values(measured["y"])) == pytest.approx(sorted(at_shape.energy_j / at_shape.batch_size))
    by_size = pd.Series(values(measured["y"])).groupby(values(measured["x"])).mean()
    assert by_size.is_monotonic_decreasing and by_size.index.tolist() == list(BATCHES)
    first, last = fits["energy"].predict_raw(*SHAPE, [1, 16]) / [1, 16]
    summary = next(m.value for m in at.markdown if m.value.startswith("Per request (estimated):"))
    assert summary == (f"Per request (estimated): **{format_energy(first)}** at batch size 1, "
                       f"**{format_energy(last)}** at 16: batches of 16 use {first / last:.1f}× less energy per "
                       "request than batches of 1.")
    # Another shape: the line moves with it, and no trial was measured there.
    at.number_input(key="fit_curve_in_a@cpu").set_value(256).run()
    assert not at.exception, at.exception
    spec = curve_spec(at)
    assert "256 in, 32 out" in spec["layout"]["title"]["text"]
    line = trace(spec, "fitted")
    sizes = values(line["x"])
    assert np.allclose(values(line["y"]), fits["energy"].predict_raw(256, 32, sizes) / sizes)
    assert not any(t.get("name", "").startswith("measured") for t in spec["data"])
    assert any("No trial was measured at this shape" in c.value for c in at.caption)


@pytest.mark.parametrize("batches, measured_at", [(None, 1), ((8, 8), 8)])
def test_a_fit_without_a_batch_axis_is_drawn_as_before_with_one_line_on_batch_sizes(
        store: Store, monkeypatch: pytest.MonkeyPatch, batches, measured_at):
    serve(monkeypatch, batches=batches)
    at = models_page()
    assert not at.select_slider and curve_spec(at) is None
    assert "Energy per request against batch size" not in [s.value for s in at.subheader]
    assert at.radio(key="fit_view").options == ["per request", "per token"]
    note = NOTE.replace("batch size 1", f"batch size {measured_at}")
    assert sum(note in c.value for c in at.caption) == 1
    surface = surface_spec(at)
    assert "energy (J, estimated)" in surface["layout"]["title"]["text"]
    assert trace(surface, "measured trials")["name"] == "measured trials"


def test_published_fits_get_no_note_on_profiling_batch_sizes(store: Store):
    at = models_page()
    next(b for b in at.button if b.label == "Load the paper's published A100 profiles").click().run()
    assert not at.exception, at.exception
    assert any("Published coefficients" in w.value for w in at.warning)
    assert NOTE not in page_text(at) and not at.select_slider


def test_real_fits_at_batch_size_one_show_the_note(store: Store, tmp_path: Path):
    from engine.fitting import fit_all, save_fits

    import_measurements(store, write_grid_csv(tmp_path / "grid.csv"))
    save_fits(store, fit_all(store, n_bootstrap=20))
    at = models_page()
    assert sum(NOTE in c.value for c in at.caption) == 1 and not at.select_slider


# -- engine.batch_curves ------------------------------------------------------------------------------------

def test_the_per_request_curve_is_one_batch_shared_by_its_requests():
    fit = page_fit("energy", 1)
    curve = per_request_curve(fit, 64, 32)
    assert curve.batch_size.tolist() == list(range(1, 17)) and curve.in_domain.all()
    assert np.allclose(curve.batch, fit.predict_raw(64, 32, curve.batch_size))
    assert np.allclose(curve.per_request, curve.batch / curve.batch_size)
    assert np.allclose(curve.per_request_uncertainty, fit.uncertainty(64, 32, curve.batch_size) / curve.batch_size)
    assert (np.diff(curve.per_request) < 0).all()
    wide = replace(fit, domain={**fit.domain, "batch_size": [1, 4096]})
    sizes = curve_batch_sizes(wide, extra=[3, 5000])
    assert sizes[0] == 1 and sizes[-1] == 4096 and 3 in sizes and 5000 not in sizes and len(sizes) <= 130
    flat = published_fits()[0]  # a real fit without a batch axis
    with pytest.raises(ValueError, match="batch size 1 only"):
        per_request_curve(flat, 64, 32, [2])
    assert per_request_curve(flat, 64, 32).batch_size.tolist() == [1]


def test_the_surface_at_a_batch_size_is_a_requests_share_and_without_a_batch_axis_is_unchanged():
    fit = page_fit("energy", 1)
    grid = surface_grid_at(fit, 8, n=5)
    tin, tout = grid.input_tokens.to_numpy(), grid.output_tokens.to_numpy()
    assert np.allclose(grid.energy_j_batch, fit.predict_raw(tin, tout, 8))
    assert np.allclose(grid.energy_j, grid.energy_j_batch / 8)
    assert np.allclose(grid.energy_j_per_token, grid.energy_j / (tin + tout))
    assert np.allclose(grid.energy_j_uncertainty, fit.uncertainty(tin, tout, 8) / 8)
    assert not surface_grid_at(fit, 32, n=5).in_domain.any()  # beyond the batch sizes measured
    flat = published_fits()[0]
    pd.testing.assert_frame_equal(surface_grid_at(flat, 1, n=5), surface_grid(flat, n=5))
    with pytest.raises(ValueError, match="batch size 1 only"):
        surface_grid_at(flat, 4, n=5)


def test_measured_points_per_batch_size_and_the_default_shape():
    fits = {"energy": page_fit("energy", 1), "runtime": page_fit("runtime", 2)}
    trials = hand_trials(fits)
    points = measured_per_request(trials, "energy_j", *SHAPE)
    assert points.batch_size.tolist() == [1, 1, 4, 4, 16, 16]
    assert np.allclose(points.per_request, points.batch / points.batch_size)
    assert measured_per_request(trials, "energy_j", 100, 100).empty
    assert measured_per_request(None, "energy_j", *SHAPE).empty
    assert best_measured_shape(trials, fits["energy"]) == SHAPE
    assert best_measured_shape(None, fits["energy"]) == (64, 32)  # the domain's geometric middle
    assert batch_size_choices(fits["energy"], trials) == [1, 2, 4, 8, 16]
    assert batch_size_choices(replace(fits["energy"], domain={**fits["energy"].domain, "batch_size": [2, 12]}),
                              trials) == [2, 4, 8, 12]
    assert batch_size_choices(page_fit("energy", 3, batches=None), trials) == [1]
    assert trials_at_batch_size(trials, 4).batch_size.tolist() == [4, 4]
    # Residuals predict each trial at its own batch size: within the ±3% the trials were made with.
    frame = residuals_by_batch_size(fits["energy"], trials)
    assert frame.batch_size.tolist() == trials.batch_size.tolist()
    assert np.abs(frame.relative_residual).max() == pytest.approx(0.03 / 0.97, rel=1e-6)


def test_stored_trials_get_their_batch_size(store: Store, tmp_path: Path):
    import_measurements(store, write_grid_csv(tmp_path / "grid.csv"))
    trials = load_trials_by_batch_size(store, "sim", "gpu0")
    assert len(trials) == 36 and trials.batch_size.tolist() == [1] * 36
    assert {"id", "input_tokens", "output_tokens", "energy_j", "runtime_s"} <= set(trials.columns)


def test_an_unconverged_point_of_a_batched_fit_is_named_with_its_batch_size_and_drawn_x_at_that_size_only(
        store: Store, monkeypatch: pytest.MonkeyPatch):
    fits = serve(monkeypatch)
    for target in fits:  # the point (64, 32) at batch size 16 did not converge
        fits[target] = replace(fits[target], details={**fits[target].details, "unconverged_points": [[*SHAPE, 16]]})
    at = models_page()
    assert any(f"{SHAPE[0]}×{SHAPE[1]} at batch size 16" in w.value and "did not converge" in w.value
               for w in at.warning)
    at.select_slider(key="fit_batch_a@cpu").set_value(16).run()
    symbols = trace(surface_spec(at), "measured trials at batch size 16")["marker"]["symbol"]
    assert set(symbols) == {"x"}  # every trial at batch size 16 is of that shape
    at.select_slider(key="fit_batch_a@cpu").set_value(4).run()
    symbols = trace(surface_spec(at), "measured trials at batch size 4")["marker"]["symbol"]
    assert set(symbols) == {"circle"}  # the same shape at batch size 4 converged
