"""Options a plan can use (a model with fitted surfaces on a device, at a batch size) and their predictions.

Every coefficient of the optimisation is built from the query's own (τin, τout), with τin
counted by each model's own tokenizer where the workload gives prompts. An option at batch
size B costs a query its per-request share of a batch of B requests of its shape (the
fit's batch prediction divided by B); how the batches are then formed and predicted from
their real members is :mod:`engine.planning.batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.catalog import HUB_PREFIX, CatalogEntry, list_models, resolve_model_path, runtime_context_length
from engine.errors import InputError, Problem
from engine.fitting import FitResult, load_latest_fits
from engine.planning.batches import BatchMemoryRule, batch_memory_rule
from engine.store import Store

#: The sizes offered by default: every power of two within a fit's measured batch range, plus 1.
DEFAULT_BATCH_POWERS = tuple(2 ** j for j in range(9))  # 1 .. 256


@dataclass(frozen=True)
class PlanOption:
    """A model on a device at a batch size, with the surfaces that predict it and the model's accuracy score.

    ``load_s`` and ``load_energy_j`` are a one-off cost of loading the model on the device,
    counted once if the plan uses the model there (at any batch size; 0 when unknown and not
    given). ``context_tokens`` is the context the model runs with here (τin + τout of a
    query must fit in it), None when it is unknown (a model with no local files): then no
    query is kept from it for its length. ``batch_size``: the requests run together (1: one
    at a time). ``memory``: the rule that keeps a batch within its device's free memory, None
    where it cannot be known here (then the fit's measured batch range is the only limit).
    ``backend``: the catalog's backend of the model (how a batch of different lengths runs,
    :func:`engine.planning.batches.batch_rule`); None when not known.
    """

    model: str
    device: str
    accuracy: float
    energy_fit: FitResult
    runtime_fit: FitResult
    load_s: float = 0.0
    load_energy_j: float = 0.0
    context_tokens: int | None = None
    batch_size: int = 1
    memory: BatchMemoryRule | None = field(default=None, compare=False)
    backend: str | None = None

    @property
    def pair(self) -> str:
        """``model@device``: the model on its device, whatever the batch size."""
        return f"{self.model}@{self.device}"

    @property
    def key(self) -> str:
        """``model@device`` at batch size 1, ``model@device×B`` above."""
        return self.pair if self.batch_size == 1 else f"{self.pair}×{self.batch_size}"

    @property
    def energy_estimated(self) -> bool:
        return self.energy_fit.energy_estimated

    @property
    def published(self) -> bool:
        return "published" in (self.energy_fit.source, self.runtime_fit.source)

    @property
    def has_batch_axis(self) -> bool:
        """Both surfaces were measured at several batch sizes (else only batch size 1 may be planned)."""
        return self.energy_fit.has_batch_axis and self.runtime_fit.has_batch_axis

    @property
    def batch_domain(self) -> tuple[int, int]:
        """The batch sizes both surfaces were measured at, (lo, hi); (1, 1) without a batch axis."""
        if not self.has_batch_axis:
            return (1, 1)
        (e_lo, e_hi), (r_lo, r_hi) = self.energy_fit.batch_domain, self.runtime_fit.batch_domain
        return (max(e_lo, r_lo), min(e_hi, r_hi))


MemoryRules = Callable[[CatalogEntry, str], tuple[BatchMemoryRule | None, str]]


def catalog_memory_rule(entry: CatalogEntry, device: str) -> tuple[BatchMemoryRule | None, str]:
    """:func:`engine.planning.batches.batch_memory_rule` for a catalog entry (its local files, if any)."""
    if entry.backend == "external" or not entry.path or entry.path.startswith(HUB_PREFIX):
        return None, "no model files here"
    return batch_memory_rule(entry.backend, resolve_model_path(entry.path), device)


def offered_batch_sizes(domain: tuple[int, int], requested: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """The batch sizes offered for a surface measured over ``domain`` = (lo, hi), and those
    refused (outside it). Default (``requested`` None): every power of two in the range,
    plus 1. A requested 1 is always offered (one request at a time; flagged outside the
    measured range when lo > 1)."""
    lo, hi = domain
    if requested is None:
        return sorted({1} | {b for b in DEFAULT_BATCH_POWERS if lo <= b <= hi}), []
    wanted = sorted(set(int(b) for b in requested))
    return [b for b in wanted if b == 1 or lo <= b <= hi], [b for b in wanted if not (b == 1 or lo <= b <= hi)]


def options_from_fits(fits: list[FitResult], catalog: dict[str, CatalogEntry], energy_scope: str = "total",
                      batch_sizes: Sequence[int] | None = None, *, memory_rules: MemoryRules | None = None,
                      ) -> tuple[list[PlanOption], list[str]]:
    """One option per (model, device, batch size) with an energy and a runtime fit in
    ``energy_scope`` and a catalog accuracy. Measured fits win over published ones; later fits
    over earlier ones. Each option gets the context its model runs with
    (:func:`engine.catalog.runtime_context_length`).

    Batch sizes: ``batch_sizes`` (default: every power of two within the fits' measured batch
    range, plus 1), limited to that range; a (model, device) whose fits have no batch axis
    (measured at batch size 1 only, as every published profile) is offered at batch size 1
    only. Options above batch size 1 get the memory rule of ``memory_rules`` (default
    :func:`catalog_memory_rule`) where it can be known here.

    Returns the options (sorted by device, then model, then batch size) and sentences about
    what was left out or limited, and why.
    """
    memory_rules = memory_rules or catalog_memory_rule
    chosen = _preferred_fits(fits, energy_scope)
    contexts: dict[str, int | None] = {}
    options, notes = [], []
    single_measured, single_published, limits, checked, unchecked = [], [], [], [], {}
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
        base = PlanOption(model=model, device=device, accuracy=float(entry.accuracy), energy_fit=slot["energy"],
                          runtime_fit=slot["runtime"], context_tokens=contexts[model], backend=entry.backend)
        if not base.has_batch_axis:
            (single_published if base.published else single_measured).append(f"{model} on {device}")
            options.append(base)
            continue
        sizes, refused = offered_batch_sizes(base.batch_domain, batch_sizes)
        lo, hi = base.batch_domain
        if refused:
            limits.append(f"{', '.join(map(str, refused))} for {model} on {device} (profiled at {lo} to {hi})")
        if not sizes:
            notes.append(f"{model} on {device} is offered at none of the batch sizes asked for (profiled at {lo} to "
                         f"{hi}), so plans leave it out")
            continue
        rule, why_not = memory_rules(entry, device) if max(sizes) > 1 else (None, "")
        if max(sizes) > 1:
            if rule is not None:
                checked.append(f"{model} on {device} ({rule.describe()})")
            else:
                unchecked.setdefault(why_not, []).append(f"{model} on {device}")
        options += [replace(base, batch_size=size, memory=rule if size > 1 else None) for size in sizes]
    notes += _batch_notes(single_measured, single_published, limits, checked, unchecked)
    return options, notes


def _preferred_fits(fits: list[FitResult], energy_scope: str) -> dict[tuple[str, str], dict[str, FitResult]]:
    """Per (model, device), the fit of each target in ``energy_scope`` to plan with: a measured
    fit over a published one, then the latest."""
    chosen: dict[tuple[str, str], dict[str, FitResult]] = {}
    for fit in fits:
        if fit.energy_scope != energy_scope:
            continue
        slot = chosen.setdefault((fit.model, fit.device), {})
        current = slot.get(fit.target)
        rank = (fit.source == "measured", fit.fit_id or 0)
        if current is None or rank >= (current.source == "measured", current.fit_id or 0):
            slot[fit.target] = fit
    return chosen


def _batch_notes(single_measured: list[str], single_published: list[str], limits: list[str], checked: list[str],
                 unchecked: dict[str, list[str]]) -> list[str]:
    """What the plan's batch sizes are limited by, in a few sentences."""
    notes = []
    if single_measured:
        one = len(single_measured) == 1
        notes.append(f"{_names(single_measured)} {'was' if one else 'were'} profiled at batch size 1 only: profile with "
                     "several batch sizes (the Profile page's default, or --batch-sizes 1,2,4,8) to plan batches "
                     "(planned one request at a time)")
    if single_published:
        notes.append(f"The published profiles ({_names(single_published)}) are of single requests: planned at batch "
                     "size 1")
    if limits:
        notes.append(f"Batch sizes outside the range profiled are not offered: {'; '.join(limits)}")
    if checked:
        notes.append(f"Batches are kept within the free memory of their device: {'; '.join(checked)}")
    for why, names in unchecked.items():
        notes.append(f"The memory a batch needs is not checked for {_names(names)} ({why}): its batch sizes are "
                     "limited by the range profiled only")
    return notes


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_options(store: Store, energy_scope: str = "total", batch_sizes: Sequence[int] | None = None,
                 ) -> tuple[list[PlanOption], list[str]]:
    """The options available in the database (see :func:`options_from_fits`)."""
    catalog = {row["name"]: CatalogEntry(**{k: row[k] for k in CatalogEntry.__dataclass_fields__})
               for row in list_models(store).to_dict("records")}
    return options_from_fits(load_latest_fits(store, energy_scope=energy_scope), catalog, energy_scope, batch_sizes)


