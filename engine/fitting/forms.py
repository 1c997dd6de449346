"""Model forms: small scikit-learn estimators of energy or runtime per request.

Each form is a weighted least-squares fit of a target (joules or seconds) on a few
feature *terms* of the token counts τin (``input_tokens``) and τout (``output_tokens``).
``X`` is always an array of shape (n, 2): columns τin, τout, one row per trial.

Why these forms (how inference spends time and energy, KV cache on):

- a fixed cost per request (tokenisation, scheduling, kernel launches): ``intercept``;
- prefill reads the prompt once, in parallel: ∝ τin, with attention adding ∝ τin²;
- decode runs once per output token; each step costs a constant (weights streamed from
  memory) plus attention over the context so far (τin + the tokens already decoded):
  Σ_j (1 + c·(τin + j)) = τout + c·τin·τout + c·τout²/2 → terms τout, τin·τout, τout².

**Never negative.** Every term is a non-negative function of the token counts and each
physical cost above is non-negative, so the candidate forms are fitted by non-negative
least squares (NNLS): coefficients ≥ 0 on features ≥ 0 give predictions ≥ 0 for *every*
τin, τout ≥ 0, including outside the measured range, by construction. A clamp would
hide the problem instead (a surface with negative coefficients can be wrong by a large
amount well before it crosses zero). The paper's form (:class:`PaperForm`) is the one
exception: it is fitted exactly as published (ordinary least squares, no weights,
coefficients unconstrained) so that its negative region can be shown honestly; it is
reported for comparison and never chosen.

**Relative error.** The candidates weight each trial by 1/ȳ², where ȳ is the mean
target of the trials at the same (τin, τout) point, so the squared *relative* error is
what is minimised: short requests count as much as long ones. Measured alternatives
(bench/fit_accuracy.py and the demo models, grouped 5-fold CV MAPE):

- 1/y² per trial (``weighting="relative-trial"``): the same CV MAPE on simulated GPU
  data (±0.1 point), lower on the heavy-tailed CPU demo data (demo-small runtime 16% vs
  22%), but only by predicting below the mean: low draws get larger weights, so the
  surface leans towards the median and under-predicts the *total* of a batch (held-out
  Σŷ/Σy = 0.93 there, against 0.98 with point-mean weights). The planner sums
  predictions, so totals matter more than the last points of per-trial MAPE.
- no weights (``"none"``): MAPE 1.5 to 6 times higher on the simulated grids, since
  the largest requests dominate.
- log space: a sum of non-negative terms is not linear in log space; it needs an
  iterative solver with local optima (and leans to the geometric mean, like 1/y²),
  where NNLS is convex with one answer, solved in microseconds.

Every trial stays a row of the fit (points measured more often count more); the solver
works on the exact per-point sufficient statistics, so 100,000 trials fit quickly.
Held-out Σŷ/Σy is reported per candidate as ``cv_total_ratio``.

**The batch axis** (:data:`BATCH_FORMS`). Trials measured at several batch sizes B have a
third column, B, and their target is the energy (runtime) of the whole batch of B requests
of shape (τin, τout). The batch forms follow how a batch is run:

- a fixed cost per batch (one generate call, its scheduling and launches): ``intercept``;
- a fixed cost per request in it (its tokenisation, its row of logits): ``batch_size``;
- prefill processes B·τin prompt tokens: ∝ B·τin (attention adds ∝ B·τin²);
- a decode step runs once per output token *for the whole batch*: reading every weight
  once costs the same whatever B (the term τout, shared B ways, the lever batching pulls),
  while each request's own compute and its KV-cache reads grow with B: ∝ B·τout, and
  attention over the context ∝ B·τin·τout (and ∝ B·τout² over the generated tokens);
- on a CPU a decode step's matrix kernels reuse each weight read across the batch's rows,
  and how well grows with B: measured here (llama.cpp, 120 M parameters, one thread), a
  step cost 1 : 3.2 : 7.3 at B = 1 : 4 : 16: it grew faster from 1 to 4 (+0.73 a request)
  than from 4 to 16 (+0.34), a concave curve no sum of the terms above draws (they are
  straight lines in B). ``batch:kv+sublinear`` adds a step
  cost ∝ τout·√B for that; like every form, it is chosen only where it predicts held-out
  design points better.

At B = 1 each batch form is one of the forms above (its B-terms merge with the others), so
a batch fit predicts one request alike. The candidates are scored and chosen as the
others: grouped cross-validation by design point, (τin, τout, B) here, so a held-out point
is a shape at a batch size the fold never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy.optimize import nnls
from sklearn.base import BaseEstimator, RegressorMixin

from engine.errors import InputError, Problem

#: Weighting schemes: per-trial weights before any sample_weight.
WEIGHTINGS = ("relative", "relative-trial", "none")


# -- terms -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One feature of a form: its name, how to compute it, and its power of tokens (for units)."""

    name: str
    token_power: int
    description: str

    def values(self, tokens_in: np.ndarray, tokens_out: np.ndarray, batch_size: np.ndarray | None = None) -> np.ndarray:
        """The term at each row; ``batch_size`` None means batches of 1 (one request)."""
        sizes = np.ones_like(tokens_in) if batch_size is None else batch_size
        return _TERM_FUNCTIONS[self.name](tokens_in, tokens_out, sizes)


