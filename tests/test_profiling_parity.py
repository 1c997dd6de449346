"""engine/profiling/worker: after the load, what execution does too (warm-up of a fixed shape, measured load cost)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from engine.energy.load_cost import WARMUP_SHAPE, LoadCost
from engine.profiling import jobs
from engine.profiling.worker import measure_job
from engine.store import Store
from tests.test_profiling import FAST, FakeBackend, ListSink, demo_store, replay_meter  # noqa: F401 (a fixture)


def test_the_load_and_warm_up_are_measured_and_kept_with_every_trial(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[64], outputs=[32], settings=FAST)
    requests = []

    class Recording(FakeBackend):
        def generate(self, input_tokens, output_tokens):
            requests.append((input_tokens, output_tokens))
            return super().generate(input_tokens, output_tokens)

    sink = ListSink()
    measure_job(job, "fake", Path("x"), pd.DataFrame(columns=["input_tokens", "output_tokens", "runtime_s", "energy_j"]),
                sink, backend_factory=Recording, meter_factory=replay_meter)
    # The warm-up has the fixed shape whatever the first point, then the point's trials.
    assert requests[:FAST.warmup_runs] == [WARMUP_SHAPE] * FAST.warmup_runs
    assert set(requests[FAST.warmup_runs:]) == {(64, 32)}
    loads = {t["library_versions"] for t in sink.trials}
    assert len(loads) == 1  # every trial carries the same provenance
    load = LoadCost(**json.loads(loads.pop())["load"])
    assert load.warmup_runs == FAST.warmup_runs and load.load_energy_j is not None and load.warmup_energy_j > 0
    assert load.energy_source == "estimated" and load.idle_power_w == 10.0  # the replayed 10 W