def with_load_costs(options: list[PlanOption], load_costs: dict[str, tuple[float, float]]) -> list[PlanOption]:
    """Options with one-off load costs: ``{"model@device" or "model": (load_s, load_energy_j)}``
    (a model is loaded once on a device, whatever batch sizes it runs at there)."""
    problems = []
    out = []
    known = {o.pair for o in options} | {o.model for o in options}
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
        cost = load_costs.get(option.pair, load_costs.get(option.model))
        out.append(option if cost is None else replace(option, load_s=float(cost[0]), load_energy_j=float(cost[1])))
    return out


@dataclass
class Predictions:
    """Per (query, option) predictions, all (N, K) unless said otherwise.

    energy_j, runtime_s: the fitted values per request, clamped at 0 (``clamped`` marks where
    the raw value was negative, which only the paper's published form can give); for an
    option at batch size B, the request's share of a batch of B requests of its shape
    (the batch's prediction / B). in_domain: both token counts and the batch size inside the
    range each fit was measured over. input_tokens: τin of the query for the option's model.
    output_tokens: (N,) the planning τout. fits_memory: where a batch of the option's size of
    the query's shape fits in its device's free memory (None: everywhere, as far as is known).
    """

    options: list[PlanOption]
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    energy_j: np.ndarray
    runtime_s: np.ndarray
    in_domain: np.ndarray
    clamped: np.ndarray
    warnings: list[str] = field(default_factory=list)
    fits_memory: np.ndarray | None = None

    @property
    def accuracy(self) -> np.ndarray:
        """(K,) accuracy score of each option's model."""
        return np.array([o.accuracy for o in self.options], dtype=float)

    @property
    def batch_sizes(self) -> np.ndarray:
        """(K,) batch size of each option."""
        return np.array([o.batch_size for o in self.options], dtype=np.int64)

    @property
    def batched(self) -> bool:
        """Some option runs batches of more than one request."""
        return any(o.batch_size > 1 for o in self.options)

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

    @property
    def holds(self) -> np.ndarray:
        """(N, K) True where the option can run the query: its context holds it and a batch of
        the option's size of its shape fits in the device's memory (as far as is known)."""
        fits = self.fits_context
        return fits if self.fits_memory is None else fits & self.fits_memory

    def at_batch_size_one(self) -> "Predictions":
        """The same queries on every (model, device) of these options at batch size 1 only:
        what the plan would be without batching."""
        pairs: dict[str, int] = {}  # per (model, device): its batch-size-1 column, else its first
        for column, option in enumerate(self.options):
            if option.batch_size == 1:
                pairs[option.pair] = column
            else:
                pairs.setdefault(option.pair, column)
        columns = list(pairs.values())
        if all(self.options[c].batch_size == 1 for c in columns):
            return Predictions(options=[self.options[c] for c in columns], input_tokens=self.input_tokens[:, columns],
                               output_tokens=self.output_tokens, energy_j=self.energy_j[:, columns],
                               runtime_s=self.runtime_s[:, columns], in_domain=self.in_domain[:, columns],
                               clamped=self.clamped[:, columns], warnings=list(self.warnings))
        ones = [replace(self.options[c], batch_size=1, memory=None) for c in columns]
        tokens = {o.model: self.input_tokens[:, c] for o, c in zip(ones, columns)}
        return predict_options(ones, tokens, self.output_tokens)