_TERM_FUNCTIONS = {
    "intercept": lambda i, o, b: np.ones_like(i),
    "input_tokens": lambda i, o, b: i,
    "input_tokens_sq": lambda i, o, b: i * i,
    "output_tokens": lambda i, o, b: o,
    "input_x_output": lambda i, o, b: i * o,
    "output_tokens_sq": lambda i, o, b: o * o,
    # The batch axis: b requests of shape (i, o) in one batch.
    "batch_size": lambda i, o, b: b,
    "batch_x_input": lambda i, o, b: b * i,
    "batch_x_input_sq": lambda i, o, b: b * i * i,
    "batch_x_output": lambda i, o, b: b * o,
    "batch_x_input_x_output": lambda i, o, b: b * i * o,
    "batch_x_output_sq": lambda i, o, b: b * o * o,
    "output_x_sqrt_batch": lambda i, o, b: o * np.sqrt(b),
}

TERMS: dict[str, Term] = {
    t.name: t for t in (
        Term("intercept", 0, "fixed cost per request"),
        Term("input_tokens", 1, "prefill, per input token"),
        Term("input_tokens_sq", 2, "prefill attention, per input token squared"),
        Term("output_tokens", 1, "decode, per output token"),
        Term("input_x_output", 2, "decode attention over the prompt, per input x output token"),
        Term("output_tokens_sq", 2, "decode attention over generated tokens, per output token squared"),
        Term("batch_size", 0, "fixed cost per request of a batch"),
        Term("batch_x_input", 1, "prefill, per input token of each request of the batch"),
        Term("batch_x_input_sq", 2, "prefill attention, per input token squared of each request"),
        Term("batch_x_output", 1, "decode, per output token of each request (its own compute and KV reads)"),
        Term("batch_x_input_x_output", 2, "decode attention over each request's prompt, per input x output token"),
        Term("batch_x_output_sq", 2, "decode attention over each request's generated tokens, per output token squared"),
        Term("output_x_sqrt_batch", 1, "decode, per output token, growing with the square root of the batch size "
                                       "(kernels that reuse each weight read across more rows as B grows)"),
    )
}

#: The terms that need the batch size column.
BATCH_TERMS = frozenset({"batch_size", "batch_x_input", "batch_x_input_sq", "batch_x_output",
                         "batch_x_input_x_output", "batch_x_output_sq", "output_x_sqrt_batch"})


def term_unit(term: str, target: str) -> str:
    """The unit of a coefficient: J or s, per token to the term's power."""
    base = "J" if target == "energy" else "s"
    power = TERMS[term].token_power
    return base if power == 0 else f"{base}/token" if power == 1 else f"{base}/token^{power}"


# -- validation --------------------------------------------------------------------------

