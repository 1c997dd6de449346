"""engine.planning.plan / options / service: schedules checked from scratch, constraints,
diagnosis, baselines, the ζ objective, settings and stored plans.

The solver itself is covered by test_planning_solver.py; here every expectation is derived either
by hand (crafted cases, the arithmetic is in the comments) or by brute force over every
assignment of a small instance, recomputed from the predictions alone.
"""

from __future__ import annotations

import io
import itertools
import json
import math

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog
from engine.catalog import CatalogEntry
from engine.errors import InputError
from engine.fitting import load_reference_profiles, published_catalog_rows, published_fits
from engine.planning import (
    SCHEDULE_COLUMNS,
    Baseline,
    ConstraintCost,
    PlanOption,
    PlanSettings,
    Predictions,
    allowed_options,
    evaluate,
    list_plans,
    load_plan,
    make_plan,
    options_from_fits,
    plan_workload,
    predict_options,
    schedule_csv,
    workload_from_frame,
    write_schedule,
)
from engine.store import Store

# Any real fit will do for the options' surfaces: the tests build the predictions directly.
_FITS = {f.target: f for f in published_fits() if f.model == "llama-2-7b"}


def option(model: str, device: str, accuracy: float, load_s: float = 0.0, load_energy_j: float = 0.0,
           context_tokens: int | None = None) -> PlanOption:
    return PlanOption(model, device, accuracy, _FITS["energy"], _FITS["runtime"], load_s, load_energy_j,
                      context_tokens)


def predictions(options: list[PlanOption], energy, runtime, input_tokens=None, output_tokens=None) -> Predictions:
    """Predictions given as (N, K) arrays; τin (N, K) or (N,), τout (N,)."""
    energy = np.asarray(energy, dtype=float)
    n, k = energy.shape
    runtime = np.broadcast_to(np.asarray(runtime, dtype=float), (n, k)).copy()
    tin = np.full((n, k), 10) if input_tokens is None else np.asarray(input_tokens)
    if tin.ndim == 1:
        tin = np.repeat(tin[:, None], k, axis=1)
    tout = np.full(n, 10) if output_tokens is None else np.asarray(output_tokens)
    return Predictions(options, tin.astype(np.int64), tout.astype(np.int64), energy, runtime,
                       np.ones((n, k), dtype=bool), np.zeros((n, k), dtype=bool))


def read_schedule(result) -> pd.DataFrame:
    """The schedule as a user gets it: through the CSV text."""
    return pd.read_csv(io.StringIO(schedule_csv(result.schedule)), dtype={"id": str})


def choice_of(schedule: pd.DataFrame, preds: Predictions, query_ids: list[str]) -> np.ndarray:
    """Option index per query (in workload order), from a schedule's model and device columns."""
    index = {(o.model, o.device): k for k, o in enumerate(preds.options)}
    by_id = {row.id: index[(row.model, row.device)] for row in schedule.itertuples()}
    return np.array([by_id[q] for q in query_ids])


# -- brute force over every assignment of a small instance ---------------------------------------

def brute_force(preds: Predictions, settings: PlanSettings, min_accuracy: np.ndarray) -> tuple[float, np.ndarray]:
    """Least energy (loads included when counted) over every assignment meeting every target,
    and the best choice; recomputed here from the arrays alone."""
    n, k = preds.energy_j.shape
    choices = np.array(list(itertools.product(range(k), repeat=n)))  # (M, n)
    rows = np.arange(n)[None, :]
    accuracy = preds.accuracy
    energy = preds.energy_j[rows, choices].sum(axis=1)
    feasible = np.ones(len(choices), dtype=bool)
    floors = np.nan_to_num(min_accuracy, nan=-1.0)
    feasible &= (accuracy[choices] >= floors[None, :] - 1e-12).all(axis=1)
    used = np.zeros((len(choices), k), dtype=bool)
    for column in range(k):
        used[:, column] = (choices == column).any(axis=1)
    if settings.count_load:
        energy = energy + used @ np.array([o.load_energy_j for o in preds.options])
    if settings.accuracy_target is not None:
        if settings.accuracy_mode == "token":
            weights = (preds.input_tokens + preds.output_tokens[:, None])[rows, choices].astype(float)
        else:
            weights = np.ones(choices.shape)
        mean = (accuracy[choices] * weights).sum(axis=1) / weights.sum(axis=1)
        feasible &= mean >= settings.accuracy_target - 1e-9
    for device in preds.devices:
        limit = settings.device_deadline(device)
        if limit is None:
            continue
        on_device = np.array([o.device == device for o in preds.options])
        busy = np.where(on_device[choices], preds.runtime_s[rows, choices], 0.0).sum(axis=1)
        if settings.count_load:
            busy = busy + used @ np.where(on_device, [o.load_s for o in preds.options], 0.0)
        feasible &= busy <= limit * (1 + 1e-9)
    if not feasible.any():
        return math.inf, np.array([])
    best = int(np.argmin(np.where(feasible, energy, np.inf)))
    return float(energy[best]), choices[best]


