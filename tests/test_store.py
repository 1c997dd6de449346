"""The DuckDB store: migrations, appends, and a file held by another process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from engine.errors import DatabaseBusyError, SchemaError
from engine.paths import DEFAULT_DB_PATH, resolve_db_path
from engine.store import LATEST_VERSION, MIGRATIONS, Migration, Store, current_version, migrate

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_TABLES = {"schema_version", "settings", "models", "devices", "profiling_jobs", "measurements", "fits",
                   "workloads", "workload_queries", "plans", "plan_assignments", "executions", "execution_results"}


def tables(path: Path) -> set[str]:
    with duckdb.connect(str(path)) as con:
        return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def test_empty_file_is_migrated_to_latest(store: Store):
    assert store.schema_version() == LATEST_VERSION
    assert EXPECTED_TABLES <= tables(store.path)
    versions = store.query_df("SELECT version FROM schema_version ORDER BY version").version.tolist()
    assert versions == [m.version for m in MIGRATIONS]


def test_older_schema_is_upgraded_and_keeps_its_data(tmp_path: Path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        assert migrate(con, MIGRATIONS[:1]) == 1
        con.execute("INSERT INTO models (name, backend, accuracy, accuracy_source) VALUES ('old-model', 'external', 0.5, 'x')")
    assert "measurements" not in tables(path)
    store = Store(path)
    assert store.schema_version() == LATEST_VERSION
    assert store.query_one("SELECT accuracy FROM models WHERE name = 'old-model'") == (0.5,)
    assert "measurements" in tables(path)


def test_a_failing_migration_leaves_the_file_at_the_previous_version(tmp_path: Path):
    path = tmp_path / "broken.duckdb"
    broken = MIGRATIONS[:1] + (Migration(2, "broken", ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")),)
    with duckdb.connect(str(path)) as con:
        with pytest.raises(duckdb.Error):
            migrate(con, broken)
        assert current_version(con) == 1
    assert "half_done" not in tables(path)


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path):
    path = tmp_path / "newer.duckdb"
    with duckdb.connect(str(path)) as con:
        migrate(con)
        con.execute("INSERT INTO schema_version (version, description) VALUES (999, 'from the future')")
    with pytest.raises(SchemaError, match="newer than this Joule Planner understands"):
        Store(path).schema_version()
    with duckdb.connect(str(path)) as con:
        assert current_version(con) == 999


def test_another_programs_database_is_not_touched(tmp_path: Path):
    path = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(SchemaError, match="another program's database"):
        Store(path).schema_version()
    assert tables(path) == {"invoices"}


def test_a_file_that_is_not_a_database_gets_a_sentence(tmp_path: Path):
    path = tmp_path / "notes.duckdb"
    path.write_text("just some text, not a database\n" * 100)
    with pytest.raises(SchemaError, match="choose another --db path"):
        Store(path).schema_version()
    assert path.read_text().startswith("just some text")


def test_a_missing_folder_gets_a_sentence(tmp_path: Path):
    with pytest.raises(SchemaError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "dir" / "x.duckdb").schema_version()


def test_append_inserts_a_frame_in_one_statement_with_defaults(store: Store):
    frame = pd.DataFrame({
        "origin": ["imported"] * 3, "model": ["m"] * 3, "device": ["cpu"] * 3,
        "input_tokens": [8, 16, 32], "output_tokens": [8, 8, 8], "runtime_s": [0.1, 0.2, 0.3],
        "energy_j": [1.0, 2.0, None], "energy_source": ["estimated", "estimated", None],
    })
    store.append("measurements", frame)
    stored = store.query_df("SELECT id, input_tokens, batch_size, energy_j, recorded_at FROM measurements ORDER BY id")
    assert stored.id.tolist() == [1, 2, 3]
    assert stored.batch_size.tolist() == [1, 1, 1]
    assert stored.input_tokens.tolist() == [8, 16, 32]
    assert pd.isna(stored.energy_j.iloc[2])  # unknown stays unknown, never 0
    assert stored.recorded_at.notna().all()


def test_append_is_all_or_nothing(store: Store):
    bad = pd.DataFrame({"origin": ["imported"] * 2, "model": ["m"] * 2, "device": ["cpu"] * 2,
                        "input_tokens": [8, -1], "output_tokens": [8, 8], "runtime_s": [0.1, 0.1]})
    with pytest.raises(duckdb.ConstraintException):
        store.append("measurements", bad)
    assert store.query_one("SELECT count(*) FROM measurements") == (0,)


def test_db_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("PLANNER_DB", raising=False)
    assert resolve_db_path(None) == DEFAULT_DB_PATH
    monkeypatch.setenv("PLANNER_DB", str(tmp_path / "env.duckdb"))
    assert resolve_db_path(None) == tmp_path / "env.duckdb"
    assert resolve_db_path(tmp_path / "flag.duckdb") == tmp_path / "flag.duckdb"


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
print("holding", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held_db(tmp_path: Path):
    """A database file held open for writing by another process."""
    path = tmp_path / "held.duckdb"
    Store(path).schema_version()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield path, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_held_file_gives_one_clear_sentence(held_db):
    path, pid = held_db
    started = time.monotonic()
    with pytest.raises(DatabaseBusyError) as caught:
        Store(path, busy_timeout_s=0.5).schema_version()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"in use by process {pid}" in message and "--db" in message
    assert "\n" not in message


def test_the_cli_on_a_held_file_prints_a_sentence_not_a_traceback(held_db):
    path, pid = held_db
    result = subprocess.run([sys.executable, "-m", "engine", "models", "list", "--db", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"in use by process {pid}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_deleted_file_is_recreated_with_its_schema(store: Store):
    assert store.schema_version() == LATEST_VERSION
    store.path.unlink()
    assert store.query_one("SELECT count(*) FROM models") == (0,)
    assert store.schema_version() == LATEST_VERSION


def test_threads_of_one_process_open_and_close_the_file_without_a_conflict(tmp_path):
    """The app's script thread and its polling fragments connect at once: DuckDB used to say
    "Unique file handle conflict" when one thread attached while another closed."""
    import threading

    store = Store(tmp_path / "threads.duckdb")
    store.query_one("SELECT 1")
    errors: list[str] = []

    def work() -> None:
        for _ in range(150):
            try:
                store.query_one("SELECT count(*) FROM models")
            except Exception as exc:  # noqa: BLE001 (collected and asserted on)
                errors.append(str(exc))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
