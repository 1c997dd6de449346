"""Options a plan can use (a model with fitted surfaces on a device) and their predictions.

Every coefficient of the optimisation is built from the query's own (τin, τout), with τin
counted by each model's own tokenizer where the workload gives prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from engine.catalog import CatalogEntry, list_models, runtime_context_length
from engine.errors import InputError, Problem
from engine.fitting import FitResult, load_latest_fits
from engine.store import Store


@dataclass(frozen=True)
class PlanOption:
    """A model on a device, with the surfaces that predict it and the model's accuracy score.

    ``load_s`` and ``load_energy_j`` are a one-off cost of loading the model on the device,
    counted once if the plan uses the option (0 when unknown and not given).
    ``context_tokens`` is the context the model runs with here (τin + τout of a query must
    fit in it), None when it is unknown (a model with no local files): then no query is
    kept from it for its length.
    """

    model: str
    device: str
    accuracy: float
    energy_fit: FitResult
    runtime_fit: FitResult
    load_s: float = 0.0
    load_energy_j: float = 0.0
    context_tokens: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}@{self.device}"

    @property
    def energy_estimated(self) -> bool:
        return self.energy_fit.energy_estimated

    @property
    def published(self) -> bool:
        return "published" in (self.energy_fit.source, self.runtime_fit.source)


def options_from_fits(fits: list[FitResult], catalog: dict[str, CatalogEntry], energy_scope: str = "total",
                      ) -> tuple[list[PlanOption], list[str]]:
    """One option per (model, device) with an energy and a runtime fit in ``energy_scope`` and a
    catalog accuracy. Measured fits win over published ones; later fits over earlier ones.
    Each option gets the context its model runs with (:func:`engine.catalog.runtime_context_length`).
    Returns the options (sorted by device, then model) and sentences about what was left out."""
    chosen: dict[tuple[str, str], dict[str, FitResult]] = {}
    contexts: dict[str, int | None] = {}
    for fit in fits:
        if fit.energy_scope != energy_scope:
            continue
        slot = chosen.setdefault((fit.model, fit.device), {})
        current = slot.get(fit.target)
        rank = (fit.source == "measured", fit.fit_id or 0)
        if current is None or rank >= (current.source == "measured", current.fit_id or 0):
            slot[fit.target] = fit
    options, notes = [], []
    for (model, device), slot in sorted(chosen.items(), key=lambda item: (item[0][1], item[0][0])):
        if "energy" not in slot or "runtime" not in slot:
            missing = "energy" if "energy" not in slot else "runtime"
            notes.append(f"{model} on {device} has no {missing} fit in the {energy_scope} scope, so plans leave it out")
            continue
        entry = catalog.get(model)
        if entry is None:
            notes.append(f"{model} on {device} is fitted but not in the catalog (no accuracy score), so plans leave it out")
            continue
        if model not in contexts:
            contexts[model] = runtime_context_length(entry)
        options.append(PlanOption(model=model, device=device, accuracy=float(entry.accuracy),
                                  energy_fit=slot["energy"], runtime_fit=slot["runtime"],
                                  context_tokens=contexts[model]))
    return options, notes


def load_options(store: Store, energy_scope: str = "total") -> tuple[list[PlanOption], list[str]]:
    """The options available in the database (see :func:`options_from_fits`)."""
    catalog = {row["name"]: CatalogEntry(**{k: row[k] for k in CatalogEntry.__dataclass_fields__})
               for row in list_models(store).to_dict("records")}
    return options_from_fits(load_latest_fits(store, energy_scope=energy_scope), catalog, energy_scope)


def with_load_costs(options: list[PlanOption], load_costs: dict[str, tuple[float, float]]) -> list[PlanOption]:
    """Options with one-off load costs: ``{"model@device" or "model": (load_s, load_energy_j)}``."""
    problems = []
    out = []
    known = {o.key for o in options} | {o.model for o in options}
    for key in load_costs:
        if key not in known:
            problems.append(Problem("load costs", f"{key!r} is not an option of this plan", None,
                                    "model@device or a model name among the options"))
    for key, (load_s, energy) in load_costs.items():
        if not (np.isfinite(load_s) and np.isfinite(energy) and load_s >= 0 and energy >= 0):
            problems.append(Problem("load costs", f"{key!r}: load time and energy must be numbers ≥ 0", None,
                                    "seconds ≥ 0 and joules ≥ 0"))
    if problems:
        raise InputError(problems)
    for option in options:
        cost = load_costs.get(option.key, load_costs.get(option.model))
        out.append(option if cost is None else replace(option, load_s=float(cost[0]), load_energy_j=float(cost[1])))
    return out


@dataclass
class Predictions:
    """Per (query, option) predictions, all (N, K) unless said otherwise.

    energy_j, runtime_s: the fitted values, clamped at 0 (``clamped`` marks where the raw
    value was negative, which only the paper's published form can give). in_domain: both
    token counts inside the range each fit was measured over. input_tokens: τin of the
    query for the option's model. output_tokens: (N,) the planning τout.
    """

    options: list[PlanOption]
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    energy_j: np.ndarray
    runtime_s: np.ndarray
    in_domain: np.ndarray
    clamped: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> np.ndarray:
        """(K,) accuracy score of each option's model."""
        return np.array([o.accuracy for o in self.options], dtype=float)

    @property
    def devices(self) -> list[str]:
        """The devices, in the options' order of first appearance."""
        return list(dict.fromkeys(o.device for o in self.options))

    @property
    def energy_estimated(self) -> bool:
        return any(o.energy_estimated for o in self.options)

    @property
    def fits_context(self) -> np.ndarray:
        """(N, K) True where the query's τin + τout fits in the option's context (or the context is unknown)."""
        return fits_context(self.options, self.input_tokens, self.output_tokens)


def fits_context(options: list[PlanOption], input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """(N, K) True where τin (N, K) + τout (N,) fits in each option's context; an unknown context holds anything."""
    context = np.array([np.inf if o.context_tokens is None else o.context_tokens for o in options], dtype=float)
    return (input_tokens + np.asarray(output_tokens)[:, None]) <= context[None, :]


def predict_options(options: list[PlanOption], input_tokens: dict[str, np.ndarray],
                    output_tokens: np.ndarray) -> Predictions:
    """Predict every query on every option (vectorised per option)."""
    if not options:
        raise InputError(Problem("plan", "there is nothing to plan with: no (model, device) has both an energy and a "
                                 "runtime fit and a catalog accuracy", None,
                                 "profile and fit a model (Profile page, or python -m engine profile / fit), or load "
                                 "the published reference profiles"))
    n, k = len(output_tokens), len(options)
    tin = np.zeros((n, k), dtype=np.int64)
    energy_raw = np.zeros((n, k))
    runtime_raw = np.zeros((n, k))
    in_domain = np.zeros((n, k), dtype=bool)
    tout = np.asarray(output_tokens, dtype=np.int64)
    for column, option in enumerate(options):
        tin[:, column] = input_tokens[option.model]
        energy_raw[:, column] = option.energy_fit.predict_raw(tin[:, column], tout)
        runtime_raw[:, column] = option.runtime_fit.predict_raw(tin[:, column], tout)
        in_domain[:, column] = (option.energy_fit.in_domain(tin[:, column], tout)
                                & option.runtime_fit.in_domain(tin[:, column], tout))
    clamped = (energy_raw < 0) | (runtime_raw < 0)
    warnings = []
    if clamped.any():
        where = sorted({options[c].key for c in np.flatnonzero(clamped.any(axis=0))})
        warnings.append(f"{int(clamped.sum()):,} predictions were negative (the published paper form, for long inputs "
                        f"with short outputs; {', '.join(where)}): those options are not offered for those queries, "
                        "unless a query has no other")
    warnings.extend(_context_warnings(options, fits_context(options, tin, tout)))
    outside = ~in_domain
    if outside.any():
        warnings.append(f"{int(outside.any(axis=1).sum()):,} queries lie outside the measured token range of at least "
                        "one option; their predictions are extrapolated")
    return Predictions(options=options, input_tokens=tin, output_tokens=tout, energy_j=np.maximum(energy_raw, 0.0),
                       runtime_s=np.maximum(runtime_raw, 0.0), in_domain=in_domain, clamped=clamped,
                       warnings=warnings)


def _context_warnings(options: list[PlanOption], fits: np.ndarray) -> list[str]:
    """What the context lengths do to a plan: queries kept from options too short for them,
    and models whose context is unknown (every length allowed on them)."""
    warnings = []
    too_long = ~fits
    if too_long.any():
        where = ", ".join(f"{o.key} ({o.context_tokens:,} tokens)" for c, o in enumerate(options) if too_long[:, c].any())
        count = int(too_long.any(axis=1).sum())
        warnings.append(f"{count:,} {'query is' if count == 1 else 'queries are'} longer (input + output tokens) than "
                        f"the context of {where}: those options are not offered for them")
    unknown = list(dict.fromkeys(o.model for o in options if o.context_tokens is None))
    if unknown:
        warnings.append(f"The context length of {', '.join(unknown)} is unknown (no model files here), so queries of "
                        f"any length are allowed on {'it' if len(unknown) == 1 else 'them'}")
    return warnings
