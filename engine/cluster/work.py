"""The remote side's entry points: what a node runs for a profiling job and for a device's part of an execution.

Each is the measuring code the local worker runs (:func:`engine.profiling.worker.measure_job`,
:func:`engine.execution.worker.run_device`), given the device as the node names it, the
model's path as the catalog stores it (resolved on the node, under its own checkout),
and a sink that streams to the driver. They never open the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from engine import catalog
from engine.cluster.protocol import RemoteWork
from engine.execution.worker import ResultSink, run_device
from engine.profiling.jobs import Job
from engine.profiling.worker import TrialSink, measure_job


@dataclass(frozen=True)
class ProfileWork(RemoteWork):
    """A profiling job's measuring on its node.

    ``job`` has the device as the node names it (``cpu``); ``stored`` the trials stored
    before (resume); ``measuring`` goes to :func:`measure_job` (tests pass their fakes;
    they must pickle).
    """

    job: Job
    backend: str
    model_path: str
    stored: pd.DataFrame
    measuring: dict = field(default_factory=dict)
    sink_interface = TrialSink

    @property
    def device(self) -> str:
        return self.job.device

    def model_files(self) -> list[tuple[str, str]]:
        return [(self.job.model, self.model_path)]

    def run(self, sink: TrialSink, progress: Callable[[str], None]) -> Any:
        return measure_job(self.job, self.backend, catalog.resolve_model_path(self.model_path), self.stored, sink,
                           progress=progress, **self.measuring)


@dataclass(frozen=True)
class ExecutionWork(RemoteWork):
    """One device's queries of an execution (in order, those stored left out), on its node.

    ``device`` is the device as the node names it; ``entries`` the catalog entries of the
    models it runs; ``measuring`` goes to :func:`run_device`.
    """

    execution_id: int
    device: str
    queries: pd.DataFrame
    entries: dict
    measuring: dict = field(default_factory=dict)
    sink_interface = ResultSink

    def model_files(self) -> list[tuple[str, str]]:
        models = dict.fromkeys(self.queries["model"])
        return [(model, self.entries[model].path) for model in models if self.entries.get(model) is not None]

    def run(self, sink: ResultSink, progress: Callable[[str], None]) -> None:
        # Never set: a cancel ends this process (the driver kills the actor), not a flag.
        stop = threading.Event()
        run_device(self.execution_id, self.device, self.queries, self.entries, sink, stop, progress=progress,
                   **self.measuring)


def missing_model_files(work: RemoteWork, node: str) -> str | None:
    """On the node: a sentence naming each model file of ``work`` that is not here, or None."""
    missing = []
    for model, stored in work.model_files():
        path = catalog.resolve_model_path(stored)
        if not path.exists():
            missing.append(f"{model} ({path})")
    if not missing:
        return None
    return (f"the model file{'s' if len(missing) > 1 else ''} of {', '.join(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} not on node {node}: copy {'them' if len(missing) > 1 else 'it'} "
            "there at that path (relative paths are under the node's checkout of the project)")