def random_instance(seed: int):
    """A small instance whose targets a random reference assignment just meets (so it is feasible,
    and the targets bite).

    Models have their own tokenizers (τin differs per model), two devices, some queries
    with a minimum accuracy, and load costs on every other seed.
    """
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 5))
    n = 7 if k == 3 else 6
    count_load = bool(seed % 2)
    accuracy = np.round(rng.uniform(0.40, 0.75, k), 3)
    opts = [option(f"m{j}", f"dev{j % 2}", float(accuracy[j]),
                   load_s=float(np.round(rng.uniform(0.5, 3), 2)) if count_load else 0.0,
                   load_energy_j=float(np.round(rng.uniform(10, 200), 2)) if count_load else 0.0)
            for j in range(k)]
    base_in = rng.integers(8, 512, n)
    tokenizer = rng.uniform(0.8, 1.25, k)
    tin = np.maximum(1, np.round(base_in[:, None] * tokenizer[None, :])).astype(np.int64)
    tout = rng.integers(8, 256, n)
    size = rng.uniform(1, 10, k)
    energy = np.round((0.3 * tin + 2.0 * tout[:, None]) * size[None, :] * rng.uniform(0.8, 1.2, (n, k)), 2)
    runtime = np.round((1e-3 * tin + 0.03 * tout[:, None]) * np.sqrt(size)[None, :], 2) + 0.01
    preds = predictions(opts, energy, runtime, tin, tout)
    min_accuracy = np.full(n, np.nan)
    floors = rng.random(n) < 0.3
    min_accuracy[floors] = accuracy[rng.integers(0, k, int(floors.sum()))]
    mode = "token" if seed % 3 == 0 else "query"
    allowed = allowed_options(preds, min_accuracy)
    reference = np.array([rng.choice(np.flatnonzero(row)) for row in allowed])
    loose = PlanSettings(accuracy_mode=mode, count_load=count_load)
    outcome = evaluate(preds, loose, allowed, reference)
    settings = PlanSettings(
        accuracy_target=math.floor(outcome.accuracy * 1e4) / 1e4, accuracy_mode=mode,
        deadlines_s={d: max(s, 0.05) * (1 + 1e-6) for d, s in outcome.per_device_runtime_s.items()},
        count_load=count_load)
    return preds, settings, min_accuracy


@pytest.mark.parametrize("seed", range(8))
def test_every_returned_schedule_is_feasible_and_optimal_recomputed_from_scratch(seed):
    preds, settings, min_accuracy = random_instance(seed)
    n = len(preds.output_tokens)
    query_ids = [f"q{i}" for i in range(n)]
    result = make_plan(preds, settings, query_ids=np.array(query_ids, dtype=object), min_accuracy=min_accuracy,
                       explain=False)
    assert result.status == "optimal", result.diagnosis
    schedule = read_schedule(result)
    assert list(schedule.columns[:len(SCHEDULE_COLUMNS)]) == list(SCHEDULE_COLUMNS)

    # Every query exactly once.
    assert sorted(schedule.id) == sorted(query_ids) and len(schedule) == n
    # Per-query minimum accuracy.
    floor = dict(zip(query_ids, min_accuracy))
    for row in schedule.itertuples():
        assert not row.accuracy < floor[row.id] - 1e-12, (row.id, row.accuracy, floor[row.id])
    # The accuracy target, recomputed from the CSV columns in the plan's mode.
    if settings.accuracy_mode == "token":
        weights = schedule.input_tokens + schedule.output_tokens
    else:
        weights = pd.Series(1.0, index=schedule.index)
    mean = float((schedule.accuracy * weights).sum() / weights.sum())
    assert mean >= settings.accuracy_target - 1e-9
    assert result.accuracy == pytest.approx(mean, abs=1e-9)

    # Deadlines, energy and start times, device by device in schedule order.
    load = {(o.model, o.device): (o.load_s, o.load_energy_j) for o in preds.options}
    loads_energy = 0.0
    for device, rows in schedule.groupby("device", sort=False):
        blocks = (rows.model != rows.model.shift()).cumsum()
        assert blocks.max() == rows.model.nunique(), "each model runs in one block per device (loaded once)"
        clock = 0.0
        previous = None
        for row in rows.itertuples():
            if row.model != previous and settings.count_load:
                clock += load[(row.model, device)][0]
                loads_energy += load[(row.model, device)][1]
            previous = row.model
            assert row.device_start_s == pytest.approx(clock, abs=1e-6)
            clock += row.predicted_runtime_s
        assert clock <= settings.device_deadline(device) * (1 + 1e-9)
        assert result.per_device_runtime_s[device] == pytest.approx(clock, abs=1e-6)
    assert result.energy_j == pytest.approx(schedule.predicted_energy_j.sum() + loads_energy, abs=1e-6)
    choice = choice_of(schedule, preds, query_ids)
    assert result.energy_j == pytest.approx(evaluate(preds, settings, result.allowed, choice).energy_j, rel=1e-12)
    assert result.assignments == {o.key: int((choice == k).sum()) for k, o in enumerate(preds.options)
                                  if (choice == k).any()}

    # Optimal within the proven gap, against every assignment enumerated.
    best, _ = brute_force(preds, settings, min_accuracy)
    assert best <= result.energy_j + 1e-9
    assert result.energy_j <= best * (1 + settings.gap_target) + 1e-9
    assert result.lower_bound_j <= best * (1 + 1e-9)
    assert result.gap == pytest.approx((result.energy_j - result.lower_bound_j) / result.energy_j, abs=1e-12)


# -- token- vs query-weighted accuracy ---------------------------------------------------------------

def test_token_and_query_weighting_choose_different_assignments():
    # One long query (τin 900 + τout 100 = 1000 tokens) and one short (90 + 10 = 100 tokens).
    # Model a: accuracy 0.4, 1 J per token; model b: accuracy 0.8, 3 J per token. Target 0.55.
    #   query mode: (a, a) has 0.4 < 0.55; long→a, short→b has (0.4 + 0.8) / 2 = 0.6, energy
    #     1000 + 300 = 1300 J; long→b, short→a costs 3000 + 100 = 3100 J; (b, b) 3300 J.
    #     Optimum: long→a, short→b.
    #   token mode: long→a, short→b has (0.4·1000 + 0.8·100) / 1100 = 0.436 < 0.55; long→b,
    #     short→a has (0.8·1000 + 0.4·100) / 1100 = 0.764, energy 3100 J; (b, b) 3300 J.
    #     Optimum: long→b, short→a.
    opts = [option("a", "gpu", 0.4), option("b", "gpu", 0.8)]
    tin, tout = np.array([900, 90]), np.array([100, 10])
    tokens = (tin + tout).astype(float)
    preds = predictions(opts, np.column_stack([tokens * 1.0, tokens * 3.0]), 1.0, tin, tout)
    ids = np.array(["long", "short"], dtype=object)
    by_query = make_plan(preds, PlanSettings(accuracy_target=0.55, accuracy_mode="query"), query_ids=ids)
    by_token = make_plan(preds, PlanSettings(accuracy_target=0.55, accuracy_mode="token"), query_ids=ids)

    def models(result) -> dict[str, str]:
        return dict(zip(result.schedule.id, result.schedule.model))

    assert models(by_query) == {"long": "a", "short": "b"}
    assert by_query.energy_j == pytest.approx(1300.0)
    assert by_query.accuracy == pytest.approx(0.6)
    assert models(by_token) == {"long": "b", "short": "a"}
    assert by_token.energy_j == pytest.approx(3100.0)
    assert by_token.accuracy == pytest.approx(840 / 1100)


