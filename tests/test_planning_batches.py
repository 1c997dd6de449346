"""Plans that choose batch sizes: options per (model, device, batch size), per-request shares in
the assignment, batches formed from the real members, deadlines on batch runtimes, the gap of
the assignment reported apart from the energy after formation, the batch-1 comparison, the
best single option at its best batch size, and schedule CSVs with batch ids.

The real (τin, τout, B) fits come from another part of the project; here a small hand-made
form stands for them (:class:`BatchFit`), whose arithmetic the expectations are worked from.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog
from engine.backends.memory import ModelMemory, estimate_batch_memory
from engine.catalog import CatalogEntry
from engine.errors import InputError
from engine.execution import import_schedule
from engine.fitting import published_fits
from engine.fitting.result import FitResult
from engine.planning import (
    BEST_SINGLE_BATCHED,
    SAME_PLAN_AT_BATCH_ONE,
    PlanSettings,
    allowed_options,
    evaluate,
    form_batches,
    load_plan,
    make_plan,
    options_from_fits,
    pareto_curve,
    predict_options,
    schedule_csv,
    store_plan,
)
from engine.planning.plan import build_problem, solve_and_form
from engine.planning.solver import solve
from engine.planning.batches import (
    BatchMemoryRule,
    batch_memory_rule,
    best_cuts,
    candidate_orders,
    predict_batches,
)
from engine.planning.options import catalog_memory_rule, offered_batch_sizes
from engine.store import Store


class BatchFit(FitResult):
    """A fit with a batch axis, for tests: one batch of B requests of (τin, τout) costs

        fixed + prefill·B·τin + step·τout + request_step·B·τout

    (a per-batch fixed cost, prefill work per prompt token, per decode step a cost shared by
    the batch and a cost per request), in J or s. Per request at batch B:
    fixed/B + prefill·τin + (step/B + request_step)·τout.
    """

    def predict_raw(self, input_tokens, output_tokens, batch_size=None):
        tin, tout, size = np.broadcast_arrays(np.asarray(input_tokens, dtype=float),
                                              np.asarray(output_tokens, dtype=float),
                                              np.asarray(1 if batch_size is None else batch_size, dtype=float))
        c = self.coefficients
        value = c["fixed"] + c["prefill"] * size * tin + c["step"] * tout + c["request_step"] * size * tout
        return value.reshape(-1)


ENERGY = {"fixed": 2.0, "prefill": 0.01, "step": 1.0, "request_step": 0.1}


def batch_fit(model: str, device: str, target: str, scale: float = 1.0, batches=(1, 16), coefficients=None) -> BatchFit:
    coef = {k: v * scale for k, v in (coefficients or ENERGY).items()}
    domain = {"input_tokens": [1, 4096], "output_tokens": [1, 4096]}
    if batches is not None:
        domain["batch_size"] = list(batches)
    return BatchFit(model=model, device=device, energy_scope="total", target=target, form="test-batch",
                    terms=tuple(coef), coefficients=coef, r2=None, cv_mape=None, n_points=12, n_trials=36,
                    domain=domain)


def entry(name: str, accuracy: float) -> CatalogEntry:
    return CatalogEntry(name=name, backend="external", accuracy=accuracy, accuracy_source="test")


def no_memory(entry_, device):
    return None, "no model files here"


def two_models(batches=(1, 16), batch_sizes=None, runtime_scale: float = 0.01):
    """Models a (accuracy 0.5, cheap) and b (0.7, twice the cost) on one device, cpu."""
    fits = [batch_fit("a", "cpu", "energy", 1.0, batches), batch_fit("a", "cpu", "runtime", runtime_scale, batches),
            batch_fit("b", "cpu", "energy", 2.0, batches), batch_fit("b", "cpu", "runtime", 2 * runtime_scale, batches)]
    return options_from_fits(fits, {"a": entry("a", 0.5), "b": entry("b", 0.7)}, batch_sizes=batch_sizes,
                             memory_rules=no_memory)


def queries(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(8, 300, n), rng.integers(8, 300, n)


def predict(options, tin, tout):
    return predict_options(options, {o.model: tin for o in options}, tout)


def by_key(options) -> dict:
    return {o.key: k for k, o in enumerate(options)}


# -- the fit interface -------------------------------------------------------------------------------

def test_a_fit_without_a_batch_axis_predicts_one_request_and_refuses_batches():
    fit = next(f for f in published_fits() if f.target == "energy")
    assert not fit.has_batch_axis and fit.batch_domain == (1, 1)
    one = fit.predict_raw([32, 64], [16, 8])
    assert np.array_equal(fit.predict_raw([32, 64], [16, 8], 1), one)
    assert np.array_equal(fit.predict_raw([32, 64], [16, 8], None), one)
    with pytest.raises(ValueError, match="batch size 1 only"):
        fit.predict_raw([32, 64], [16, 8], 4)
    assert fit.in_domain([32, 32], [16, 16], [1, 4]).tolist() == [True, False]


def test_a_fit_with_a_batch_axis_predicts_one_batch_within_its_range():
    fit = batch_fit("a", "cpu", "energy", batches=(1, 16))
    assert fit.has_batch_axis and fit.batch_domain == (1, 16)
    # 2 + 0.01·4·100 + 1·10 + 0.1·4·10 = 20 J for the batch of 4.
    assert fit.predict_raw(100, 10, 4)[0] == pytest.approx(20.0)
    assert fit.in_domain([100, 100, 100], [10, 10, 10], [1, 16, 32]).tolist() == [True, True, False]
    flat = batch_fit("a", "cpu", "energy", batches=(8, 8))  # one batch size measured: no axis
    assert not flat.has_batch_axis


# -- options --------------------------------------------------------------------------------------------

def test_options_are_expanded_by_batch_size_and_keyed_with_it():
    options, notes = two_models()
    assert [o.key for o in options] == [f"{m}@cpu{s}" for m in "ab" for s in ("", "×2", "×4", "×8", "×16")]
    assert {o.pair for o in options} == {"a@cpu", "b@cpu"}
    assert any("memory a batch needs is not checked for a on cpu, b on cpu (no model files here)" in n for n in notes)
    # The user's list, limited to the profiled range (64 is not offered, and said so).
    options, notes = two_models(batch_sizes=(1, 4, 64))
    assert [o.key for o in options] == ["a@cpu", "a@cpu×4", "b@cpu", "b@cpu×4"]
    assert any("not offered: 64 for a on cpu (profiled at 1 to 16)" in n for n in notes)
    assert offered_batch_sizes((2, 32), None) == ([1, 2, 4, 8, 16, 32], [])
    assert offered_batch_sizes((2, 32), (1, 3, 64)) == ([1, 3], [64])


def test_a_fit_with_one_batch_size_only_is_planned_at_batch_one_with_the_note():
    options, notes = two_models(batches=None, batch_sizes=(1, 8))
    assert [o.key for o in options] == ["a@cpu", "b@cpu"]
    assert "a on cpu, b on cpu were profiled at batch size 1 only: profile with several batch sizes (the Profile " \
           "page's default, or --batch-sizes 1,2,4,8) to plan batches (planned one request at a time)" in notes
    tin, tout = queries(12)
    result = make_plan(predict(options, tin, tout), PlanSettings(accuracy_target=0.6), explain=False)
    assert result.status == "optimal"
    assert set(result.schedule.batch_size) == {1} and result.batching_saving is None
    assert SAME_PLAN_AT_BATCH_ONE not in result.baselines and BEST_SINGLE_BATCHED not in result.baselines
    published = options_from_fits(published_fits(), {"llama-2-7b": entry("llama-2-7b", 0.5)}, batch_sizes=(4,))[1]
    assert any("published profiles (llama-2-7b on a100-swing) are of single requests" in n for n in published)


def test_each_query_costs_its_share_of_a_batch_of_its_shape():
    options, _ = two_models()
    tin, tout = np.array([100, 20]), np.array([10, 50])
    preds = predict(options, tin, tout)
    k = by_key(options)
    # a×4, query 0: (2 + 0.01·4·100 + 10 + 0.1·4·10) / 4 = 20 / 4 = 5 J.
    assert preds.energy_j[0, k["a@cpu×4"]] == pytest.approx(5.0)
    for key, column in k.items():
        size = options[column].batch_size
        fit = options[column].energy_fit
        assert np.allclose(preds.energy_j[:, column], fit.predict_raw(tin, tout, size) / size), key
        assert np.allclose(preds.runtime_s[:, column], options[column].runtime_fit.predict_raw(tin, tout, size) / size)


# -- forming batches ---------------------------------------------------------------------------------------

def cuts_brute_force(option, tin, tout, share) -> float:
    """The least energy over every way to cut members (in this order) into consecutive batches
    of at most the option's batch size, each predicted by the plan's rule."""
    m = len(tin)
    best = math.inf
    for mask in range(2 ** (m - 1)):  # a cut after member i where bit i is set
        sizes, run = [], 1
        for i in range(m - 1):
            if mask >> i & 1:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        if max(sizes) > option.batch_size:
            continue
        predicted = predict_batches(option, tin, tout, np.array(sizes), share, share)
        best = min(best, float(predicted.energy_j.sum()))
    return best


def test_batches_hold_every_query_once_at_most_b_each_in_one_of_the_orders():
    options, _ = two_models()
    k = by_key(options)
    tin, tout = queries(43, seed=3)
    preds = predict(options, tin, tout)
    choice = np.where(np.arange(43) < 39, k["a@cpu×8"], k["b@cpu"])  # 39 queries batched by 8, 4 alone
    batches = form_batches(preds, choice)
    assert sorted(batches.members.tolist()) == list(range(43))  # every query exactly once
    assert np.array_equal(np.bincount(batches.batch_of), batches.size)
    on_a = batches.option == k["a@cpu×8"]
    assert batches.size[on_a].max() <= 8 and batches.size[on_a].sum() == 39
    assert (batches.size[on_a] < 8).any()  # 39 is no multiple of 8: some batch is smaller
    assert batches.size[~on_a].tolist() == [1, 1, 1, 1]
    assert batches.members[39:].tolist() == [39, 40, 41, 42]  # batch size 1: workload order
    members = batches.members[:39]
    orders = [np.flatnonzero(choice == k["a@cpu×8"])[o] for o in candidate_orders(tin[:39], tout[:39])]
    assert any(np.array_equal(members, order) for order in orders)  # cut from one candidate order
    longest_first = orders[0]
    assert [(-tout[q], -tin[q], q) for q in longest_first] == sorted((-tout[q], -tin[q], q) for q in longest_first)
    for b in range(len(batches)):
        inside = batches.members[batches.starts[b]:batches.starts[b + 1]]
        assert (batches.batch_of[inside] == b).all()
        assert batches.input_tokens[b] == tin[inside].max() and batches.output_tokens[b] == tout[inside].max()


@pytest.mark.parametrize("seed", range(4))
def test_the_cuts_are_the_cheapest_of_every_way_to_cut_the_order(seed):
    options, _ = two_models()
    option = options[by_key(options)["a@cpu×4"]]
    rng = np.random.default_rng(seed)
    tin = rng.integers(8, 300, 11)
    tout = np.sort(rng.lognormal(4, 1, 11).astype(int) + 1)[::-1]  # longest first, a long tail
    share = option.energy_fit.predict_raw(tin, tout, 4) / 4
    sizes, cost = best_cuts(option, tin, tout, share)
    assert sizes.sum() == 11 and sizes.max() <= 4
    assert cost == pytest.approx(cuts_brute_force(option, tin, tout, share), rel=1e-9)
    assert cost == pytest.approx(predict_batches(option, tin, tout, sizes, share, share).energy_j.sum(), rel=1e-9)


def test_a_long_answer_is_not_made_to_hold_up_a_full_batch():
    # One answer of 2,000 tokens among 7 of 10: a batch of 4 with it decodes 2,000 steps for
    # all four; alone it does so for itself only. The cut puts it alone, chunks of 4 would not.
    options, _ = two_models()
    option = options[by_key(options)["a@cpu×4"]]
    tin = np.full(8, 50)
    tout = np.array([2000] + [10] * 7)
    share = option.energy_fit.predict_raw(tin, tout, 4) / 4
    sizes, cost = best_cuts(option, tin, tout, share)
    assert sizes[0] == 1
    chunks = predict_batches(option, tin, tout, np.array([4, 4]), share, share).energy_j.sum()
    assert cost < chunks


def test_a_batch_is_predicted_at_its_longest_members_and_its_real_size():
    options, _ = two_models()
    option = options[by_key(options)["a@cpu×4"]]
    tin, tout = np.array([10, 200, 30]), np.array([100, 5, 40])
    share = option.energy_fit.predict_raw(tin, tout, 4) / 4
    predicted = predict_batches(option, tin, tout, np.array([3]), share, share * 0.01)
    # The longest answer (100) sets the decode steps, the longest prompt (200) the padding:
    # 2 + 0.01·3·200 + 1·100 + 0.1·3·100 = 138 J, runtime the same times 0.01.
    assert predicted.energy_j[0] == pytest.approx(138.0)
    assert predicted.runtime_s[0] == pytest.approx(1.38)
    # Each member's share is in proportion to its own per-request prediction; they add up.
    assert predicted.member_energy_j.sum() == pytest.approx(138.0)
    assert np.allclose(predicted.member_energy_j, 138.0 * share / share.sum())
    # More than the shares the assignment counted (each as if its batch-mates had its shape).
    assert predicted.energy_j[0] > share.sum()
    # llama.cpp pads nothing: each member's own prompt, the longest answer, the batch's size:
    # mean over members of 2 + 0.01·3·τin + 100 + 0.1·3·100 = 132 + 0.01·(10 + 200 + 30) = 134.4 J.
    ragged = replace(option, backend="llama.cpp")
    assert predict_batches(ragged, tin, tout, np.array([3]), share, share).energy_j[0] == pytest.approx(134.4)


def test_load_costs_count_once_per_model_and_device_whatever_the_batch_sizes():
    options, _ = two_models()
    from engine.planning.options import with_load_costs

    options = with_load_costs(options, {"a@cpu": (5.0, 100.0)})
    assert {o.load_energy_j for o in options if o.model == "a"} == {100.0}
    k = by_key(options)
    tin, tout = queries(6)
    preds = predict(options, tin, tout)
    choice = np.array([k["a@cpu×4"]] * 4 + [k["a@cpu"]] * 2)
    settings = PlanSettings(count_load=True)
    outcome = evaluate(preds, settings, allowed_options(preds, None), choice)
    assert outcome.energy_j == pytest.approx(outcome.batches.energy_j.sum() + 100.0)
    assert outcome.per_device_runtime_s["cpu"] == pytest.approx(outcome.batches.runtime_s.sum() + 5.0)
    result = make_plan(preds, settings, explain=False, compare=False)
    used = {o.model for o in options if o.key in result.assignments}
    assert result.energy_j == pytest.approx(result.schedule.predicted_energy_j.sum() + 100.0 * ("a" in used)
                                            + 0.0 * ("b" in used))


# -- the plan -------------------------------------------------------------------------------------------------

def brute_force_shares(preds, settings, allowed) -> float:
    """The least per-request-share energy over every assignment meeting the accuracy target and
    the deadlines counted in shares: the optimum of the assignment problem."""
    n, k = preds.energy_j.shape
    best = math.inf
    for choice in itertools.product(range(k), repeat=n):
        choice = np.array(choice)
        if not allowed[np.arange(n), choice].all():
            continue
        if settings.accuracy_target is not None and preds.accuracy[choice].mean() < settings.accuracy_target - 1e-9:
            continue
        if settings.deadline_s is not None and preds.runtime_s[np.arange(n), choice].sum() > settings.deadline_s:
            continue
        best = min(best, float(preds.energy_j[np.arange(n), choice].sum()))
    return best


def test_the_gap_is_that_of_the_assignment_and_the_energy_that_of_the_batches():
    options, _ = two_models(batch_sizes=(1, 4))
    tin, tout = queries(7, seed=5)
    preds = predict(options, tin, tout)
    settings = PlanSettings(accuracy_target=0.6)
    result = make_plan(preds, settings, explain=False)
    assert result.status == "optimal"
    optimum = brute_force_shares(preds, settings, result.allowed)
    # The bound is proven for the assignment problem (per-request shares)...
    assert result.lower_bound_j <= optimum * (1 + 1e-9)
    assert result.assignment_energy_j <= optimum * (1 + settings.gap_target) + 1e-9
    assert result.gap == pytest.approx((result.assignment_energy_j - result.lower_bound_j)
                                       / result.assignment_energy_j, abs=1e-12)
    # ...the energy is that of the batches as formed, and the difference is reported.
    schedule = result.schedule
    batch_energy = schedule.groupby("batch_id").predicted_energy_j.sum()
    assert result.energy_j == pytest.approx(batch_energy.sum())
    assert result.n_batches == schedule.batch_id.nunique() == sum(result.batches.values())
    assert result.formation_overhead_j == pytest.approx(result.energy_j - result.assignment_energy_j)
    assert result.formation_overhead_j > 0  # the 7 queries do not make whole batches of one shape
    document = result.to_json()
    for key in ("assignment_energy_j", "formation_overhead_j", "n_batches", "batches", "batch_sizes",
                "batching_saving"):
        assert key in document
    assert document["batch_sizes"] == {"a@cpu": [1, 4], "b@cpu": [1, 4]}


def test_deadlines_count_batch_runtimes_one_after_another():
    options, _ = two_models()
    tin, tout = queries(40, seed=1)
    preds = predict(options, tin, tout)
    result = make_plan(preds, PlanSettings(accuracy_target=0.6, deadline_s=60.0), explain=False, compare=False)
    assert result.has_schedule
    clock = 0.0
    for _, batch in result.schedule.groupby("batch_id", sort=True):
        assert (batch.device_start_s == batch.device_start_s.iloc[0]).all()  # one start per batch
        assert batch.device_start_s.iloc[0] == pytest.approx(clock)
        assert len(batch) == batch.batch_size.iloc[0]
        clock += batch.predicted_runtime_s.sum()  # the batch's runtime
    assert result.per_device_runtime_s["cpu"] == pytest.approx(clock)
    assert clock <= 60.0 * (1 + 1e-7)


def unconstrained(preds, settings: PlanSettings):
    """The plan's assignment and batches without deadlines: (shares on cpu, batches on cpu) in s."""
    formed = solve_and_form(preds, settings, allowed_options(preds, None))
    return formed.outcome.assignment_runtime_s["cpu"], formed.outcome.per_device_runtime_s["cpu"]


