"""ui.plan_view's pure parts: round duration ticks for the deadline axis, the energy unit of the
curves, and a workload's fingerprint (a new upload hides the plan of the old one)."""

from __future__ import annotations

import math

from engine.planning import parse_workload
from ui.plan_view import duration_ticks, energy_unit, workload_key


def test_deadline_ticks_are_round_durations_in_the_range():
    assert duration_ticks(50, 3600) == ([60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0],
                                        ["1 min", "2 min", "5 min", "10 min", "20 min", "30 min", "1 h"])
    values, labels = duration_ticks(0.5, 200_000)
    assert len(values) <= 7 and values == sorted(values) and labels[0] == "1 s" and labels[-1].endswith("h")


def test_energy_unit_follows_the_largest_value():
    assert energy_unit([12.0, 800.0]) == (1.0, "J")
    assert energy_unit([12.0, 1_500.0, math.nan]) == (1e3, "kJ")
    assert energy_unit([2.5e6]) == (1e6, "MJ")
    assert energy_unit([]) == (1.0, "J")


def test_a_workload_fingerprint_changes_with_its_queries_not_with_reading_it_again():
    text = "id,input_tokens,output_tokens\na,10,5\nb,20,5\n"
    first = workload_key(parse_workload(text, "w.csv", name="w"))
    assert workload_key(parse_workload(text, "w.csv", name="w")) == first
    assert workload_key(parse_workload(text.replace("20,5", "21,5"), "w.csv", name="w")) != first
    assert workload_key(parse_workload(text, "other.csv", name="other")) != first