# -- each constraint binding ---------------------------------------------------------------------------

def test_accuracy_target_binds_and_one_more_point_costs_energy():
    # Ten identical queries; a: 0.4 at 1 J, b: 0.8 at 3 J. Target 0.6 needs half on b:
    # 5·1 + 5·3 = 20 J, accuracy exactly 0.6 (binding). Target 0.61 needs 0.4 + 0.4·f ≥ 0.61,
    # f ≥ 0.525, so 6 on b: 4 + 18 = 22 J, 2 J more.
    opts = [option("a", "gpu", 0.4), option("b", "gpu", 0.8)]
    preds = predictions(opts, np.tile([1.0, 3.0], (10, 1)), 1.0)
    result = make_plan(preds, PlanSettings(accuracy_target=0.6))
    assert result.energy_j == pytest.approx(20.0)
    assert result.assignments == {"a@gpu": 5, "b@gpu": 5}
    cost = next(c for c in result.constraint_costs if c.constraint == "accuracy")
    assert cost.binding is True
    assert cost.delta_energy_j == pytest.approx(2.0)

    loose = make_plan(preds, PlanSettings(accuracy_target=0.3))
    cost = next(c for c in loose.constraint_costs if c.constraint == "accuracy")
    assert loose.energy_j == pytest.approx(10.0) and cost.binding is False


def test_device_deadline_binds_and_more_time_saves_energy():
    # Twenty identical queries, one model on two devices: slow (10 s, 1 J) and fast (1 s, 5 J).
    # slow's deadline 100 s holds 10 queries: 10·1 + 10·5 = 60 J. 10% more (110 s) holds 11:
    # 11 + 45 = 56 J, a saving of 4 J. fast's deadline (1000 s) is not binding.
    opts = [option("m", "slow", 0.5), option("m", "fast", 0.5)]
    preds = predictions(opts, np.tile([1.0, 5.0], (20, 1)), np.tile([10.0, 1.0], (20, 1)))
    result = make_plan(preds, PlanSettings(deadline_s=1000.0, deadlines_s={"slow": 100.0}))
    assert result.energy_j == pytest.approx(60.0)
    assert result.per_device_runtime_s == pytest.approx({"slow": 100.0, "fast": 10.0})
    costs = {c.constraint: c for c in result.constraint_costs}
    assert costs["deadline slow"].binding is True
    assert costs["deadline slow"].delta_energy_j == pytest.approx(-4.0)
    assert costs["deadline fast"].binding is False


def test_min_share_forces_a_model_to_take_its_share():
    # b costs 3 J against a's 1 J and nothing else asks for it: without a share b gets no
    # query; a share of 0.25 of 10 queries is at least 2.5 queries, so exactly 3 (the fewest).
    opts = [option("a", "gpu", 0.5), option("b", "gpu", 0.5)]
    preds = predictions(opts, np.tile([1.0, 3.0], (10, 1)), 1.0)
    assert make_plan(preds, PlanSettings(), explain=False).assignments == {"a@gpu": 10}
    result = make_plan(preds, PlanSettings(min_share={"b": 0.25}), explain=False)
    assert result.assignments == {"a@gpu": 7, "b@gpu": 3}
    assert result.energy_j == pytest.approx(7 * 1.0 + 3 * 3.0)


def test_unknown_share_model_or_deadline_device_is_refused():
    preds = predictions([option("a", "gpu", 0.5)], np.ones((2, 1)), 1.0)
    with pytest.raises(InputError) as caught:
        make_plan(preds, PlanSettings(min_share={"ghost": 0.1}, deadlines_s={"tpu": 5.0}))
    text = str(caught.value)
    assert "'ghost'" in text and "'tpu'" in text


# -- load costs --------------------------------------------------------------------------------------

def test_load_costs_count_once_per_used_option_and_shift_start_times():
    # Eight queries, deadline 12 s on each device.
    #   a@dev0: 1 J, 2 s per query; load 4 s, 100 J.   b@dev1: 3 J, 2 s; load 2 s, 10 J.
    # dev0 holds 4 + 2·na ≤ 12 → na ≤ 4; dev1 holds 2 + 2·nb ≤ 12 → nb ≤ 5; so both are used.
    # na = 4, nb = 4: 4 + 12 + 110 = 126 J; na = 3, nb = 5: 3 + 15 + 110 = 128 J. Optimum 126 J.
    # (Without the load times on the deadlines, dev0 could take 6 queries.)
    opts = [option("a", "dev0", 0.5, load_s=4.0, load_energy_j=100.0),
            option("b", "dev1", 0.5, load_s=2.0, load_energy_j=10.0)]
    preds = predictions(opts, np.tile([1.0, 3.0], (8, 1)), 2.0)
    result = make_plan(preds, PlanSettings(deadline_s=12.0, count_load=True))
    assert result.assignments == {"a@dev0": 4, "b@dev1": 4}
    assert result.energy_j == pytest.approx(126.0)
    assert result.energy_j == pytest.approx(result.schedule.predicted_energy_j.sum() + 110.0)
    starts = result.schedule.groupby("device").device_start_s.apply(list).to_dict()
    assert starts == {"dev0": [4.0, 6.0, 8.0, 10.0], "dev1": [2.0, 4.0, 6.0, 8.0]}
    assert result.per_device_runtime_s == pytest.approx({"dev0": 12.0, "dev1": 10.0})
    # The baselines count the loads too: every query on b would be 8·3 + 10 J (but needs 18 s).
    only_b = result.baselines["only b@dev1"]
    assert only_b.energy_j == pytest.approx(34.0) and only_b.feasible is False