def fits_context(options: list[PlanOption], input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """(N, K) True where τin (N, K) + τout (N,) fits in each option's context; an unknown context holds anything."""
    context = np.array([np.inf if o.context_tokens is None else o.context_tokens for o in options], dtype=float)
    return (input_tokens + np.asarray(output_tokens)[:, None]) <= context[None, :]


def predict_options(options: list[PlanOption], input_tokens: dict[str, np.ndarray],
                    output_tokens: np.ndarray) -> Predictions:
    """Predict every query on every option (vectorised per option): per request, or its share
    of a batch of the option's size of its own shape."""
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
    fits_memory = np.ones((n, k), dtype=bool)
    tout = np.asarray(output_tokens, dtype=np.int64)
    for column, option in enumerate(options):
        tin[:, column] = input_tokens[option.model]
        size = None if option.batch_size == 1 else option.batch_size  # batch size 1: one request, as before
        energy_raw[:, column] = option.energy_fit.predict_raw(tin[:, column], tout, size) / option.batch_size
        runtime_raw[:, column] = option.runtime_fit.predict_raw(tin[:, column], tout, size) / option.batch_size
        in_domain[:, column] = (option.energy_fit.in_domain(tin[:, column], tout, size)
                                & option.runtime_fit.in_domain(tin[:, column], tout, size))
        if option.memory is not None:
            fits_memory[:, column] = option.memory.fits(option.batch_size, tin[:, column], tout)
    clamped = (energy_raw < 0) | (runtime_raw < 0)
    warnings = []
    if clamped.any():
        where = sorted({options[c].key for c in np.flatnonzero(clamped.any(axis=0))})
        warnings.append(f"{int(clamped.sum()):,} predictions were negative (the published paper form, for long inputs "
                        f"with short outputs; {', '.join(where)}): those options are not offered for those queries, "
                        "unless a query has no other option")
    warnings.extend(_context_warnings(options, fits_context(options, tin, tout)))
    warnings.extend(_memory_warnings(options, fits_memory))
    outside = ~in_domain
    if outside.any():
        warnings.append(f"{int(outside.any(axis=1).sum()):,} queries lie outside the measured token range of at least "
                        "one option; their predictions are extrapolated")
    return Predictions(options=options, input_tokens=tin, output_tokens=tout, energy_j=np.maximum(energy_raw, 0.0),
                       runtime_s=np.maximum(runtime_raw, 0.0), in_domain=in_domain, clamped=clamped,
                       warnings=warnings, fits_memory=None if fits_memory.all() else fits_memory)


def _memory_warnings(options: list[PlanOption], fits: np.ndarray) -> list[str]:
    """Options whose batch size is too large, in the device's free memory, for some queries."""
    too_big = [f"{o.key} ({int((~fits[:, c]).sum()):,})" for c, o in enumerate(options) if not fits[:, c].all()]
    if not too_big:
        return []
    return [f"A batch of these sizes of some queries' shape would not fit in the device's free memory, so those "
            f"options are not offered for them (queries): {', '.join(too_big)}"]


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
