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
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from engine.errors import InputError, PlannerError, Problem
from engine.formatting import format_duration, format_energy, format_percent, json_safe
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
    count_load: count each used option's load time and energy once.
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
        if problems:
            raise InputError(problems)

    def device_deadline(self, device: str) -> float | None:
        return self.deadlines_s.get(device, self.deadline_s)


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
    option's context, its model meets the query's own minimum accuracy, and its prediction
    was not clamped (see :func:`_not_clamped`)."""
    fits = predictions.fits_context
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
    open_cost = None
    if settings.count_load:
        open_cost = np.array([o.load_energy_j for o in predictions.options])
        if settings.objective == "zeta":  # the same normalisation as the per-query energy
            open_cost = settings.zeta * open_cost / (float(predictions.energy_j.max()) or 1.0)
    return AssignmentProblem(cost=objective_costs(predictions, settings), allowed=allowed, rows=rows,
                             open_cost=open_cost)


# -- evaluating any assignment ---------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What an assignment costs, recomputed from the predictions alone."""

    energy_j: float
    accuracy: float
    per_device_runtime_s: dict[str, float]
    makespan_s: float
    meets_accuracy: bool
    meets_deadlines: bool
    meets_min_accuracy: bool

    @property
    def feasible(self) -> bool:
        return self.meets_accuracy and self.meets_deadlines and self.meets_min_accuracy


def evaluate(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray, choice: np.ndarray) -> Outcome:
    """Energy (with load energy if counted), accuracy, per-device time and which targets it meets."""
    n = len(choice)
    rows = np.arange(n)
    used = np.unique(choice)
    energy = float(predictions.energy_j[rows, choice].sum())
    load_s = {device: 0.0 for device in predictions.devices}
    if settings.count_load:
        energy += sum(predictions.options[k].load_energy_j for k in used)
        for k in used:
            load_s[predictions.options[k].device] += predictions.options[k].load_s
    weights = accuracy_weights(predictions, settings.accuracy_mode)[rows, choice]
    accuracy = float((predictions.accuracy[choice] * weights).sum() / weights.sum())
    device_of = np.array([predictions.devices.index(o.device) for o in predictions.options])
    per_device_runtime = np.bincount(device_of[choice], weights=predictions.runtime_s[rows, choice],
                                     minlength=len(predictions.devices))
    per_device = {d: float(per_device_runtime[i] + load_s[d]) for i, d in enumerate(predictions.devices)}
    # The solver's own tolerance (check_assignment): 1e-7 relative.
    meets_deadlines = all(settings.device_deadline(d) is None
                          or per_device[d] <= settings.device_deadline(d) + 1e-7 * max(1.0, settings.device_deadline(d))
                          for d in per_device)
    meets_accuracy = settings.accuracy_target is None or accuracy >= settings.accuracy_target - 1e-7
    return Outcome(energy_j=energy, accuracy=accuracy, per_device_runtime_s=per_device,
                   makespan_s=max(per_device.values()), meets_accuracy=meets_accuracy,
                   meets_deadlines=meets_deadlines, meets_min_accuracy=bool(allowed[rows, choice].all()))


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