def test_an_unused_option_pays_no_load():
    # a and b cost the same per query (1 J, 1 s); loading a costs 50 J, loading b 5 J. The
    # optimum runs all four queries on b: 4·1 + 5 = 9 J, never paying a's 50 J. Each start
    # is after b's 1 s load: 1, 2, 3, 4 s.
    opts = [option("a", "gpu", 0.5, load_s=1.0, load_energy_j=50.0),
            option("b", "gpu", 0.5, load_s=1.0, load_energy_j=5.0)]
    preds = predictions(opts, np.ones((4, 2)), 1.0)
    result = make_plan(preds, PlanSettings(accuracy_target=0.5, count_load=True), explain=False)
    assert result.assignments == {"b@gpu": 4}
    assert result.energy_j == pytest.approx(9.0)
    assert list(result.schedule.device_start_s) == pytest.approx([1.0, 2.0, 3.0, 4.0])


# -- infeasibility diagnosis -------------------------------------------------------------------------

def test_accuracy_target_above_the_best_model_is_named_with_the_best_achievable():
    opts = [option("a", "gpu", 0.41), option("b", "gpu", 0.73), option("c", "cpu", 0.62)]
    preds = predictions(opts, np.ones((5, 3)), 1.0)
    for mode in ("query", "token"):
        result = make_plan(preds, PlanSettings(accuracy_target=0.9, accuracy_mode=mode))
        assert result.status == "infeasible" and not result.has_schedule and result.schedule is None
        text = " ".join(result.diagnosis)
        assert "accuracy target 0.900" in text and "0.730" in text
        assert result.best_achievable["accuracy"] == pytest.approx(0.73)  # every query on b


def test_deadlines_impossible_even_ignoring_accuracy_give_the_deadlines_needed():
    # Five queries; a@dev0 takes 2 s each, b@dev1 3 s each. A common deadline T needs
    # 2·na ≤ T and 3·nb ≤ T with na + nb = 5: (3, 2) gives T = 6 s, (4, 1) 8 s, (2, 3) 9 s.
    # So the deadline of 1 s must grow to 6 s on both devices.
    opts = [option("a", "dev0", 0.5), option("b", "dev1", 0.7)]
    preds = predictions(opts, np.tile([1.0, 2.0], (5, 1)), np.tile([2.0, 3.0], (5, 1)))
    result = make_plan(preds, PlanSettings(accuracy_target=0.5, deadline_s=1.0))
    assert result.status == "infeasible"
    assert "cannot be met even ignoring accuracy" in " ".join(result.diagnosis)
    needed = {key.removeprefix("deadline_s "): value for key, value in result.best_achievable.items()}
    assert set(needed) == {"dev0", "dev1"}
    for seconds in needed.values():
        assert 6.0 * (1 - 1e-9) <= seconds <= 6.0 * 1.01
    again = make_plan(preds, PlanSettings(accuracy_target=0.5, deadlines_s=needed), explain=False)
    assert again.status == "optimal"
    assert max(again.per_device_runtime_s.values()) <= 6.0 + 1e-9


def test_deadlines_that_cap_accuracy_report_the_most_accurate_schedule_in_time():
    # Four queries; a@dev0 (0.4) takes 1 s, b@dev1 (0.8) takes 4 s; deadline 5 s on each.
    # dev1 fits one query of b, so the best reachable is (3·0.4 + 0.8) / 4 = 0.5 < 0.6.
    opts = [option("a", "dev0", 0.4), option("b", "dev1", 0.8)]
    preds = predictions(opts, np.tile([1.0, 2.0], (4, 1)), np.tile([1.0, 4.0], (4, 1)))
    result = make_plan(preds, PlanSettings(accuracy_target=0.6, deadline_s=5.0))
    assert result.status == "infeasible"
    assert result.best_achievable["accuracy"] == pytest.approx(0.5)
    text = " ".join(result.diagnosis)
    assert "accuracy target 0.600" in text and "0.500" in text
    # Reaching 0.6 needs two queries on b (8 s on dev1): deadlines × 1.6.
    assert result.best_achievable["deadline_s dev1"] == pytest.approx(8.0, rel=1e-2)


def test_a_query_asking_more_than_every_model_is_named():
    opts = [option("a", "gpu", 0.5), option("b", "gpu", 0.6)]
    preds = predictions(opts, np.ones((3, 2)), 1.0)
    result = make_plan(preds, PlanSettings(), query_ids=np.array(["x1", "x2", "x3"], dtype=object),
                       min_accuracy=np.array([np.nan, 0.95, 0.6]))
    assert result.status == "no_option"
    text = " ".join(result.diagnosis)
    assert "x2" in text and "x1" not in text and "x3" not in text
    assert result.best_achievable["min_accuracy"] == pytest.approx(0.6)


def test_no_options_is_nothing_to_plan_with():
    with pytest.raises(InputError, match="nothing to plan with"):
        predict_options([], {}, np.zeros(0))


# -- context length ------------------------------------------------------------------------------------

