"""engine/execution with batches: the plan's batches run in order, each through one
``generate_batch`` in one energy window, stored whole (the batch as measured, each member's
share by tokens processed, the executed measurement where the shape is exact), failed whole,
resumed whole after a kill, and compared with the plan per batch and per request.

Fakes (a batch-capable backend that pads like transformers or not like llama.cpp, a replay
meter) for the bookkeeping; the real demo models for what a backend was fed and for a real
worker killed mid-list. Expectations come from the plan (members, order, predictions) or are
worked by hand in the comments.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog, runs
from engine.backends import open_backend
from engine.backends.base import GenerationResult, TextResult
from engine.backends.batch import STOPPED_CAP, STOPPED_END, BatchResult, ExactRequest, PromptRequest, RequestResult
from engine.energy import EnergyMeter, ReplayMeter
from engine.energy.load_cost import WARMUP_SHAPE
from engine.errors import InferenceError
from engine.execution import (
    compare,
    create_execution,
    execution_batches,
    execution_progress,
    execution_results,
    get_execution,
    plan_queries,
    reconcile_executions,
    resume_execution,
    start_worker,
)
from engine.execution.worker import (
    SHARE_RULE,
    ExecutionCancelled,
    StoreResultSink,
    refit_shape,
    run_execution,
    share_by_tokens,
)
from engine.planning.workload import count_prompt_tokens
from engine.store import Store, append_frame

MODEL_OF_FILE = {"demo-small-hf": "demo-small", "demo-large.gguf": "demo-large"}
IDLE_S = 0.02


# -- fakes ---------------------------------------------------------------------------------------

class BatchHost:
    """Batch-capable fake backends that log every call; ``fail`` maps a batch's first input length to
    the exception it raises; ``stop`` is set after ``stop_after`` batches (as SIGTERM would)."""

    def __init__(self, fail: dict | None = None, stop: threading.Event | None = None, stop_after: int | None = None):
        self.fail, self.stop, self.stop_after = fail or {}, stop, stop_after
        self.loads: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, str, list]] = []  # (device, model, "batch" | "alone", [request, ...])
        self.backends: list[BatchFakeBackend] = []
        self.fed: list[tuple[list[list[int]], BatchResult]] = []  # per generate_batch: ids fed, result
        self._lock = threading.Lock()

    def backend(self, backend: str, path, device: str = "cpu", **options) -> "BatchFakeBackend":
        made = BatchFakeBackend(self, MODEL_OF_FILE[Path(path).name], backend, device)
        self.backends.append(made)
        return made

    def log(self, backend: "BatchFakeBackend", kind: str, requests: list) -> None:
        with self._lock:
            self.calls.append((backend.device, backend.model, kind, requests))
        failure = self.fail.get(requests[0][0])
        if failure is not None:
            raise failure
        time.sleep(0.002 * len(requests))  # so that the replayed power gives every batch some energy

    def batches_done(self) -> None:
        with self._lock:
            if self.stop is not None and sum(c[2] == "batch" or c[2] == "alone" for c in self.calls) == self.stop_after:
                self.stop.set()

    def runs(self, device: str = "cpu") -> list[list]:
        """Each call's requests on ``device``, in the order they ran (warm-ups left out)."""
        return [c[3] for c in self.calls if c[0] == device]


class BatchFakeBackend:
    """Answers at once. A prompt's tokens are its words plus BOS, its answer its words backwards (one token
    a word, cut at the cap). ``kind`` transformers pads on the left and keeps finished rows computing;
    llama.cpp does neither (as engine.backends.hf and .llamacpp do)."""

    name = "fake"

    def __init__(self, host: BatchHost, model: str, kind: str, device: str):
        self.host, self.model, self.kind, self.device = host, model, kind, device
        self.last_batch_prompt_ids: list[list[int]] = []

    def load(self) -> None:
        self.host.loads.append((self.device, self.model))

    def close(self) -> None:
        pass

    @property
    def settings(self) -> dict:
        return {"backend": "fake", "device": self.device}

    def generate(self, input_tokens: int, output_tokens: int) -> GenerationResult:
        if (input_tokens, output_tokens) != WARMUP_SHAPE:
            self.host.log(self, "alone", [(input_tokens, output_tokens)])
            self.host.batches_done()
        return GenerationResult(input_tokens, output_tokens, 0.001 * output_tokens, None)

    def generate_text(self, prompt: str, max_output_tokens: int) -> TextResult:
        self.host.log(self, "alone", [(prompt, max_output_tokens)])
        words = prompt.split()[::-1][:max_output_tokens]
        self.host.batches_done()
        return TextResult(" ".join(words), len(prompt.split()) + 1, len(words), 0.001 * len(words),
                          STOPPED_CAP if len(words) == max_output_tokens else STOPPED_END)

    def generate_batch(self, requests) -> BatchResult:
        self.host.log(self, "batch", [(r.input_tokens, r.output_tokens) if isinstance(r, ExactRequest)
                                      else (r.prompt, r.max_output_tokens) for r in requests])
        lengths, outputs, texts = [], [], []
        for r in requests:
            if isinstance(r, ExactRequest):
                lengths.append(r.input_tokens)
                outputs.append(r.output_tokens)
                texts.append(None)
            else:
                words = r.prompt.split()[::-1][:r.max_output_tokens]
                lengths.append(len(r.prompt.split()) + 1)
                outputs.append(len(words))
                texts.append(" ".join(words))
        steps, longest = max(outputs), max(lengths)
        padded = self.kind == "transformers"
        results = tuple(RequestResult(
            n, out, STOPPED_CAP if isinstance(r, ExactRequest) or out == r.max_output_tokens else STOPPED_END, text,
            wasted_decode_tokens=steps - out if padded else 0, padding_tokens=longest - n if padded else 0)
            for r, n, out, text in zip(requests, lengths, outputs, texts, strict=True))
        self.last_batch_prompt_ids = [list(range(n)) for n in lengths]
        result = BatchResult(results, 0.001 * steps * len(requests), None, steps)
        self.host.fed.append((self.last_batch_prompt_ids, result))
        self.host.batches_done()
        return result