def test_a_deadline_broken_by_forming_batches_is_repaired_and_said():
    # The per-request shares of the cheapest batched assignment fit in the deadline; formed
    # into batches (each as long as its longest answer) they do not: the plan tightens the
    # deadline of its assignment until the batches fit, and says so.
    # Model b costs twice a's energy but runs four times faster: a deadline moves queries to b.
    fits = [batch_fit("a", "cpu", "energy", 1.0), batch_fit("a", "cpu", "runtime", 0.02),
            batch_fit("b", "cpu", "energy", 2.0), batch_fit("b", "cpu", "runtime", 0.005)]
    options, _ = options_from_fits(fits, {"a": entry("a", 0.5), "b": entry("b", 0.7)}, memory_rules=no_memory)
    tin, tout = queries(40, seed=2)
    preds = predict(options, tin, tout)
    shares_s, formed_s = unconstrained(preds, PlanSettings())
    assert shares_s < formed_s  # batches take longer than the shares
    deadline = (shares_s + formed_s) / 2  # the shares fit, the batches do not
    settings = PlanSettings(deadline_s=deadline)
    result = make_plan(preds, settings, explain=False, compare=False)
    assert result.has_schedule, result.diagnosis
    assert result.per_device_runtime_s["cpu"] <= deadline * (1 + 1e-7)
    assert any("Batches on cpu needed" in w for w in result.warnings)
    assert result.solver["solves"] > 1
    # The gap is that of the assignment problem solved: the shares on cpu held to a shorter
    # deadline, which the result names; against the problem as asked, the gap is larger.
    held = result.assignment_deadlines_s["cpu"]
    assert held < deadline
    assert result.gap == pytest.approx((result.assignment_energy_j - result.lower_bound_j)
                                       / result.assignment_energy_j, abs=1e-12)
    assert result.gap <= settings.gap_target
    assert result.assignment_energy_j <= solve(build_problem(preds, replace(settings, deadline_s=held),
                                                             result.allowed)).objective * (1 + settings.gap_target)
    as_asked = solve(build_problem(preds, settings, result.allowed))
    assert result.gap_as_asked == pytest.approx((result.assignment_energy_j - min(as_asked.lower_bound,
                                                 result.lower_bound_j)) / result.assignment_energy_j, rel=1e-6)
    assert result.gap_as_asked >= result.gap