def test_an_option_whose_context_cannot_hold_the_query_is_not_offered():
    # a (4,096-token context) is cheap; b (context unknown: no files here) is dear. The short
    # query (100 + 50) goes to a; the 130,000-token prompt cannot run on a, so it goes to b,
    # and τin + τout = 4,096 exactly still fits a.
    opts = [option("a", "gpu", 0.5, context_tokens=4096), option("b", "gpu", 0.5)]
    tin, tout = np.array([100, 130_000, 4000]), np.array([50, 100, 96])
    preds = predictions(opts, np.tile([1.0, 9.0], (3, 1)), 1.0, tin, tout)
    result = make_plan(preds, PlanSettings(), query_ids=np.array(["short", "long", "edge"], dtype=object),
                       explain=False)
    assert result.status == "optimal"
    assert dict(zip(result.schedule.id, result.schedule.model)) == {"short": "a", "long": "b", "edge": "a"}
    assert result.energy_j == pytest.approx(1.0 + 9.0 + 1.0)
    assert result.allowed.tolist() == [[True, True], [False, True], [True, True]]
    # A baseline that sends the long query to a breaks the context: it is not feasible.
    assert result.baselines["only a@gpu"].feasible is False and result.baselines["only b@gpu"].feasible is True


def test_a_query_no_option_can_hold_is_named_in_the_diagnosis():
    opts = [option("a", "gpu", 0.5, context_tokens=4096), option("b", "cpu", 0.7, context_tokens=8192)]
    tin, tout = np.array([100, 130_000, 200]), np.array([50, 100, 20])
    preds = predictions(opts, np.ones((3, 2)), 1.0, tin, tout)
    result = make_plan(preds, PlanSettings(accuracy_target=0.5), query_ids=np.array(["q1", "q2", "q3"], dtype=object),
                       min_accuracy=np.array([np.nan, np.nan, 0.9]))
    assert result.status == "no_option" and not result.has_schedule
    text = " ".join(result.diagnosis)
    assert "1 query (q2: 130,100 tokens) is longer than the context of every option" in text
    assert "8,192 tokens" in text and "q1" not in text
    # q3 fits, but asks for more accuracy than any model: named for that, separately.
    assert "1 query (q3) asks for a minimum accuracy" in text and "0.700" in text
    assert result.best_achievable == {"context_tokens": 8192.0, "min_accuracy": 0.7}


def test_a_query_too_demanding_for_the_models_that_can_hold_it_says_so():
    # q1 fits only a (0.5); b (0.9) would meet its floor of 0.8 but cannot hold it.
    opts = [option("a", "gpu", 0.5, context_tokens=100_000), option("b", "gpu", 0.9, context_tokens=4096)]
    preds = predictions(opts, np.ones((1, 2)), 1.0, np.array([50_000]), np.array([100]))
    result = make_plan(preds, PlanSettings(), query_ids=np.array(["q1"], dtype=object), min_accuracy=np.array([0.8]))
    assert result.status == "no_option"
    assert "above every available model that can hold it (the best is 0.500)" in " ".join(result.diagnosis)
    assert result.best_achievable == {"min_accuracy": 0.5}


def test_a_clamped_prediction_is_waived_only_among_options_that_hold_the_query():
    # b's prediction is clamped; a cannot hold the query. b stays (flagged), since it is the
    # only option that can run it; before, a counted as "another option" and b was dropped.
    opts = [option("a", "gpu", 0.5, context_tokens=10), option("b", "gpu", 0.5)]
    preds = predictions(opts, [[5.0, 0.0]], 1.0, np.array([100]), np.array([10]))
    preds.clamped[:] = [[False, True]]
    assert allowed_options(preds, None).tolist() == [[False, True]]


def write_gguf(path: Path, context_length: int) -> Path:
    """A tiny GGUF model file whose header says it was trained for ``context_length`` tokens."""
    from engine.demo_models import CORPUS_PATH, LlamaDims, random_llama_tensors, train_tokenizer, write_llama_gguf

    dims = LlamaDims(16, 1, 2, 2, 32, context_length=context_length)
    tokenizer = train_tokenizer(CORPUS_PATH, 300)
    write_llama_gguf(path, tokenizer, dims, random_llama_tensors(dims, tokenizer.get_vocab_size(), seed=1, std=0.02),
                     "ctx")
    return path


def test_the_context_is_what_the_backend_will_use(tmp_path: Path):
    # llama.cpp runs with n_ctx = min(trained context, DEFAULT_MAX_CONTEXT) unless n_ctx is set;
    # transformers with config.json's max_position_embeddings; external models have none known.
    from engine.backends.llamacpp import DEFAULT_MAX_CONTEXT

    long_gguf = write_gguf(tmp_path / "long.gguf", DEFAULT_MAX_CONTEXT * 8)
    short_gguf = write_gguf(tmp_path / "short.gguf", 512)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    entries = {
        "long": CatalogEntry("long", "llama.cpp", 0.5, "test", str(long_gguf)),
        "short": CatalogEntry("short", "llama.cpp", 0.5, "test", str(short_gguf)),
        "hf": CatalogEntry("hf", "transformers", 0.5, "test", str(hf)),
        "ext": CatalogEntry("ext", "external", 0.5, "test"),
        "gone": CatalogEntry("gone", "llama.cpp", 0.5, "test", str(tmp_path / "missing.gguf")),
    }
    assert catalog.model_context_length(entries["long"]) == DEFAULT_MAX_CONTEXT * 8  # what it was trained for
    assert catalog.runtime_context_length(entries["long"]) == DEFAULT_MAX_CONTEXT  # what it runs with here
    assert catalog.runtime_context_length(entries["long"], n_ctx=16_384) == 16_384
    fits = [replace(f, model=name) for name in entries for f in _FITS.values()]
    options, _ = options_from_fits(fits, entries)
    contexts = {o.model: o.context_tokens for o in options}
    assert contexts == {"long": DEFAULT_MAX_CONTEXT, "short": 512, "hf": 1024, "ext": None, "gone": None}


