"""A cheap worker process for tests/test_runs.py: ``python -m tests.run_worker --db PATH --job ID``.

It is the profiling worker itself (the shared worker entry, the job's device lock, resume,
one transaction a trial), with a backend that answers in a few milliseconds and a replayed
meter in place of a model and sensors, so a lifecycle test starts, kills and resumes a
real process in seconds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial

from engine import runs
from engine.backends.base import GenerationResult
from engine.energy import EnergyMeter, ReplayMeter
from engine.profiling.worker import work_on_job

#: Profiling jobs, run by this module.
KIND = dataclasses.replace(runs.PROFILING, worker_module="tests.run_worker", log_prefix="test-run")
TRIAL_S = 0.05


class QuickBackend:
    """Answers every request after TRIAL_S seconds, with exactly the tokens asked for."""

    name = "quick"

    def __init__(self, backend, path, device="cpu", **options):
        self.device = device

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def check_request(self, input_tokens: int, output_tokens: int) -> None:
        pass

    @property
    def settings(self) -> dict:
        return {"backend": "quick", "device": self.device}

    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        time.sleep(TRIAL_S)
        return GenerationResult(input_tokens, output_tokens, TRIAL_S, None)


def replay_meter(device: str = "cpu") -> EnergyMeter:
    return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="estimated: replay at 10 W")])


if __name__ == "__main__":
    sys.exit(runs.worker_main(KIND, partial(work_on_job, backend_factory=QuickBackend, meter_factory=replay_meter)))
