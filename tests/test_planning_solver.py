"""engine.planning.solver: optimality against brute force, proven bounds, infeasibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.planning.solver import AssignmentProblem, CouplingRow, check_assignment, solve


def random_instance(rng: np.random.Generator, n: int, k: int, *, accuracy_target: float | None,
                    deadline_share: float | None, open_costs: bool = False) -> AssignmentProblem:
    """Energies, accuracies and two devices with runtimes; targets set relative to what is possible."""
    tokens_in = rng.integers(8, 512, n)
    tokens_out = rng.integers(8, 256, n)
    size = rng.uniform(1, 10, k)
    energy = (0.4 * tokens_in[:, None] + 20 * tokens_out[:, None]) * size[None, :] * rng.uniform(0.8, 1.2, (n, k))
    runtime = (1e-3 * tokens_in[:, None] + 0.04 * tokens_out[:, None]) * np.sqrt(size)[None, :]
    accuracy = rng.uniform(0.4, 0.7, k)
    device = np.arange(k) % 2
    allowed = rng.random((n, k)) > 0.15
    allowed[np.arange(n), rng.integers(0, k, n)] = True
    rows = []
    if accuracy_target is not None:
        rows.append(CouplingRow("accuracy", np.broadcast_to(accuracy - accuracy_target, (n, k)).copy(), ">=", 0.0))
    if deadline_share is not None:
        total = float(np.where(allowed, runtime, np.inf).min(axis=1).sum())
        for d in (0, 1):
            rows.append(CouplingRow(f"deadline {d}", np.where(device[None, :] == d, runtime, 0.0), "<=",
                                    total * deadline_share,
                                    open_coef=np.where(device == d, 0.5, 0.0) if open_costs else None))
    return AssignmentProblem(energy, allowed, rows, rng.uniform(50, 500, k) if open_costs else None)


def brute_force(problem: AssignmentProblem) -> float:
    n, k = problem.shape
    best = np.inf
    for choice in itertools.product(range(k), repeat=n):
        choice = np.array(choice)
        if not problem.allowed[np.arange(n), choice].all():
            continue
        objective, _, violations = check_assignment(problem, choice)
        if not violations:
            best = min(best, objective)
    return best


def brute_force_instance(seed: int) -> AssignmentProblem:
    """A random instance small enough to enumerate (at most 7000 assignments)."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 9)), int(rng.integers(2, 4))
    if n * np.log(k) > np.log(7000):
        n = int(np.log(7000) / np.log(k))
    return random_instance(rng, n, k, accuracy_target=float(rng.uniform(0.45, 0.62)),
                           deadline_share=float(rng.uniform(0.6, 1.5)), open_costs=bool(seed % 3 == 0))


def assert_claims_hold(problem: AssignmentProblem, solution, expected: float, gap_target: float = 1e-3) -> None:
    """What a solution claims, checked against the enumerated optimum ``expected`` (inf: none)."""
    if solution.status == "infeasible":
        assert not np.isfinite(expected), "called infeasible, but a schedule meets every row"
        return
    if solution.status not in ("optimal", "feasible"):
        return  # no schedule claimed
    objective, _, violations = check_assignment(problem, solution.choice)
    assert violations == {}
    assert objective == pytest.approx(solution.objective, rel=1e-12)
    assert objective >= expected * (1 - 1e-9)  # never better than every assignment
    assert solution.lower_bound <= expected * (1 + 1e-9)  # the bound is a real lower bound
    assert solution.gap == pytest.approx((solution.objective - solution.lower_bound) / solution.objective)
    if solution.status == "optimal":
        assert objective <= expected * (1 + gap_target)


@pytest.mark.parametrize("seed", range(12))
def test_optimal_against_brute_force(seed):
    problem = brute_force_instance(seed)
    expected = brute_force(problem)
    solution = solve(problem)
    if not np.isfinite(expected):
        assert solution.status == "infeasible"
        return
    assert solution.status == "optimal"
    assert solution.objective == pytest.approx(expected, rel=1e-9)
    # The bound is a real lower bound and the gap is what it claims.
    assert solution.lower_bound <= expected * (1 + 1e-9)
    assert solution.gap == pytest.approx((solution.objective - solution.lower_bound) / solution.objective)
    objective, _, violations = check_assignment(problem, solution.choice)
    assert violations == {} and objective == pytest.approx(solution.objective)


@pytest.mark.parametrize("seed", range(12))
def test_decomposition_forced_on_the_brute_force_instances_finds_their_optimum(seed):
    # A whole-problem limit of 0 sends even these tiny instances through the Lagrangian prices
    # and CBC on the near-ties (the path every large plan takes), with a free set of one group.
    problem = brute_force_instance(seed)
    expected = brute_force(problem)
    solution = solve(problem, full_mip_max_vars=0)
    assert "Lagrangian" in solution.method and solution.n_free_groups < solution.n_groups
    if not np.isfinite(expected):
        assert solution.status == "infeasible"
        return
    assert solution.status in ("optimal", "feasible")  # the bound of so few queries may not prove it
    assert solution.objective == pytest.approx(expected, rel=1e-9)
    assert_claims_hold(problem, solution, expected)