def test_planning_keeps_a_long_prompt_off_a_short_context_model(store: Store, demo_models):
    # The reported case: a 130,000-token prompt planned "optimal" on a 4,096-token model, then
    # failing in execution. demo-large (llama.cpp, 4,096 tokens here) is the only option.
    catalog.register_demo_models(store, list(demo_models.values()))
    from engine.fitting import save_fits

    save_fits(store, [replace(f, model="demo-large", device="cpu") for f in _FITS.values()])
    frame = pd.DataFrame({"id": ["ok", "huge"], "input_tokens": [500, 130_000], "output_tokens": [100, 100]})
    result = plan_workload(store, workload_from_frame(frame, "long"), PlanSettings(), explain=False)
    assert result.status == "no_option" and result.schedule is None
    assert "1 query (huge: 130,100 tokens) is longer than the context of every option (the largest holds 4,096 " \
           "tokens" in " ".join(result.diagnosis)
    assert load_plan(store, result.plan_id)[1].empty  # stored as a plan without a schedule

    # With a published model (no files here: context unknown) beside it, the prompt goes there.
    load_reference_profiles(store)
    both = ["demo-large@cpu", "llama-2-7b@a100-swing"]
    result = plan_workload(store, workload_from_frame(frame, "long"), PlanSettings(), only=both, explain=False)
    assert result.status == "optimal"
    assert dict(zip(result.schedule.id, result.schedule.model))["huge"] == "llama-2-7b"
    assert any("1 query is longer (input + output tokens) than the context of demo-large@cpu (4,096 tokens)" in w
               for w in result.warnings)
    assert any("context length of llama-2-7b is unknown" in w for w in result.warnings)


# -- baselines ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 4])
def test_baselines_are_named_recomputable_and_never_beat_the_plan(seed):
    preds, settings, min_accuracy = random_instance(seed)
    result = make_plan(preds, settings, min_accuracy=min_accuracy, explain=False)
    assert result.status == "optimal"
    names = {f"only {o.key}" for o in preds.options} | {"round-robin", "random", "greedy cheapest-first"}
    assert set(result.baselines) == names
    for name, baseline in result.baselines.items():
        assert {"energy_j", "accuracy", "makespan_s", "feasible"} <= set(baseline.to_json())
        if baseline.feasible:
            assert result.energy_j <= baseline.energy_j * (1 + 1e-9), name
    # The targets above are tight enough that no baseline meets them, so check it where they do:
    # without the target and deadlines, every baseline that keeps to each query's options is feasible.
    loose = make_plan(preds, replace(settings, accuracy_target=None, deadlines_s={}), min_accuracy=min_accuracy,
                      explain=False)
    feasible = {name for name, baseline in loose.baselines.items() if baseline.feasible}
    assert {"round-robin", "random", "greedy cheapest-first"} <= feasible
    for name in feasible:
        assert loose.energy_j <= loose.baselines[name].energy_j * (1 + 1e-9), name
    # Round-robin: query i takes the (i mod |pool|)-th option it may use.
    allowed = allowed_options(preds, min_accuracy)
    n = len(preds.output_tokens)
    choice = np.array([np.flatnonzero(allowed[i])[i % allowed[i].sum()] for i in range(n)])
    energy = preds.energy_j[np.arange(n), choice].sum()
    if settings.count_load:
        energy += sum(preds.options[k].load_energy_j for k in set(choice.tolist()))
    assert result.baselines["round-robin"].energy_j == pytest.approx(energy, rel=1e-12)
    # Every query on one option: its column's sum.
    for k, o in enumerate(preds.options):
        expected = preds.energy_j[:, k].sum() + (o.load_energy_j if settings.count_load else 0.0)
        assert result.baselines[f"only {o.key}"].energy_j == pytest.approx(expected, rel=1e-12)


def test_greedy_without_deadlines_is_each_querys_cheapest_allowed_option():
    rng = np.random.default_rng(3)
    opts = [option("a", "gpu", 0.4), option("b", "gpu", 0.6), option("c", "cpu", 0.8)]
    energy = rng.uniform(1, 10, (12, 3))
    preds = predictions(opts, energy, 1.0)
    floor = np.where(rng.random(12) < 0.5, 0.6, np.nan)  # half may not use a
    result = make_plan(preds, PlanSettings(), min_accuracy=floor, explain=False)
    cheapest = np.where(allowed_options(preds, floor), energy, np.inf).min(axis=1).sum()
    assert result.baselines["greedy cheapest-first"].energy_j == pytest.approx(cheapest)
    assert result.energy_j == pytest.approx(cheapest, rel=1e-3)  # no targets: the plan is the same


# -- the ζ objective ------------------------------------------------------------------------------------

def zeta_instance():
    # Models with their own tokenizers: token credit A_K·(τin_K + τout) can favour a less
    # accurate model that counts more tokens, which is what ζ = 0 must maximise.
    rng = np.random.default_rng(11)
    n = 15
    opts = [option("a", "gpu", 0.45), option("b", "gpu", 0.6), option("c", "cpu", 0.7)]
    tin = rng.integers(20, 400, (n, 3))
    tout = rng.integers(10, 200, n)
    energy = rng.uniform(1, 100, (n, 3))
    return predictions(opts, energy, 1.0, tin, tout), tin, tout, energy


def test_zeta_one_is_the_least_energy_schedule():
    preds, _, _, energy = zeta_instance()
    result = make_plan(preds, PlanSettings(objective="zeta", zeta=1.0), explain=False)
    assert result.has_schedule
    assert result.energy_j == pytest.approx(energy.min(axis=1).sum(), rel=2e-3)
    assert result.energy_j >= energy.min(axis=1).sum() - 1e-9


def test_zeta_zero_is_the_most_token_accurate_schedule():
    preds, tin, tout, _ = zeta_instance()
    credit = np.array([0.45, 0.6, 0.7])[None, :] * (tin + tout[:, None])
    expected = credit.argmax(axis=1)
    assert len(set(expected)) > 1  # the instance does exercise the per-model τin
    result = make_plan(preds, PlanSettings(objective="zeta", zeta=0.0), explain=False)
    ids = [str(i + 1) for i in range(len(tout))]
    assert list(choice_of(result.schedule, preds, ids)) == list(expected)


