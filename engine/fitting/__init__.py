"""Fitted energy and runtime surfaces per (model, device, energy scope).

Public API (the CLI's ``fit``/``predict`` and the Models page use only these):

- :func:`fit_all` (store) / :func:`fit_frame` (DataFrame) -> list[:class:`FitResult`], each with
  the forms it compared as :class:`FormCandidate`
- :func:`save_fits`, :func:`load_latest_fits`, :func:`load_fit`
- :func:`predict`, :func:`surface_grid`, :func:`residuals`, :func:`suggest_points`
- :func:`load_trials`, :func:`measurement_groups`
- :func:`energy_model_card`, :func:`fits_from_card`
- :func:`published_fits`, :func:`store_published_fits`, :func:`published_catalog_rows`
- the forms (:data:`DEFAULT_FORMS`, :class:`ModelForm`, ...) and the CV code
  (:func:`cross_validated_predictions`, :func:`point_groups`).
"""

from engine.fitting.card import energy_model_card, fits_from_card
from engine.fitting.data import ENERGY_SCOPES, SOURCE_FILTERS, expand_id_ranges, id_ranges, measurement_groups
from engine.fitting.forms import (
    DEFAULT_FORMS,
    FORMS_BY_NAME,
    ModelForm,
    OverheadKV,
    OverheadKVDecode2,
    OverheadKVPrefill2,
    OverheadKVQuadratic,
    OverheadLinear,
    PaperForm,
    PaperTermsNonneg,
)
from engine.fitting.predict import PREDICTION_COLUMNS, predict, residuals, suggest_points, surface_grid
from engine.fitting.reference import (
    PUBLISHED_DEVICE,
    PUBLISHED_LABEL,
    PUBLISHED_MODELS,
    load_reference_profiles,
    published_catalog_rows,
    published_fits,
    store_published_fits,
)
from engine.fitting.result import FitResult, FormCandidate
from engine.fitting.selection import cross_validated_predictions, mape, point_groups, r2, score_form
from engine.fitting.storage import fit_all, fit_frame, load_fit, load_latest_fits, load_trials, save_fits

__all__ = [
    "DEFAULT_FORMS", "ENERGY_SCOPES", "FORMS_BY_NAME", "FitResult", "FormCandidate", "ModelForm", "OverheadKV", "OverheadKVDecode2",
    "OverheadKVPrefill2", "OverheadKVQuadratic", "OverheadLinear", "PREDICTION_COLUMNS", "PUBLISHED_DEVICE",
    "PUBLISHED_LABEL", "PUBLISHED_MODELS", "PaperForm", "PaperTermsNonneg", "SOURCE_FILTERS",
    "cross_validated_predictions", "energy_model_card", "expand_id_ranges", "fit_all", "fit_frame", "fits_from_card",
    "id_ranges", "load_fit", "load_latest_fits", "load_trials", "mape", "measurement_groups", "point_groups",
    "predict", "published_catalog_rows", "published_fits", "r2", "residuals", "save_fits", "score_form",
    "store_published_fits", "suggest_points", "surface_grid",
]