def replay_meter(device: str, **_) -> EnergyMeter:
    return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="estimated: replay at 10 W")])


def run(store: Store, execution_id: int, host: BatchHost, stop: threading.Event | None = None, **measuring) -> None:
    run_execution(store, execution_id, stop or threading.Event(), backend_factory=host.backend,
                  meter_factory=replay_meter, idle_s=IDLE_S, **measuring)


# -- plans ---------------------------------------------------------------------------------------

@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


def store_plan(store: Store, rows: list[dict], prompts: dict[str, str] | None = None) -> int:
    """A plan stored as the planner stores one (with a workload when some queries are prompts); its id.

    Each row: query_id, model, device, input_tokens, output_tokens, device_start_s and optionally
    batch_id, batch_size, predicted_energy_j (default 1 J), predicted_runtime_s (default 0.1 s).
    """
    prompts = prompts or {}
    frame = pd.DataFrame([{"predicted_energy_j": 1.0, "predicted_runtime_s": 0.1, "accuracy": 0.5, **row}
                          for row in rows])
    with store.transaction() as con:
        workload_id = None
        if prompts:
            workload_id = con.execute("INSERT INTO workloads (name, n_queries) VALUES ('w', ?) RETURNING id",
                                      [len(frame)]).fetchone()[0]
            append_frame(con, "workload_queries", pd.DataFrame({
                "workload_id": workload_id, "query_id": frame["query_id"],
                "prompt": [prompts.get(q) for q in frame["query_id"]],
                "input_tokens": [None if q in prompts else n for q, n in zip(frame["query_id"], frame["input_tokens"])],
                "output_tokens": frame["output_tokens"]}))
        plan_id = con.execute("INSERT INTO plans (workload_id, objective, energy_scope, status) VALUES "
                              "(?, 'energy', 'total', 'optimal') RETURNING id", [workload_id]).fetchone()[0]
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def q(query_id: str, model: str, input_tokens: int, output_tokens: int, start: float, batch: int | None = None,
      size: int | None = None, energy: float = 1.0, device: str = "cpu") -> dict:
    row = {"query_id": query_id, "model": model, "device": device, "input_tokens": input_tokens,
           "output_tokens": output_tokens, "device_start_s": start, "predicted_energy_j": energy}
    if batch is not None:
        row.update(batch_id=batch, batch_size=size)
    return row


# The cpu's schedule: the two models alternate in start order; batch ids are not in start order.
SCHEDULE = [
    q("a1", "demo-small", 32, 8, 0.0, 1, 4, 2.0), q("a2", "demo-small", 32, 8, 0.0, 1, 4, 2.0),
    q("a3", "demo-small", 32, 8, 0.0, 1, 4, 2.0), q("a4", "demo-small", 32, 8, 0.0, 1, 4, 2.0),
    q("b1", "demo-large", 20, 6, 1.0, 2, 4, 3.0), q("b2", "demo-large", 10, 4, 1.0, 2, 4, 3.0),  # the option's last
    q("c1", "demo-small", 40, 8, 2.0, 3, 4, 1.5), q("c2", "demo-small", 24, 5, 2.0, 3, 4, 1.0),
    q("c3", "demo-small", 6, 2, 2.0, 3, 4, 0.5),  # a prompt of five words: six tokens with BOS, capped at two
    q("d1", "demo-small", 8, 4, 3.0, 4, 1, 0.7),
    q("e1", "demo-large", 12, 3, 4.0, 5, 2, 1.2), q("e2", "demo-large", 12, 3, 4.0, 5, 2, 1.2),
]
PROMPTS = {"c3": "one two three four five"}


# -- the share rule and the refit shape -------------------------------------------------------------

def test_shares_by_tokens_processed_add_up_to_the_batch_and_keep_unknown_unknown():
    # 30 + 10 + 60 tokens of a 2.5 J batch: 0.75, 0.25 and 1.5 J.
    assert share_by_tokens(2.5, [30, 10, 60]) == pytest.approx([0.75, 0.25, 1.5])
    rng = np.random.default_rng(7)
    for _ in range(200):
        tokens = rng.integers(1, 5000, size=rng.integers(1, 33)).tolist()
        total = float(rng.uniform(0.001, 5000.0))
        shares = share_by_tokens(total, tokens)
        assert sum(shares) == total  # the last member takes the remainder: the sum is the batch's, bit for bit
        assert all(s >= 0 for s in shares)
        assert shares[0] == pytest.approx(total * tokens[0] / sum(tokens))
    assert share_by_tokens(None, [3, 4]) == [None, None]  # an unknown energy is not split into zeros
    assert share_by_tokens(float("nan"), [3]) == [None]
    assert share_by_tokens(7.0, [5]) == [7.0]