def test_zeta_one_with_load_costs_is_the_least_energy_schedule_loads_included():
    # Four queries; a: 1 J each, loading it 100 J; b: 3 J each, loading it 1 J. Least energy
    # with the loads counted: all on b, 4·3 + 1 = 13 J (all on a: 4 + 100 = 104 J; a mix pays
    # both loads, > 101 J). ζ = 1 weighs energy alone, so it must find the 13 J schedule.
    opts = [option("a", "gpu", 0.5, load_s=1.0, load_energy_j=100.0),
            option("b", "gpu", 0.5, load_s=1.0, load_energy_j=1.0)]
    preds = predictions(opts, np.tile([1.0, 3.0], (4, 1)), 1.0)
    by_energy = make_plan(preds, PlanSettings(count_load=True), explain=False)
    assert by_energy.energy_j == pytest.approx(13.0)
    by_zeta = make_plan(preds, PlanSettings(objective="zeta", zeta=1.0, count_load=True), explain=False)
    assert by_zeta.energy_j == pytest.approx(13.0)


# -- settings ------------------------------------------------------------------------------------------

def test_validate_lists_every_bad_setting_at_once():
    settings = PlanSettings(accuracy_target=1.5, accuracy_mode="tokens", deadline_s=-5.0, objective="zeta",
                            zeta=None, min_share={"a": 0.7, "b": 0.6})
    with pytest.raises(InputError) as caught:
        settings.validate()
    wheres = [p.where for p in caught.value.problems]
    # Named by the setting, not by a CLI flag (the Plan page shows them too).
    assert wheres.count("accuracy target") == 1
    assert wheres.count("accuracy mode") == 1
    assert wheres.count("deadline") == 1
    assert wheres.count("zeta") == 1
    assert wheres.count("minimum share") == 1  # the sum 1.3 > 1; each share alone is fine
    assert not any(where.startswith("--") for where in wheres)
    assert len(wheres) == 5


@pytest.mark.parametrize("bad", [
    {"accuracy_target": math.nan}, {"accuracy_target": -0.1}, {"accuracy_mode": "words"},
    {"deadlines_s": {"gpu": 0.0}}, {"deadline_s": math.inf}, {"objective": "zeta"},
    {"objective": "zeta", "zeta": 1.5}, {"min_share": {"a": -0.1}}, {"min_share": {"a": 0.5, "b": 0.51}},
])
def test_validate_refuses_each_bad_setting(bad):
    with pytest.raises(InputError):
        PlanSettings(**bad).validate()


def problems_of(settings: PlanSettings) -> list[str]:
    """The settings named by validate's InputError ([] when it accepts them)."""
    try:
        settings.validate()
    except InputError as exc:
        return [p.where for p in exc.problems]
    return []


def test_validate_accepts_the_edges_and_refuses_just_past_them():
    assert problems_of(PlanSettings(accuracy_target=1.0, objective="zeta", zeta=0.0,
                                    min_share={"a": 0.5, "b": 0.5})) == []
    assert problems_of(PlanSettings(accuracy_target=0.0, deadline_s=1e-3, objective="zeta", zeta=1.0)) == []
    assert problems_of(PlanSettings(accuracy_target=1.0 + 1e-9)) == ["accuracy target"]
    assert problems_of(PlanSettings(accuracy_target=-1e-9)) == ["accuracy target"]
    assert problems_of(PlanSettings(objective="zeta", zeta=1.0 + 1e-9)) == ["zeta"]
    assert problems_of(PlanSettings(deadline_s=0.0)) == ["deadline"]
    assert problems_of(PlanSettings(min_share={"a": 0.5, "b": 0.5 + 1e-9})) == ["minimum share"]


# -- service: plan a workload against the database, store, load, write ---------------------------------

@pytest.fixture
def reference_store(store: Store) -> Store:
    load_reference_profiles(store)
    return store


def token_workload(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"id": [f"w{i:03d}" for i in range(n)], "input_tokens": rng.integers(16, 1024, n),
                          "output_tokens": rng.integers(64, 512, n)})
    return workload_from_frame(frame, "synthetic")


def test_plan_workload_stores_a_plan_that_loads_back_the_same(reference_store: Store, tmp_path):
    workload = token_workload()
    settings = PlanSettings(accuracy_target=0.6, deadline_s=3600.0)
    result = plan_workload(reference_store, workload, settings)
    assert result.status == "optimal"
    plans = list_plans(reference_store)
    assert plans.id.tolist() == [result.plan_id]
    assert plans.workload.iloc[0] == "synthetic" and plans.n_queries.iloc[0] == 40
    assert plans.energy_j.iloc[0] == pytest.approx(result.energy_j)

    row, stored = load_plan(reference_store, result.plan_id)
    assert row["status"] == "optimal"
    columns = list(SCHEDULE_COLUMNS)
    mine = result.schedule[columns].sort_values("id").reset_index(drop=True)
    back = stored[columns].sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, back, check_dtype=False)

    text = schedule_csv(stored)
    header = text.splitlines()[0].split(",")
    assert header[:len(columns)] == ["id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j",
                                     "predicted_runtime_s", "accuracy", "device_start_s"]
    assert len(text.strip().splitlines()) == 1 + 40

    with pytest.raises(InputError, match="is a directory"):
        write_schedule(result.schedule, tmp_path)
    written = write_schedule(result.schedule, tmp_path / "schedule.csv")
    assert written.read_text(encoding="utf-8") == schedule_csv(result.schedule)
    with pytest.raises(InputError):
        load_plan(reference_store, result.plan_id + 100)


def test_stored_plan_loads_back_typed_baselines_and_constraint_costs(reference_store: Store):
    result = plan_workload(reference_store, token_workload(), PlanSettings(accuracy_target=0.6, deadline_s=3600.0))
    assert result.constraint_costs and result.baselines
    row, _ = load_plan(reference_store, result.plan_id)
    assert all(isinstance(b, Baseline) for b in row["baselines"].values())
    assert row["baselines"] == result.baselines  # every field, through the database and back
    assert all(isinstance(c, ConstraintCost) for c in row["params"]["constraint_costs"])
    assert row["params"]["constraint_costs"] == result.constraint_costs
    assert {c.unit for c in result.constraint_costs} == {"fraction", "s"}