def test_no_schedule_when_no_repair_meets_the_deadline_and_the_device_is_named():
    # Batch size 8 only: nothing to fall back on. Every query's share fits, barely, but every
    # batch runs as long as its longest member, so no formation of these queries fits.
    options, _ = two_models(batch_sizes=(8,))
    tin = np.full(20, 50)
    tout = np.array([10, 200] * 10)
    preds = predict(options, tin, tout)
    shares_s, formed_s = unconstrained(preds, PlanSettings())
    assert formed_s > shares_s * 1.2
    tight = shares_s * 1.0001
    result = make_plan(preds, PlanSettings(deadline_s=tight), explain=False, compare=False)
    assert result.status == "infeasible" and not result.has_schedule
    assert any("Formed into batches, the queries on cpu need" in line for line in result.diagnosis)
    assert result.best_achievable["deadline_s cpu"] > tight


def test_batching_saves_against_the_same_plan_at_batch_one():
    options, _ = two_models()
    tin, tout = queries(30, seed=6)
    preds = predict(options, tin, tout)
    settings = PlanSettings(accuracy_target=0.6)
    result = make_plan(preds, settings, explain=False)
    ones = preds.at_batch_size_one()
    assert [o.key for o in ones.options] == ["a@cpu", "b@cpu"]
    alone = make_plan(ones, settings, explain=False, compare=False)
    baseline = result.baselines[SAME_PLAN_AT_BATCH_ONE]
    assert baseline.energy_j == pytest.approx(alone.energy_j) and baseline.feasible
    assert result.batching_saving == pytest.approx(1 - result.energy_j / alone.energy_j)
    assert result.batching_saving > 0.3  # the shared per-step cost (1 J of 1.1 J per token) is split 16 ways
    # The batch-1 options need not be among those offered: they are built from the same fits.
    only_batched, _ = two_models(batch_sizes=(16,))
    again = make_plan(predict(only_batched, tin, tout), settings, explain=False)
    assert again.baselines[SAME_PLAN_AT_BATCH_ONE].energy_j == pytest.approx(alone.energy_j)