def batch(*shapes: tuple[int, int], steps: int | None = None) -> BatchResult:
    requests = tuple(RequestResult(i, o, STOPPED_CAP) for i, o in shapes)
    return BatchResult(requests, 1.0, None, steps or max(o for _, o in shapes))


def test_refit_shape_is_exact_for_one_shape_padded_on_transformers_and_none_for_mixed_llama():
    assert refit_shape("llama.cpp", batch((12, 3), (12, 3))) == ((12, 3), "exact", None)
    assert refit_shape("transformers", batch((32, 8), (32, 8), (32, 8)))[:2] == ((32, 8), "exact")
    shape, kind, note = refit_shape("transformers", batch((40, 8), (24, 5), (6, 2)))
    assert (shape, kind) == ((40, 8), "padded") and "pads on the left" in note
    shape, kind, note = refit_shape("llama.cpp", batch((20, 6), (10, 4)))
    assert shape is None and kind is None and "kept out of refits" in note


def test_a_query_without_a_batch_becomes_a_batch_of_its_own_numbered_after_the_plans():
    from engine.execution.jobs import with_batches

    frame = pd.DataFrame({"query_id": ["a", "b", "c", "d", "e"], "batch_id": [3, None, 3, None, 7],
                          "batch_size": [2, None, 2, None, None]})
    batched = with_batches(frame)
    assert list(batched.batch_id) == [3, 8, 3, 9, 7]  # the plan's ids kept; the others after its largest
    assert list(batched.batch_size) == [2, 1, 2, 1, 1]  # a batch without a size: its members
    assert list(with_batches(batched).batch_id) == list(batched.batch_id)  # once in a batch, it stays there
    assert list(with_batches(frame.drop(columns=["batch_id", "batch_size"])).batch_id) == [1, 2, 3, 4, 5]


# -- the worker, in-process, against fakes ------------------------------------------------------------

