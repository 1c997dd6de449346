"""engine.planning.summary and engine.planning.output_lengths: what the Plan page and the CLI
show about a plan (timeline blocks, savings and misses against baselines), and output lengths
learned from executions filled into a workload."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest

from engine.formatting import format_energy
from engine.planning import (BEST_SINGLE_BATCHED, SAME_PLAN_AT_BATCH_ONE, Baseline, PlanResult, PlanSettings,
                             make_plan, parse_workload)
from engine.planning.output_lengths import fill_learned_output_lengths, missing_output_lengths
from engine.planning.summary import (baseline_misses, batching_sentences, compare_with_baselines, gap_sentence,
                                     option_table, option_usage, single_options_at_best_batch, timeline_batches,
                                     timeline_blocks)


def test_timeline_blocks_group_consecutive_queries_of_a_model_on_a_device():
    schedule = pd.DataFrame({
        "id": ["a", "b", "c", "d", "e"],
        "model": ["m1", "m1", "m2", "m1", "m1"],
        "device": ["cpu", "cpu", "cpu", "cuda:0", "cuda:0"],
        "device_start_s": [0.0, 1.0, 2.5, 0.0, 2.0],
        "predicted_runtime_s": [1.0, 1.5, 0.5, 2.0, 3.0],
    })
    blocks = timeline_blocks(schedule)
    assert blocks.to_dict("records") == [
        {"device": "cpu", "model": "m1", "start_s": 0.0, "end_s": 2.5, "queries": 2},
        {"device": "cpu", "model": "m2", "start_s": 2.5, "end_s": 3.0, "queries": 1},
        {"device": "cuda:0", "model": "m1", "start_s": 0.0, "end_s": 5.0, "queries": 2},
    ]
    assert timeline_blocks(schedule.iloc[:0]).empty


def test_a_baseline_that_misses_says_which_target_and_by_how_much():
    settings = PlanSettings(accuracy_target=0.6, deadline_s=60.0, deadlines_s={"cuda:0": 30.0})
    slow = Baseline(energy_j=10.0, accuracy=0.55, makespan_s=90.0, feasible=False,
                    per_device_runtime_s={"cpu": 90.0, "cuda:0": 20.0})
    assert baseline_misses(slow, settings) == ["mean accuracy 0.5500 is below the target 0.600",
                                               "cpu needs 1 min 30 s, past its 1 min 00 s deadline"]
    gpu_late = Baseline(energy_j=10.0, accuracy=0.7, makespan_s=40.0, feasible=False,
                        per_device_runtime_s={"cpu": 10.0, "cuda:0": 40.0})
    assert baseline_misses(gpu_late, settings) == ["cuda:0 needs 40 s, past its 30 s deadline"]
    # Everything mean is met: a query's own minimum accuracy is what it misses.
    per_query = Baseline(energy_j=10.0, accuracy=0.7, makespan_s=10.0, feasible=False,
                         per_device_runtime_s={"cpu": 10.0})
    assert baseline_misses(per_query, settings) == ["some queries get a model below their own minimum accuracy"]
    # A plan stored before per-device times were kept: the busiest device against the common deadline.
    old = Baseline(energy_j=10.0, accuracy=0.7, makespan_s=75.0, feasible=False)
    assert baseline_misses(old, settings) == ["the busiest device needs 1 min 15 s, past the 1 min 00 s deadline"]
    assert baseline_misses(Baseline(energy_j=1.0, accuracy=0.7, makespan_s=1.0, feasible=True), settings) == []


def test_savings_against_each_baseline_cheapest_first():
    settings = PlanSettings(accuracy_target=0.6)
    result = PlanResult(settings=settings, status="optimal", n_queries=2, solve_s=0.1, plan_s=0.2,
                        energy_scope="total", energy_estimated=False, energy_j=75.0, accuracy=0.6,
                        baselines={"round-robin": Baseline(100.0, 0.6, 1.0, True, note="in turn"),
                                   "only cheap": Baseline(50.0, 0.5, 1.0, False),
                                   "broken": Baseline(math.nan, math.nan, math.nan, False)})
    rows = compare_with_baselines(result)
    assert [r.name for r in rows] == ["only cheap", "round-robin", "broken"]
    assert rows[0].saving == pytest.approx(-0.5) and rows[0].misses == ("mean accuracy 0.5000 is below the target 0.600",)
    assert rows[1].saving == pytest.approx(0.25) and rows[1].meets_targets and rows[1].misses == ()
    assert rows[2].saving is None
    infeasible = PlanResult(settings=settings, status="infeasible", n_queries=2, solve_s=0.1, plan_s=0.2,
                            energy_scope="total", energy_estimated=False, baselines=result.baselines)
    assert all(r.saving is None for r in compare_with_baselines(infeasible))


def learned(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "category": c, "queries": 3, "median_output_tokens": v} for m, c, v in rows])


def test_learned_lengths_fill_only_queries_without_one_by_category_else_overall():
    workload = parse_workload("id,input_tokens,output_tokens,max_output_tokens,category\n"
                              "a,10,5,,chat\n"      # given: kept
                              "b,10,,40,chat\n"     # a stated maximum: kept
                              "c,10,,,chat\n"       # learned for chat
                              "d,10,,,code\n"       # no code length learned: overall
                              "e,10,,,\n", "w.csv")  # no category: overall
    assert missing_output_lengths(workload).tolist() == [False, False, True, True, True]
    frame = learned([("m1", "(all)", 100.0), ("m2", "(all)", 60.0), ("m1", "chat", 30.0), ("m2", "chat", 50.0)])
    filled, fill = fill_learned_output_lengths(workload, frame)
    # b keeps its stated maximum (no output_tokens); c gets chat's median over models, d and e the overall one.
    assert list(filled.queries.output_tokens.astype("Float64").fillna(-1)) == [5, -1, 40, 80, 80]
    assert fill.n_filled == 3 and fill.overall_median_tokens == 80.0 and fill.by_category_tokens == {"chat": 40.0}
    assert filled.warnings[-1].startswith("3 queries planned with output lengths learned from executed prompts")
    assert workload.queries.output_tokens.isna().sum() == 4  # the original is untouched


def test_nothing_learned_or_nothing_missing_leaves_the_workload_as_it_is():
    workload = parse_workload("id,input_tokens\na,10\n", "w.csv")
    same, fill = fill_learned_output_lengths(workload, learned([]).reindex(columns=["model", "category",
                                                                                  "median_output_tokens"]))
    assert same is workload and fill is None
    complete = parse_workload("id,input_tokens,output_tokens\na,10,4\n", "w.csv")
    same, fill = fill_learned_output_lengths(complete, learned([("m", "(all)", 50.0)]))
    assert same is complete and fill is None
    one, fill = fill_learned_output_lengths(workload, learned([("m", "(all)", 50.0)]))
    assert fill.sentence == "1 query planned with output lengths learned from executed prompts (median 50 tokens)"


# -- batches -------------------------------------------------------------------------------------

def test_a_batch_is_drawn_from_its_start_for_its_whole_runtime():
    # Two batches of cpu: members share the batch's start; their runtimes are shares of the batch's.
    schedule = pd.DataFrame({
        "id": ["a", "b", "c", "d", "e"], "model": ["m1", "m1", "m1", "m1", "m2"],
        "device": "cpu", "device_start_s": [0.0, 0.0, 0.0, 6.0, 8.0],
        "predicted_runtime_s": [3.0, 2.0, 1.0, 2.0, 1.5], "batch_id": [1, 1, 1, 2, 3]})
    assert timeline_batches(schedule).to_dict("records") == [
        {"device": "cpu", "model": "m1", "batch_id": 1, "start_s": 0.0, "end_s": 6.0, "queries": 3},
        {"device": "cpu", "model": "m1", "batch_id": 2, "start_s": 6.0, "end_s": 8.0, "queries": 1},
        {"device": "cpu", "model": "m2", "batch_id": 3, "start_s": 8.0, "end_s": 9.5, "queries": 1}]
    # The block of m1 ends where its last batch does (a row's own share would end it at 3 s).
    assert timeline_blocks(schedule).to_dict("records") == [
        {"device": "cpu", "model": "m1", "start_s": 0.0, "end_s": 8.0, "queries": 4},
        {"device": "cpu", "model": "m2", "start_s": 8.0, "end_s": 9.5, "queries": 1}]
    # Rows outside any batch are batches of their own.
    alone = schedule.assign(batch_id=[1, 1, 1, None, None])
    assert timeline_batches(alone).batch_id.isna().tolist() == [False, True, True]
    assert timeline_batches(alone).end_s.tolist() == [6.0, 8.0, 9.5]


def batched_plan(n: int = 40, **settings):
    from tests.test_planning_batches import predict, queries, two_models

    options, _ = two_models()
    tin, tout = queries(n, seed=3)
    return make_plan(predict(options, tin, tout), PlanSettings(accuracy_target=0.6, **settings), explain=False)


def test_the_timeline_of_a_batched_plan_ends_where_its_devices_do():
    result = batched_plan()
    batches = timeline_batches(result.schedule)
    assert len(batches) == result.n_batches and batches.queries.sum() == 40
    assert batches.end_s.max() == pytest.approx(result.per_device_runtime_s["cpu"])
    assert (batches.start_s.iloc[1:].to_numpy() == pytest.approx(batches.end_s.iloc[:-1].to_numpy()))  # back to back
    assert timeline_blocks(result.schedule).end_s.max() == pytest.approx(result.per_device_runtime_s["cpu"])


def test_the_option_table_has_one_row_per_model_on_a_device_with_its_batch_sizes():
    from tests.test_planning_batches import two_models

    options, _ = two_models()
    table = option_table(options, demo_models=set())
    assert table.option.tolist() == ["a@cpu", "b@cpu"]
    assert table["batch sizes"].tolist() == ["1, 2, 4, 8, 16", "1, 2, 4, 8, 16"]
    unbatched, _ = two_models(batches=None)
    assert option_table(unbatched, set())["batch sizes"].tolist() == ["1 (profiled at batch size 1 only)"] * 2


def test_usage_per_option_says_the_batch_size_and_the_batches_formed():
    result = batched_plan()
    usage = option_usage(result).set_index("option")
    schedule = result.schedule
    for option, row in usage.iterrows():
        mine = schedule[schedule.model + "@" + schedule.device == option]
        assert row.queries == len(mine) and row.batches == mine.batch_id.nunique()
        assert row["batch size"] == "16"
        assert sum(int(part.split(" × ")[0]) for part in row.formed.split(", ")) == row.batches
        assert row.energy_j == pytest.approx(mine.predicted_energy_j.sum())
    assert sum(result.batches.values()) == usage.batches.sum()


def test_batching_is_told_against_batch_one_and_the_best_single_option_at_its_best_size():
    result = batched_plan()
    singles = single_options_at_best_batch(result)
    best = singles[0]
    assert best.meets_targets and best.batch_size == 16  # every batch size of b was a baseline; 16 is cheapest
    every_b = [b for name, b in result.baselines.items() if name.startswith("only b@cpu")]
    assert best.energy_j == pytest.approx(min(b.energy_j for b in every_b if b.feasible))
    assert best.energy_j == pytest.approx(result.baselines[BEST_SINGLE_BATCHED].energy_j)
    saving, by_hand = batching_sentences(result)
    assert saving == (f"Batching saves **{result.batching_saving:.1%}** against the same plan at batch 1 "
                      f"({format_energy(result.baselines[SAME_PLAN_AT_BATCH_ONE].energy_j)}).")
    assert by_hand == (f"The best a user could do by hand: batch everything on b at B=16: "
                       f"{format_energy(best.energy_j)}; this plan saves {best.saving:.1%} against it.")
    overhead = result.formation_overhead_j / result.assignment_energy_j
    assert gap_sentence(result).startswith("The assignment is ")
    assert gap_sentence(result).endswith(f"optimal for per-request costs (proven); forming the batches from the "
                                         f"queries' real lengths adds {overhead:.1%}.")
    assert gap_sentence(replace(result, gap=0.0)).startswith("The assignment is optimal for per-request costs "
                                                             "(proven: gap 0); forming")
    nearly = replace(result, gap=1.2e-5)
    assert gap_sentence(nearly).startswith("The assignment is within 0.0012% of optimal for per-request costs "
                                           "(proven); forming")


def test_without_a_batch_axis_one_line_says_how_to_profile_batch_sizes():
    from tests.test_planning_batches import predict, queries, two_models

    options, _ = two_models(batches=None)
    tin, tout = queries(20, seed=3)
    result = make_plan(predict(options, tin, tout), PlanSettings(accuracy_target=0.6), explain=False)
    lines = batching_sentences(result)
    assert len(lines) == 1 and "Plans here are at batch size 1" in lines[0]
    assert "measure batch sizes 1 to 32 by default" in lines[0] and "*Measure batching*" in lines[0]
    assert gap_sentence(replace(result, gap=0.0)) == "The schedule is the optimum of its predictions (proven: gap 0)."
    assert gap_sentence(replace(result, gap=3e-4)) == ("The schedule is within 0.0300% of the optimum of its "
                                                       "predictions (proven).")
    assert option_usage(result)["formed"].tolist() == ["one at a time"] * len(option_usage(result))