@pytest.mark.parametrize("limit", [0, 10])
def test_what_the_decomposition_claims_holds_on_many_small_instances(limit):
    # On instances this small the decomposition may miss the optimum (it then says "feasible",
    # with the gap it could not close) or find no schedule; what it does claim must hold.
    statuses = []
    for seed in range(12, 52):
        problem = brute_force_instance(seed)
        solution = solve(problem, full_mip_max_vars=limit)
        assert_claims_hold(problem, solution, brute_force(problem))
        if "Lagrangian" in solution.method:
            statuses.append(solution.status)
    assert len(statuses) >= 20  # most went through the decomposition (one-query instances cannot)
    assert "optimal" in statuses  # and on some it proved the gap


def test_large_instance_uses_decomposition_and_proves_gap():
    rng = np.random.default_rng(1)
    problem = random_instance(rng, 20_000, 14, accuracy_target=0.6, deadline_share=1.2)
    solution = solve(problem)
    assert solution.status == "optimal", solution
    assert "Lagrangian" in solution.method and solution.n_free_groups < 20_000
    assert solution.gap <= 1e-3
    objective, values, violations = check_assignment(problem, solution.choice)
    assert violations == {}
    assert objective == pytest.approx(solution.objective)
    assert values["accuracy"] >= 0


def test_decomposition_matches_whole_problem_in_cbc():
    """The same instance through both paths: the same optimum within the proven gap."""
    rng = np.random.default_rng(5)
    problem = random_instance(rng, 300, 4, accuracy_target=0.58, deadline_share=1.0)
    whole = solve(problem, full_mip_max_vars=10_000)
    split = solve(problem, full_mip_max_vars=10)
    assert whole.method == "whole problem in CBC" and "Lagrangian" in split.method
    assert whole.status == split.status == "optimal"
    assert split.objective == pytest.approx(whole.objective, rel=2e-3)
    assert split.lower_bound <= whole.objective * (1 + 1e-9)


def test_identical_queries_are_grouped():
    n = 5000
    energy = np.tile([[10.0, 20.0, 40.0]], (n, 1))
    accuracy = np.array([0.4, 0.5, 0.7])
    problem = AssignmentProblem(energy, np.ones((n, 3), bool),
                                [CouplingRow("accuracy", np.tile(accuracy - 0.55, (n, 1)), ">=", 0.0)])
    solution = solve(problem)
    assert solution.n_groups == 1
    assert solution.status == "optimal"
    counts = np.bincount(solution.choice, minlength=3)
    # Mean accuracy ≥ 0.55 at least cost: mix the 0.5 and 0.7 models (or 0.4 and 0.7).
    assert (counts * accuracy).sum() / n >= 0.55 - 1e-12
    # Any mix reaching 0.55 costs at least 25 J per query on average (half 0.4/half 0.7, or
    # three 0.5 to one 0.7), and 5000 queries split exactly, so the optimum is 125 kJ.
    assert solution.objective == pytest.approx(25.0 * n)


def test_each_constraint_binds_in_a_crafted_case():
    # Two queries, two options on two devices: cheap/slow/inaccurate vs dear/fast/accurate.
    energy = np.array([[1.0, 5.0], [1.0, 5.0]])
    runtime = np.array([[10.0, 1.0], [10.0, 1.0]])
    accuracy = np.array([0.4, 0.8])
    free = solve(AssignmentProblem(energy, np.ones((2, 2), bool)))
    assert list(free.choice) == [0, 0] and free.objective == 2.0
    target = CouplingRow("accuracy", np.tile(accuracy - 0.6, (2, 1)), ">=", 0.0)
    with_target = solve(AssignmentProblem(energy, np.ones((2, 2), bool), [target]))
    assert sorted(with_target.choice) == [0, 1] and with_target.objective == 6.0
    assert with_target.prices["accuracy"] > 0
    deadline = CouplingRow("deadline 0", np.array([[10.0, 0.0], [10.0, 0.0]]), "<=", 10.0)
    with_deadline = solve(AssignmentProblem(energy, np.ones((2, 2), bool), [deadline]))
    assert sorted(with_deadline.choice) == [0, 1]
    assert with_deadline.prices["deadline 0"] > 0


def test_infeasible_rows_are_named():
    n = 50
    energy = np.ones((n, 2))
    accuracy = np.array([0.4, 0.5])
    problem = AssignmentProblem(energy, np.ones((n, 2), bool),
                                [CouplingRow("accuracy", np.tile(accuracy - 0.6, (n, 1)), ">=", 0.0)])
    solution = solve(problem)
    assert solution.status == "infeasible"
    # The LP cannot meet the row (its price hits the cap), and the least-violating schedule puts
    # every query on the 0.5 model: 50 queries, each 0.1 short of 0.6.
    assert solution.capped_rows == ["accuracy"]
    assert solution.violations == {"accuracy": pytest.approx(5.0)}
    assert list(solution.choice) == [1] * n


