"""The assignment problem behind a plan, solved exactly enough to prove it (python-mip).

Every query goes to exactly one option (a model on a device); a few *coupling* rows tie
the queries together: the mean-accuracy target, one deadline per device, optionally a
minimum share per model. Objective: the sum of per-query costs (energy in J, or the
paper's ζ-weighted cost), plus an optional one-off cost per option, or group of options,
that is used (loading the model on the device, once whatever batch sizes it runs at).

Why it scales. With N queries and m coupling rows, a basic optimal solution of the LP
relaxation splits at most m queries between options; every other query sits at its
cheapest option under the rows' prices. So:

1. Identical queries (same costs, coefficients and allowed options) are grouped; an
   integer count per (group, option) replaces one binary per (query, option) without
   changing the problem. (Rows are matched by an exact hash of their bits, checked row by
   row; a re-solve with other right-hand sides can reuse the groups.)
2. The rows are priced by Lagrangian relaxation: for prices λ ≥ 0 each group independently
   takes its cheapest option under cost + λ·coefficients, which is a vectorised argmin.
   The dual function L(λ) is maximised by Kelley's cutting planes, the master being a
   tiny LP solved by python-mip. *Every* L(λ) is a valid lower bound on the integer
   optimum (weak duality), so the bound we report is proven whatever happens next.
3. Groups whose best option wins by a clear margin under the final prices are fixed
   there; the near-ties (the LP's fractional queries and their neighbours) stay free and
   python-mip (CBC) solves that integer problem, with the fixed groups' usage as
   constants in the rows. If the free set is too small to repair the rows, it grows.
   Small problems simply leave every group free: then CBC solves the whole problem and
   its own bound is global.

Infeasibility is found, not guessed: each row gets a slack at a large price, so the dual
stays bounded and the integer model always has a solution; a positive slack in a problem
where nothing was fixed, or a row whose price reaches its cap, means that row cannot be
met, and the slack says by how much.

Results are checked beside the solver: :func:`check_assignment` recomputes the objective
and every row from the assignment alone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import mip
import numpy as np

ROW_SENSES = ("<=", ">=")
# Price cap on a normalised row (cost units per normalised unit of violation). A row whose
# price reaches it cannot be met by the LP relaxation.
PRICE_CAP = 1.0e4
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_GAP_TARGET = 1.0e-3
FULL_MIP_MAX_VARS = 6_000      # up to this many (group, option) pairs, CBC gets the whole problem;
                               # above it, the first restricted problem is no bigger
_TOLERANCE = 1e-9


@dataclass
class CouplingRow:
    """One linear row over all (query, option) pairs: Σ coef[i, k]·x[i, k] (+ Σ open_coef[k]·y[k]) sense rhs.

    ``coef`` is (N, K); ``open_coef`` (K,) counts once for each option that is used (a model's
    load time on a device's deadline). ``kind`` is what the row means ("accuracy",
    "deadline", "share"), for the messages built on top.
    """

    name: str
    coef: np.ndarray
    sense: str
    rhs: float
    kind: str = ""
    open_coef: np.ndarray | None = None


@dataclass
class AssignmentProblem:
    """N queries x K options. ``cost`` (N, K); ``allowed`` (N, K) bool; ``open_cost`` (K,)
    is paid once per used option (None: nothing). Disallowed entries of ``cost`` and the rows'
    coefficients are ignored (they may be NaN).

    ``open_group`` (K,) ints, optional: options with the same group are opened together, so
    the one-off cost (and ``open_coef``) is paid once for the group however many of its
    options are used (a model is loaded once on a device, whatever batch size it runs at).
    The group's cost is that of its first option; the planner gives every option of a group
    the same one.
    """

    cost: np.ndarray
    allowed: np.ndarray
    rows: list[CouplingRow] = field(default_factory=list)
    open_cost: np.ndarray | None = None
    open_group: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.cost.shape

    def opened(self, used: np.ndarray) -> np.ndarray:
        """(K,) True at the first option of every group that has a used option (``used``: (K,) bool):
        where the one-off costs are counted."""
        k = self.shape[1]
        groups = np.arange(k) if self.open_group is None else np.asarray(self.open_group)
        _, first = np.unique(groups, return_index=True)
        used_groups = np.unique(groups[np.asarray(used, dtype=bool)])
        opened = np.zeros(k, dtype=bool)
        opened[first[np.isin(groups[first], used_groups)]] = True
        return opened

    def group_members(self) -> list[np.ndarray]:
        """The options of each open group (each option alone without ``open_group``), first option first."""
        k = self.shape[1]
        groups = np.arange(k) if self.open_group is None else np.asarray(self.open_group)
        return [np.flatnonzero(groups == group) for group in dict.fromkeys(groups.tolist())]


@dataclass(frozen=True)
class Solution:
    """What :func:`solve` found.

    status: 'optimal' (gap ≤ the target), 'feasible' (a schedule, gap above the target),
    'infeasible' (``violations`` says which rows and by how much; ``choice`` is then the
    least-violating schedule found), or 'no_option' (some query has no allowed option;
    ``unassignable`` lists them).
    choice: option index per query (-1 where none). objective: recomputed from ``choice``.
    lower_bound: proven lower bound on the optimum. gap: (objective − lower_bound) / |objective|.
    prices: per row, the marginal objective per unit of its right-hand side (LP dual, ≥ 0).
    row_values: per row, its left-hand side under ``choice``. violations: per row, how far
    ``choice`` misses it (only rows that are missed). capped_rows: rows whose price reached the
    cap (the LP relaxation cannot meet them). method, n_groups, n_free_groups,
    dual_iterations, mip_status: how it was solved (for the plan's report). grouping: the
    groups of identical queries found, warm_start: the dual's cuts (a re-solve of the same
    problem with other right-hand sides may pass them back).
    """

    status: str
    choice: np.ndarray
    objective: float
    lower_bound: float
    gap: float
    solve_s: float
    prices: dict[str, float] = field(default_factory=dict)
    row_values: dict[str, float] = field(default_factory=dict)
    violations: dict[str, float] = field(default_factory=dict)
    capped_rows: list[str] = field(default_factory=list)
    unassignable: np.ndarray | None = None
    method: str = ""
    n_groups: int = 0
    n_free_groups: int = 0
    dual_iterations: int = 0
    mip_status: str = ""
    grouping: Grouping | None = field(default=None, repr=False, compare=False)
    warm_start: DualWarmStart | None = field(default=None, repr=False, compare=False)


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the C library's own prints (CLP says "Empty problem ..." even at verbose 0),
    so that ``--json`` output on stdout stays one JSON document."""
    with _STDOUT_LOCK:
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError):
            yield
            return
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