def test_the_best_single_option_at_its_best_batch_size_is_a_baseline():
    options, _ = two_models()
    tin, tout = queries(25, seed=7)
    preds = predict(options, tin, tout)
    result = make_plan(preds, PlanSettings(accuracy_target=0.6), explain=False)
    singles = {name: b for name, b in result.baselines.items() if name.startswith("only ")}
    assert len(singles) == len(options)  # every model on every device at every batch size
    meeting = {name: b for name, b in singles.items() if b.feasible}
    assert set(meeting) == {f"only b@cpu{s}" for s in ("", "×2", "×4", "×8", "×16")}  # a alone misses 0.6
    best_name = min(meeting, key=lambda name: meeting[name].energy_j)
    best = result.baselines[BEST_SINGLE_BATCHED]
    assert best.energy_j == meeting[best_name].energy_j and best.feasible
    assert best.note.startswith(best_name.removeprefix("only "))
    # Costed after forming its batches, as the plan is.
    k = by_key(options)[best_name.removeprefix("only ")]
    formed = form_batches(preds, np.full(25, k))
    assert best.energy_j == pytest.approx(formed.energy_j.sum())
    assert result.energy_j <= best.energy_j * (1 + 1e-9)


# -- memory -------------------------------------------------------------------------------------------------

def test_a_batch_that_would_not_fit_in_memory_is_not_offered():
    memory = ModelMemory(weights_bytes=1_000_000, kv_bytes_per_token=1_000, activation_bytes_per_token=100,
                         logits_bytes_per_request=1_000)
    # Free: the weights plus room for 4 × 300 tokens of KV (and the rest) with the margin.
    need_4x300 = estimate_batch_memory(memory, 4, 250, 50).total_bytes
    rule = BatchMemoryRule(model=memory, free_bytes=need_4x300, max_tokens_per_pass=None, source="test")
    assert rule.fits(4, np.array([250, 250, 10]), np.array([50, 51, 10])).tolist() == [True, False, True]
    assert rule.fits(16, np.array([250]), np.array([50])).tolist() == [False]
    options, _ = two_models()
    options = [o if o.batch_size == 1 else type(o)(**{**o.__dict__, "memory": rule}) for o in options]
    preds = predict(options, np.array([250, 10]), np.array([50, 10]))
    allowed = allowed_options(preds, None)
    k = by_key(options)
    assert allowed[0, k["a@cpu×4"]] and not allowed[0, k["a@cpu×8"]] and allowed[0, k["a@cpu"]]
    assert allowed[1, k["a@cpu×16"]]
    assert any("would not fit in the device's free memory" in w for w in preds.warnings)