def baselines(predictions: Predictions, settings: PlanSettings, allowed: np.ndarray) -> dict[str, Baseline]:
    """The obvious alternatives on the same predictions: every single option, round-robin,
    random (seeded) and greedy cheapest-first (each query, in order, to its cheapest allowed
    option whose device still has time before its deadline)."""
    n, k = predictions.energy_j.shape

    def costed(choice: np.ndarray, note: str) -> Baseline:
        outcome = evaluate(predictions, settings, allowed, choice)
        return Baseline(energy_j=outcome.energy_j, accuracy=outcome.accuracy, makespan_s=outcome.makespan_s,
                        feasible=outcome.feasible, per_device_runtime_s=outcome.per_device_runtime_s, note=note)

    results = {f"only {option.key}": costed(np.full(n, column), "every query on one option")
               for column, option in enumerate(predictions.options)}
    # Round-robin and random draw among each query's allowed options (all of them if none is).
    pools = [np.flatnonzero(row) if row.any() else np.arange(k) for row in allowed]
    results["round-robin"] = costed(np.array([pool[i % len(pool)] for i, pool in enumerate(pools)]),
                                    "queries in turn over the options each may use")
    rng = np.random.default_rng(settings.seed)
    results["random"] = costed(np.array([pool[rng.integers(len(pool))] for pool in pools]),
                               f"uniformly at random over the options each may use (seed {settings.seed})")
    results["greedy cheapest-first"] = costed(
        _greedy_cheapest_first(predictions, settings, allowed),
        "each query to its cheapest allowed option whose device still has time; accuracy target not considered")
    return results


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
    DESIGN.md plus in_domain, clamped and option. Energies are in J of ``energy_scope``."""

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
    # What it was solved from, for curves and re-solves (not stored).
    predictions: Predictions | None = field(default=None, repr=False)
    allowed: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_schedule(self) -> bool:
        return self.status in ("optimal", "feasible")

    def to_json(self) -> dict:
        """The ``plan --json`` document of DESIGN.md, plus documented extra keys."""
        document = {
            "status": self.status, "energy_j": self.energy_j, "lower_bound_j": self.lower_bound_j, "gap": self.gap,
            "solve_s": self.solve_s, "accuracy": self.accuracy, "per_device_runtime_s": self.per_device_runtime_s,
            "n_queries": self.n_queries, "assignments": self.assignments,
            "baselines": {name: baseline.to_json() for name, baseline in self.baselines.items()},
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

    ``explain`` adds what each constraint costs (a re-solve per binding constraint);
    ``compare`` adds the baselines. ``started`` (perf_counter) is when the workload was
    parsed, so ``plan_s`` covers tokenizing, predicting and solving.
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
    problem = build_problem(predictions, settings, allowed)
    solution = solve(problem, gap_target=settings.gap_target, time_limit_s=settings.time_limit_s)
    result = PlanResult(settings=settings, status=solution.status, n_queries=n, solve_s=solution.solve_s,
                        plan_s=0.0, energy_scope=settings.energy_scope,
                        energy_estimated=predictions.energy_estimated,
                        warnings=list(warnings or []) + list(predictions.warnings),
                        options=[o.key for o in predictions.options],
                        solver={"method": solution.method, "groups": solution.n_groups,
                                "free_groups": solution.n_free_groups, "dual_iterations": solution.dual_iterations,
                                "cbc_status": solution.mip_status, "prices": solution.prices},
                        predictions=predictions, allowed=allowed)
    if solution.status in ("optimal", "feasible"):
        _fill_schedule(result, predictions, settings, allowed, solution, query_ids)
    else:
        _diagnose(result, predictions, settings, allowed, solution, query_ids)
    if compare:
        result.baselines = baselines(predictions, settings, allowed)
    if explain and result.has_schedule:
        result.constraint_costs = constraint_costs(predictions, settings, allowed, result)
    result.plan_s = time.perf_counter() - started
    return result


def _fill_schedule(result: PlanResult, predictions: Predictions, settings: PlanSettings, allowed: np.ndarray,
                   solution: Solution, query_ids: np.ndarray) -> None:
    choice = solution.choice
    outcome = evaluate(predictions, settings, allowed, choice)
    # The sanity check beside the solver: the schedule is recomputed from scratch.
    if not (outcome.feasible or solution.status == "infeasible"):
        raise PlannerError("the solver returned a schedule that misses a target (a bug; please report it with the "
                           "workload); nothing was stored")
    result.energy_j = outcome.energy_j
    result.accuracy = outcome.accuracy
    result.per_device_runtime_s = outcome.per_device_runtime_s
    result.objective_value = solution.objective
    result.objective_lower_bound = solution.lower_bound
    result.gap = solution.gap
    if settings.objective == "energy":
        result.lower_bound_j = solution.lower_bound
    counts = np.bincount(choice, minlength=len(predictions.options))
    result.assignments = {o.key: int(c) for o, c in zip(predictions.options, counts) if c}
    result.schedule = schedule_frame(predictions, settings, choice, query_ids)


def schedule_frame(predictions: Predictions, settings: PlanSettings, choice: np.ndarray,
                   query_ids: np.ndarray) -> pd.DataFrame:
    """The schedule: per device, queries grouped by model (each model loaded once, in order
    of first use) and in workload order within a model; ``device_start_s`` is when each query
    starts on its device (after its model's load time when loads are counted)."""
    n = len(choice)
    rows = np.arange(n)
    options = predictions.options
    frame = pd.DataFrame({
        "id": query_ids, "model": [options[c].model for c in choice], "device": [options[c].device for c in choice],
        "input_tokens": predictions.input_tokens[rows, choice], "output_tokens": predictions.output_tokens,
        "predicted_energy_j": predictions.energy_j[rows, choice],
        "predicted_runtime_s": predictions.runtime_s[rows, choice],
        "accuracy": predictions.accuracy[choice], "option": choice, "position": rows,
        "in_domain": predictions.in_domain[rows, choice], "clamped": predictions.clamped[rows, choice],
    })
    first_use = frame.groupby("option")["position"].transform("min")
    frame = frame.assign(first_use=first_use).sort_values(["device", "first_use", "position"], kind="stable")
    load = np.array([o.load_s for o in options]) if settings.count_load else np.zeros(len(options))
    new_model = frame["option"].ne(frame.groupby("device")["option"].shift())
    load_before = np.where(new_model, load[frame["option"].to_numpy()], 0.0)
    elapsed = frame["predicted_runtime_s"].to_numpy() + load_before
    end = pd.Series(elapsed, index=frame.index).groupby(frame["device"]).cumsum().to_numpy()
    frame["device_start_s"] = end - frame["predicted_runtime_s"].to_numpy()
    columns = ["id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j", "predicted_runtime_s",
               "accuracy", "device_start_s", "in_domain", "clamped"]
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
    """The optimal energy under ``settings`` (a re-solve), or None when there is no schedule."""
    other = solve(build_problem(predictions, settings, allowed), gap_target=settings.gap_target,
                  time_limit_s=settings.time_limit_s)
    if other.status not in ("optimal", "feasible"):
        return None
    return evaluate(predictions, settings, allowed, other.choice).energy_j


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
                 points: int = 9) -> pd.DataFrame:
    """Optimal energy as the accuracy target (or the common deadline) varies, the rest fixed.

    Returns columns value (target or deadline s), energy_j, accuracy, makespan_s, status.
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
        solution = solve(build_problem(predictions, varied, allowed), gap_target=varied.gap_target,
                         time_limit_s=varied.time_limit_s)
        if solution.status in ("optimal", "feasible"):
            outcome = evaluate(predictions, varied, allowed, solution.choice)
            rows.append({"value": float(value), "energy_j": outcome.energy_j, "accuracy": outcome.accuracy,
                         "makespan_s": outcome.makespan_s, "status": solution.status})
        else:
            rows.append({"value": float(value), "energy_j": math.nan, "accuracy": math.nan, "makespan_s": math.nan,
                         "status": solution.status})
    return pd.DataFrame(rows)


__all__ = ["Baseline", "ConstraintCost", "PlanOption", "PlanResult", "PlanSettings", "Predictions", "baselines",
           "build_problem", "check_assignment", "constraint_costs", "evaluate", "make_plan", "pareto_curve",
           "predict_options", "schedule_frame"]
