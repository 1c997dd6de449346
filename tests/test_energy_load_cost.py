"""engine/energy/load_cost: a model's load and warm-up, measured, and read back as the planner's load cost."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from engine.energy import EnergyMeter, ReplayMeter, measure_idle_power
from engine.energy.load_cost import WARMUP_SHAPE, LoadCost, measure_window, stored_load_costs, warm_up
from engine.store import Store, append_frame


class Clock:
    """A scripted monotonic clock: each call moves on by the next step."""

    def __init__(self, *steps: float):
        self.now, self.steps = 0.0, list(steps)

    def __call__(self) -> float:
        if self.steps:
            self.now += self.steps.pop(0)
        return self.now


def test_a_load_and_its_warm_up_are_measured_and_scaled_to_another_number_of_warm_ups():
    # 100 W while loading (4 s), 50 W idle (2 s), 100 W warming up (1 s for 2 runs).
    meter = EnergyMeter([ReplayMeter("cuda:0", "gpu", [100.0, 50.0, 100.0])], background=False,
                        clock=Clock(0, 4, 0, 2, 0, 1))
    load = measure_window(meter, lambda: None)
    idle = measure_idle_power(meter, 2.0, sleep=lambda s: None)
    calls = []

    class Backend:
        def generate(self, input_tokens, output_tokens):
            calls.append((input_tokens, output_tokens))

    warmed = measure_window(meter, lambda: warm_up(Backend(), 2))
    assert calls == [WARMUP_SHAPE] * 2
    cost = LoadCost.from_windows(load, warmed, 2, idle)
    assert (cost.load_s, cost.load_energy_j, cost.warmup_s, cost.warmup_energy_j) == (4.0, 400.0, 1.0, 100.0)
    assert cost.idle_power_w == 50.0 and cost.energy_source == "measured"
    assert cost.cost(2) == (5.0, 500.0)
    assert cost.cost(1) == (4.5, 450.0)  # one warm-up is half of two
    assert cost.cost(2, "dynamic") == (5.0, 500.0 - 50.0 * 5.0)
    assert LoadCost(**json.loads(json.dumps(cost.to_dict()))) == cost  # survives the provenance JSON


def test_an_unmeasured_load_has_no_cost_never_zero():
    cost = LoadCost(load_s=3.0, load_energy_j=None, warmup_runs=2, warmup_s=1.0, warmup_energy_j=10.0,
                    idle_power_w=None, energy_source="measured", energy_method="x")
    assert cost.cost() == (4.0, None)
    assert LoadCost(3.0, 30.0, 2, 1.0, 10.0, None, "estimated", "x").cost(2, "dynamic") == (4.0, None)


def test_the_latest_load_of_each_model_and_device_is_the_planners_load_cost(store: Store):
    def row(model, device, finished, load_s, energy_j):
        load = LoadCost(load_s, energy_j, 2, 1.0, 10.0, 0.5, "estimated", "estimated: x")
        return {"origin": "profiled", "model": model, "device": device, "input_tokens": 8, "output_tokens": 8,
                "runtime_s": 0.1, "energy_j": 1.0, "finished_at": pd.Timestamp(finished, tz="UTC"),
                "library_versions": json.dumps({"backend": "fake", "load": load.to_dict()})}

    rows = [row("a", "cpu", "2026-01-01", 10.0, 100.0), row("a", "cpu", "2026-01-02", 2.0, 20.0),
            row("b", "cpu", "2026-01-01", 3.0, None),
            {"origin": "imported", "model": "c", "device": "cpu", "input_tokens": 8, "output_tokens": 8,
             "runtime_s": 0.1, "energy_j": 1.0}]
    with store.transaction() as con:
        append_frame(con, "measurements", pd.DataFrame(rows))
    costs = stored_load_costs(store)
    assert costs == {"a@cpu": (3.0, 30.0)}  # the latest load; b's has no energy, c has no load recorded
    assert stored_load_costs(store, warmup_runs=0) == {"a@cpu": (2.0, 20.0)}
    assert stored_load_costs(store, energy_scope="dynamic")["a@cpu"] == (3.0, 30.0 - 0.5 * 3.0)
