"""FitResult: one fitted surface (model, device, energy scope, target) and what it knows.

A fit predicts the raw value of its form, a standard error of that mean surface (from
the residual bootstrap's coefficient covariance: a prediction is linear in the
coefficients, so aᵀ·Cov·a is exactly the bootstrap variance at any point), and an
uncertainty for one request: the half-width of a 90% prediction interval,
1.645·sqrt(SE² + (noise_rel_sd·prediction)²), where noise_rel_sd is the relative
trial-to-trial spread measured at repeated points. Published fits have neither (NaN).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from engine.fitting.forms import ModelForm, form_from_coefficients, term_unit
from engine.formatting import json_safe

#: z for a two-sided 90% interval.
Z_90 = 1.6448536269514722
UNCERTAINTY_MEANING = "half-width of a 90% prediction interval for one request (same unit as the value)"


@dataclass(frozen=True)
class FormCandidate:
    """One form tried for a surface, and how it scored (see :mod:`engine.fitting.selection`).

    form: the form's name; n_terms: its number of coefficients; selectable: it may be
    chosen (the paper's unconstrained form is scored for comparison only); offered: the
    measured points can tell its terms apart (when not, ``reason`` says why and there are
    no scores); chosen: it is the fit's form.
    cv_mape: MAPE over held-out trials, grouped by design point (a fraction, 0.05 = 5%);
    cv_r2: R² of those held-out predictions; r2: in-sample R²; cv_total_ratio: the held-out
    predictions' sum over the measured sum. coefficients: the form fitted on every trial
    (units as :attr:`FitResult.units`); min_prediction: its smallest prediction at a measured
    point, in the target's unit (J or s).

    Fits stored before this type existed hold each candidate as a dict with a subset of
    these keys: :meth:`from_dict` reads them.
    """

    form: str
    n_terms: int
    selectable: bool
    offered: bool
    chosen: bool = False
    reason: str | None = None
    cv_mape: float | None = None
    cv_r2: float | None = None
    r2: float | None = None
    cv_total_ratio: float | None = None
    coefficients: dict[str, float] = field(default_factory=dict)
    min_prediction: float | None = None

    def to_dict(self) -> dict:
        """Every field, strict-JSON-safe."""
        return json_safe(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FormCandidate":
        coefficients = {str(k): float(v) for k, v in (data.get("coefficients") or {}).items()}
        return cls(form=str(data["form"]), n_terms=int(data.get("n_terms", len(coefficients))),
                   selectable=bool(data.get("selectable", True)), offered=bool(data.get("offered", True)),
                   chosen=bool(data.get("chosen", False)), reason=data.get("reason"),
                   cv_mape=_float_or_none(data.get("cv_mape")), cv_r2=_float_or_none(data.get("cv_r2")),
                   r2=_float_or_none(data.get("r2")), cv_total_ratio=_float_or_none(data.get("cv_total_ratio")),
                   coefficients=coefficients, min_prediction=_float_or_none(data.get("min_prediction")))


@dataclass
class FitResult:
    """One fitted (or published) surface.

    Attributes:
        model, device, energy_scope ('total'|'dynamic'), target ('energy'|'runtime').
        form: the form's name; terms: its feature terms, in order.
        coefficients: term -> value, in J (energy) or s (runtime) per token^power
            (see ``units``).
        r2: in-sample R² over the trials (as the paper reports it); cv_mape: grouped
            k-fold cross-validated MAPE over held-out trials, a fraction (None when
            published).
        n_points: distinct (input_tokens, output_tokens) points; n_trials: trials.
        domain: {input_tokens: [lo, hi], output_tokens: [lo, hi]} that was measured, and
            batch_size: [lo, hi] when the fit has a batch axis (:attr:`has_batch_axis`).
        source: 'measured' (fitted here) or 'published' (the paper's coefficients).
        energy_source: 'measured' or 'estimated' for energy fits, None for runtime.
        candidates: every form tried (:class:`FormCandidate`); forms not offered have no
            scores and a reason.
        coef_cov: bootstrap covariance of the coefficients (None when published).
        noise_rel_sd: relative trial-to-trial standard deviation (None when published).
        details: everything else (cv scheme, weighting, noise floor, measurement id
            ranges, measured points, sensor, software versions, warnings, label).
        fit_id, created_at: set once stored.
    """

    model: str
    device: str
    energy_scope: str
    target: str
    form: str
    terms: tuple[str, ...]
    coefficients: dict[str, float]
    r2: float | None
    cv_mape: float | None
    n_points: int
    n_trials: int
    domain: dict[str, list[int]]
    source: str = "measured"
    energy_source: str | None = None
    candidates: list[FormCandidate] = field(default_factory=list)
    coef_cov: list[list[float]] | None = None
    noise_rel_sd: float | None = None
    details: dict = field(default_factory=dict)
    fit_id: int | None = None
    created_at: str | None = None

    # -- identity ----------------------------------------------------------------------

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.device, self.energy_scope, self.target)

    @property
    def value_column(self) -> str:
        """The column name of this target's values: energy_j or runtime_s."""
        return "energy_j" if self.target == "energy" else "runtime_s"

    @property
    def unit(self) -> str:
        return "J" if self.target == "energy" else "s"

    @property
    def units(self) -> dict[str, str]:
        """The unit of each coefficient."""
        return {term: term_unit(term, self.target) for term in self.terms}

    @property
    def energy_estimated(self) -> bool:
        """True when this is an energy fit of estimated (not measured) energy."""
        return self.target == "energy" and self.energy_source == "estimated"

    @property
    def label(self) -> str:
        """A short line for a UI: what this surface is made from."""
        if self.source == "published":
            return self.details.get("label", "published coefficients, no measurements")
        kind = "estimated energy" if self.energy_estimated else ("measured energy" if self.target == "energy"
                                                                 else "measured runtime")
        return f"{kind}, {self.n_trials} trials at {self.n_points} points"

    @property
    def unconverged_points(self) -> list[list[int]]:
        """The measured points ([τin, τout]; [τin, τout, B] for a fit with a batch axis) whose
        trials ended without meeting the profiling job's confidence rule (most of their trials
        did); empty when every point converged, or for fits made before points were judged.
        See :mod:`engine.fitting.selection`."""
        return [[int(v) for v in point] for point in self.details.get("unconverged_points", [])]

    def estimator(self) -> ModelForm:
        """The form as a fitted estimator (``predict(X)`` with X = [[τin, τout], ...])."""
        return form_from_coefficients(self.form, self.terms, self.coefficients)

    # -- predictions -------------------------------------------------------------------

    # -- the batch axis --------------------------------------------------------------
    # A fit with a batch axis predicts ONE BATCH of ``batch_size`` requests of the same
    # shape (τin, τout): its X has a third column, the batch size, and its domain a
    # "batch_size" range. A fit without one was measured at batch size 1 only and predicts
    # one request; it refuses any other batch size rather than guess what batching does.

    @property
    def batch_domain(self) -> tuple[int, int]:
        """The batch sizes measured, (lo, hi); (1, 1) for a fit without a batch axis."""
        lo, hi = self.domain.get("batch_size") or (1, 1)
        return int(lo), int(hi)

    @property
    def has_batch_axis(self) -> bool:
        """True when the fit was measured at several batch sizes (its predictions depend on B)."""
        lo, hi = self.batch_domain
        return "batch_size" in self.domain and hi > lo

    def _columns(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        """X: (n, 2) token counts, or (n, 3) with the batch size for a fit with a batch axis.

        The arguments broadcast; ``batch_size=None`` means 1. A fit without a batch axis
        refuses any batch size but 1 (ValueError): it knows nothing about batches.
        """
        arrays = [np.asarray(input_tokens, dtype=float), np.asarray(output_tokens, dtype=float)]
        if batch_size is not None:
            sizes = np.asarray(batch_size, dtype=float)
            if not self.has_batch_axis and (sizes != 1).any():
                raise ValueError(f"the {self.target} fit of {self.model} on {self.device} was measured at batch size 1 "
                                 "only: it cannot predict batches (profile with several batch sizes)")
            if self.has_batch_axis:
                arrays.append(sizes)
        elif self.has_batch_axis:
            arrays.append(np.ones(1))
        return np.column_stack([a.reshape(-1) for a in np.broadcast_arrays(*arrays)])

    def _features(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        return self.estimator().features(self._columns(input_tokens, output_tokens, batch_size))

    def predict_raw(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        """The form's value (may be negative only for the paper's unconstrained form): for a
        fit with a batch axis, the energy (J) or runtime (s) of one batch of ``batch_size``
        requests of this shape (None: 1); for a fit without one, of one request."""
        coef = np.array([self.coefficients[t] for t in self.terms], dtype=float)
        return self._features(input_tokens, output_tokens, batch_size) @ coef

    def standard_error(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        """Bootstrap standard error of the mean surface at each point (NaN when unknown)."""
        features = self._features(input_tokens, output_tokens, batch_size)
        if self.coef_cov is None:
            return np.full(features.shape[0], np.nan)
        cov = np.asarray(self.coef_cov, dtype=float)
        variance = np.einsum("ij,jk,ik->i", features, cov, features)
        return np.sqrt(np.maximum(variance, 0.0))

    def uncertainty(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        """Half-width of a 90% prediction interval for one request, or one batch of
        ``batch_size`` for a fit with a batch axis (NaN when unknown)."""
        se = self.standard_error(input_tokens, output_tokens, batch_size)
        if self.noise_rel_sd is None:
            return np.full_like(se, np.nan)
        value = np.maximum(self.predict_raw(input_tokens, output_tokens, batch_size), 0.0)
        return Z_90 * np.sqrt(se * se + (self.noise_rel_sd * value) ** 2)

    def in_domain(self, input_tokens, output_tokens, batch_size=None) -> np.ndarray:
        """True where both token counts (and the batch size, None meaning 1) lie within the
        measured range; a fit without a batch axis holds batch size 1 only."""
        sizes = np.ones(1) if batch_size is None else np.asarray(batch_size, dtype=float)
        tokens_in, tokens_out, sizes = (a.reshape(-1) for a in np.broadcast_arrays(
            np.asarray(input_tokens, dtype=float), np.asarray(output_tokens, dtype=float), sizes))
        (in_lo, in_hi), (out_lo, out_hi) = self.domain["input_tokens"], self.domain["output_tokens"]
        batch_lo, batch_hi = self.batch_domain if self.has_batch_axis else (1, 1)
        return ((tokens_in >= in_lo) & (tokens_in <= in_hi) & (tokens_out >= out_lo) & (tokens_out <= out_hi)
                & (sizes >= batch_lo) & (sizes <= batch_hi))

    # -- serialisation -----------------------------------------------------------------

    def to_json_dict(self) -> dict:
        """The ``fit --json`` element of DESIGN.md, plus documented extra keys.

        Contract keys: model, device, target, form, coefficients, r2, cv_mape, n_points,
        domain. Extras: id, energy_scope, source, energy_source, energy_estimated, label,
        units, n_trials, uncertainty {meaning, noise_rel_sd}, candidates [{form, cv_mape,
        r2, cv_r2, chosen, offered}], warnings, unconverged_points ([[τin, τout(, B)], ...]),
        cv_mape_by_batch_size ({"B": fraction} for a fit with a batch axis: the held-out MAPE of
        its trials at each batch size, CV grouped by (τin, τout, B); None without one).
        """
        return json_safe({
            "model": self.model, "device": self.device, "target": self.target, "form": self.form,
            "coefficients": dict(self.coefficients), "r2": self.r2, "cv_mape": self.cv_mape,
            "n_points": self.n_points, "domain": self.domain,
            "id": self.fit_id, "energy_scope": self.energy_scope, "source": self.source,
            "energy_source": self.energy_source, "energy_estimated": self.energy_estimated, "label": self.label,
            "units": self.units, "n_trials": self.n_trials,
            "uncertainty": {"meaning": UNCERTAINTY_MEANING, "noise_rel_sd": self.noise_rel_sd},
            "candidates": [{"form": c.form, "cv_mape": c.cv_mape, "r2": c.r2, "cv_r2": c.cv_r2, "chosen": c.chosen,
                            "offered": c.offered} for c in self.candidates],
            "warnings": list(self.details.get("warnings", [])),
            "unconverged_points": self.unconverged_points,
            "cv_mape_by_batch_size": self.details.get("cv_mape_by_batch_size"),
        })

    def to_dict(self) -> dict:
        """Every field, strict-JSON-serialisable; :meth:`from_dict` restores it exactly."""
        return json_safe(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FitResult":
        fields = dict(data)
        fields["terms"] = tuple(fields["terms"])
        fields["coefficients"] = {k: float(v) for k, v in fields["coefficients"].items()}
        fields["candidates"] = [FormCandidate.from_dict(c) for c in fields.get("candidates") or []]
        return cls(**fields)

    #: Columns of the fits table filled from a FitResult (id and created_at are the table's).
    ROW_COLUMNS = ("model", "device", "energy_scope", "target", "form", "coefficients", "r2", "cv_mape", "n_points",
                   "domain", "source", "details")

    def to_row(self) -> dict:
        """The fits-table row: JSON columns as strings; the rest of the fields in ``details``."""
        details = json_safe({**self.details, "terms": list(self.terms), "n_trials": self.n_trials,
                             "energy_source": self.energy_source, "candidates": self.candidates,
                             "coef_cov": self.coef_cov, "noise_rel_sd": self.noise_rel_sd})
        return {"model": self.model, "device": self.device, "energy_scope": self.energy_scope, "target": self.target,
                "form": self.form, "coefficients": json.dumps(json_safe(self.coefficients)),
                "r2": _float_or_none(self.r2), "cv_mape": _float_or_none(self.cv_mape), "n_points": int(self.n_points),
                "domain": json.dumps(json_safe(self.domain)), "source": self.source,
                "details": json.dumps(details)}

    @classmethod
    def from_row(cls, row: dict) -> "FitResult":
        details = dict(_json(row.get("details")) or {})
        coefficients = _json(row["coefficients"])
        terms = tuple(details.pop("terms", None) or coefficients)  # rows written elsewhere: the keys' order
        created = row.get("created_at")
        return cls(
            model=row["model"], device=row["device"], energy_scope=row["energy_scope"], target=row["target"],
            form=row["form"], terms=terms, coefficients={k: float(v) for k, v in coefficients.items()},
            r2=_float_or_none(row.get("r2")), cv_mape=_float_or_none(row.get("cv_mape")),
            n_points=int(row["n_points"]) if row.get("n_points") is not None else 0,
            n_trials=int(details.pop("n_trials", 0) or 0), domain=_json(row["domain"]), source=row["source"],
            energy_source=details.pop("energy_source", None),
            candidates=[FormCandidate.from_dict(c) for c in details.pop("candidates", None) or []],
            coef_cov=details.pop("coef_cov", None), noise_rel_sd=details.pop("noise_rel_sd", None), details=details,
            fit_id=int(row["id"]) if row.get("id") is not None else None,
            created_at=created.isoformat() if hasattr(created, "isoformat") else (str(created) if created else None),
        )

    def with_id(self, fit_id: int) -> "FitResult":
        return replace(self, fit_id=int(fit_id))


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _json(value):
    if value is None or isinstance(value, (dict, list)):
        return value
    return json.loads(value)
