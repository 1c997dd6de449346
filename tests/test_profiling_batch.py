"""Profiling with a batch axis (issue 13): designs over (τin, τout, B), batch trials, memory refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import catalog
from engine.backends.batch import BatchResult, RequestResult, STOPPED_CAP
from engine.backends.memory import ModelMemory
from engine.errors import InputError
from engine.planning.batches import BatchMemoryRule
from engine.profiling import jobs
from engine.profiling.design import Design, DesignPoint, build_design, parse_batch_sizes
from engine.profiling.worker import run_job
from engine.store import Store
from tests.test_profiling import FakeBackend, replay_meter

ROOT = Path(__file__).resolve().parent.parent
FAST = jobs.ProfileSettings(min_trials=3, max_trials=4, warmup_runs=1, idle_s=0.5, seed=7, batch_sizes=(1, 4))


@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


class FakeBatchBackend(FakeBackend):
    """A fake that also runs batches: a batch of B takes (1 + B/4) times one request's time."""

    def __init__(self, *args, memory_error: InputError | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.memory_checks, self.memory_error = [], [], memory_error

    def check_batch_memory(self, batch_size, input_tokens, output_tokens, free_bytes=None):
        self.memory_checks.append((batch_size, input_tokens, output_tokens))
        if self.memory_error is not None:
            raise self.memory_error

    def generate_batch(self, requests):
        self.calls += 1
        self.batches.append(list(requests))
        first = requests[0]
        runtime = 0.001 * (1 + first.output_tokens / 8) * (1 + len(requests) / 4)
        return BatchResult(tuple(RequestResult(r.input_tokens, r.output_tokens, STOPPED_CAP) for r in requests),
                           runtime, None, first.output_tokens)


# -- the design --------------------------------------------------------------------------------

def test_a_design_crosses_every_shape_with_each_batch_size():
    design = build_design("custom", inputs=[8, 64], outputs=[16], batch_sizes=(1, 4, 16))
    assert len(design.points) == 6 and design.batch_sizes == (1, 4, 16)
    assert DesignPoint(64, 16, 4) in design.points and DesignPoint(8, 16) == DesignPoint(8, 16, 1)
    assert Design.from_dict(design.to_dict()) == design
    # Stored designs from before the batch axis (pairs) still read, at batch size 1.
    assert Design.from_dict({"kind": "quick", "points": [[8, 8]]}).points == (DesignPoint(8, 8, 1),)
    assert build_design("quick").batch_sizes == (1,)
    with pytest.raises(InputError, match="adaptive design measures one request at a time"):
        build_design("adaptive", batch_sizes=(1, 4))


@pytest.mark.parametrize("text, fragment", [("1,0", "at least one request"), ("-2", "at least one request"),
                                            ("2.5", "not a whole number"), ("4,abc", "not a whole number"),
                                            ("1,300", "more than the 256"), ("", "not a whole number")])
def test_bad_batch_sizes_are_refused_by_name(text, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_batch_sizes(text, "--batch-sizes")


def test_batch_sizes_parse_sorted_and_distinct():
    assert parse_batch_sizes("16, 1,4,4") == (1, 4, 16)
    assert jobs.ProfileSettings(batch_sizes=[8, 2]).validate().batch_sizes == (2, 8)
    with pytest.raises(InputError, match="batch sizes alone"):
        jobs.ProfileSettings(batch_size=4, batch_sizes=(1, 8)).validate()


# -- batch trials --------------------------------------------------------------------------------

def test_a_batch_trial_is_one_batch_stored_with_its_size_and_energy(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-large", "cpu", "custom", inputs=[8, 32], outputs=[8, 16], settings=FAST)
    assert job.points_total == 8 and job.settings.batch_sizes == (1, 4)
    backends = []

    def factory(*args, **kwargs):
        backends.append(FakeBatchBackend(*args, **kwargs))
        return backends[-1]

    run_job(demo_store, job, backend_factory=factory, meter_factory=replay_meter)
    stored = demo_store.query_df("SELECT * FROM measurements WHERE job_id = ?", [job.id])
    assert set(stored.batch_size) == {1, 4}
    batched = stored[stored.batch_size == 4]
    # Each trial at B = 4 was one call of generate_batch with 4 identical requests of its shape.
    assert len(backends[0].batches) == len(batched)
    assert all(len(b) == 4 and len({(r.input_tokens, r.output_tokens) for r in b}) == 1 for b in backends[0].batches)
    assert set(backends[0].memory_checks) == {(4, 8, 8), (4, 32, 8), (4, 8, 16), (4, 32, 16)}  # before anything ran
    # The row holds the whole batch's runtime and energy (the replay meter: 10 W over the batch's window).
    one = stored[(stored.batch_size == 1) & (stored.output_tokens == 8)].runtime_s.mean()
    four = batched[batched.output_tokens == 8].runtime_s.mean()
    assert four == pytest.approx(2 * one, rel=0.01)
    assert (batched.energy_j > 0).all() and (batched.input_tokens.isin([8, 32])).all()
    outcomes = jobs.point_outcomes(demo_store, [job.id])
    assert len(outcomes) == 8 and set(outcomes.batch_size) == {1, 4}
    progress = jobs.job_progress(demo_store, job.id)
    assert len(progress.points) == 8 and progress.points.converged.notna().all()
    # Fitted: the two batch sizes give the fits a batch axis.
    from engine.fitting import fit_all

    fits = fit_all(demo_store, model="demo-large", n_bootstrap=0)
    assert all(f.has_batch_axis and f.domain["batch_size"] == [1, 4] for f in fits)


def test_a_batch_that_does_not_fit_is_refused_before_the_worker_measures_anything(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-large", "cpu", "custom", inputs=[8], outputs=[8], settings=FAST)
    refusal = InputError("batch of 4 × (8 + 8) tokens needs ≈ 9 GB; cpu has 1 GB free")
    with pytest.raises(InputError, match="needs"):
        run_job(demo_store, job, backend_factory=lambda *a, **k: FakeBatchBackend(*a, memory_error=refusal, **k),
                meter_factory=replay_meter)
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE job_id = ?", [job.id])[0] == 0


def tiny_memory(free_bytes: int) -> BatchMemoryRule:
    model = ModelMemory(weights_bytes=100_000_000, kv_bytes_per_token=100_000, activation_bytes_per_token=10_000,
                        logits_bytes_per_request=100_000)
    return BatchMemoryRule(model=model, free_bytes=free_bytes, max_tokens_per_pass=None, source="test")


def test_a_design_beyond_the_devices_memory_is_refused_and_nothing_is_stored(demo_store: Store, monkeypatch):
    entry = catalog.get_model(demo_store, "demo-small")
    design = build_design("custom", inputs=[64, 512], outputs=[64], batch_sizes=(1, 4, 64))
    # 64 × 576 tokens × 100 kB of KV cache ≈ 3.7 GB, against 0.5 GB free: 64 is refused, 4 fits.
    with pytest.raises(InputError) as info:
        jobs.check_design_memory(entry, "cpu", design, memory_rule=tiny_memory(500_000_000))
    (problem,) = info.value.problems
    assert problem.message.startswith("64:") and "KV cache" in problem.message and "500.0 MB free" in problem.message
    assert "batch sizes up to" in problem.expected
    jobs.check_design_memory(entry, "cpu", build_design("custom", inputs=[64], outputs=[64], batch_sizes=(1, 4)),
                             memory_rule=tiny_memory(500_000_000))
    # Through create_job, with the device's free memory read as tiny: the job is refused, not stored.
    import engine.backends.memory as memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device, **_: 10_000_000)
    with pytest.raises(InputError, match="free"):
        jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[64], outputs=[64],
                        settings=jobs.ProfileSettings(batch_sizes=(1, 32)))
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_llama_cpp_jobs_take_a_batch_axis_and_the_older_option_is_refused_with_the_way_out(demo_store: Store):
    job = jobs.create_job(demo_store, "demo-large", "cpu", "custom", inputs=[8], outputs=[8],
                          settings=jobs.ProfileSettings(batch_sizes=(1, 2)))
    assert job.design.batch_sizes == (1, 2)
    with pytest.raises(InputError, match="--batch-sizes 1,4"):
        jobs.create_job(demo_store, "demo-large", "cpu", settings=jobs.ProfileSettings(batch_size=4))


@pytest.mark.parametrize("model", ["demo-small", "demo-large"])
def test_real_backends_profile_batches(demo_store: Store, model: str):
    settings = jobs.ProfileSettings(min_trials=1, max_trials=1, warmup_runs=0, idle_s=0.5, batch_sizes=(1, 3))
    job = jobs.create_job(demo_store, model, "cpu", "custom", inputs=[8], outputs=[4], settings=settings)
    run_job(demo_store, job, meter_factory=replay_meter)
    stored = demo_store.query_df("SELECT input_tokens, output_tokens, batch_size, runtime_s, energy_j "
                                 "FROM measurements WHERE job_id = ? ORDER BY batch_size", [job.id])
    assert stored.batch_size.tolist() == [1, 3]
    assert (stored.input_tokens == 8).all() and (stored.output_tokens == 4).all()  # per request, read back
    assert (stored.runtime_s > 0).all() and (stored.energy_j > 0).all()


def test_cli_profile_batch_sizes_bad_values_exit_2_and_store_nothing(demo_store: Store):
    result = subprocess.run([sys.executable, "-m", "engine", "profile", "--model", "demo-small", "--inputs", "8",
                             "--outputs", "8", "--batch-sizes", "0,-2,2.5,abc", "--db", str(demo_store.path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--batch-sizes" in result.stderr and "Traceback" not in result.stderr
    for item in ("0", "-2", "'2.5'", "'abc'"):
        assert item in result.stderr
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_points_recorded_before_the_batch_axis_migrate_at_batch_size_one(tmp_path: Path):
    import duckdb

    from engine.store import MIGRATIONS, migrate

    path = tmp_path / "version8.duckdb"
    with duckdb.connect(str(path)) as con:
        assert migrate(con, MIGRATIONS[:8]) == 8
        job_id = con.execute("INSERT INTO profiling_jobs (model, device, host, design, settings, status, points_total) "
                             "VALUES ('m', 'cpu', 'h', '{\"kind\": \"custom\", \"points\": [[8, 8]]}', '{}', 'done', 1) "
                             "RETURNING id").fetchone()[0]
        con.execute("INSERT INTO profiling_points (job_id, input_tokens, output_tokens, trials, converged, stopped, "
                    "runtime_ci_rel) VALUES (?, 8, 8, 5, false, 'max-trials', 0.4)", [job_id])
    store = Store(path)
    assert store.schema_version() == MIGRATIONS[-1].version
    outcomes = jobs.point_outcomes(store, [job_id])
    assert outcomes[["input_tokens", "output_tokens", "batch_size", "trials"]].values.tolist() == [[8, 8, 1, 5]]
    assert bool(outcomes.unconverged.iloc[0]) and jobs.get_job(store, job_id).design.points == (DesignPoint(8, 8),)
    # A point is now (τin, τout, B): the same shape at another batch size is a point of its own.
    store.execute("INSERT INTO profiling_points (job_id, input_tokens, output_tokens, batch_size, trials, converged, "
                  "stopped) VALUES (?, 8, 8, 4, 3, true, 'converged')", [job_id])
    assert len(jobs.point_outcomes(store, [job_id])) == 2


def test_cli_profile_with_batch_sizes_stores_each_batch(demo_store: Store):
    result = subprocess.run([sys.executable, "-m", "engine", "profile", "--model", "demo-small", "--inputs", "8",
                             "--outputs", "4", "--batch-sizes", "2,1", "--min-trials", "1", "--max-trials", "1",
                             "--warmup", "0", "--idle-s", "0.5", "--json", "--db", str(demo_store.path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    stored = demo_store.query_df("SELECT batch_size, input_tokens, output_tokens FROM measurements ORDER BY batch_size")
    assert stored.values.tolist() == [[1, 8, 4], [2, 8, 4]]
    assert jobs.get_job(demo_store, 1).settings.batch_sizes == (1, 2)


def test_without_named_batch_sizes_a_fixed_design_takes_the_default_axis_and_the_adaptive_one_batch_size_one(
        demo_store: Store):
    from engine.profiling.design import DEFAULT_BATCH_SIZES

    assert DEFAULT_BATCH_SIZES == (1, 2, 4, 8, 16, 32)
    _, _, design, settings = jobs.prepare_job(demo_store, "demo-small", "cpu", "quick", default_batch_axis=True)
    assert design.batch_sizes == DEFAULT_BATCH_SIZES and settings.batch_sizes == DEFAULT_BATCH_SIZES
    assert len(design.points) == 9 * 6 and not design.dropped
    _, _, adaptive, settings = jobs.prepare_job(demo_store, "demo-small", "cpu", "adaptive", default_batch_axis=True)
    assert adaptive.batch_sizes == (1,) and settings.batch_sizes == (1,)
    # The older option (identical requests through generate) keeps its one batch size.
    _, _, older, settings = jobs.prepare_job(demo_store, "demo-small", "cpu", "quick", default_batch_axis=True,
                                             settings=jobs.ProfileSettings(batch_size=4))
    assert older.batch_sizes == (1,) and settings.batch_size == 4
    # Named sizes are kept as named; without default_batch_axis the library default stays batch size 1.
    named = jobs.ProfileSettings(batch_sizes=(1, 3))
    assert jobs.prepare_job(demo_store, "demo-small", "cpu", "quick", settings=named)[2].batch_sizes == (1, 3)
    assert jobs.prepare_job(demo_store, "demo-small", "cpu", "quick")[2].batch_sizes == (1,)


def test_the_default_axis_leaves_out_the_sizes_that_do_not_fit_and_names_them_while_named_sizes_are_refused(
        demo_store: Store, monkeypatch):
    from engine.profiling.design import DEFAULT_BATCH_SIZES

    entry = catalog.get_model(demo_store, "demo-small")
    design = build_design("custom", inputs=[64, 512], outputs=[64], batch_sizes=DEFAULT_BATCH_SIZES)
    # 576 tokens × 100 kB of KV cache a request, with the weights and a margin, 0.5 GB free: up to 4 fit.
    kept = jobs.drop_unfitting_batch_sizes(entry, "cpu", design, memory_rule=tiny_memory(500_000_000))
    assert kept.batch_sizes == (1, 2, 4) and len(kept.points) == 2 * 3
    assert len(kept.dropped) == 3 and kept.dropped[0].startswith("batch size 8: a batch of 8 × (512 + 64) tokens")
    assert all("left out of the default batch axis" in note and "free" in note for note in kept.dropped)
    # Through prepare_job, with the device's free memory read as tiny: the default is cut, not refused ...
    import engine.planning.batches as batches

    monkeypatch.setattr(batches, "batch_memory_rule", lambda *args, **kwargs: (tiny_memory(500_000_000), "test"))
    _, _, cut, settings = jobs.prepare_job(demo_store, "demo-small", "cpu", "custom", inputs=[64, 512], outputs=[64],
                                           default_batch_axis=True)
    assert cut.batch_sizes == (1, 2, 4) and settings.batch_sizes == (1, 2, 4) and len(cut.dropped) == 3
    # ... and the same sizes named are refused, with nothing stored.
    with pytest.raises(InputError, match="batch sizes up to"):
        jobs.create_job(demo_store, "demo-small", "cpu", "custom", inputs=[64, 512], outputs=[64],
                        settings=jobs.ProfileSettings(batch_sizes=DEFAULT_BATCH_SIZES))
    assert demo_store.query_one("SELECT count(*) FROM profiling_jobs")[0] == 0


def test_cli_profile_without_batch_sizes_measures_the_default_batch_axis(demo_store: Store):
    result = subprocess.run([sys.executable, "-m", "engine", "profile", "--model", "demo-small", "--inputs", "8",
                             "--outputs", "4", "--min-trials", "1", "--max-trials", "1", "--warmup", "0",
                             "--idle-s", "0.5", "--json", "--db", str(demo_store.path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    stored = demo_store.query_df("SELECT DISTINCT batch_size FROM measurements ORDER BY batch_size")
    assert stored.batch_size.tolist() == [1, 2, 4, 8, 16, 32]
    assert jobs.get_job(demo_store, 1).settings.batch_sizes == (1, 2, 4, 8, 16, 32)


def test_the_duration_estimate_uses_measured_batches_when_there_are_some(demo_store: Store):
    import pandas as pd

    from tests.test_fitting import insert

    def runtime(tin, tout, size):  # a batch: fixed cost, prefill per B·τin, decode steps, per-request decode
        return 0.1 + 0.001 * size * tin + 0.01 * tout + 0.002 * size * tout

    shapes = [(i, o, b) for i in (8, 64) for o in (8, 64) for b in (1, 4, 16)]
    frame = pd.DataFrame([{"origin": "imported", "model": "demo-small", "device": "cpu", "input_tokens": i,
                           "output_tokens": o, "batch_size": b, "runtime_s": runtime(i, o, b), "energy_j": 1.0,
                           "trial": 1} for i, o, b in shapes])
    design = build_design("custom", inputs=[32], outputs=[32], batch_sizes=(1, 16))
    settings = jobs.ProfileSettings(min_trials=2, max_trials=5, idle_s=1.0, batch_sizes=(1, 16))
    # Single requests only: a batch of 16 takes at least one request's time and at most 16 requests'.
    insert(demo_store, frame[frame.batch_size == 1])
    low, high = jobs.estimate_duration_s(demo_store, "demo-small", "cpu", design, settings)
    single = runtime(32, 32, 1)
    assert low == pytest.approx(1.0 + 5.0 + 2 * (single + single), rel=1e-6)
    assert high == pytest.approx(1.0 + 5.0 + 5 * (single + 16 * single), rel=1e-6)
    # With batches measured, a batch's own time.
    insert(demo_store, frame[frame.batch_size > 1])
    low, high = jobs.estimate_duration_s(demo_store, "demo-small", "cpu", design, settings)
    batches = runtime(32, 32, 1) + runtime(32, 32, 16)
    assert low == pytest.approx(1.0 + 5.0 + 2 * batches, rel=1e-6)
    assert high == pytest.approx(1.0 + 5.0 + 5 * batches, rel=1e-6)