_GC_LOCK = threading.Lock()
_gc_holders = 0
_gc_was_enabled = True


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while python-mip works.

    A python-mip Model sits in reference cycles, so it is freed by the cyclic collector at
    an arbitrary moment; if that moment falls inside cffi's first lookup of a library
    function (which holds cffi's lock), the Model's ``__del__`` asks for the same lock and
    the process hangs. Seen here; pausing the collector during a solve avoids it.
    """
    global _gc_holders, _gc_was_enabled
    with _GC_LOCK:
        if _gc_holders == 0:  # the first holder saves the state; the last one restores it
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def _optimize(model: mip.Model, **kwargs) -> mip.OptimizationStatus:
    with _quiet_stdout():
        return model.optimize(**kwargs)


# -- checking --------------------------------------------------------------------------

def check_assignment(problem: AssignmentProblem, choice: np.ndarray) -> tuple[float, dict[str, float], dict[str, float]]:
    """Objective, row values and violations of an assignment, from scratch.

    Raises ValueError when a query is unassigned or sent to an option it may not use.
    """
    n, k = problem.shape
    choice = np.asarray(choice)
    if choice.shape != (n,) or (choice < 0).any() or (choice >= k).any():
        raise ValueError("every query needs exactly one option")
    idx = np.arange(n)
    if not problem.allowed[idx, choice].all():
        raise ValueError("a query was sent to an option it may not use")
    used = np.zeros(k, dtype=bool)
    used[np.unique(choice)] = True
    opened = problem.opened(used)
    objective = float(problem.cost[idx, choice].sum())
    if problem.open_cost is not None:
        objective += float(problem.open_cost[opened].sum())
    values, violations = {}, {}
    for row in problem.rows:
        value = float(row.coef[idx, choice].sum())
        if row.open_coef is not None:
            value += float(row.open_coef[opened].sum())
        values[row.name] = value
        miss = value - row.rhs if row.sense == "<=" else row.rhs - value
        if miss > 1e-7 * max(1.0, abs(row.rhs)):
            violations[row.name] = miss
    return objective, values, violations


# -- the solver ------------------------------------------------------------------------

@dataclass
class _Normalised:
    """The problem on groups, rows in ≤ form, everything scaled to O(1)."""

    cost: np.ndarray          # (G, K) scaled; +inf where not allowed
    coef: np.ndarray          # (m, G, K) scaled, ≤ form; 0 where not allowed
    rhs: np.ndarray           # (m,) scaled
    counts: np.ndarray        # (G,) int
    members: np.ndarray       # query indices, group by group (group g owns counts[g] of them)
    cost_scale: float
    row_scale: np.ndarray     # (m,) original = scaled * row_scale * sign
    row_sign: np.ndarray      # (m,) +1 for ≤ rows, -1 for ≥ rows
    grouping: Grouping | None = None


@dataclass(frozen=True)
class Grouping:
    """Groups of identical queries (same costs, allowed options and row coefficients):
    representative query of each group, its size, and every query index listed group by
    group. Still valid for the same problem with other right-hand sides or with some options
    disallowed for every query (identical rows stay identical), so a re-solve can reuse it."""

    first: np.ndarray
    counts: np.ndarray
    members: np.ndarray


def _group(problem: AssignmentProblem) -> Grouping:
    """Groups of identical queries, by an exact 128-bit hash of each row's bit patterns
    (integer arithmetic modulo 2^64, so identical rows always hash alike), checked row by row
    against the group's representative; the bytewise comparison of every row is the fallback."""
    parts = [np.where(problem.allowed, problem.cost, np.inf), problem.allowed.astype(float)]
    parts += [np.where(problem.allowed, row.coef, 0.0) for row in problem.rows]
    rng = np.random.default_rng(0x5EED)
    keys = np.zeros((problem.shape[0], 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            bits = np.ascontiguousarray(part, dtype=np.float64).view(np.uint64)
            keys += bits @ (rng.integers(1, 2 ** 62, size=(part.shape[1], 2), dtype=np.uint64) | np.uint64(1))
    hashed = np.ascontiguousarray(keys).view(np.dtype((np.void, 16))).reshape(-1)
    _, first, inverse, counts = np.unique(hashed, return_index=True, return_inverse=True, return_counts=True)
    inverse = np.asarray(inverse).reshape(-1)
    if not all(np.array_equal(part, part[first][inverse]) for part in parts):  # a collision: compare bytes
        stacked = np.ascontiguousarray(np.concatenate(parts, axis=1))
        rows = stacked.view(np.dtype((np.void, stacked.dtype.itemsize * stacked.shape[1]))).reshape(-1)
        _, first, inverse, counts = np.unique(rows, return_index=True, return_inverse=True, return_counts=True)
        inverse = np.asarray(inverse).reshape(-1)
    members = np.argsort(inverse, kind="stable")  # group by group, each group's queries ascending
    return Grouping(first=first, counts=counts, members=members)


def _normalise(problem: AssignmentProblem, grouping: Grouping | None = None) -> _Normalised:
    grouping = grouping or _group(problem)
    first, counts, members = grouping.first, grouping.counts, grouping.members
    allowed = problem.allowed[first]
    raw_cost = np.where(allowed, problem.cost[first], np.nan)
    best = np.nanmin(np.abs(raw_cost), axis=1)
    cost_scale = float(np.mean(best)) if np.isfinite(best).all() and np.mean(best) > 0 else 1.0
    cost = np.where(allowed, raw_cost / cost_scale, np.inf)
    m = len(problem.rows)
    g, k = allowed.shape
    coef = np.zeros((m, g, k))
    rhs = np.zeros(m)
    row_scale = np.ones(m)
    row_sign = np.ones(m)
    for j, row in enumerate(problem.rows):
        sign = 1.0 if row.sense == "<=" else -1.0
        values = np.where(allowed, row.coef[first], 0.0) * sign
        typical = float(np.mean(np.abs(values[allowed]))) if allowed.any() else 0.0
        scale = typical if typical > 0 else max(abs(row.rhs) / max(counts.sum(), 1), 1.0)
        coef[j] = values / scale
        rhs[j] = sign * row.rhs / scale
        row_scale[j], row_sign[j] = scale, sign
    return _Normalised(cost, coef, rhs, counts, members, cost_scale, row_scale, row_sign, grouping)


@dataclass(frozen=True)
class DualCut:
    """One point of the Lagrangian dual, whatever the rows' right-hand sides: prices λ (m,),
    priced = Σ counts·min_k(cost + λ·coef) and usage (m,) = the rows' left-hand sides at that
    choice (scaled, ≤ form). For right-hand sides b, L(λ) = priced − λ·b and usage − b is a
    subgradient: a re-solve with other right-hand sides starts from every cut already made."""

    prices: np.ndarray
    priced: float
    usage: np.ndarray


@dataclass(frozen=True)
class DualWarmStart:
    """The cuts of a solve and the scales they were made in (a re-solve uses them only when its
    own scales are the same: same costs, coefficients and allowed options)."""

    cuts: tuple[DualCut, ...]
    cost_scale: float
    row_scale: np.ndarray


def _lagrangian(norm: _Normalised, prices: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, DualCut]:
    """L(λ) (scaled), a subgradient, the reduced costs (G, K) and the point as a cut."""
    reduced = norm.cost.copy()
    term = np.empty_like(reduced)
    for j, price in enumerate(prices):
        if price != 0.0:  # a row at price 0 (not binding) changes nothing
            np.multiply(norm.coef[j], price, out=term)
            reduced += term
    best = np.argmin(reduced, axis=1)
    rows = np.arange(len(best))
    priced = float(norm.counts @ reduced[rows, best])
    usage = np.einsum("mg,g->m", norm.coef[:, rows, best], norm.counts) if len(prices) else np.zeros(0)
    return priced - float(prices @ norm.rhs), usage - norm.rhs, reduced, DualCut(prices.copy(), priced, usage)


@dataclass(frozen=True)
class _DualBound:
    """The best point of the dual found: L(λ) (scaled; a valid lower bound), its prices λ (m,),
    the reduced costs under them (G, K), the cutting-plane iterations it took, and every cut."""

    lower_scaled: float
    prices: np.ndarray
    reduced: np.ndarray
    iterations: int
    cuts: tuple[DualCut, ...] = ()


def _maximise_dual(norm: _Normalised, deadline: float, tolerance: float = 1e-7, max_iterations: int = 200,
                   warm: tuple[DualCut, ...] = ()) -> _DualBound:
    """Kelley's cutting planes on L(λ), λ in [0, PRICE_CAP]^m, master LP by python-mip; ``warm``:
    the cuts of an earlier solve of the same problem with other right-hand sides."""
    m = len(norm.rhs)
    prices = np.zeros(m)
    value, subgradient, reduced, cut = _lagrangian(norm, prices)
    cuts = [cut]
    best = (value, prices.copy(), reduced)
    if m == 0 or (subgradient <= 1e-12).all():
        # The unconstrained choice already meets every row.
        return _DualBound(lower_scaled=best[0], prices=best[1], reduced=best[2], iterations=1, cuts=tuple(cuts))
    master = mip.Model(sense=mip.MAXIMIZE, solver_name=mip.CBC)
    master.verbose = 0
    master.threads = 1
    theta = master.add_var(lb=-mip.INF, name="theta")
    lam = [master.add_var(lb=0.0, ub=PRICE_CAP, name=f"lambda{j}") for j in range(m)]
    master.objective = mip.maximize(theta)

    def add(cut: DualCut) -> None:
        # θ ≤ L(λt) + g·(λ − λt) = priced + usage·(λ − λt) − b·λ
        master.add_constr(theta - mip.xsum(float(cut.usage[j] - norm.rhs[j]) * lam[j] for j in range(m))
                          <= cut.priced - float(cut.usage @ cut.prices))

    for old in warm:
        add(old)
    if warm:  # start again from the best earlier point, priced with these right-hand sides
        start = max(warm, key=lambda c: c.priced - float(c.prices @ norm.rhs))
        if start.prices.any():
            prices = start.prices.copy()
            value, subgradient, reduced, cut = _lagrangian(norm, prices)
            cuts.append(cut)
            if value > best[0]:
                best = (value, prices.copy(), reduced)
    added = 0  # this solve's cuts already in the master
    iterations = len(cuts)
    while iterations < max_iterations and time.perf_counter() < deadline:
        for new in cuts[added:]:
            add(new)
        added = len(cuts)
        status = _optimize(master, relax=True)
        if status != mip.OptimizationStatus.OPTIMAL:
            break
        upper = float(master.objective_value)
        if upper - best[0] <= tolerance * max(1.0, abs(best[0])):
            break
        prices = np.array([min(max(v.x, 0.0), PRICE_CAP) for v in lam])
        value, subgradient, reduced, cut = _lagrangian(norm, prices)
        cuts.append(cut)
        iterations += 1
        if value > best[0]:
            best = (value, prices.copy(), reduced)
    return _DualBound(lower_scaled=best[0], prices=best[1], reduced=best[2], iterations=iterations,
                      cuts=tuple(warm) + tuple(cuts))


def _free_groups(reduced: np.ndarray, allowed: np.ndarray, n_free: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_free`` groups closest to a tie under the prices, and per group the options
    worth offering (within the largest free margin of the best)."""
    ordered = np.sort(np.where(allowed, reduced, np.inf), axis=1)
    second = ordered[:, 1] if ordered.shape[1] > 1 else np.full(len(ordered), np.inf)
    margin = second - ordered[:, 0]
    n_free = min(n_free, len(margin))
    free = np.argsort(margin, kind="stable")[:n_free]
    threshold = float(margin[free].max()) if n_free else 0.0
    if not math.isfinite(threshold):
        finite = margin[free][np.isfinite(margin[free])]
        threshold = float(finite.max()) if len(finite) else 0.0
    offered = allowed[free] & (reduced[free] <= ordered[free, :1] + threshold + 1e-12)
    return free, offered


@dataclass(frozen=True)
class _FixedGroups:
    """What the groups left at their base choice add to the restricted problem (scaled)."""

    groups: np.ndarray        # their indices
    usage: np.ndarray         # (m,) their part of each row
    cost: float               # their part of the objective
    opened: np.ndarray        # (K,) bool: the options they use


def _fixed_groups(norm: _Normalised, base_choice: np.ndarray, free: np.ndarray) -> _FixedGroups:
    g, k = norm.cost.shape
    fixed = np.ones(g, dtype=bool)
    fixed[free] = False
    groups = np.flatnonzero(fixed)
    usage, cost, opened = np.zeros(len(norm.rhs)), 0.0, np.zeros(k, dtype=bool)
    if len(groups):
        chosen = base_choice[groups]
        usage = np.einsum("mg,g->m", norm.coef[:, groups, chosen], norm.counts[groups])
        cost = float(norm.cost[groups, chosen] @ norm.counts[groups])
        opened[np.unique(chosen)] = True
    return _FixedGroups(groups=groups, usage=usage, cost=cost, opened=opened)


@dataclass
class _Terms:
    """The restricted model's linear pieces, collected while its variables are added."""

    cost: list = field(default_factory=list)
    rows: list[list] = field(default_factory=list)          # per row
    per_option: list[list] = field(default_factory=list)    # per option, its count variables
    variables: list[tuple[int, int, mip.Var]] = field(default_factory=list)  # (group, option, variable)


def _add_counts(model: mip.Model, norm: _Normalised, free: np.ndarray, offered: np.ndarray) -> _Terms:
    """One integer count per (free group, offered option); each group's counts add up to its size."""
    g, k = norm.cost.shape
    m = len(norm.rhs)
    terms = _Terms(rows=[[] for _ in range(m)], per_option=[[] for _ in range(k)])
    for position, group in enumerate(free):
        count = int(norm.counts[group])
        group_vars = []
        for option in np.flatnonzero(offered[position]):
            var = model.add_var(var_type=mip.INTEGER, lb=0, ub=count)
            group_vars.append(var)
            terms.variables.append((group, option, var))
            terms.cost.append(float(norm.cost[group, option]) * var)
            terms.per_option[option].append(var)
            for j in range(m):
                c = float(norm.coef[j, group, option])
                if c != 0.0:
                    terms.rows[j].append(c * var)
        model += mip.xsum(group_vars) == count
    return terms


def _add_open_costs(model: mip.Model, problem: AssignmentProblem, norm: _Normalised, terms: _Terms,
                    fixed_opened: np.ndarray) -> tuple[list, list[list]]:
    """The one-off cost (and row terms) of each open group in use (see ``open_group``): a
    binary per group the free groups may open, a constant 1 for a group the fixed groups
    already use. Returns the objective terms and, per row, its terms."""
    m, k = len(norm.rhs), norm.cost.shape[1]
    open_terms, open_rows = [], [[] for _ in range(m)]
    if problem.open_cost is None and all(r.open_coef is None for r in problem.rows):
        return open_terms, open_rows
    open_cost = problem.open_cost if problem.open_cost is not None else np.zeros(k)
    free_count = np.zeros(k, dtype=np.int64)  # queries the free groups could send to each option
    for group, option, _ in terms.variables:
        free_count[option] += int(norm.counts[group])
    for members in problem.group_members():
        variables = [var for option in members for var in terms.per_option[option]]
        if not variables and not fixed_opened[members].any():
            continue
        if fixed_opened[members].any():
            opened: object = 1.0
        else:
            y = model.add_var(var_type=mip.BINARY)
            model += mip.xsum(variables) <= int(free_count[members].sum()) * y
            opened = y
        first = members[0]
        open_terms.append(float(open_cost[first]) / norm.cost_scale * opened)
        for j, row in enumerate(problem.rows):
            if row.open_coef is not None and row.open_coef[first] != 0.0:
                open_rows[j].append(float(norm.row_sign[j] * row.open_coef[first] / norm.row_scale[j]) * opened)
    return open_terms, open_rows


@dataclass(frozen=True)
class _MipResult:
    """What CBC made of a restricted problem: per-group option counts (G, K; None without a
    solution), its status, its bound (scaled; only meaningful when nothing was fixed, None
    unless optimal) and each row's slack (scaled)."""

    counts: np.ndarray | None
    status: str
    bound: float | None
    slack: np.ndarray


def _restricted_mip(problem: AssignmentProblem, norm: _Normalised, base_choice: np.ndarray,
                    free: np.ndarray, offered: np.ndarray, time_limit_s: float,
                    slack_price: float, relative_gap: float, absolute_gap: float) -> _MipResult:
    """CBC on the free groups (integer counts per offered option), the rest fixed at ``base_choice``."""
    g, k = norm.cost.shape
    m = len(norm.rhs)
    fixed = _fixed_groups(norm, base_choice, free)
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.threads = 1
    terms = _add_counts(model, norm, free, offered)
    open_terms, open_rows = _add_open_costs(model, problem, norm, terms, fixed.opened)
    slacks = [model.add_var(lb=0.0) for _ in range(m)]
    for j in range(m):
        model += mip.xsum(terms.rows[j] + open_rows[j]) + float(fixed.usage[j]) - slacks[j] <= float(norm.rhs[j])
    model.objective = mip.minimize(mip.xsum(terms.cost + open_terms) + fixed.cost
                                   + mip.xsum(slack_price * s for s in slacks))
    # The proof of the plan's gap comes from the Lagrangian bound (or from CBC's own bound
    # when nothing is fixed); CBC only has to close the part of the gap it owns.
    model.max_mip_gap = relative_gap
    model.max_mip_gap_abs = absolute_gap
    status = _optimize(model, max_seconds=max(time_limit_s, 0.5))
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return _MipResult(counts=None, status=status.name.lower(), bound=None, slack=np.zeros(m))
    counts = np.zeros((g, k), dtype=np.int64)
    counts[fixed.groups, base_choice[fixed.groups]] = norm.counts[fixed.groups]
    for group, option, var in terms.variables:
        counts[group, option] = int(round(var.x))
    return _MipResult(counts=counts, status=status.name.lower(),
                      bound=float(model.objective_bound) if status == mip.OptimizationStatus.OPTIMAL else None,
                      slack=np.array([max(s.x, 0.0) for s in slacks]))


def _disaggregate(norm: _Normalised, counts: np.ndarray, n: int) -> np.ndarray:
    """Per-query options from per-group counts: a group's queries take its options in order."""
    g, k = counts.shape
    options = np.repeat(np.tile(np.arange(k), g), counts.ravel())
    choice = np.full(n, -1, dtype=np.int64)
    choice[norm.members] = options
    return choice


def solve(problem: AssignmentProblem, *, gap_target: float = DEFAULT_GAP_TARGET,
          time_limit_s: float = DEFAULT_TIME_LIMIT_S, full_mip_max_vars: int = FULL_MIP_MAX_VARS,
          grouping: Grouping | None = None, warm_start: DualWarmStart | None = None) -> Solution:
    """Minimise the objective subject to the rows; see the module docstring for how.

    ``grouping``: the :attr:`Solution.grouping` of an earlier solve of the same costs and
    coefficients (other right-hand sides, or options disallowed for every query), to skip
    grouping the queries again. ``warm_start``: its :attr:`Solution.warm_start`, when only the
    right-hand sides changed: the dual starts from its cuts (used only when the scales agree).
    """
    with _collector_paused():
        return _solve(problem, gap_target, time_limit_s, full_mip_max_vars, grouping, warm_start)


_NEAR_TIES = "Lagrangian prices + CBC on the near-ties"
_WHOLE_PROBLEM = "whole problem in CBC"
#: Price of one normalised unit of slack in the restricted problems: above any row's price cap.
_SLACK_PRICE = PRICE_CAP * 10.0


@dataclass(frozen=True)
class _Candidate:
    """One schedule the search found, checked from scratch (:func:`check_assignment`)."""

    choice: np.ndarray
    objective: float
    row_values: dict[str, float]
    violations: dict[str, float]

    @property
    def rank(self) -> tuple[bool, float]:
        """Schedules that meet every row first, then the cheaper."""
        return (bool(self.violations), self.objective)


@dataclass(frozen=True)
class _Search:
    """Where the search over growing free sets ended: the best schedule (None if none was
    found), the proven lower bound (unscaled), the free set's size asked for and used, whether
    CBC saw the whole problem, and CBC's last status."""

    best: _Candidate | None
    lower_bound: float
    n_free: int
    n_free_groups: int
    everything_free: bool
    mip_status: str


def _judgeable(problem: AssignmentProblem) -> AssignmentProblem:
    """The problem with every option that cannot be judged (a non-finite cost or row
    coefficient) disallowed: a NaN coefficient would abort CBC."""
    allowed = problem.allowed & np.isfinite(problem.cost)
    for row in problem.rows:
        allowed &= np.isfinite(row.coef)
    return replace(problem, allowed=allowed)


def _search(problem: AssignmentProblem, norm: _Normalised, dual: _DualBound, proven_infeasible: bool,
            gap_target: float, deadline: float, full_mip_max_vars: int) -> _Search:
    """Restricted integer problems over a growing free set, from the near-ties, until the
    proven gap is small enough, the rows can be met, or the whole problem is in CBC (only
    when it is small enough)."""
    g = len(norm.counts)
    group_allowed = np.isfinite(norm.cost)
    base_choice = np.argmin(dual.reduced, axis=1)
    n_pairs = int(group_allowed.sum())
    n_free = min(g, max(64, 8 * (len(norm.rhs) + 1) ** 2))
    if n_pairs <= full_mip_max_vars // 8:
        n_free = g  # tiny: CBC proves it directly
    elif n_pairs > full_mip_max_vars:
        # Too big for CBC in one piece: the first restricted problem stays within the same
        # limit (this is also what lets a test force the decomposition on a small instance).
        n_free = min(n_free, max(1, full_mip_max_vars // norm.cost.shape[1]))
    lower = dual.lower_scaled * norm.cost_scale
    best: _Candidate | None = None
    while True:
        free, offered = _free_groups(dual.reduced, group_allowed, n_free)
        if n_free >= g:
            offered = group_allowed[free]
        everything_free = n_free >= g and int(offered.sum()) == n_pairs
        remaining = deadline - time.perf_counter()
        # CBC must close only the part of the gap it owns: with everything free its own bound
        # is the proof (relative gap); otherwise the Lagrangian bound is (absolute gap).
        found = _restricted_mip(
            problem, norm, base_choice, free, offered, min(remaining, 3.0) if proven_infeasible else remaining,
            _SLACK_PRICE, relative_gap=0.5 * gap_target if everything_free else 1e-6,
            absolute_gap=0.1 * gap_target * max(abs(dual.lower_scaled), 1e-9))
        if found.counts is not None:
            choice = _disaggregate(norm, found.counts, problem.shape[0])
            objective, values, violations = check_assignment(problem, choice)
            if everything_free and found.bound is not None and not violations:
                lower = max(lower, found.bound * norm.cost_scale)  # CBC's bound on the whole problem
            candidate = _Candidate(choice=choice, objective=objective, row_values=values, violations=violations)
            if best is None or candidate.rank < best.rank:
                best = candidate
            if not best.violations and (best.objective - lower) / max(abs(best.objective), 1e-12) <= 0.2 * gap_target:
                break
        if everything_free or proven_infeasible or time.perf_counter() >= deadline:
            break
        grown = min(g, n_free * 4)
        if grown == g and n_pairs > full_mip_max_vars:
            break  # the whole problem is too big for CBC in one piece; report what was found
        n_free = grown
    return _Search(best=best, lower_bound=lower, n_free=n_free, n_free_groups=len(free),
                   everything_free=everything_free, mip_status=found.status)


def _solve(problem: AssignmentProblem, gap_target: float, time_limit_s: float, full_mip_max_vars: int,
           grouping: Grouping | None = None, warm_start: DualWarmStart | None = None) -> Solution:
    started = time.perf_counter()
    deadline = started + time_limit_s
    n = problem.shape[0]
    problem = _judgeable(problem)
    stranded = np.flatnonzero(~problem.allowed.any(axis=1))
    if n == 0 or len(stranded):
        return Solution(status="no_option", choice=np.full(n, -1), objective=math.nan, lower_bound=math.nan,
                        gap=math.nan, solve_s=time.perf_counter() - started, unassignable=stranded)
    norm = _normalise(problem, grouping)
    warm = ()
    if warm_start is not None and warm_start.cost_scale == norm.cost_scale \
            and np.array_equal(warm_start.row_scale, norm.row_scale):
        warm = warm_start.cuts
    dual = _maximise_dual(norm, deadline, warm=warm)
    capped = [problem.rows[j].name for j in range(len(dual.prices)) if dual.prices[j] >= PRICE_CAP * (1 - 1e-9)]
    search = _search(problem, norm, dual, bool(capped), gap_target, deadline, full_mip_max_vars)
    g = len(norm.counts)
    how = dict(capped_rows=capped, n_groups=g, n_free_groups=search.n_free_groups, dual_iterations=dual.iterations,
               mip_status=search.mip_status, grouping=norm.grouping,
               warm_start=DualWarmStart(cuts=dual.cuts, cost_scale=norm.cost_scale, row_scale=norm.row_scale))
    best = search.best
    if best is None:
        return Solution(status="unsolved", choice=np.full(n, -1), objective=math.nan, lower_bound=search.lower_bound,
                        gap=math.nan, solve_s=time.perf_counter() - started, method=_NEAR_TIES, **how)
    lower = min(search.lower_bound, best.objective)
    gap = (best.objective - lower) / max(abs(best.objective), 1e-12)
    if best.violations:
        # Proven only when the LP itself needs the slack or CBC saw the whole problem.
        status = "infeasible" if (search.everything_free or capped) else "unsolved"
        gap = math.nan
    else:
        status = "optimal" if gap <= gap_target else "feasible"
    prices = {row.name: float(dual.prices[j] * norm.cost_scale / norm.row_scale[j])
              for j, row in enumerate(problem.rows)}
    return Solution(status=status, choice=best.choice, objective=best.objective, lower_bound=lower, gap=gap,
                    solve_s=time.perf_counter() - started, prices=prices, row_values=best.row_values,
                    violations=best.violations, method=_WHOLE_PROBLEM if search.n_free >= g else _NEAR_TIES, **how)