def test_batches_run_in_schedule_order_grouped_by_model_one_load_each_one_window_each(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    planned = plan_queries(demo_store, plan_id)
    assert list(planned.batch_id) == [1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 5]
    execution = create_execution(demo_store, plan_id)
    host = BatchHost()
    run(demo_store, execution.id, host)

    # Grouped by model in order of first use; each model's batches in start order; the batch of one
    # runs as a single request (as executions always ran a query).
    assert host.loads == [("cpu", "demo-small"), ("cpu", "demo-large")]
    assert [(c[1], c[2]) for c in host.calls] == [("demo-small", "batch"), ("demo-small", "batch"),
                                                  ("demo-small", "alone"), ("demo-large", "batch"),
                                                  ("demo-large", "batch")]
    assert host.runs() == [[(32, 8)] * 4, [(40, 8), (24, 5), ("one two three four five", 2)], [(8, 4)],
                           [(20, 6), (10, 4)], [(12, 3), (12, 3)]]
    assert get_execution(demo_store, execution.id).status == "done"
    progress = execution_progress(demo_store, execution.id)
    assert (progress.done, progress.total, progress.batches_done, progress.batches_total) == (12, 12, 5, 5)

    batches = execution_batches(demo_store, execution.id).set_index("batch_id")
    assert list(batches.index) == [1, 2, 3, 4, 5]  # listed in schedule order (run order is by model)
    assert list(batches.members) == [len(batches.loc[b, "query_ids"]) for b in batches.index]
    assert batches.loc[2, "query_ids"] == ["b1", "b2"] and batches.loc[2, "batch_size"] == 4  # fewer than B
    assert (batches.share_rule == SHARE_RULE).all() and batches.error.isna().all()
    assert (batches.energy_j > 0).all() and (batches.energy_source == "estimated").all()
    # The batch's prediction is its members' summed: 4 × 2.0, 2 × 3.0, 1.5 + 1.0 + 0.5, 0.7, 2 × 1.2.
    assert batches.predicted_energy_j.to_dict() == pytest.approx({1: 8.0, 2: 6.0, 3: 3.0, 4: 0.7, 5: 2.4})

    results = execution_results(demo_store, execution.id).set_index("id")
    for batch_id, row in batches.iterrows():
        members = results.loc[row.query_ids]
        assert (members.batch_id == batch_id).all() and (members.batch_size == row.batch_size).all()
        assert members.energy_j.sum() == pytest.approx(row.energy_j, rel=1e-12)  # the shares add up
        assert members.runtime_s.sum() == pytest.approx(row.runtime_s, rel=1e-12)
        assert members.energy_share.sum() == pytest.approx(1.0)
        tokens = members.input_tokens + members.output_tokens
        assert np.allclose(members.energy_j, row.energy_j * tokens / tokens.sum())  # by tokens processed
        assert (members.started_at == row.started_at).all()  # one window for the whole batch
    # Batch 3 (transformers, mixed): c1 40+8, c2 24+5, c3 (the prompt) 6+2 tokens run.
    assert list(results.loc[["c1", "c2", "c3"], "input_tokens"]) == [40, 24, 6]
    assert results.loc["c3", "generated_text"] == "five four" and results.loc["c3", "prompt_kind"] == "text"
    assert list(results.loc[["c1", "c2", "c3"], "energy_share"]) == pytest.approx([48 / 85, 29 / 85, 8 / 85])


def test_waste_is_counted_per_request_and_per_batch(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    execution = create_execution(demo_store, plan_id)
    run(demo_store, execution.id, BatchHost())
    results = execution_results(demo_store, execution.id).set_index("id")
    # transformers, batch 3: padded to 40 prompt tokens and 8 steps; c2 wastes 3 steps and 16 pads, c3 6 and 34.
    assert list(results.loc[["c1", "c2", "c3"], "wasted_decode_tokens"]) == [0, 3, 6]
    assert list(results.loc[["c1", "c2", "c3"], "padding_tokens"]) == [0, 16, 34]
    # llama.cpp drops finished sequences and pads nothing.
    assert list(results.loc[["b1", "b2"], "wasted_decode_tokens"]) == [0, 0]
    assert list(results.loc[["b1", "b2"], "padding_tokens"]) == [0, 0]
    batches = execution_batches(demo_store, execution.id).set_index("batch_id")
    assert (batches.loc[3, "wasted_decode_tokens"], batches.loc[3, "padding_tokens"]) == (9, 50)
    assert (batches.loc[3, "decode_steps"], batches.loc[3, "max_input_tokens"]) == (8, 40)
    assert (batches.loc[1, "wasted_decode_tokens"], batches.loc[1, "padding_tokens"]) == (0, 0)
    per_batch = compare(execution_results(demo_store, execution.id)).per_batch.set_index("batch_id")
    assert (per_batch.loc[3, "wasted_decode_tokens"], per_batch.loc[3, "padding_tokens"]) == (9, 50)


def test_executed_measurements_only_where_the_shape_is_exact(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    execution = create_execution(demo_store, plan_id)
    run(demo_store, execution.id, BatchHost())
    batches = execution_batches(demo_store, execution.id).set_index("batch_id")
    measured = demo_store.query_df(
        "SELECT b.batch_id, m.model, m.input_tokens, m.output_tokens, m.batch_size, m.energy_j, m.runtime_s, "
        "m.origin, m.library_versions FROM execution_batches b JOIN measurements m ON m.id = b.measurement_id "
        "WHERE b.execution_id = ? ORDER BY b.batch_id", [execution.id]).set_index("batch_id")
    # 1: one shape, 4 rows; 3: transformers mixed, stored as its padded shape; 4: alone; 5: one shape, 2 rows.
    # 2: llama.cpp mixed, no single shape: kept out.
    assert list(measured.index) == [1, 3, 4, 5]
    assert [tuple(r) for r in measured[["input_tokens", "output_tokens", "batch_size"]].itertuples(index=False)] == [
        (32, 8, 4), (40, 8, 3), (8, 4, 1), (12, 3, 2)]
    assert (measured.origin == "executed").all()
    assert np.allclose(measured.energy_j, batches.loc[measured.index, "energy_j"])  # the whole batch's energy
    assert np.allclose(measured.runtime_s, batches.loc[measured.index, "runtime_s"])
    assert list(batches.loc[[1, 3, 4, 5], "refit_shape"]) == ["exact", "padded", "exact", "exact"]
    assert json.loads(measured.loc[3, "library_versions"])["batch"]["shape"] == "padded"
    assert "pads on the left" in batches.loc[3, "refit_note"]
    assert pd.isna(batches.loc[2, "refit_shape"]) and "kept out of refits" in batches.loc[2, "refit_note"]
    results = demo_store.query_df("SELECT query_id, measurement_id FROM execution_results WHERE execution_id = ?",
                                  [execution.id]).set_index("query_id")
    assert results.loc[["b1", "b2"], "measurement_id"].isna().all()
    assert results.loc[["a1", "a4"], "measurement_id"].nunique() == 1  # members refer to their batch's measurement


def test_batches_with_the_same_start_run_by_batch_id_then_a_plan_without_batches_runs_as_before(demo_store: Store):
    rows = [q("y1", "demo-small", 9, 2, 5.0, 7, 2), q("y2", "demo-small", 9, 2, 5.0, 7, 2),
            q("x1", "demo-small", 8, 2, 5.0, 6, 2), q("x2", "demo-small", 8, 2, 5.0, 6, 2)]
    execution = create_execution(demo_store, store_plan(demo_store, rows))
    host = BatchHost()
    run(demo_store, execution.id, host)
    assert host.runs() == [[(8, 2), (8, 2)], [(9, 2), (9, 2)]]

    # No batch columns (NULL): every query alone, through the single-request call, each a batch of its own.
    old = [q(f"o{i}", "demo-small", 10 + i, 2, float(i)) for i in range(3)]
    plan_id = store_plan(demo_store, old)
    planned = plan_queries(demo_store, plan_id)
    assert list(planned.batch_id) == [1, 2, 3] and (planned.batch_size == 1).all()
    execution = create_execution(demo_store, plan_id)
    host = BatchHost()
    run(demo_store, execution.id, host)
    assert [c[2] for c in host.calls] == ["alone"] * 3 and host.runs() == [[(10, 2)], [(11, 2)], [(12, 2)]]
    results = execution_results(demo_store, execution.id)
    assert list(results.id) == ["o0", "o1", "o2"] and (results.energy_share == 1.0).all()
    assert (results.input_tokens == results.planned_input_tokens).all()
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed' AND "
                                "input_tokens IN (10, 11, 12) AND batch_size = 1")[0] == 3


def test_a_batch_that_fails_stores_every_member_with_the_error_and_the_run_goes_on(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    execution = create_execution(demo_store, plan_id)
    host = BatchHost(fail={40: InferenceError("demo-small: llama.cpp could not decode a batch of 56 tokens"),
                           20: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")})
    run(demo_store, execution.id, host)
    assert get_execution(demo_store, execution.id).status == "done"
    results = execution_results(demo_store, execution.id).set_index("id")
    assert results.loc[["c1", "c2", "c3"], "error"].str.startswith("InferenceError: demo-small: llama.cpp").all()
    assert results.loc[["b1", "b2"], "error"].str.startswith("RuntimeError: CUDA out of memory").all()
    failed = results.loc[["b1", "b2", "c1", "c2", "c3"]]
    assert failed.energy_j.isna().all() and (failed.output_tokens == 0).all()
    assert results.drop(index=failed.index).error.isna().all()
    batches = execution_batches(demo_store, execution.id).set_index("batch_id")
    assert batches.loc[[2, 3], "error"].notna().all() and batches.loc[[2, 3], "energy_j"].isna().all()
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 3  # 1, 4, 5
    comparison = compare(execution_results(demo_store, execution.id))
    assert (comparison.n_failed, comparison.n_batches, comparison.n_batches_failed) == (5, 3, 2)


def test_the_memory_check_refuses_a_batch_before_it_runs_and_each_member_keeps_the_sentence(
        demo_store: Store, monkeypatch):
    from engine.backends import memory

    # 1 MB free: a warm-up or a short query alone fits (≈ 0.2 MB), two of 128 + 32 tokens do not (> 1.3 MB of
    # KV cache alone at ≈ 4 kB a token).
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device, **_: 1_000_000)
    rows = [q("m1", "demo-small", 128, 32, 0.0, 1, 2), q("m2", "demo-small", 128, 32, 0.0, 1, 2),
            q("m3", "demo-small", 8, 2, 1.0, 2, 1)]
    execution = create_execution(demo_store, store_plan(demo_store, rows))
    run_execution(demo_store, execution.id, threading.Event(), meter_factory=replay_meter, idle_s=IDLE_S,
                  warmup_runs=1)
    results = execution_results(demo_store, execution.id).set_index("id")
    refused = results.loc[["m1", "m2"], "error"]
    assert refused.nunique() == 1
    assert re.match(r"InputError: batch_size: batch of 2 × \(128 \+ 32\) tokens needs .* cpu has 1\.0 MB free",
                    refused.iloc[0]), refused.iloc[0]
    assert pd.isna(results.loc["m3", "error"]) and results.loc["m3", "output_tokens"] == 2  # the run went on


def test_stop_between_batches_then_resume_runs_only_the_batches_left(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    execution = create_execution(demo_store, plan_id)
    stop = threading.Event()
    first = BatchHost(stop=stop, stop_after=2)
    with pytest.raises(ExecutionCancelled):
        run(demo_store, execution.id, first, stop)
    stored = execution_batches(demo_store, execution.id)
    assert sorted(stored.batch_id) == [1, 3]  # two batches, all their members
    assert len(execution_results(demo_store, execution.id)) == 7
    runs.set_status(demo_store, runs.EXECUTION, execution.id, "cancelled", "cancelled")
    resume_execution(demo_store, execution.id)
    second = BatchHost()
    run(demo_store, execution.id, second)
    # What is left, grouped by model in order of first use: demo-large's batches 2 and 5, then demo-small's 4.
    assert second.runs() == [[(20, 6), (10, 4)], [(12, 3), (12, 3)], [(8, 4)]]
    assert second.loads == [("cpu", "demo-large"), ("cpu", "demo-small")]
    assert len(execution_batches(demo_store, execution.id)) == 5
    assert execution_results(demo_store, execution.id).id.is_unique


def test_a_batch_lands_whole_or_not_at_all_and_never_twice(demo_store: Store, monkeypatch):
    plan_id = store_plan(demo_store, SCHEDULE[:4])
    execution = create_execution(demo_store, plan_id)
    host = BatchHost()
    captured = []

    class Capture(StoreResultSink):
        def add_batch(self, batch, results, measurement):
            captured.append((batch, results, measurement))
            super().add_batch(batch, results, measurement)

    run(demo_store, execution.id, host, sink=Capture(demo_store, execution.id))
    batch_row, members, measurement = captured[0]
    sink = StoreResultSink(demo_store, execution.id)
    sink.add_batch(batch_row, members, measurement)  # what a re-run stream (the cluster retrying) hands over again
    assert demo_store.query_one("SELECT count(*) FROM execution_results WHERE execution_id = ?", [execution.id])[0] == 4
    assert demo_store.query_one("SELECT count(*) FROM execution_batches WHERE execution_id = ?", [execution.id])[0] == 1
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 1

    # A failure between the batch's rows and its members' leaves nothing of it.
    import engine.execution.worker as worker

    class Interrupted(Exception):
        pass

    real_append = worker.append_frame

    def failing_append(con, table, frame):
        if table == "execution_results":
            raise Interrupted("the process died here")
        real_append(con, table, frame)

    monkeypatch.setattr(worker, "append_frame", failing_append)
    other = create_execution(demo_store, plan_id)
    with pytest.raises(Interrupted):
        sink = StoreResultSink(demo_store, other.id)
        sink.add_batch({**batch_row, "execution_id": other.id}, [{**m, "execution_id": other.id} for m in members],
                       measurement)
    for table in ("execution_batches", "execution_results"):
        assert demo_store.query_one(f"SELECT count(*) FROM {table} WHERE execution_id = ?", [other.id])[0] == 0
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 1


# -- compared per batch and per request ---------------------------------------------------------------

def results_frame(rows: list[tuple]) -> pd.DataFrame:
    columns = ["id", "model", "device", "batch_id", "batch_size", "energy_j", "predicted_energy_j", "runtime_s",
               "predicted_runtime_s", "wasted_decode_tokens", "padding_tokens", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(predicted_energy_uncertainty_j=np.nan, energy_source="measured", idle_power_w=np.nan)


def test_compare_per_batch_and_per_request_share():
    results = results_frame([
        # Batch 1 of 3: measured 3 + 2 + 1 = 6 J against 2 + 2 + 1 = 5 J predicted: +20%.
        ("a", "m", "cpu", 1, 4, 3.0, 2.0, 0.3, 0.2, 0, 0, None),
        ("b", "m", "cpu", 1, 4, 2.0, 2.0, 0.2, 0.2, 1, 4, None),
        ("c", "m", "cpu", 1, 4, 1.0, 1.0, 0.1, 0.1, 2, 8, None),
        # Batch 2 of 2: 4 J against 5 J: −20%.
        ("d", "m", "cpu", 2, 2, 2.0, 2.5, 0.5, 0.5, 0, 0, None),
        ("e", "m", "cpu", 2, 2, 2.0, 2.5, 0.5, 0.5, 0, 0, None),
        # Batch 3 failed whole; f alone (no batch): 1.1 J against 1 J, +10%.
        ("g", "m", "cpu", 3, 2, np.nan, 1.0, np.nan, 0.1, np.nan, np.nan, "MemoryError: out of memory"),
        ("h", "m", "cpu", 3, 2, np.nan, 1.0, np.nan, 0.1, np.nan, np.nan, "MemoryError: out of memory"),
        ("f", "m", "cpu", np.nan, np.nan, 1.1, 1.0, 0.1, 0.1, np.nan, np.nan, None),
    ])
    c = compare(results)
    assert (c.n_batches, c.n_batches_failed, c.n_failed) == (3, 1, 2)
    per_batch = c.per_batch
    assert list(per_batch.queries) == [3, 2, 1] and list(per_batch.batch_size) == [4, 2, 1]
    assert list(per_batch.measured_energy_j) == pytest.approx([6.0, 4.0, 1.1])
    assert list(per_batch.predicted_energy_j) == pytest.approx([5.0, 5.0, 1.0])
    assert list(per_batch.energy_error) == pytest.approx([0.2, -0.2, 0.1])
    assert list(per_batch.measured_runtime_s) == pytest.approx([0.6, 1.0, 0.1])
    assert (per_batch.wasted_decode_tokens.iloc[0], per_batch.padding_tokens.iloc[0]) == (3, 12)
    assert c.per_batch_energy_error_median == pytest.approx(0.1)
    assert c.per_batch_energy_error_mean_abs == pytest.approx(0.5 / 3)
    low, high = c.per_batch_energy_error_p10_p90
    assert low == pytest.approx(-0.2 + 0.2 * 0.3) and high == pytest.approx(0.1 + 0.8 * 0.1)  # linear quantiles
    shares = c.per_query.set_index("id")
    assert list(shares.loc[["a", "b", "c"], "measured_share"]) == pytest.approx([0.5, 1 / 3, 1 / 6])
    assert list(shares.loc[["a", "b", "c"], "predicted_share"]) == pytest.approx([0.4, 0.4, 0.2])
    assert shares.loc["a", "energy_error"] == pytest.approx(0.5)  # its share, 3 J, against its 2 J
    assert shares.loc["f", "measured_share"] == 1.0
    # The totals are those of the queries, as before: 11.1 J against 11 J.
    assert c.energy_error == pytest.approx(11.1 / 11 - 1)


def test_compare_of_a_stored_batched_execution(demo_store: Store):
    plan_id = store_plan(demo_store, SCHEDULE, PROMPTS)
    execution = create_execution(demo_store, plan_id)
    run(demo_store, execution.id, BatchHost())
    c = compare(execution_results(demo_store, execution.id))
    batches = execution_batches(demo_store, execution.id).set_index("batch_id")
    per_batch = c.per_batch.set_index("batch_id")
    assert sorted(per_batch.index) == [1, 2, 3, 4, 5]
    assert np.allclose(per_batch.measured_energy_j, batches.loc[per_batch.index, "energy_j"])
    assert np.allclose(per_batch.energy_error, batches.loc[per_batch.index, "energy_error"])
    assert list(per_batch.index) == [1, 2, 3, 4, 5]
    assert list(per_batch.predicted_energy_j) == pytest.approx([8.0, 6.0, 3.0, 0.7, 2.4])
    assert list(per_batch.queries) == [4, 2, 3, 1, 2] and list(per_batch.batch_size) == [4, 4, 4, 1, 2]


# -- real backends ---------------------------------------------------------------------------------

def test_the_planned_input_of_each_request_is_what_the_real_backend_was_fed(demo_store: Store):
    prompts = {"p1": "The planner measures how much energy each model spends.", "p2": "A short one."}
    counted = {model: count_prompt_tokens(catalog.get_model(demo_store, model), list(prompts.values()))
               for model in ("demo-small", "demo-large")}
    rows = []
    for batch_id, model in ((1, "demo-small"), (2, "demo-large")):
        planned_in = dict(zip(prompts, counted[model].tolist()))
        shapes = {"t1": (12, 3), "t2": (20, 5), "p1": (planned_in["p1"], 4), "p2": (planned_in["p2"], 2)}
        rows += [q(f"{model}-{name}", model, tin, tout, float(batch_id), batch_id, 4)
                 for name, (tin, tout) in shapes.items()]
    plan_id = store_plan(demo_store, rows, {f"{m}-{p}": text for m in ("demo-small", "demo-large")
                                             for p, text in prompts.items()})
    fed: dict[str, list] = {}

    def spying_backend(backend, path, device, **options):
        made = open_backend(backend, path, device, **options)
        real = made.generate_batch

        def generate_batch(requests):
            result = real(requests)
            if len(requests) > 1:  # not a warm-up (transformers runs a single request as a batch of one)
                fed.setdefault(backend, []).append(([len(ids) for ids in made.last_batch_prompt_ids], result))
            return result

        made.generate_batch = generate_batch
        return made

    execution = create_execution(demo_store, plan_id)
    run_execution(demo_store, execution.id, threading.Event(), backend_factory=spying_backend,
                  meter_factory=replay_meter, idle_s=IDLE_S, warmup_runs=1)
    assert get_execution(demo_store, execution.id).status == "done"
    results = execution_results(demo_store, execution.id).set_index("id")
    assert results.error.isna().all()
    for model, backend in (("demo-small", "transformers"), ("demo-large", "llama.cpp")):
        ids = [f"{model}-{s}" for s in ("t1", "t2", "p1", "p2")]
        (lengths, ran), = fed[backend]  # one batch of four, through generate_batch
        assert lengths == list(results.loc[ids, "planned_input_tokens"])  # the plan's τin is what was fed
        assert list(results.loc[ids, "input_tokens"]) == lengths
        assert list(results.loc[ids, "output_tokens"]) == [r.output_tokens for r in ran.requests]
        assert list(results.loc[ids[:2], "output_tokens"]) == [3, 5]  # exact requests: exactly their τout
        assert (results.loc[ids[2:], "output_tokens"] <= [4, 2]).all()  # prompts: at most the planned cap
        assert list(results.loc[ids, "wasted_decode_tokens"]) == [r.wasted_decode_tokens for r in ran.requests]
        assert list(results.loc[ids, "padding_tokens"]) == [r.padding_tokens for r in ran.requests]
        assert results.loc[ids, "runtime_s"].sum() == pytest.approx(ran.runtime_s)
    small = results.loc[[f"demo-small-{s}" for s in ("t1", "t2")]]
    assert small.padding_tokens.iloc[0] > 0 and small.wasted_decode_tokens.iloc[0] == 2  # 12 padded to the longest
    batches = execution_batches(demo_store, execution.id).set_index("model")
    assert batches.loc["demo-small", "refit_shape"] == "padded"
    assert pd.isna(batches.loc["demo-large", "refit_shape"])


# -- a real worker killed mid-list ------------------------------------------------------------------

def wait_for(predicate, timeout_s: float = 240.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


STARTED = re.compile(r"cpu: batch (\d+) started")


def test_kill_9_mid_batch_list_then_resume_reruns_only_unfinished_batches_and_stores_nothing_twice(
        demo_store: Store):
    rows = [q(f"k{b}{m}", "demo-small", 96 + m, 192, float(b), b, 3) for b in range(1, 7) for m in range(3)]
    plan_id = store_plan(demo_store, rows)
    execution = create_execution(demo_store, plan_id)
    log = runs.worker_log_path(demo_store, runs.EXECUTION, execution.id)
    process = start_worker(demo_store, execution.id, watch=False)
    at_kill: dict = {}

    def kill_mid_batch() -> bool:
        # While this connection is open the worker cannot store a batch: what is read here is what the
        # kill leaves. Killed once a batch is stored and a later one started (in flight, or measured and
        # waiting to be stored).
        with demo_store.connect() as con:
            stored = {int(b) for (b,) in con.execute("SELECT batch_id FROM execution_batches WHERE execution_id = ?",
                                                     [execution.id]).fetchall()}
            started = {int(b) for b in STARTED.findall(log.read_text())} if log.exists() else set()
            if stored and started - stored:
                process.kill()
                process.wait()
                at_kill.update(stored=stored, in_flight=started - stored, log_size=len(log.read_text()),
                               killed_at=pd.Timestamp.now(tz="UTC"))
                at_kill["frame"] = con.execute("SELECT batch_id, started_at FROM execution_batches WHERE "
                                               "execution_id = ?", [execution.id]).df()
        return bool(at_kill)

    try:
        assert wait_for(kill_mid_batch), "the worker stored no batch and started no other in time"
    finally:
        process.kill()
        process.wait()
    assert len(at_kill["stored"]) < 6 and at_kill["in_flight"]
    reconcile_executions(demo_store)
    failed = get_execution(demo_store, execution.id)
    assert failed.status == "failed" and "killed" in failed.reason
    results = execution_results(demo_store, execution.id)
    assert sorted(set(results.batch_id)) == sorted(at_kill["stored"])
    assert results.groupby("batch_id").size().eq(3).all()  # whole batches only: all members or none

    resume_execution(demo_store, execution.id)
    process = start_worker(demo_store, execution.id, watch=False)
    assert process.wait(timeout=240) == 0
    assert get_execution(demo_store, execution.id).status == "done", get_execution(demo_store, execution.id).reason
    second_run = {int(b) for b in STARTED.findall(log.read_text()[at_kill["log_size"]:])}
    assert second_run == set(range(1, 7)) - at_kill["stored"]  # only the unfinished batches ran again
    assert at_kill["in_flight"] <= second_run  # the batch in flight at the kill ran again, whole
    batches = execution_batches(demo_store, execution.id)
    assert sorted(batches.batch_id) == list(range(1, 7))  # each batch stored once
    kept = batches.set_index("batch_id").loc[sorted(at_kill["stored"]), "started_at"]
    assert list(kept) == list(at_kill["frame"].set_index("batch_id").loc[sorted(at_kill["stored"]), "started_at"])
    rerun = batches.set_index("batch_id").loc[sorted(second_run), "started_at"]
    assert (pd.to_datetime(rerun, utc=True) > at_kill["killed_at"]).all()
    results = execution_results(demo_store, execution.id)
    assert sorted(results.id) == sorted(r["query_id"] for r in rows) and results.error.isna().all()
    assert (results.input_tokens == results.planned_input_tokens).all()
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 6
    assert math.isclose(results.energy_j.sum(), batches.energy_j.sum(), rel_tol=1e-9)


# -- the cluster path: run_device on a node, its batches streamed to the driver ----------------------

def test_batches_on_cluster_nodes_land_once_in_cluster_terms_even_when_a_stream_is_rerun(demo_store: Store,
                                                                                         monkeypatch):
    from engine.cluster.driver import drive_execution
    from engine.runs.cluster import ADDRESS_ENV, use_cluster
    from tests.test_cluster import FakeCluster

    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1:9")  # a cluster is configured; the fake never connects
    use_cluster(None)
    try:
        rows = [{**row, "device": "nodeA/cpu"} for row in SCHEDULE]
        execution = create_execution(demo_store, store_plan(demo_store, rows, PROMPTS))
        host, lines = BatchHost(), []
        drive_execution(demo_store, execution.id, FakeCluster({"nodeA/cpu": {"rerun_after": 3}}),
                        measuring={"backend_factory": host.backend, "meter_factory": replay_meter, "idle_s": IDLE_S},
                        progress=lines.append, poll_s=0.01)
    finally:
        use_cluster(None)
    assert "stored 5 records, 3 already stored skipped" in lines  # the driver knows a batch by its id
    assert get_execution(demo_store, execution.id).status == "done"
    assert len(host.runs("cpu")) > 5  # the node ran part of its list twice (the stream was re-run) ...
    batches = execution_batches(demo_store, execution.id)
    assert sorted(batches.batch_id) == [1, 2, 3, 4, 5] and (batches.device == "nodeA/cpu").all()  # ... stored once
    results = execution_results(demo_store, execution.id)
    assert len(results) == 12 and results.id.is_unique and (results.device == "nodeA/cpu").all()
    measured = demo_store.query_df("SELECT device, host FROM measurements WHERE origin = 'executed'")
    assert len(measured) == 4 and (measured.device == "nodeA/cpu").all() and (measured.host == "nodeA").all()


def test_cli_execute_prints_the_per_batch_error_distribution(demo_store: Store, capsys):
    from engine import cli

    rows = [q("s1", "demo-small", 16, 4, 0.0, 1, 2, 0.5), q("s2", "demo-small", 16, 4, 0.0, 1, 2, 0.5),
            q("s3", "demo-small", 8, 2, 1.0, 2, 1, 0.2)]
    plan_id = store_plan(demo_store, rows)
    assert cli.main(["execute", "--plan", str(plan_id)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("batches: "))
    assert re.fullmatch(r"batches: 2 run, 0 failed; energy error per batch: median [+-]\d+\.\d%, 80% of batches "
                        r"within \[[+-]\d+\.\d%, [+-]\d+\.\d%\], mean \|error\| \d+\.\d%", line), line
    assert "queries: 3 of 3 run, 0 failed" in out
