"""From a workload and targets to the energy-optimal schedule, its proof and its context.

:func:`make_plan` builds the assignment problem from the predictions (every coefficient from
the query's own τin, τout), solves it (:mod:`engine.planning.solver`), checks the answer
from scratch, and adds what a planner needs to trust it: the baselines on the same
predictions, what each constraint costs, and, when there is no schedule, which constraint
is to blame and the best value that can be reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from engine.backends.batch import MAX_BATCH_SIZE, check_batch_size
from engine.errors import InputError, PlannerError, Problem
from engine.formatting import format_duration, format_energy, format_percent, json_safe
from engine.planning.band import EnergyBand, plan_energy_band
from engine.planning.batches import Batches, form_batches
from engine.planning.options import PlanOption, Predictions, predict_options
from engine.planning.solver import AssignmentProblem, CouplingRow, Solution, check_assignment, solve

OBJECTIVES = ("energy", "zeta")
ACCURACY_MODES = ("query", "token")
ACCURACY_STEP = 0.01      # "one accuracy point"
DEADLINE_STEP = 0.10      # "10% more time on a device"


@dataclass
class PlanSettings:
    """What the planner asks for.

    accuracy_target: mean accuracy to reach (a fraction), None for no target.
    accuracy_mode: 'query' (each query counts once) or 'token' (weighted by τin + τout,
        the paper's a_K = A_K·(τin + τout)).
    deadline_s: the same deadline for every device; deadlines_s overrides per device.
    objective: 'energy' (total energy of the fits' scope) or 'zeta' (the paper's
        ζ·normalised energy − (1 − ζ)·normalised token accuracy).
    min_share: model -> minimum fraction of the queries it must serve (the paper's γ).
    count_load: count each used model's load time and energy once per device.
    batch_sizes: the batch sizes a plan may use (each a whole number from 1 to
        :data:`engine.backends.batch.MAX_BATCH_SIZE`); None: every power of two within each
        fit's measured batch range, plus 1 (see :func:`engine.planning.options.options_from_fits`).
    """

    accuracy_target: float | None = None
    accuracy_mode: str = "query"
    deadline_s: float | None = None
    deadlines_s: dict[str, float] = field(default_factory=dict)
    objective: str = "energy"
    zeta: float | None = None
    min_share: dict[str, float] = field(default_factory=dict)
    count_load: bool = False
    energy_scope: str = "total"
    gap_target: float = 1e-3
    time_limit_s: float = 30.0
    seed: int = 0
    batch_sizes: tuple[int, ...] | None = None

    def validate(self) -> None:
        """InputError naming every bad setting (by the setting's name: the CLI maps them to its flags)."""
        problems = []
        if self.accuracy_target is not None and not (_finite(self.accuracy_target) and 0 <= self.accuracy_target <= 1):
            problems.append(Problem("accuracy target", f"{self.accuracy_target!r} is not an accuracy", None,
                                    "a fraction between 0 and 1 (0.55 for 55%)"))
        if self.accuracy_mode not in ACCURACY_MODES:
            problems.append(Problem("accuracy mode", f"{self.accuracy_mode!r} is not a mode", None, "query or token"))
        if self.deadline_s is not None and not (_finite(self.deadline_s) and self.deadline_s > 0):
            problems.append(Problem("deadline", f"{self.deadline_s!r} for every device is not a deadline", None,
                                    "a number of seconds > 0"))
        for device, seconds in self.deadlines_s.items():
            if not (_finite(seconds) and seconds > 0):
                problems.append(Problem("device deadline", f"{seconds!r} for {device} is not a deadline", None,
                                        "a number of seconds > 0"))
        if self.objective not in OBJECTIVES:
            problems.append(Problem("objective", f"{self.objective!r} is not an objective", None, "energy or zeta"))
        if self.objective == "zeta" and not (self.zeta is not None and _finite(self.zeta) and 0 <= self.zeta <= 1):
            problems.append(Problem("zeta", f"{self.zeta!r} is not a weight", None, "a number between 0 and 1"))
        for model, share in self.min_share.items():
            if not (_finite(share) and 0 <= share <= 1):
                problems.append(Problem("minimum share", f"{share!r} for {model} is not a share", None,
                                        "a fraction between 0 and 1"))
        if sum(self.min_share.values()) > 1 + 1e-12:
            problems.append(Problem("minimum share", "the minimum shares add up to more than 1", None,
                                    "shares whose sum is at most 1"))
        if not (_finite(self.gap_target) and 0 < self.gap_target < 1):
            problems.append(Problem("gap target", f"{self.gap_target!r}", None, "a fraction between 0 and 1"))
        if not (_finite(self.time_limit_s) and self.time_limit_s > 0):
            problems.append(Problem("time limit", f"{self.time_limit_s!r}", None, "seconds > 0"))
        problems.extend(batch_size_problems(self.batch_sizes))
        if problems:
            raise InputError(problems)

    def device_deadline(self, device: str) -> float | None:
        return self.deadlines_s.get(device, self.deadline_s)


def batch_size_problems(batch_sizes, where: str = "batch sizes") -> list[Problem]:
    """One problem per bad batch size (not a whole number from 1 to the backends' maximum), or
    for an empty list; none for None (the default sizes)."""
    if batch_sizes is None:
        return []
    if isinstance(batch_sizes, (str, bytes)) or len(batch_sizes) == 0:
        return [Problem(where, f"{batch_sizes!r} is not a list of batch sizes", None,
                        f"one or more whole numbers from 1 to {MAX_BATCH_SIZE}, e.g. 1,4,16")]
    problems = []
    for size in batch_sizes:
        try:
            check_batch_size(size, MAX_BATCH_SIZE, where)
        except InputError as exc:
            problems.extend(exc.problems)
    return problems


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -- the problem ---------------------------------------------------------------------------

def accuracy_weights(predictions: Predictions, mode: str) -> np.ndarray:
    """(N, K) weight of each query in the mean accuracy: 1, or τin + τout (per model's τin)."""
    if mode == "token":
        return (predictions.input_tokens + predictions.output_tokens[:, None]).astype(float)
    return np.ones(predictions.energy_j.shape)


def allowed_options(predictions: Predictions, min_accuracy: np.ndarray | None) -> np.ndarray:
    """(N, K) True where the option may serve the query: the query's τin + τout fits in the
    option's context (and a batch of the option's size of it in the device's memory, where
    that is known), its model meets the query's own minimum accuracy, and its prediction
    was not clamped (see :func:`_not_clamped`)."""
    fits = predictions.holds
    if min_accuracy is None:
        return fits & _not_clamped(predictions, fits)
    floor = np.nan_to_num(np.asarray(min_accuracy, dtype=float), nan=-np.inf)
    return fits & (predictions.accuracy[None, :] >= floor[:, None] - 1e-12) & _not_clamped(predictions, fits)


def _not_clamped(predictions: Predictions, fits: np.ndarray) -> np.ndarray:
    """A prediction clamped from a negative value says nothing about the cost (the paper's form
    outside its sense): such an option is not offered for the query, unless every option that
    can hold the query is clamped (then they stay, flagged). A context too short is never waived."""
    clamped = predictions.clamped
    return ~clamped | (clamped | ~fits).all(axis=1, keepdims=True)


def objective_costs(predictions: Predictions, settings: PlanSettings) -> np.ndarray:
    """(N, K) cost per query and option: energy (J), or the paper's ζ-weighted cost."""
    if settings.objective == "energy":
        return predictions.energy_j
    credit = predictions.accuracy[None, :] * (predictions.input_tokens + predictions.output_tokens[:, None])
    energy_max = float(predictions.energy_j.max()) or 1.0
    credit_max = float(credit.max()) or 1.0
    return settings.zeta * predictions.energy_j / energy_max - (1 - settings.zeta) * credit / credit_max


def build_problem(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> AssignmentProblem:
    """The assignment problem for these predictions and settings."""
    n, k = predictions.energy_j.shape
    rows = []
    if settings.accuracy_target is not None:
        weights = accuracy_weights(predictions, settings.accuracy_mode)
        rows.append(CouplingRow(name="accuracy", kind="accuracy", sense=">=", rhs=0.0,
                                coef=(predictions.accuracy[None, :] - settings.accuracy_target) * weights))
    device_of = np.array([o.device for o in predictions.options])
    load_s = np.array([o.load_s for o in predictions.options])
    for device in predictions.devices:
        limit = settings.device_deadline(device)
        if limit is None:
            continue
        on_device = device_of == device
        rows.append(CouplingRow(name=f"deadline {device}", kind="deadline", sense="<=", rhs=float(limit),
                                coef=np.where(on_device[None, :], predictions.runtime_s, 0.0),
                                open_coef=np.where(on_device, load_s, 0.0) if settings.count_load else None))
    model_of = np.array([o.model for o in predictions.options])
    for model, share in settings.min_share.items():
        if share > 0:
            rows.append(CouplingRow(name=f"share {model}", kind="share", sense=">=", rhs=math.ceil(share * n - 1e-9),
                                    coef=np.broadcast_to((model_of == model)[None, :], (n, k)).astype(float)))
    open_cost = open_group = None
    if settings.count_load:
        open_cost = np.array([o.load_energy_j for o in predictions.options])
        if settings.objective == "zeta":  # the same normalisation as the per-query energy
            open_cost = settings.zeta * open_cost / (float(predictions.energy_j.max()) or 1.0)
        pairs = list(dict.fromkeys(o.pair for o in predictions.options))
        open_group = np.array([pairs.index(o.pair) for o in predictions.options])  # loaded once, any batch size
    return AssignmentProblem(cost=objective_costs(predictions, settings), allowed=allowed, rows=rows,
                             open_cost=open_cost, open_group=open_group)


# -- evaluating any assignment ---------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What an assignment costs, recomputed from the predictions alone, once its batches are
    formed (:mod:`engine.planning.batches`; at batch size 1 every query is its own batch).

    energy_j, per_device_runtime_s, makespan_s: of the batches as formed and predicted from
    their real members (load energy and time included when counted); deadlines are judged on
    these times. assignment_energy_j, assignment_runtime_s: the same from the per-request
    shares the assignment problem costs (equal to the former when every batch holds one query).
    batches: the batches.
    """

    energy_j: float
    accuracy: float
    per_device_runtime_s: dict[str, float]
    makespan_s: float
    meets_accuracy: bool
    meets_deadlines: bool
    meets_min_accuracy: bool
    assignment_energy_j: float = math.nan
    assignment_runtime_s: dict[str, float] = field(default_factory=dict)
    batches: Batches | None = field(default=None, repr=False, compare=False)

    @property
    def feasible(self) -> bool:
        return self.meets_accuracy and self.meets_deadlines and self.meets_min_accuracy

    def late_devices(self, settings: PlanSettings) -> dict[str, float]:
        """Devices whose batches run past their deadline: device -> seconds needed."""
        return {d: s for d, s in self.per_device_runtime_s.items() if not _within(s, settings.device_deadline(d))}


def _within(seconds: float, limit: float | None) -> bool:
    """A device's time meets its deadline, with the solver's own tolerance (check_assignment: 1e-7 relative)."""
    return limit is None or seconds <= limit + 1e-7 * max(1.0, limit)


def evaluate(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray, choice: np.ndarray,
             batches: Batches | None = None) -> Outcome:
    """Energy (with load energy if counted), accuracy, per-device time and which targets it
    meets, after forming the batches of ``choice`` (formed here unless given)."""
    n = len(choice)
    rows = np.arange(n)
    options = predictions.options
    batches = form_batches(predictions, choice) if batches is None else batches
    load_energy = 0.0
    load_s = {device: 0.0 for device in predictions.devices}
    if settings.count_load:  # once per model and device, whatever batch sizes it runs at
        loaded = {options[column].pair: options[column] for column in np.unique(choice)}
        for option in loaded.values():
            load_energy += option.load_energy_j
            load_s[option.device] += option.load_s
    weights = accuracy_weights(predictions, settings.accuracy_mode)[rows, choice]
    accuracy = float((predictions.accuracy[choice] * weights).sum() / weights.sum())
    device_of = np.array([predictions.devices.index(o.device) for o in options])
    devices = len(predictions.devices)
    formed = np.bincount(device_of[batches.option], weights=batches.runtime_s, minlength=devices)
    shares = np.bincount(device_of[choice], weights=predictions.runtime_s[rows, choice], minlength=devices)
    per_device = {d: float(formed[i] + load_s[d]) for i, d in enumerate(predictions.devices)}
    meets_deadlines = all(_within(seconds, settings.device_deadline(d)) for d, seconds in per_device.items())
    meets_accuracy = settings.accuracy_target is None or accuracy >= settings.accuracy_target - 1e-7
    return Outcome(energy_j=float(batches.energy_j.sum()) + load_energy, accuracy=accuracy,
                   per_device_runtime_s=per_device, makespan_s=max(per_device.values()),
                   meets_accuracy=meets_accuracy, meets_deadlines=meets_deadlines,
                   meets_min_accuracy=bool(allowed[rows, choice].all()),
                   assignment_energy_j=float(predictions.energy_j[rows, choice].sum()) + load_energy,
                   assignment_runtime_s={d: float(shares[i] + load_s[d]) for i, d in enumerate(predictions.devices)},
                   batches=batches)


# -- baselines -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Baseline:
    """An obvious alternative schedule, costed on the plan's own predictions.

    energy_j: its energy (J of the plan's energy scope, load energy included when counted).
    accuracy: its mean accuracy (a fraction, weighted as the plan's accuracy mode).
    makespan_s: the busiest device's time (s). per_device_runtime_s: each device's time (s).
    feasible: it meets the accuracy target, every deadline, and sends every query to an option
    it may use (its minimum accuracy met, its tokens within the context).
    note: how it was built, in words.

    Plans stored before this type existed hold only energy_j, accuracy, makespan_s and
    feasible: :meth:`from_dict` reads them with the rest empty.
    """

    energy_j: float
    accuracy: float
    makespan_s: float
    feasible: bool
    per_device_runtime_s: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        """The ``plan --json`` shape of DESIGN.md: energy_j, accuracy, makespan_s (and feasible)."""
        return json_safe({"energy_j": self.energy_j, "accuracy": self.accuracy, "makespan_s": self.makespan_s,
                          "feasible": self.feasible})

    def to_dict(self) -> dict:
        """Every field, strict-JSON-safe (what a stored plan keeps)."""
        return json_safe(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Baseline":
        return cls(energy_j=_float(data.get("energy_j")), accuracy=_float(data.get("accuracy")),
                   makespan_s=_float(data.get("makespan_s")), feasible=bool(data.get("feasible", False)),
                   per_device_runtime_s={str(k): _float(v) for k, v in (data.get("per_device_runtime_s") or {}).items()},
                   note=str(data.get("note") or ""))


def _float(value) -> float:
    """A stored number back as a float (NaN where JSON held null)."""
    return math.nan if value is None else float(value)


#: The baseline of a plan whose options batch: the best single option at its best batch size.
BEST_SINGLE_BATCHED = "batch everything on one model"
#: The baseline of a plan whose options batch: the same plan with every option at batch size 1.
SAME_PLAN_AT_BATCH_ONE = "same plan at batch 1"


def baselines(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> dict[str, Baseline]:
    """The obvious alternatives on the same predictions, each costed after forming its batches
    as the plan's are: every single option (each model on each device at each batch size
    offered), round-robin and random (seeded) over the options each query may use at batch
    size 1 (the paper's baselines, one request at a time), and greedy cheapest-first (each
    query, in order, to its cheapest allowed option whose device still has time before its
    deadline). When some option batches, also :data:`BEST_SINGLE_BATCHED`: the single option
    at its best batch size that meets the targets, the best a person could do by hand."""
    n, k = predictions.energy_j.shape

    def costed(choice: np.ndarray, note: str) -> Baseline:
        outcome = evaluate(predictions, settings, allowed, choice)
        return Baseline(energy_j=outcome.energy_j, accuracy=outcome.accuracy, makespan_s=outcome.makespan_s,
                        feasible=outcome.feasible, per_device_runtime_s=outcome.per_device_runtime_s, note=note)

    results = {f"only {option.key}": costed(np.full(n, column), "every query on one option" + (
        f", in batches of {option.batch_size}" if option.batch_size > 1 else ""))
        for column, option in enumerate(predictions.options)}
    if predictions.batched:
        results[BEST_SINGLE_BATCHED] = _best_single(results, predictions)
    # Round-robin and random draw among each query's allowed options at batch size 1 (else its
    # allowed options, else all of them).
    single = predictions.batch_sizes == 1
    pools = [np.flatnonzero(row & single) if (row & single).any() else
             np.flatnonzero(row) if row.any() else np.arange(k) for row in allowed]
    each = " at batch size 1" if predictions.batched else ""
    results["round-robin"] = costed(np.array([pool[i % len(pool)] for i, pool in enumerate(pools)]),
                                    f"queries in turn over the options each may use{each}")
    rng = np.random.default_rng(settings.seed)
    results["random"] = costed(np.array([pool[rng.integers(len(pool))] for pool in pools]),
                               f"uniformly at random over the options each may use{each} (seed {settings.seed})")
    results["greedy cheapest-first"] = costed(
        _greedy_cheapest_first(predictions, settings, allowed),
        "each query to its cheapest allowed option whose device still has time; accuracy target not considered")
    return results


def _best_single(results: dict[str, Baseline], predictions: Predictions) -> Baseline:
    """The cheapest single-option baseline that meets the targets (the cheapest of all when none does)."""
    singles = {f"only {o.key}": o for o in predictions.options}
    meeting = [name for name in singles if results[name].feasible and math.isfinite(results[name].energy_j)]
    pool = meeting or [name for name in singles if math.isfinite(results[name].energy_j)] or list(singles)
    name = min(pool, key=lambda key: results[key].energy_j if math.isfinite(results[key].energy_j) else math.inf)
    option = singles[name]
    how = "in batches of {}".format(option.batch_size) if option.batch_size > 1 else "one request at a time"
    note = (f"{option.key}: every query on {option.model} on {option.device}, {how}: the best single option at its "
            "best batch size" + ("" if meeting else " (none meets the targets: the cheapest is shown)"))
    return replace(results[name], note=note)


def _greedy_cheapest_first(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> np.ndarray:
    """Each query, in order, to its cheapest allowed option whose device still has time."""
    n = len(predictions.output_tokens)
    remaining = {d: settings.device_deadline(d) if settings.device_deadline(d) is not None else math.inf
                 for d in predictions.devices}
    device_of = [o.device for o in predictions.options]
    order = np.argsort(np.where(allowed, predictions.energy_j, np.inf), axis=1)
    choice = np.empty(n, dtype=np.int64)
    for i in range(n):
        candidates = [c for c in order[i] if allowed[i, c]] or list(order[i])
        fitting = [c for c in candidates if predictions.runtime_s[i, c] <= remaining[device_of[c]]]
        pick = (fitting or candidates)[0]
        choice[i] = pick
        remaining[device_of[pick]] -= predictions.runtime_s[i, pick]
    return choice


# -- the plan --------------------------------------------------------------------------------

@dataclass
class PlanResult:
    """A solved plan (see :func:`make_plan`). ``schedule`` has the schedule CSV columns of
    DESIGN.md (batch_id and batch_size included) plus in_domain and clamped. Energies are in
    J of ``energy_scope``.

    What the figures refer to. The assignment problem costs each query at its per-request
    share on its option (for batch size B, a batch of B of its shape / B); ``lower_bound_j``
    and ``gap`` are proven for that problem: gap = (assignment_energy_j − lower_bound_j) /
    assignment_energy_j (of the ζ objective with ``objective="zeta"``). The batches are then
    formed from the real members (:mod:`engine.planning.batches`): ``energy_j``,
    ``per_device_runtime_s`` and the schedule are those of the batches as formed, and
    ``formation_overhead_j`` = energy_j − assignment_energy_j is what forming them cost
    beyond the shares. With every option at batch size 1 the two are the same and
    gap = (energy_j − lower_bound_j) / energy_j, as before batching.
    When forming the batches broke a deadline, the assignment problem solved holds the shares
    on that device to a shorter deadline (``assignment_deadlines_s``; the batches meet the
    deadline asked for): ``lower_bound_j`` and ``gap`` are that problem's, and
    ``gap_as_asked`` is the assignment's gap against the bound of the problem with the
    deadlines as asked (what holding the shares tighter cost; equal to ``gap`` otherwise).
    ``batches``: batches per option key; ``batch_sizes``: the sizes offered per
    ``model@device``; ``batching_saving``: the share of the energy of the same plan at batch
    size 1 that batching saves (None when no option batches or there is no such plan).
    ``energy_band``: the range the measured total is expected in (:mod:`engine.planning.band`;
    None without a schedule or where a fit has no held-out error); ``energy_band_j`` in JSON.
    """

    settings: PlanSettings
    status: str
    n_queries: int
    solve_s: float
    plan_s: float
    energy_scope: str
    energy_estimated: bool
    energy_j: float | None = None
    lower_bound_j: float | None = None
    gap: float | None = None
    objective_value: float | None = None
    objective_lower_bound: float | None = None
    accuracy: float | None = None
    per_device_runtime_s: dict[str, float] = field(default_factory=dict)
    assignments: dict[str, int] = field(default_factory=dict)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    schedule: pd.DataFrame | None = None
    diagnosis: list[str] = field(default_factory=list)
    best_achievable: dict[str, float] = field(default_factory=dict)
    constraint_costs: list[ConstraintCost] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    solver: dict = field(default_factory=dict)
    plan_id: int | None = None
    workload_id: int | None = None
    assignment_energy_j: float | None = None
    formation_overhead_j: float | None = None
    batches: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, list[int]] = field(default_factory=dict)
    batching_saving: float | None = None
    assignment_deadlines_s: dict[str, float] = field(default_factory=dict)
    gap_as_asked: float | None = None
    energy_band: EnergyBand | None = None
    # What it was solved from, for curves and re-solves (not stored).
    predictions: Predictions | None = field(default=None, repr=False)
    allowed: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_schedule(self) -> bool:
        return self.status in ("optimal", "feasible")

    @property
    def n_batches(self) -> int:
        return int(sum(self.batches.values()))

    def to_json(self) -> dict:
        """The ``plan --json`` document of DESIGN.md, plus documented extra keys (see the class
        docstring for what energy_j and gap refer to)."""
        document = {
            "status": self.status, "energy_j": self.energy_j, "lower_bound_j": self.lower_bound_j, "gap": self.gap,
            "solve_s": self.solve_s, "accuracy": self.accuracy, "per_device_runtime_s": self.per_device_runtime_s,
            "n_queries": self.n_queries, "assignments": self.assignments,
            "baselines": {name: baseline.to_json() for name, baseline in self.baselines.items()},
            "assignment_energy_j": self.assignment_energy_j, "formation_overhead_j": self.formation_overhead_j,
            "n_batches": self.n_batches, "batches": self.batches, "batch_sizes": self.batch_sizes,
            "batching_saving": self.batching_saving, "assignment_deadlines_s": self.assignment_deadlines_s,
            "gap_as_asked": self.gap_as_asked,
            "energy_band_j": None if self.energy_band is None else [self.energy_band.low_j, self.energy_band.high_j],
            "energy_band": None if self.energy_band is None else self.energy_band.to_json(),
            "plan_s": self.plan_s, "energy_scope": self.energy_scope, "energy_estimated": self.energy_estimated,
            "objective": self.settings.objective, "objective_value": self.objective_value,
            "objective_lower_bound": self.objective_lower_bound, "diagnosis": self.diagnosis,
            "best_achievable": self.best_achievable,
            "constraint_costs": [cost.to_dict() for cost in self.constraint_costs],
            "warnings": self.warnings, "plan_id": self.plan_id, "settings": asdict(self.settings),
        }
        return json_safe(document)


def make_plan(predictions: Predictions, settings: PlanSettings, *, query_ids: np.ndarray | None = None,
              min_accuracy: np.ndarray | None = None, explain: bool = True, compare: bool = True,
              started: float | None = None, warnings: list[str] | None = None) -> PlanResult:
    """Solve the plan for ``predictions`` under ``settings``.

    The assignment problem is solved with its proof, the batches formed (and repaired when
    forming them breaks a deadline: :func:`solve_and_form`). ``explain`` adds what each
    constraint costs (a re-solve per binding constraint); ``compare`` adds the baselines (and,
    when some option batches, the same plan at batch size 1). ``started`` (perf_counter) is
    when the workload was parsed, so ``plan_s`` covers tokenizing, predicting and solving.
    """
    settings.validate()
    started = time.perf_counter() if started is None else started
    n = len(predictions.output_tokens)
    if n == 0:
        raise InputError(Problem("workload", "has no queries", None, "at least one query"))
    unknown = sorted(set(settings.min_share) - {o.model for o in predictions.options})
    unknown_devices = sorted(set(settings.deadlines_s) - set(predictions.devices))
    if unknown or unknown_devices:
        raise InputError([Problem("minimum share", f"{m!r} is not a model with fitted options", None,
                                  ", ".join(sorted({o.model for o in predictions.options}))) for m in unknown]
                         + [Problem("device deadline", f"{d!r} is not a device of the options", None,
                                    ", ".join(predictions.devices)) for d in unknown_devices])
    query_ids = np.asarray(query_ids if query_ids is not None else [str(i + 1) for i in range(n)], dtype=object)
    allowed = allowed_options(predictions, min_accuracy)
    formed = solve_and_form(predictions, settings, allowed)
    solution = formed.solution
    result = PlanResult(settings=settings, status=solution.status, n_queries=n, solve_s=formed.solve_s,
                        plan_s=0.0, energy_scope=settings.energy_scope,
                        energy_estimated=predictions.energy_estimated,
                        warnings=list(warnings or []) + list(predictions.warnings) + formed.repairs,
                        options=[o.key for o in predictions.options],
                        batch_sizes={pair: sorted(o.batch_size for o in predictions.options if o.pair == pair)
                                     for pair in dict.fromkeys(o.pair for o in predictions.options)},
                        solver={"method": solution.method, "groups": solution.n_groups,
                                "free_groups": solution.n_free_groups, "dual_iterations": solution.dual_iterations,
                                "cbc_status": solution.mip_status, "prices": solution.prices,
                                "formation_repairs": formed.repairs, "solves": formed.solves},
                        predictions=predictions, allowed=allowed)
    if formed.late:
        _explain_late_batches(result, settings, formed)
    elif solution.status in ("optimal", "feasible"):
        _fill_schedule(result, predictions, settings, allowed, formed, query_ids)
        result.energy_band = plan_energy_band(result.schedule, predictions.options, result.energy_j)
    else:
        _diagnose(result, predictions, settings, allowed, solution, query_ids)
    if compare:
        result.baselines = baselines(predictions, settings, allowed)
        if predictions.batched:
            _compare_with_batch_one(result, predictions, settings, min_accuracy)
    if explain and result.has_schedule:
        result.constraint_costs = constraint_costs(predictions, settings, allowed, result)
    result.plan_s = time.perf_counter() - started
    return result


# -- batches after the assignment ---------------------------------------------------------------

#: Re-solves when batches run past a deadline, before the late devices are planned at batch size 1.
MAX_DEADLINE_TIGHTENINGS = 5
#: Of those, re-solves that loosen the shares' deadline again, when the batches fit with more than
#: LOOSEN_SLACK of a deadline left (each costs a solve: the gain is the energy of that slack).
MAX_LOOSENINGS = 1
LOOSEN_SLACK = 0.02


@dataclass(frozen=True)
class FormedPlan:
    """An assignment and its batches, after any repair (see :func:`solve_and_form`).

    solution: the assignment used, with the proven bound and gap of the assignment problem it
    solved. That problem is the one asked for, unless forming the batches broke a deadline:
    then it is the one asked for with the per-request shares held to a tighter deadline on
    those devices (``assignment_deadlines_s``), or those devices at batch size 1 (said in
    ``repairs``). requested_lower_bound: the proven bound of the problem as asked (the first
    solve), lower than or equal to the solved one's. outcome: the assignment's batches and what
    they cost (None without a schedule). late: devices whose batches still run past their
    deadline after every repair (device -> seconds needed; then there is no schedule).
    solve_s, solves: solver time and the number of solves, repairs included.
    """

    solution: Solution
    outcome: Outcome | None
    requested_lower_bound: float
    repairs: list[str]
    late: dict[str, float]
    solve_s: float
    solves: int
    assignment_deadlines_s: dict[str, float] = field(default_factory=dict)


def solve_and_form(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> FormedPlan:
    """Solve the assignment problem, form its batches, and repair a deadline they break.

    The assignment counts per-request shares; a formed batch runs as long as its longest
    members, so a device's batches can take longer than its shares. When they run past a
    deadline, the shares on that device are held to a shorter deadline (:func:`_shares_for`;
    halfway back when that left no schedule) and the assignment is solved again, warm-started;
    once the batches fit with more than :data:`LOOSEN_SLACK` of the deadline to spare, the
    shares' deadline is loosened halfway back towards the tightest one whose batches ran late
    (at most :data:`MAX_LOOSENINGS` times), keeping the cheapest schedule whose batches fit (at
    most :data:`MAX_DEADLINE_TIGHTENINGS` solves in all). If no batched schedule fits, the late devices are planned at batch size 1 (where the
    batches are the shares). The schedule's deadlines are always checked on the batches, as
    asked.
    """
    def attempt(deadlines: dict[str, float], options_allowed: np.ndarray) -> Solution:
        nonlocal solve_s, solves
        same_options = options_allowed is allowed  # then only right-hand sides changed: the dual's cuts hold
        found = solve(build_problem(predictions, replace(settings, deadline_s=None, deadlines_s=deadlines),
                                    options_allowed),
                      gap_target=settings.gap_target, time_limit_s=settings.time_limit_s,
                      grouping=solution.grouping, warm_start=solution.warm_start if same_options else None)
        solve_s += found.solve_s
        solves += 1
        return found

    solution = solve(build_problem(predictions, settings, allowed), gap_target=settings.gap_target,
                     time_limit_s=settings.time_limit_s)
    requested_lower = solution.lower_bound
    solve_s, solves, repairs = solution.solve_s, 1, []
    if solution.status not in ("optimal", "feasible"):
        return FormedPlan(solution, None, requested_lower, [], {}, solve_s, solves)
    outcome = evaluate(predictions, settings, allowed, solution.choice)
    late = outcome.late_devices(settings)
    asked = {d: settings.device_deadline(d) for d in predictions.devices if settings.device_deadline(d) is not None}
    current = dict(asked)  # the shares' deadlines of the assignment at hand
    best: tuple[Solution, Outcome, dict[str, float]] | None = None if late else (solution, outcome, current)
    seen: dict[str, list[tuple[float, float]]] = {}  # per device: (seconds of shares, seconds of batches) when late
    too_late = dict(asked)  # per device: the loosest deadline for the shares whose batches ran late
    too_tight: dict[str, float] = {}  # per device: a deadline for the shares that left no schedule
    loosened = 0
    for _ in range(MAX_DEADLINE_TIGHTENINGS if late else 0):
        if late:
            deadlines = _tighter_deadlines(current, late, outcome, settings, seen, too_tight, repairs)
        else:
            deadlines = None if loosened >= MAX_LOOSENINGS else _looser_deadlines(current, outcome, asked, seen,
                                                                                  too_late)
            if deadlines is None:
                break
            loosened += 1
        candidate = attempt(deadlines, allowed)
        if candidate.status not in ("optimal", "feasible"):
            for device, seconds in deadlines.items():
                if seconds < current[device]:
                    too_tight[device] = max(too_tight.get(device, 0.0), seconds)
            repairs.append("That left no schedule: the next try holds the shares less tight")
            continue
        found = evaluate(predictions, settings, allowed, candidate.choice)
        found_late = found.late_devices(settings)
        if found_late and best is not None:  # loosened too far: keep the schedule that fits
            too_late.update({d: deadlines[d] for d in found_late})
            continue
        solution, outcome, late, current = candidate, found, found_late, deadlines
        if late:
            too_late.update({d: min(too_late[d], deadlines[d]) for d in late})
        elif best is None or candidate.objective < best[0].objective:
            best = (candidate, found, deadlines)
    if best is not None:
        solution, outcome, current = best
        late = {}
    else:  # the late devices at batch size 1, where the batches are the shares
        batched_here = np.array([o.device in late and o.batch_size > 1 for o in predictions.options])
        deadlines = {**current, **{device: asked[device] for device in late}}
        candidate = attempt(deadlines, allowed & ~batched_here[None, :])
        repairs.append(f"Batches on {', '.join(late)} still ran past the deadline: planned at batch size 1 there"
                       + ("" if candidate.status in ("optimal", "feasible") else ", which left no schedule either"))
        if candidate.status in ("optimal", "feasible"):
            solution, current = candidate, deadlines
            outcome = evaluate(predictions, settings, allowed, solution.choice)
            late = outcome.late_devices(settings)
    held = {d: seconds for d, seconds in current.items() if seconds != asked[d]}
    return FormedPlan(solution, outcome, min(requested_lower, solution.lower_bound), repairs, late, solve_s, solves,
                      assignment_deadlines_s=held)


def _tighter_deadlines(current: dict[str, float], late: dict[str, float], outcome: Outcome, settings: PlanSettings,
                       seen: dict[str, list[tuple[float, float]]], too_tight: dict[str, float],
                       repairs: list[str]) -> dict[str, float]:
    """The shares' deadlines held tighter on each device whose batches ran late (``late``: the
    seconds they needed), never as tight as one that left no schedule; each late run is noted
    in ``seen``, and said in ``repairs``."""
    deadlines = dict(current)
    for device, needed in late.items():
        shares = outcome.assignment_runtime_s[device]
        seen.setdefault(device, []).append((shares, needed))
        target = _shares_for(seen[device], settings.device_deadline(device))
        if device in too_tight and target <= too_tight[device]:
            target = (too_tight[device] + shares) / 2
        deadlines[device] = min(deadlines[device], target)
        repairs.append(f"Batches on {device} needed {format_duration(needed)} against its deadline of "
                       f"{format_duration(settings.device_deadline(device))}; the assignment was solved again with "
                       f"{format_duration(deadlines[device])} of per-request shares there")
    return deadlines


def _looser_deadlines(current: dict[str, float], outcome: Outcome, asked: dict[str, float],
                      seen: dict[str, list[tuple[float, float]]], too_late: dict[str, float]) -> dict[str, float] | None:
    """The batches fit: the shares' deadlines back towards the tightest one whose batches ran late,
    on the devices with more than :data:`LOOSEN_SLACK` of their deadline to spare; None when none has."""
    roomy = [d for d in current
             if current[d] < too_late[d] and outcome.per_device_runtime_s[d] < asked[d] * (1 - LOOSEN_SLACK)]
    if not roomy:
        return None
    deadlines = dict(current)
    for device in roomy:  # the secant through the late point and this one, kept between the two
        points = seen[device][-1:] + [(outcome.assignment_runtime_s[device], outcome.per_device_runtime_s[device])]
        target = _shares_for(points, asked[device], cap=False)
        inside = current[device] < target < too_late[device]
        deadlines[device] = target if inside else (current[device] + too_late[device]) / 2
    return deadlines


def _shares_for(seen: list[tuple[float, float]], deadline_s: float, margin: float = 2e-3, cap: bool = True) -> float:
    """The seconds of per-request shares to allow on a device so that its batches take
    ``deadline_s`` (less a small margin), from what was seen: (shares, batches) of earlier
    assignments there. The batches take longer than the shares by a ratio that itself grows as
    the shares are squeezed, so after two points the secant through them is followed (when it
    rises), else the ratio of the last; with ``cap``, always less than the last one's shares."""
    goal = deadline_s * (1 - margin)
    shares, batches = seen[-1]
    target = shares * goal / batches
    if len(seen) >= 2:
        (s0, b0), (s1, b1) = seen[-2], seen[-1]
        if s1 != s0 and (b1 - b0) / (s1 - s0) > 0:
            target = s1 + (goal - b1) * (s1 - s0) / (b1 - b0)
    return min(target, shares * (1 - margin)) if cap else target


def _explain_late_batches(result: PlanResult, settings: PlanSettings, formed: FormedPlan) -> None:
    """No schedule: forming batches breaks a deadline that no repair could restore."""
    result.status = "infeasible"
    for device, needed in formed.late.items():
        limit = settings.device_deadline(device)
        result.diagnosis.append(
            f"Formed into batches, the queries on {device} need {format_duration(needed)} against its deadline of "
            f"{format_duration(limit)}: a batch runs as long as its longest members, and neither a tighter deadline "
            f"for the assignment nor {device} at batch size 1 meets it. Give {device} about "
            f"{format_duration(needed)}, or lower the accuracy target.")
        result.best_achievable[f"deadline_s {device}"] = needed


def _compare_with_batch_one(result: PlanResult, predictions: Predictions, settings: PlanSettings,
                            min_accuracy: np.ndarray | None) -> None:
    """The same plan with every (model, device) at batch size 1: a baseline, and what batching saves."""
    ones = predictions.at_batch_size_one()
    allowed = allowed_options(ones, min_accuracy)
    formed = solve_and_form(ones, settings, allowed)
    outcome = formed.outcome
    if outcome is None or formed.late:
        result.baselines[SAME_PLAN_AT_BATCH_ONE] = Baseline(
            energy_j=math.nan, accuracy=math.nan, makespan_s=math.nan, feasible=False,
            note=f"no schedule meets the targets with every option at batch size 1 ({formed.solution.status})")
        return
    result.baselines[SAME_PLAN_AT_BATCH_ONE] = Baseline(
        energy_j=outcome.energy_j, accuracy=outcome.accuracy, makespan_s=outcome.makespan_s,
        feasible=outcome.feasible, per_device_runtime_s=outcome.per_device_runtime_s,
        note="the energy-optimal plan with every option at batch size 1 (one request at a time)")
    if result.has_schedule and outcome.energy_j > 0:
        result.batching_saving = 1.0 - result.energy_j / outcome.energy_j


def _fill_schedule(result: PlanResult, predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
                   formed: FormedPlan, query_ids: np.ndarray) -> None:
    solution, outcome = formed.solution, formed.outcome
    choice = solution.choice
    # The sanity check beside the solver: the schedule is recomputed from scratch.
    if not (outcome.feasible or solution.status == "infeasible"):
        raise PlannerError("the solver returned a schedule that misses a target (a bug; please report it with the "
                           "workload); nothing was stored")
    result.status = solution.status
    result.energy_j = outcome.energy_j
    result.assignment_energy_j = outcome.assignment_energy_j
    result.formation_overhead_j = outcome.energy_j - outcome.assignment_energy_j
    result.accuracy = outcome.accuracy
    result.per_device_runtime_s = outcome.per_device_runtime_s
    result.objective_value = solution.objective
    result.objective_lower_bound = solution.lower_bound
    result.gap = solution.gap
    result.gap_as_asked = (solution.objective - formed.requested_lower_bound) / max(abs(solution.objective), 1e-12)
    result.assignment_deadlines_s = formed.assignment_deadlines_s
    if settings.objective == "energy":
        result.lower_bound_j = solution.lower_bound
    counts = np.bincount(choice, minlength=len(predictions.options))
    result.assignments = {o.key: int(c) for o, c in zip(predictions.options, counts) if c}
    per_option = outcome.batches.per_option(len(predictions.options))
    result.batches = {o.key: int(c) for o, c in zip(predictions.options, per_option) if c}
    result.schedule = schedule_frame(predictions, settings, choice, query_ids, outcome.batches)


def schedule_frame(predictions: Predictions, settings: PlanSettings, choice: np.ndarray,
                   query_ids: np.ndarray, batches: Batches | None = None) -> pd.DataFrame:
    """The schedule: per device, queries grouped by model (each model loaded once, in order of
    first use), a model's batch sizes largest first, its batches in formation order (at batch
    size 1, workload order). ``device_start_s`` is when each query's batch starts on its
    device (after its model's load time when loads are counted); every member of a batch has
    the same ``batch_id`` (numbered from 1 in schedule order), start and ``batch_size`` (the
    requests the batch holds). ``predicted_energy_j`` and ``predicted_runtime_s`` are each
    query's share of its batch's (they add up to the batch's)."""
    batches = form_batches(predictions, choice) if batches is None else batches
    n = len(choice)
    rows = np.arange(n)
    options = predictions.options
    rank = np.empty(n, dtype=np.int64)
    rank[batches.members] = rows
    frame = pd.DataFrame({
        "id": query_ids, "model": [options[c].model for c in choice], "device": [options[c].device for c in choice],
        "input_tokens": predictions.input_tokens[rows, choice], "output_tokens": predictions.output_tokens,
        "predicted_energy_j": batches.member_energy_j, "predicted_runtime_s": batches.member_runtime_s,
        "accuracy": predictions.accuracy[choice], "batch": batches.batch_of, "batch_size": batches.size[batches.batch_of],
        "option_size": predictions.batch_sizes[choice], "position": rows, "rank": rank,
        "in_domain": batches.in_domain[batches.batch_of], "clamped": batches.clamped[batches.batch_of],
    })
    first_use = frame.groupby(["device", "model"])["position"].transform("min")
    frame = frame.assign(first_use=first_use, larger_first=-frame["option_size"]).sort_values(
        ["device", "first_use", "larger_first", "batch", "rank"], kind="stable")
    load_of = {(o.device, o.model): o.load_s for o in options} if settings.count_load else {}
    starts_batch = frame["batch"].ne(frame["batch"].shift()).to_numpy()
    new_model = (frame["model"].ne(frame.groupby("device")["model"].shift())).to_numpy()
    load_before = np.array([load_of.get((d, m), 0.0) if new else 0.0
                            for d, m, new in zip(frame["device"], frame["model"], new_model)])
    batch_runtime = batches.runtime_s[frame["batch"].to_numpy()]
    elapsed = np.where(starts_batch, batch_runtime, 0.0) + load_before
    end = pd.Series(elapsed, index=frame.index).groupby(frame["device"]).cumsum().to_numpy()
    start = pd.Series(np.where(starts_batch, end - batch_runtime, np.nan), index=frame.index).ffill()
    frame["device_start_s"] = start.to_numpy()
    frame["batch_id"] = np.cumsum(starts_batch)
    columns = ["id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j", "predicted_runtime_s",
               "accuracy", "device_start_s", "batch_id", "batch_size", "in_domain", "clamped"]
    return frame[columns].reset_index(drop=True)


# -- what each constraint costs ----------------------------------------------------------------

@dataclass(frozen=True)
class ConstraintCost:
    """What one constraint of a solved plan costs, measured by re-solving.

    constraint: "accuracy" or "deadline <device>". binding: the schedule sits at the limit.
    value and limit: what the schedule reaches and what the constraint asks, in the
    constraint's own unit (:attr:`unit`: a fraction for accuracy, seconds for a deadline).
    delta_energy_j: how the optimal energy changes when the constraint is relaxed (deadline,
    10% longer: negative, a saving) or tightened (accuracy, one point more), in J; None
    when that was not measured. text: the sentence a planner reads.
    """

    constraint: str
    binding: bool
    value: float
    limit: float
    text: str
    delta_energy_j: float | None = None

    @property
    def unit(self) -> str:
        return "fraction" if self.constraint == "accuracy" else "s"

    def to_dict(self) -> dict:
        """Every field, strict-JSON-safe (the ``constraint_costs`` of ``plan --json``)."""
        return json_safe(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConstraintCost":
        delta = data.get("delta_energy_j")
        return cls(constraint=str(data["constraint"]), binding=bool(data["binding"]), value=_float(data.get("value")),
                   limit=_float(data.get("limit")), text=str(data.get("text") or ""),
                   delta_energy_j=None if delta is None else float(delta))


def constraint_costs(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
                     result: PlanResult) -> list[ConstraintCost]:
    """Per constraint: binding or not, and what relaxing it by one step is worth, measured by
    re-solving (one accuracy point; 10% more time on a device). Energy objective only."""
    if settings.objective != "energy" or result.energy_j is None:
        return []
    quick = replace(settings, time_limit_s=min(settings.time_limit_s, 10.0))
    costs = []
    if settings.accuracy_target is not None:
        costs.append(_accuracy_cost(predictions, quick, allowed, result))
    for device in predictions.devices:
        if settings.device_deadline(device) is not None:
            costs.append(_deadline_cost(predictions, quick, allowed, result, device))
    return costs


def _resolved_energy_j(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> float | None:
    """The optimal energy under ``settings`` (a re-solve, batches formed as the plan's), or None
    when there is no schedule."""
    other = solve_and_form(predictions, settings, allowed)
    if other.outcome is None or other.late:
        return None
    return other.outcome.energy_j


def _accuracy_cost(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
                   result: PlanResult) -> ConstraintCost:
    target = settings.accuracy_target
    binding = result.accuracy - target < 1e-3
    delta = None
    if target + ACCURACY_STEP > 1:
        text = "The accuracy target is at its maximum."
    else:
        harder = _resolved_energy_j(predictions, replace(settings, accuracy_target=target + ACCURACY_STEP), allowed)
        if harder is not None:
            delta = harder - result.energy_j
            text = (f"One more accuracy point ({target:.2f} → {target + ACCURACY_STEP:.2f}) costs "
                    f"{format_energy(delta, unknown='an unknown amount')}.")
        else:
            text = (f"One more accuracy point ({target + ACCURACY_STEP:.2f}) cannot be reached under the other "
                    "constraints.")
    if not binding:
        text = f"The accuracy target is not binding: the cheapest schedule already reaches {result.accuracy:.3f}. " + text
    return ConstraintCost(constraint="accuracy", binding=binding, value=result.accuracy, limit=target, text=text,
                          delta_energy_j=delta)


def _deadline_cost(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray, result: PlanResult,
                   device: str) -> ConstraintCost:
    limit = settings.device_deadline(device)
    used = result.per_device_runtime_s.get(device, 0.0)
    binding = used >= limit * (1 - 1e-3)
    delta = None
    if binding:
        looser = replace(settings, deadlines_s={**settings.deadlines_s, device: limit * (1 + DEADLINE_STEP)})
        relaxed = _resolved_energy_j(predictions, looser, allowed)
        delta = None if relaxed is None else relaxed - result.energy_j
        saved = format_energy(None if delta is None else -delta, unknown="an unknown amount")
        text = (f"The {device} deadline is binding: {format_percent(DEADLINE_STEP, 0)} more time there "
                f"({format_duration(limit * DEADLINE_STEP)}) would save {saved}.")
    else:
        text = (f"The {device} deadline is not binding: the schedule uses {format_percent(used / limit, 0)} of it "
                f"({format_duration(used)} of {format_duration(limit)}).")
    return ConstraintCost(constraint=f"deadline {device}", binding=binding, value=used, limit=limit, text=text,
                          delta_energy_j=delta)


# -- when there is no schedule ---------------------------------------------------------------

def _diagnose(result: PlanResult, predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
              solution: Solution, query_ids: np.ndarray) -> None:
    """Say which constraint makes the plan infeasible and the best value that can be reached.

    The causes are tried from the plainest (a query no model may serve) to the subtlest
    (constraints that clash only together); the first one that explains it is reported.
    """
    if solution.status == "no_option":
        _explain_unservable(result, predictions, solution, query_ids)
    elif _explain_accuracy_out_of_reach(result, predictions, settings, allowed):
        pass
    elif _explain_deadlines(result, predictions, settings, allowed):
        pass
    elif settings.min_share:
        result.diagnosis.append("The minimum shares per model cannot be met together with the other constraints; "
                                "lower them.")
    elif solution.status == "unsolved":
        result.diagnosis.append(f"No schedule was found within the time limit of "
                                f"{format_duration(settings.time_limit_s)}; try a longer time limit.")
    else:
        violated = ", ".join(solution.violations) or ", ".join(solution.capped_rows)
        result.diagnosis.append(f"These constraints cannot be met together: {violated}.")


def _explain_unservable(result: PlanResult, predictions: Predictions, solution: Solution,
                        query_ids: np.ndarray) -> None:
    """Queries no option may serve: longer than every option's context, or asking for a
    minimum accuracy above every model that can hold them."""
    stuck = solution.unassignable
    fits = predictions.fits_context[stuck]
    too_long = stuck[~fits.any(axis=1)]
    too_demanding = stuck[fits.any(axis=1)]
    if len(too_long):
        tokens = (predictions.input_tokens + predictions.output_tokens[:, None])[too_long].min(axis=1)
        known = [o.context_tokens for o in predictions.options if o.context_tokens is not None]
        longest = max(known)
        result.diagnosis.append(
            f"{_count_queries(too_long)} ({_name_queries(query_ids, too_long, tokens)}) "
            f"{'is' if len(too_long) == 1 else 'are'} longer than the context of every option (the largest holds "
            f"{longest:,} tokens, input and output together); shorten {'it' if len(too_long) == 1 else 'them'}, lower "
            "the output tokens, or add a model with a longer context.")
        result.best_achievable["context_tokens"] = float(longest)
    if len(too_demanding):
        holds = predictions.fits_context[too_demanding]  # every one fits some option
        best = float(predictions.accuracy[holds.any(axis=0)].max())
        one = len(too_demanding) == 1
        holding = "" if holds.all() else f" that can hold {'it' if one else 'them'}"
        result.diagnosis.append(f"{_count_queries(too_demanding)} ({_name_queries(query_ids, too_demanding)}) "
                                f"{'asks' if one else 'ask'} for a minimum accuracy above every available model"
                                f"{holding} (the best is {best:.3f}); lower {'its' if one else 'their'} min_accuracy "
                                "or add a better model.")
        result.best_achievable["min_accuracy"] = best


def _count_queries(indices: np.ndarray) -> str:
    return f"{len(indices)} quer{'y' if len(indices) == 1 else 'ies'}"


def _name_queries(query_ids: np.ndarray, indices: np.ndarray, tokens: np.ndarray | None = None) -> str:
    """The first eight queries by id (each with its τin + τout when ``tokens`` are given), and how many more."""
    names = [str(query_ids[i]) for i in indices[:8]]
    if tokens is not None:
        names = [f"{name}: {int(count):,} tokens" for name, count in zip(names, tokens)]
    return ", ".join(names) + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


def _explain_accuracy_out_of_reach(result: PlanResult, predictions: Predictions, settings: PlanSettings,
                                   allowed: np.ndarray) -> bool:
    """True (and said) when the target is above every query on its most accurate model."""
    weights = accuracy_weights(predictions, settings.accuracy_mode)
    rows = np.arange(len(predictions.output_tokens))
    most_accurate = np.argmax(np.where(allowed, predictions.accuracy[None, :], -np.inf), axis=1)
    best_accuracy = float((predictions.accuracy[most_accurate] * weights[rows, most_accurate]).sum()
                          / weights[rows, most_accurate].sum())
    target = settings.accuracy_target
    if target is None or target <= best_accuracy + 1e-9:
        return False
    result.diagnosis.append(f"The accuracy target {target:.3f} is above the best achievable {best_accuracy:.3f} "
                            f"(every query on the most accurate model it may use, {settings.accuracy_mode}-weighted).")
    result.best_achievable["accuracy"] = best_accuracy
    return True


def _scaled_deadlines(predictions: Predictions, settings: PlanSettings, scale: float) -> dict[str, float]:
    """Every device's deadline times ``scale`` (devices without one left out)."""
    return {d: settings.device_deadline(d) * scale for d in predictions.devices
            if settings.device_deadline(d) is not None}


def _describe_deadlines(deadlines_s: dict[str, float]) -> str:
    return ", ".join(f"{device} {format_duration(seconds)}" for device, seconds in deadlines_s.items())


def _explain_deadlines(result: PlanResult, predictions: Predictions, settings: PlanSettings,
                       allowed: np.ndarray) -> bool:
    """True (and said) when the deadlines are to blame: alone, or together with the accuracy target."""
    if not any(settings.device_deadline(d) is not None for d in predictions.devices):
        return False
    lines = result.diagnosis
    no_target = replace(settings, accuracy_target=None, min_share={})
    alone = _minimum_deadline_scale(predictions, no_target, allowed)
    if alone is None:
        lines.append("The deadlines cannot be met even ignoring accuracy, not even 1000 times longer.")
        return True
    if alone > 1:
        needed = _scaled_deadlines(predictions, settings, alone)
        lines.append("The deadlines cannot be met even ignoring accuracy: the fastest schedule needs them about "
                     f"{alone:.2f} times longer ({_describe_deadlines(needed)}).")
        result.best_achievable.update({f"deadline_s {d}": s for d, s in needed.items()})
        return True
    target = settings.accuracy_target
    if target is None:
        return False
    # The most accurate schedule the deadlines allow.
    problem = build_problem(predictions, no_target, allowed)
    problem.cost = -(predictions.accuracy[None, :] * accuracy_weights(predictions, settings.accuracy_mode))
    best = solve(problem, time_limit_s=min(settings.time_limit_s, 10.0))
    found = False
    if best.status in ("optimal", "feasible"):
        reachable = evaluate(predictions, no_target, allowed, best.choice).accuracy
        if reachable < target - 1e-9:
            lines.append(f"With these deadlines the accuracy target {target:.3f} cannot be met: the most accurate "
                         f"schedule that meets every deadline reaches {reachable:.3f}.")
            result.best_achievable["accuracy"] = reachable
            found = True
    scale = _minimum_deadline_scale(predictions, replace(settings, min_share={}), allowed)
    if scale is not None and scale > 1:
        needed = _scaled_deadlines(predictions, settings, scale)
        lines.append("To reach the accuracy target, the deadlines must grow by a factor of about "
                     f"{scale:.2f}: {_describe_deadlines(needed)}.")
        result.best_achievable.update({f"deadline_s {d}": s for d, s in needed.items()})
        found = True
    return found


def _minimum_deadline_scale(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
                            steps: int = 12) -> float | None:
    """The smallest factor on every deadline that makes the plan feasible (bisection on
    whole solves), or None when even 1000x is not enough."""
    def feasible(scale: float) -> bool:
        scaled = replace(settings, deadline_s=None if settings.deadline_s is None else settings.deadline_s * scale,
                         deadlines_s={d: s * scale for d, s in settings.deadlines_s.items()},
                         time_limit_s=min(settings.time_limit_s, 5.0))
        return solve(build_problem(predictions, scaled, allowed), time_limit_s=scaled.time_limit_s).status \
            in ("optimal", "feasible")

    if feasible(1.0):
        return 1.0
    low, high = 1.0, 2.0
    while not feasible(high):
        low, high = high, high * 4
        if high > 1000:
            return None
    for _ in range(steps):
        middle = math.sqrt(low * high)
        if feasible(middle):
            high = middle
        else:
            low = middle
    return high


# -- curves ------------------------------------------------------------------------------

def pareto_curve(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray, *, vary: str = "accuracy",
                 points: int = 9, on_point: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Optimal energy as the accuracy target (or the common deadline) varies, the rest fixed
    (each point's batches formed, and repaired against its deadline, as the plan's).

    Returns columns value (target or deadline s), energy_j, accuracy, makespan_s, status.
    ``on_point(n)`` is called after the n-th solve (a caller's progress; it may raise to stop).
    """
    rows = []
    weights = accuracy_weights(predictions, settings.accuracy_mode)
    index = np.arange(len(predictions.output_tokens))
    if vary == "accuracy":
        cheapest = np.argmin(np.where(allowed, predictions.energy_j, np.inf), axis=1)
        most = np.argmax(np.where(allowed, predictions.accuracy[None, :], -np.inf), axis=1)
        low = float((predictions.accuracy[cheapest] * weights[index, cheapest]).sum() / weights[index, cheapest].sum())
        high = float((predictions.accuracy[most] * weights[index, most]).sum() / weights[index, most].sum())
        values = np.linspace(low, high, points)
    else:
        fastest = float(predictions.runtime_s.min(axis=1).sum()) / max(len(predictions.devices), 1)
        slowest = float(predictions.runtime_s.max(axis=1).sum())
        values = np.geomspace(max(fastest, 1e-6), max(slowest, fastest * 2, 1e-6), points)
    for value in values:
        changed = {"accuracy_target": float(value)} if vary == "accuracy" else {"deadline_s": float(value),
                                                                              "deadlines_s": {}}
        varied = replace(settings, **changed, time_limit_s=min(settings.time_limit_s, 10.0))
        formed = solve_and_form(predictions, varied, allowed)  # batches formed (and repaired) as the plan's
        solution, outcome = formed.solution, formed.outcome
        if outcome is not None and not formed.late:
            rows.append({"value": float(value), "energy_j": outcome.energy_j, "accuracy": outcome.accuracy,
                         "makespan_s": outcome.makespan_s, "status": solution.status})
        else:
            rows.append({"value": float(value), "energy_j": math.nan, "accuracy": math.nan, "makespan_s": math.nan,
                         "status": "infeasible" if formed.late else solution.status})
        if on_point is not None:
            on_point(len(rows))
    return pd.DataFrame(rows)


__all__ = ["BEST_SINGLE_BATCHED", "SAME_PLAN_AT_BATCH_ONE", "Baseline", "ConstraintCost", "FormedPlan", "PlanOption",
           "PlanResult", "PlanSettings", "Predictions", "baselines", "build_problem", "check_assignment",
           "constraint_costs", "evaluate", "make_plan", "pareto_curve", "predict_options", "schedule_frame",
           "solve_and_form"]