def test_batches_are_cut_only_where_they_fit_in_memory():
    memory = ModelMemory(weights_bytes=1_000_000, kv_bytes_per_token=1_000, activation_bytes_per_token=100,
                         logits_bytes_per_request=1_000)
    rule = BatchMemoryRule(model=memory, free_bytes=estimate_batch_memory(memory, 2, 50, 10).total_bytes,
                           max_tokens_per_pass=None, source="test")
    options, _ = two_models()
    option = replace(options[by_key(options)["a@cpu×4"]], memory=rule)
    tin, tout = np.array([500, 50, 50]), np.array([10, 10, 10])
    share = option.energy_fit.predict_raw(tin, tout, 4) / 4
    unlimited, _ = best_cuts(replace(option, memory=None), tin, tout, share)
    assert unlimited.tolist() == [3]  # cheapest together...
    sizes, _ = best_cuts(option, tin, tout, share)
    assert sizes.tolist() == [1, 2]  # ...but only two short ones fit together, the long one alone


def test_the_memory_rule_reads_local_model_files_and_says_why_not_elsewhere(demo_models, tmp_path: Path):
    for demo in demo_models.values():
        rule, why = batch_memory_rule(demo.backend, demo.path, "cpu")
        assert rule is not None, why
        assert rule.model.weights_bytes > 0 and rule.model.kv_bytes_per_token > 0 and rule.free_bytes > 0
    assert batch_memory_rule("transformers", tmp_path / "missing", "cpu") == (None, "no model files here")
    assert batch_memory_rule("llama.cpp", next(iter(demo_models.values())).path, "a100-swing")[1] == \
        "a100-swing is not a device of this host"
    assert catalog_memory_rule(entry("x", 0.5), "cpu") == (None, "no model files here")