def test_plans_stored_in_the_old_dict_shape_still_load(reference_store: Store):
    # Before the typed results, a plan stored each baseline as {energy_j, accuracy, makespan_s,
    # feasible} and each constraint cost as a dict without delta_energy_j where none was measured.
    result = plan_workload(reference_store, token_workload(), PlanSettings(accuracy_target=0.6, deadline_s=3600.0))
    old_baselines = {name: {"energy_j": b.energy_j, "accuracy": b.accuracy, "makespan_s": b.makespan_s,
                            "feasible": b.feasible} for name, b in result.baselines.items()}
    old_costs = []
    for cost in result.constraint_costs:
        entry = {"constraint": cost.constraint, "binding": cost.binding, "value": cost.value, "limit": cost.limit,
                 "text": cost.text}
        if cost.delta_energy_j is not None:
            entry["delta_energy_j"] = cost.delta_energy_j
        old_costs.append(entry)
    params = json.loads(reference_store.query_one("SELECT CAST(params AS VARCHAR) FROM plans WHERE id = ?",
                                                  [result.plan_id])[0])
    params["constraint_costs"] = old_costs
    reference_store.execute("UPDATE plans SET baselines = ?, params = ? WHERE id = ?",
                            [json.dumps(old_baselines), json.dumps(params), result.plan_id])
    row, schedule = load_plan(reference_store, result.plan_id)
    assert len(schedule) == 40
    for name, baseline in result.baselines.items():
        loaded = row["baselines"][name]
        assert (loaded.energy_j, loaded.accuracy, loaded.makespan_s, loaded.feasible) == \
            (baseline.energy_j, baseline.accuracy, baseline.makespan_s, baseline.feasible)
        assert loaded.per_device_runtime_s == {} and loaded.note == ""  # not stored then
        assert loaded.to_json() == baseline.to_json()
    assert row["params"]["constraint_costs"] == result.constraint_costs


def test_plan_json_keeps_the_dict_shapes_of_the_typed_results(reference_store: Store):
    result = plan_workload(reference_store, token_workload(20, seed=2),
                           PlanSettings(accuracy_target=0.6, deadline_s=3600.0), save=False)
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    for name, baseline in document["baselines"].items():
        # DESIGN.md: {name: {energy_j, accuracy, makespan_s}}, plus feasible; nothing else.
        assert set(baseline) == {"energy_j", "accuracy", "makespan_s", "feasible"}
        typed = result.baselines[name]
        assert baseline == {"energy_j": typed.energy_j, "accuracy": typed.accuracy, "makespan_s": typed.makespan_s,
                            "feasible": typed.feasible}
    assert len(document["constraint_costs"]) == 2  # accuracy and the one device's deadline: the loop checks both
    for entry, typed in zip(document["constraint_costs"], result.constraint_costs, strict=True):
        assert {"constraint", "binding", "value", "limit", "text"} <= set(entry)
        assert entry["text"] == typed.text and entry["binding"] is typed.binding


def test_plan_json_has_the_design_contract(reference_store: Store):
    result = plan_workload(reference_store, token_workload(30, seed=1),
                           PlanSettings(accuracy_target=0.58, accuracy_mode="token", deadline_s=1800.0))
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    contract = {"status", "energy_j", "lower_bound_j", "gap", "solve_s", "accuracy", "per_device_runtime_s",
                "n_queries", "assignments", "baselines"}
    assert contract <= set(document)
    assert document["status"] == "optimal" and document["n_queries"] == 30
    assert document["gap"] == pytest.approx((document["energy_j"] - document["lower_bound_j"]) / document["energy_j"])
    assert 0 <= document["gap"] <= result.settings.gap_target
    assert sum(document["assignments"].values()) == 30
    assert all("@" in key for key in document["assignments"])
    assert set(document["per_device_runtime_s"]) == {"a100-swing"}
    assert document["per_device_runtime_s"]["a100-swing"] <= 1800.0 * (1 + 1e-9)
    names = {f"only {row['name']}@a100-swing" for row in published_catalog_rows()}
    assert names | {"round-robin", "random", "greedy cheapest-first"} == set(document["baselines"])
    for baseline in document["baselines"].values():
        assert {"energy_j", "accuracy", "makespan_s"} <= set(baseline)
    # Token-weighted accuracy recomputed from the schedule.
    schedule = result.schedule
    weights = schedule.input_tokens + schedule.output_tokens
    assert document["accuracy"] == pytest.approx(float((schedule.accuracy * weights).sum() / weights.sum()))
    assert document["accuracy"] >= 0.58 - 1e-9


def test_plan_workload_with_no_fits_stores_nothing(store: Store):
    with pytest.raises(InputError, match="nothing to plan with"):
        plan_workload(store, token_workload(5), PlanSettings(accuracy_target=0.5))
    assert list_plans(store).empty


def test_a_clamped_prediction_is_not_taken_as_free():
    # Query 0: option b's raw prediction was negative (clamped to 0 J); a costs 5 J. Without the
    # guard the plan would put query 0 on b "for free". Query 1 has only clamped options: kept.
    opts = [option("a", "dev", 0.5), option("b", "dev", 0.7)]
    preds = predictions(opts, [[5.0, 0.0], [0.0, 0.0]], 1.0)
    preds.clamped[:] = [[False, True], [True, True]]
    result = make_plan(preds, PlanSettings(), explain=False, compare=False)
    schedule = read_schedule(result)
    assert schedule.set_index("id").loc["1", "model"] == "a"
    assert bool(schedule.set_index("id").loc["2", "clamped"])


def test_overlapping_solves_leave_garbage_collection_on():
    import gc
    import threading

    from engine.planning import solver

    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with solver._collector_paused():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(5)
    with solver._collector_paused():
        assert not gc.isenabled()
    release.set()
    thread.join()
    assert gc.isenabled()