def check_X(X, where: str = "X", batch_axis: bool = False) -> np.ndarray:
    """Token counts as a float array (n, 2), or (n, 3) with the batch size for a form with a
    batch axis; every column finite and > 0."""
    array = np.asarray(X, dtype=float)
    columns = 3 if batch_axis else 2
    if array.ndim != 2 or array.shape[1] != columns:
        raise InputError(Problem(where, f"has shape {array.shape}", None,
                                 "three columns: input_tokens, output_tokens, batch_size" if batch_axis else
                                 "two columns: input_tokens, output_tokens"))
    bad = ~np.isfinite(array).all(axis=1) | (array <= 0).any(axis=1)
    if bad.any():
        raise InputError(Problem(where, f"{int(bad.sum())} rows have token counts that are missing, infinite or not > 0",
                                 "input_tokens/output_tokens" + ("/batch_size" if batch_axis else ""),
                                 "whole numbers > 0"))
    return array


def check_y(y, n: int, where: str = "y", positive: bool = True) -> np.ndarray:
    """Targets as a float array (n,), finite, and > 0 when ``positive`` (relative error needs it)."""
    array = np.asarray(y, dtype=float).reshape(-1)
    if array.shape[0] != n:
        raise InputError(Problem(where, f"has {array.shape[0]} values for {n} rows of token counts"))
    bad = ~np.isfinite(array) | ((array <= 0) if positive else False)
    if bad.any():
        condition = "missing, infinite or not > 0" if positive else "missing or infinite"
        raise InputError(Problem(where, f"{int(bad.sum())} values are {condition}", None,
                                 "a positive number per trial" if positive else "a number per trial"))
    return array


# -- grouping trials by design point -----------------------------------------------------

@dataclass(frozen=True)
class PointStats:
    """Trials grouped by distinct (τin, τout) point (τin, τout, B with a batch axis): the
    sufficient statistics of a fit.

    ``points`` (P, 2) (or (P, 3)) are the distinct points, ``inverse`` (n,) the point of each trial,
    ``weight`` (P,) the summed trial weights per point and ``mean`` (P,) the weighted mean.
    """

    points: np.ndarray
    inverse: np.ndarray
    weight: np.ndarray
    mean: np.ndarray