# -- schedules with batch ids -------------------------------------------------------------------------------------

@pytest.fixture
def batch_store(store: Store) -> Store:
    for name, accuracy in (("a", 0.5), ("b", 0.7)):
        catalog.add_model(store, name=name, accuracy=accuracy, backend="external")
    return store


def batched_result(n: int = 30):
    options, _ = two_models()
    tin, tout = queries(n, seed=8)
    return make_plan(predict(options, tin, tout), PlanSettings(accuracy_target=0.6), explain=False, compare=False)


def test_the_schedule_csv_carries_batch_ids_and_reads_back_the_same(batch_store: Store, tmp_path: Path):
    result = batched_result()
    assert result.schedule.batch_size.max() > 1
    plan_id = store_plan(batch_store, result, None)
    row, stored = load_plan(batch_store, plan_id)
    assert row["gap"] == pytest.approx(result.gap) and row["energy_j"] == pytest.approx(result.energy_j)
    assert row["params"]["assignment_energy_j"] == pytest.approx(result.assignment_energy_j)
    assert row["params"]["batches"] == result.batches
    text = schedule_csv(stored)
    header = text.splitlines()[0].split(",")
    assert header[8:11] == ["device_start_s", "batch_id", "batch_size"]
    path = tmp_path / "schedule.csv"
    path.write_text(text, encoding="utf-8")
    imported = import_schedule(batch_store, path, runnable_here=False)
    _, back = load_plan(batch_store, imported)
    columns = ["id", "model", "device", "batch_id", "batch_size"]
    mine = result.schedule[columns].sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, back[columns].sort_values("id").reset_index(drop=True), check_dtype=False)
    starts = back.groupby("batch_id").device_start_s.nunique()
    assert (starts == 1).all()
    assert pd.read_csv(io.StringIO(text)).batch_id.dtype.kind == "i"  # whole numbers, never 3.0