def test_query_without_allowed_option():
    allowed = np.array([[True, False], [False, False]])
    solution = solve(AssignmentProblem(np.ones((2, 2)), allowed))
    assert solution.status == "no_option"
    assert list(solution.unassignable) == [1]


def test_check_assignment_rejects_disallowed_choice():
    problem = AssignmentProblem(np.ones((2, 2)), np.array([[True, False], [True, True]]))
    with pytest.raises(ValueError):
        check_assignment(problem, np.array([1, 0]))


def test_a_nan_coefficient_never_reaches_cbc():
    # Option 1's runtime is unknown (NaN): it cannot be judged against the deadline, so it is
    # not offered; the solve finishes instead of aborting inside CBC.
    energy = np.array([[1.0, 0.5], [1.0, 0.5]])
    runtime = np.array([[1.0, np.nan], [1.0, np.nan]])
    solution = solve(AssignmentProblem(energy, np.ones((2, 2), bool), [CouplingRow("deadline", runtime, "<=", 5.0)]))
    assert solution.status == "optimal" and list(solution.choice) == [0, 0]


def brute_force_grouped(problem: AssignmentProblem) -> float:
    """The optimum with the one-off costs counted once per open group used, recomputed here
    from the arrays (not through check_assignment)."""
    n, k = problem.shape
    best = np.inf
    for choice in itertools.product(range(k), repeat=n):
        choice = np.array(choice)
        if not problem.allowed[np.arange(n), choice].all():
            continue
        groups = {int(problem.open_group[c]) for c in choice}
        first = {int(g): int(np.flatnonzero(problem.open_group == g)[0]) for g in groups}
        objective = problem.cost[np.arange(n), choice].sum() + sum(problem.open_cost[first[g]] for g in groups)
        feasible = True
        for row in problem.rows:
            value = row.coef[np.arange(n), choice].sum()
            if row.open_coef is not None:
                value += sum(row.open_coef[first[g]] for g in groups)
            feasible &= value <= row.rhs + 1e-9 if row.sense == "<=" else value >= row.rhs - 1e-9
        if feasible:
            best = min(best, objective)
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("limit", [6000, 2])
def test_options_of_one_open_group_pay_its_cost_once(seed, limit):
    # Options in pairs (a model at two batch sizes on a device): loading costs once per pair.
    rng = np.random.default_rng(100 + seed)
    n, k = 5, 4
    problem = random_instance(rng, n, k, accuracy_target=0.5, deadline_share=1.2, open_costs=True)
    problem.open_group = np.array([0, 0, 1, 1])
    problem.open_cost = np.repeat(rng.uniform(200, 2000, 2), 2)
    for row in problem.rows:
        if row.open_coef is not None:
            row.open_coef = np.repeat(row.open_coef[::2], 2)
    expected = brute_force_grouped(problem)
    solution = solve(problem, full_mip_max_vars=limit)
    assert_claims_hold(problem, solution, expected)
    if solution.status in ("optimal", "feasible"):
        used = set(solution.choice.tolist())
        groups = {int(problem.open_group[c]) for c in used}
        by_hand = problem.cost[np.arange(n), solution.choice].sum() + sum(problem.open_cost[2 * g] for g in groups)
        assert solution.objective == pytest.approx(by_hand)
    assert np.isfinite(expected) == (solution.status in ("optimal", "feasible")) or solution.status == "unsolved"


def test_a_re_solve_reuses_the_grouping_and_the_dual_cuts_and_finds_the_same_optimum():
    rng = np.random.default_rng(7)
    base = random_instance(rng, 60, 6, accuracy_target=0.55, deadline_share=0.9)
    tile = lambda a: np.tile(a, (10, 1))  # noqa: E731 (ten copies of each query)
    problem = AssignmentProblem(tile(base.cost), tile(base.allowed),
                                [CouplingRow(r.name, tile(r.coef), r.sense, r.rhs * 10) for r in base.rows])
    first = solve(problem)
    assert first.grouping is not None and first.n_groups == 60
    for row in problem.rows:
        if row.name.startswith("deadline"):
            row.rhs *= 1.1
    fresh = solve(problem)
    for again in (solve(problem, grouping=first.grouping),
                  solve(problem, grouping=first.grouping, warm_start=first.warm_start)):  # the dual's cuts too
        assert again.n_groups == fresh.n_groups
        assert again.status == "optimal"
        assert again.objective == pytest.approx(fresh.objective, rel=2e-3)
        # Each bound is a real lower bound: below the other's schedule.
        assert again.lower_bound <= fresh.objective * (1 + 1e-9) and fresh.lower_bound <= again.objective * (1 + 1e-9)
    warm = solve(problem, grouping=first.grouping, warm_start=first.warm_start)
    assert warm.dual_iterations <= fresh.dual_iterations