def point_index(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of X (in order of first appearance) and, for each row, its point's index.

    Hash-based (pandas.factorize), O(n): sorting 100,000 keys per CV fold cost more
    than the fits themselves.
    """
    key = X[:, 0] * 4294967296.0 + X[:, 1]  # exact for token counts below 2**21
    if X.shape[1] > 2:  # the batch axis: a third column no longer fits in one exact float key
        inverse = pd.MultiIndex.from_arrays([X[:, k] for k in range(X.shape[1])]).factorize(sort=False)[0]
        distinct = np.arange(int(inverse.max()) + 1 if len(inverse) else 0)
    else:
        inverse, distinct = pd.factorize(key, sort=False)
    first = np.full(len(distinct), len(key), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(key)))
    return X[first], inverse.astype(np.int64)


def trial_weights(y: np.ndarray, inverse: np.ndarray, n_points: int, weighting: str) -> np.ndarray:
    """Per-trial weights for a weighting scheme (see the module docstring)."""
    if weighting == "none":
        return np.ones_like(y)
    if weighting == "relative-trial":
        return 1.0 / (y * y)
    if weighting == "relative":
        counts = np.bincount(inverse, minlength=n_points)
        means = np.bincount(inverse, weights=y, minlength=n_points) / counts
        return 1.0 / (means[inverse] ** 2)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def point_stats(points: np.ndarray, inverse: np.ndarray, y: np.ndarray, weights: np.ndarray) -> PointStats:
    weight = np.bincount(inverse, weights=weights, minlength=len(points))
    mean = np.bincount(inverse, weights=weights * y, minlength=len(points)) / weight
    return PointStats(points, inverse, weight, mean)


# -- the solver --------------------------------------------------------------------------

class WeightedSolver:
    """Weighted least squares on per-point statistics, optionally with coefficients ≥ 0.

    Σ_trials w·(a·β − y)² equals Σ_points W·(a·β − ȳ_w)² plus a constant, so the fit
    runs on the distinct points. Columns are scaled to unit norm for conditioning, and
    the (P, k) system is reduced to its (k, k) triangular factor once, so repeated
    solves with new targets (the bootstrap) cost a k x k NNLS each.
    """

    def __init__(self, features: np.ndarray, weight: np.ndarray, nonnegative: bool):
        root = np.sqrt(weight)[:, None]
        matrix = features * root
        scale = np.linalg.norm(matrix, axis=0)
        scale[scale == 0] = 1.0
        self._root = root[:, 0]
        self._scale = scale
        self._nonnegative = nonnegative
        scaled = matrix / scale
        if scaled.shape[0] > scaled.shape[1]:
            self._q, self._r = np.linalg.qr(scaled, mode="reduced")
        else:
            self._q, self._r = None, scaled

    def solve(self, mean: np.ndarray) -> np.ndarray:
        """Coefficients for per-point weighted means ``mean`` (P,)."""
        return self.solve_many(mean[None, :])[0]

    def solve_many(self, means: np.ndarray) -> np.ndarray:
        """Coefficients (m, k) for m alternative vectors of point means (m, P) at once."""
        b = means * self._root[None, :]
        if self._q is not None:
            b = b @ self._q
        return np.vstack([self._solve_reduced(row) for row in b])

    def _solve_reduced(self, b: np.ndarray) -> np.ndarray:
        if self._nonnegative:
            solution, _ = nnls(self._r, b, maxiter=50 * self._r.shape[1] + 100)
        else:
            solution = np.linalg.lstsq(self._r, b, rcond=None)[0]
        return solution / self._scale


# -- the forms ---------------------------------------------------------------------------

class ModelForm(BaseEstimator, RegressorMixin):
    """A linear-in-coefficients form: ``name``, ``terms`` and how it is fitted.

    Parameters:
        weighting: ``"relative"`` (weights 1/ȳ² per point mean: relative error, the
            default), ``"relative-trial"`` (1/y² per trial) or ``"none"`` (plain least
            squares, as the paper).

    Learned attributes: ``coef_`` (array, in the order of ``terms``), ``coefficients_``
    (dict term -> value, in J or s per token to the term's power), ``n_points_``,
    ``n_trials_``, ``points_`` (the distinct points fitted) and ``domain_``.
    """

    name: ClassVar[str] = "form"
    terms: ClassVar[tuple[str, ...]] = ()
    #: Fitted to batches: X has a third column, the batch size, and y is the batch's value.
    batch_axis: ClassVar[bool] = False
    nonnegative: ClassVar[bool] = True
    #: Chosen only when it is non-negative by construction (the paper's form is not).
    selectable: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, weighting: str = "relative"):
        self.weighting = weighting

    # -- what the form needs -----------------------------------------------------------

    @property
    def min_points(self) -> int:
        """Distinct points needed: one more than the coefficients, so a residual remains."""
        return len(self.terms) + 1

    def features(self, X) -> np.ndarray:
        """The (n, k) feature matrix of token counts X (n, 2), or (n, 3) with batch sizes (no third
        column: batches of 1)."""
        X = np.asarray(X, dtype=float)
        tokens_in, tokens_out = X[:, 0], X[:, 1]
        sizes = X[:, 2] if X.shape[1] > 2 else None
        return np.column_stack([TERMS[t].values(tokens_in, tokens_out, sizes) for t in self.terms])

    def unsupported_reason(self, X) -> str | None:
        """Why this form cannot be fitted to these points, or None when it can.

        It needs at least ``min_points`` distinct points, and points that tell its terms
        apart (a full-rank design: e.g. τin² needs three distinct input counts).
        """
        points, _ = point_index(np.asarray(X, dtype=float))
        if len(points) < self.min_points:
            what = "(input_tokens, output_tokens, batch_size)" if points.shape[1] > 2 else "(input_tokens, output_tokens)"
            return f"needs at least {self.min_points} distinct {what} points, has {len(points)}"
        design = self.features(points)
        design = design / np.maximum(np.abs(design).max(axis=0), 1e-300)
        if np.linalg.matrix_rank(design, tol=1e-10) < len(self.terms):
            counts = "input or output counts or batch sizes" if points.shape[1] > 2 else "input or output counts"
            return f"its terms cannot be told apart on these points (too few distinct {counts})"
        return None

    # -- estimator ---------------------------------------------------------------------

    def fit(self, X, y, sample_weight=None):
        """Fit on every trial: X (n, 2) token counts, y (n,) joules or seconds. Returns self."""
        X = check_X(X, batch_axis=self.batch_axis)
        y = check_y(y, X.shape[0], positive=self.weighting != "none")
        points, inverse = point_index(X)
        weights = trial_weights(y, inverse, len(points), self.weighting)
        if sample_weight is not None:
            weights = weights * np.asarray(sample_weight, dtype=float)
        stats = point_stats(points, inverse, y, weights)
        self._set_fit(stats, n_trials=len(y))
        return self

    def _set_fit(self, stats: PointStats, n_trials: int) -> None:
        self.solver_ = WeightedSolver(self.features(stats.points), stats.weight, self.nonnegative)
        self.coef_ = self.solver_.solve(stats.mean)
        self.coefficients_ = {term: float(c) for term, c in zip(self.terms, self.coef_)}
        self.stats_ = stats
        self.points_ = stats.points
        self.n_points_ = len(stats.points)
        self.n_trials_ = n_trials
        self.domain_ = {"input_tokens": [int(stats.points[:, 0].min()), int(stats.points[:, 0].max())],
                        "output_tokens": [int(stats.points[:, 1].min()), int(stats.points[:, 1].max())]}
        if stats.points.shape[1] > 2:
            self.domain_["batch_size"] = [int(stats.points[:, 2].min()), int(stats.points[:, 2].max())]

    def predict(self, X) -> np.ndarray:
        """Raw predictions (never negative for the NNLS forms; may be for the paper's)."""
        return self.features(X) @ self.coef_


class PaperForm(ModelForm):
    """The paper's form, fitted as published: e = α0·τin + α1·τout + α2·τin·τout by OLS.

    No intercept, no weights, no sign constraint, so it can predict negative values
    (long input, short output). Kept for comparison; never chosen.
    """

    name = "paper"
    terms = ("input_tokens", "output_tokens", "input_x_output")
    nonnegative = False
    selectable = False
    description = "paper (Wilkins et al.): α0·τin + α1·τout + α2·τin·τout, OLS, no intercept"

    def __init__(self, weighting: str = "none"):
        super().__init__(weighting=weighting)


class PaperTermsNonneg(ModelForm):
    name = "paper-nonneg"
    terms = ("input_tokens", "output_tokens", "input_x_output")
    description = "the paper's terms, coefficients ≥ 0, relative error"


class OverheadLinear(ModelForm):
    name = "overhead+linear"
    terms = ("intercept", "input_tokens", "output_tokens")
    description = "fixed cost + prefill ∝ τin + decode ∝ τout"


class OverheadKV(ModelForm):
    name = "overhead+kv"
    terms = ("intercept", "input_tokens", "output_tokens", "input_x_output")
    description = "fixed cost + prefill ∝ τin + decode ∝ τout·(1 + c·τin)"


class OverheadKVPrefill2(ModelForm):
    name = "overhead+kv+prefill2"
    terms = ("intercept", "input_tokens", "input_tokens_sq", "output_tokens", "input_x_output")
    description = "fixed cost + prefill ∝ τin + τin² + decode ∝ τout·(1 + c·τin)"


class OverheadKVDecode2(ModelForm):
    name = "overhead+kv+decode2"
    terms = ("intercept", "input_tokens", "output_tokens", "input_x_output", "output_tokens_sq")
    description = "fixed cost + prefill ∝ τin + decode ∝ τout·(1 + c·τin + d·τout)"


class OverheadKVQuadratic(ModelForm):
    name = "overhead+kv+quadratic"
    terms = ("intercept", "input_tokens", "input_tokens_sq", "output_tokens", "input_x_output", "output_tokens_sq")
    description = "fixed cost + prefill ∝ τin + τin² + decode ∝ τout·(1 + c·τin + d·τout)"


#: The forms fit_all tries, simplest first (ties in CV MAPE go to the simpler form).
DEFAULT_FORMS: tuple[type[ModelForm], ...] = (
    PaperForm, PaperTermsNonneg, OverheadLinear, OverheadKV, OverheadKVPrefill2, OverheadKVDecode2,
    OverheadKVQuadratic,
)


# -- forms of one batch of B requests (see "The batch axis" in the module docstring) -------------

class BatchForm(ModelForm):
    """A form of one batch: X (n, 3) = τin, τout, B; y the whole batch's joules or seconds."""

    batch_axis = True


class BatchShared(BatchForm):
    name = "batch:shared-decode"
    terms = ("intercept", "batch_size", "batch_x_input", "output_tokens")
    description = ("fixed cost per batch + per request + prefill ∝ B·τin + decode steps ∝ τout shared by the batch "
                   "(weights read once a step)")


class BatchLinear(BatchForm):
    name = "batch:linear"
    terms = ("intercept", "batch_size", "batch_x_input", "output_tokens", "batch_x_output")
    description = ("fixed cost per batch + per request + prefill ∝ B·τin + per decode step a weights read (∝ τout) "
                   "and per-request compute (∝ B·τout)")


class BatchKV(BatchForm):
    name = "batch:kv"
    terms = ("intercept", "batch_size", "batch_x_input", "output_tokens", "batch_x_output", "batch_x_input_x_output")
    description = ("fixed costs + prefill ∝ B·τin + decode ∝ τout (weights) + B·τout·(1 + c·τin) (per-request compute "
                   "and KV reads)")


class BatchKVDecode2(BatchForm):
    name = "batch:kv+decode2"
    terms = ("intercept", "batch_size", "batch_x_input", "output_tokens", "batch_x_output", "batch_x_input_x_output",
             "batch_x_output_sq")
    description = "batch:kv + KV reads over each request's generated tokens ∝ B·τout²"


class BatchKVPrefill2(BatchForm):
    name = "batch:kv+prefill2"
    terms = ("intercept", "batch_size", "batch_x_input", "batch_x_input_sq", "output_tokens", "batch_x_output",
             "batch_x_input_x_output")
    description = "batch:kv + prefill attention ∝ B·τin²"


class BatchKVSublinear(BatchForm):
    name = "batch:kv+sublinear"
    terms = ("intercept", "batch_size", "batch_x_input", "output_tokens", "output_x_sqrt_batch", "batch_x_output",
             "batch_x_input_x_output")
    description = "batch:kv + a decode step's cost growing with √B (weights reused across the batch's rows)"


#: The forms fitted to trials at several batch sizes, simplest first.
BATCH_FORMS: tuple[type[ModelForm], ...] = (BatchShared, BatchLinear, BatchKV, BatchKVDecode2, BatchKVPrefill2,
                                            BatchKVSublinear)

FORMS_BY_NAME: dict[str, type[ModelForm]] = {form.name: form for form in DEFAULT_FORMS + BATCH_FORMS}


def form_from_coefficients(name: str, terms: list[str] | tuple[str, ...], coefficients: dict[str, float]) -> ModelForm:
    """A fitted-looking form from stored coefficients (for prediction only)."""
    cls = FORMS_BY_NAME.get(name)
    if cls is None or tuple(cls.terms) != tuple(terms):
        cls = type(f"StoredForm_{len(terms)}", (ModelForm,), {"name": name, "terms": tuple(terms)})
    form = cls()
    form.coef_ = np.array([float(coefficients[t]) for t in terms], dtype=float)
    form.coefficients_ = {t: float(coefficients[t]) for t in terms}
    return form