SCHEDULE_HEAD = "id,model,device,input_tokens,output_tokens,device_start_s,batch_id,batch_size\n"


@pytest.mark.parametrize("rows, line, message", [
    (["q1,a,cpu,10,5,0,1,2", "q2,a,cuda:0,10,5,0,1,2"], 3, "batch 1 has device cuda:0 here but cpu on line 2"),
    (["q1,a,cpu,10,5,0,1,2", "q2,b,cpu,10,5,0,1,2"], 3, "batch 1 has model b here but a on line 2"),
    (["q1,a,cpu,10,5,0,1,2", "q2,a,cpu,10,5,0,1,4"], 3, "batch 1 has batch_size 4 here but 2 on line 2"),
    (["q1,a,cpu,10,5,0,1,2", "q2,a,cpu,10,5,0,1,2", "q3,a,cpu,10,5,0,1,2"], 4,
     "batch 1 has more rows than its batch size 2 (from line 2)"),
    (["q1,a,cpu,10,5,0,1,2", "q2,a,cpu,10,5,3.5,1,2"], 3, "batch 1 has device_start_s 3.5 s here but 0.0 s on line 2"),
    (["q1,a,cpu,10,5,0,1,"], 2, "has a batch_id but no batch_size"),
    (["q1,a,cpu,10,5,0,x,2"], 2, "'x' is not a batch id"),
    (["q1,a,cpu,10,5,0,1,0"], 2, "0 is not allowed: a batch holds at least one request"),
    (["q1,a,cpu,10,5,0,1,300"], 2, "300 is more than the 256 requests"),
])
def test_inconsistent_batch_ids_are_refused_by_line_and_nothing_is_stored(batch_store: Store, tmp_path: Path,
                                                                         rows, line, message):
    path = tmp_path / "schedule.csv"
    path.write_text(SCHEDULE_HEAD + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        import_schedule(batch_store, path, runnable_here=False)
    found = [p for p in caught.value.problems if message in p.message]
    assert found and found[0].where == f"{path}:{line}", caught.value.problems
    assert batch_store.query_one("SELECT count(*) FROM plans")[0] == 0


def test_a_schedule_without_batch_columns_still_imports_each_query_alone(batch_store: Store, tmp_path: Path):
    path = tmp_path / "schedule.csv"
    path.write_text("id,model,device,input_tokens,output_tokens\nq1,a,cpu,10,5\nq2,b,cpu,12,6\n", encoding="utf-8")
    _, back = load_plan(batch_store, import_schedule(batch_store, path, runnable_here=False))
    assert back.batch_id.isna().all() and back.batch_size.isna().all()
    assert schedule_csv(back).splitlines()[1].split(",")[9:11] == ["", ""]  # empty batch cells


def test_trade_off_curves_form_batches_as_the_plan_does():
    options, _ = two_models()
    tin, tout = queries(60, seed=9)
    preds = predict(options, tin, tout)
    settings = PlanSettings(accuracy_target=0.5, deadline_s=20.0)
    allowed = allowed_options(preds, None)
    curve = pareto_curve(preds, settings, allowed, points=4)
    assert (curve.status == "optimal").any() and (curve.status == "infeasible").any()
    for point in curve.itertuples():
        if point.status in ("optimal", "feasible"):
            assert point.makespan_s <= 20.0 * (1 + 1e-7)  # the batches, not the shares, meet the deadline
            plan = make_plan(preds, replace(settings, accuracy_target=point.value), explain=False, compare=False)
            assert plan.energy_j == pytest.approx(point.energy_j)
        else:  # the shares would fit 0.567 in 20 s; the batches need 24 s
            assert math.isnan(point.energy_j)
