"""The DuckDB store: migrations, appends, a file held by another process, a damaged file,
backups, and a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from engine.errors import DatabaseBusyError, DatabaseDamagedError, DiskFullError, InputError, SchemaError
from engine.paths import DEFAULT_DB_PATH, resolve_db_path
from engine.store import (KEEP_BACKUPS, LATEST_VERSION, MIGRATIONS, Migration, Store, current_version, list_backups,
                          migrate)
from tests.conftest import write_grid_csv

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


# -- a damaged file --------------------------------------------------------------------

def _bulk_measurements(n_rows: int) -> pd.DataFrame:
    """Imported rows with varied values, so the measurements fill several blocks of the file."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "origin": "imported", "model": [f"bulk-{i % 7}" for i in range(n_rows)], "device": "cpu",
        "input_tokens": rng.integers(1, 4096, n_rows), "output_tokens": rng.integers(1, 512, n_rows),
        "runtime_s": rng.random(n_rows), "energy_j": rng.random(n_rows) * 100, "energy_source": "measured",
        "warnings": [f"note {rng.integers(1 << 40)}" for _ in range(n_rows)],
    })


@pytest.fixture(scope="module")
def planner_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real planner database, written through the Store: the grid CSV imported, plus bulk rows.

    Tests damage copies of it: a copy is a new file to this process, so it is checked afresh.
    """
    from engine.measurements_io import import_measurements

    folder = tmp_path_factory.mktemp("pristine")
    store = Store(folder / "planner.duckdb")
    import_measurements(store, write_grid_csv(folder / "grid.csv"))
    store.append("measurements", _bulk_measurements(30_000))
    assert not (folder / "planner.duckdb.wal").exists()
    return store.path


def _copy(source: Path, folder: Path) -> Path:
    target = folder / "damaged.duckdb"
    shutil.copyfile(source, target)
    return target


def _snapshot(path: Path) -> dict[str, bytes]:
    """The bytes of the database and of every file beside it, to show nothing was written."""
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


def _attempt_import_and_fit(path: Path, tmp_path: Path) -> None:
    """Both writing paths the issue saw writing into a damaged file: each must be refused."""
    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements

    store = Store(path)
    with pytest.raises(DatabaseDamagedError):
        import_measurements(store, write_grid_csv(tmp_path / "more.csv"))
    with pytest.raises(DatabaseDamagedError):
        save_fits(store, fit_all(store))


def test_a_file_cut_to_half_is_refused_with_a_sentence_and_never_written(planner_db: Path, tmp_path: Path):
    path = _copy(planner_db, tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    before = _snapshot(path)
    with pytest.raises(DatabaseDamagedError) as caught:
        Store(path).schema_version()
    message = str(caught.value)
    assert message.startswith(f"The database {path} is damaged (the file is cut short")
    assert "nothing was written to it" in message
    assert f"No backup was found beside it; move {path} away to start a new database" in message
    assert "\n" not in message and "IOException" not in message
    _attempt_import_and_fit(path, tmp_path)
    assert _snapshot(path) == before


def test_flipped_bytes_in_a_data_block_are_refused_and_never_written(planner_db: Path, tmp_path: Path):
    path = _copy(planner_db, tmp_path)
    with duckdb.connect(str(path), read_only=True) as con:
        block_size, block_id = con.execute(
            "SELECT (SELECT block_size FROM pragma_database_size()), max(block_id) "
            "FROM pragma_storage_info('measurements') WHERE column_name = 'warnings'").fetchone()
    location = 3 * 4096 + block_id * block_size  # DuckDB: three 4 KiB headers, then the blocks
    with open(path, "r+b") as file:
        file.seek(location + 1000)
        chunk = file.read(64)
        file.seek(location + 1000)
        file.write(bytes(byte ^ 0xFF for byte in chunk))
    before = _snapshot(path)
    with pytest.raises(DatabaseDamagedError) as caught:
        Store(path).schema_version()
    assert str(caught.value).startswith(
        f"The database {path} is damaged (a checksum does not match in the block at byte {location}); "
        "nothing was written to it.")
    _attempt_import_and_fit(path, tmp_path)
    assert _snapshot(path) == before


def _leave_a_log(path: Path) -> Path:
    """Commit a change that stays in the write-ahead log, as after a crash."""
    with duckdb.connect(str(path)) as con:
        con.execute("PRAGMA disable_checkpoint_on_shutdown")
        con.execute("INSERT INTO settings (key, value) SELECT 'k' || i, repeat('v', 200) FROM range(500) t(i)")
    wal = path.with_name(path.name + ".wal")
    assert wal.stat().st_size > 10_000
    return wal


def test_a_damaged_write_ahead_log_is_refused_and_both_files_left_alone(planner_db: Path, tmp_path: Path):
    path = _copy(planner_db, tmp_path)
    wal = _leave_a_log(path)
    with open(wal, "r+b") as file:
        file.seek(wal.stat().st_size // 2)
        chunk = file.read(32)
        file.seek(wal.stat().st_size // 2)
        file.write(bytes(byte ^ 0xFF for byte in chunk))
    before = _snapshot(path)
    with pytest.raises(DatabaseDamagedError) as caught:
        Store(path).query_one("SELECT count(*) FROM settings")
    message = str(caught.value)
    assert f"its write-ahead log {wal} is damaged (a checksum does not match at byte" in message
    assert f"No backup was found beside it; move {wal} away to open the database as of its last checkpoint" in message
    _attempt_import_and_fit(path, tmp_path)
    assert _snapshot(path) == before


def test_a_damaged_file_with_a_log_beside_it_is_not_written_when_closed(planner_db: Path, tmp_path: Path):
    """Closing the last connection folds the log into the file; a damaged file must not get it."""
    path = _copy(planner_db, tmp_path)
    _leave_a_log(path)
    os.truncate(path, path.stat().st_size // 2)
    before = _snapshot(path)
    with pytest.raises(DatabaseDamagedError, match="is damaged"):
        Store(path).schema_version()
    assert _snapshot(path) == before


def test_the_cli_says_the_file_is_damaged_in_one_line(planner_db: Path, tmp_path: Path, capsys):
    from engine.cli import main

    path = _copy(planner_db, tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    before = _snapshot(path)
    csv = write_grid_csv(tmp_path / "more.csv")
    assert main(["import-measurements", str(csv), "--db", str(path)]) == 1
    assert main(["fit", "--db", str(path)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith(f"error: The database {path} is damaged") for line in errors)
    assert _snapshot(path) == before


def test_a_damaged_file_is_looked_at_again_once_it_is_replaced(planner_db: Path, tmp_path: Path):
    path = _copy(planner_db, tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    store = Store(path)
    for _ in range(2):  # the second refusal comes without opening the file again
        with pytest.raises(DatabaseDamagedError):
            store.schema_version()
    shutil.copyfile(planner_db, path)  # restored, in place
    assert store.query_one("SELECT count(*) FROM measurements") == (30_036,)


# -- backups -----------------------------------------------------------------------------

def test_a_backup_is_copied_beside_the_file_before_a_schema_upgrade(tmp_path: Path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        migrate(con, MIGRATIONS[:1])
        con.execute("INSERT INTO models (name, backend, accuracy, accuracy_source) VALUES ('old-model', 'external', 0.5, 'x')")
    original = path.read_bytes()
    assert Store(path).schema_version() == LATEST_VERSION
    [backup] = list_backups(path)
    assert backup.name.startswith("old.duckdb.backup-v1-")
    assert backup.read_bytes() == original  # the file as it was, before the upgrade
    with duckdb.connect(str(backup), read_only=True) as con:
        assert current_version(con) == 1
        assert con.execute("SELECT name FROM models").fetchall() == [("old-model",)]
    assert Store(path).schema_version() == LATEST_VERSION
    assert list_backups(path) == [backup]  # at the latest version: no upgrade, no new backup
    new = Store(tmp_path / "new.duckdb")
    assert new.schema_version() == LATEST_VERSION and list_backups(new.path) == []  # nothing to keep of a new file

    os.truncate(path, 3 * 4096 + 100)  # and when the upgraded file is later damaged, the sentence names the backup
    with pytest.raises(DatabaseDamagedError) as caught:
        Store(path).schema_version()
    assert caught.value.backup == backup
    assert f"Restore the newest backup (copy {backup} over {path})" in str(caught.value)


def test_only_the_newest_backups_are_kept_and_nothing_else_is_deleted(store: Store, tmp_path: Path):
    store.append("measurements", _bulk_measurements(50))
    folder = store.path.parent
    users_own = [folder / "planner.duckdb.bak", folder / "planner.duckdb.backup-mine", folder / "notes.txt"]
    old = [folder / f"planner.duckdb.backup-v3-2020010{day}T120000Z" for day in range(1, 5)]
    for file in users_own + old:
        file.write_text("keep me" if file in users_own else "an old backup")

    made = store.backup()
    assert made.name.startswith(f"planner.duckdb.backup-v{LATEST_VERSION}-")
    assert list_backups(store.path) == [made, old[3], old[2]]
    assert len(list_backups(store.path)) == KEEP_BACKUPS
    assert all(file.read_text() == "keep me" for file in users_own)
    with duckdb.connect(str(made), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM measurements").fetchone() == (50,)

    chosen = tmp_path / "elsewhere" / "mine.duckdb"
    chosen.parent.mkdir()
    assert store.backup(chosen) == chosen and chosen.exists()
    with pytest.raises(InputError, match="already exists"):
        store.backup(chosen)
    assert store.backup(chosen.parent).parent == chosen.parent
    assert chosen.exists() and len(list_backups(store.path)) == KEEP_BACKUPS


def test_a_backup_is_never_written_through_a_link_or_over_the_database(store: Store, tmp_path: Path):
    store.schema_version()
    dangling = tmp_path / "link.duckdb"
    dangling.symlink_to(tmp_path / "nowhere.duckdb")
    with pytest.raises(InputError, match="symbolic link"):
        store.backup(dangling)
    assert dangling.is_symlink() and not (tmp_path / "nowhere.duckdb").exists()
    with pytest.raises(InputError, match="the database"):
        store.backup(store.path)
    assert list_backups(store.path) == []


def test_the_cli_backs_up_beside_the_database(store: Store, capsys):
    from engine.cli import main

    store.schema_version()
    assert main(["backup", "--db", str(store.path)]) == 0
    [made] = list_backups(store.path)
    assert capsys.readouterr().out.strip() == f"backed up to {made}"


# -- a full disk ---------------------------------------------------------------------------

class _DiskFullOnCommit:
    """A real connection whose COMMIT fails as DuckDB's does on a full disk (message as measured)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, wal: Path):
        self._con = con
        self._wal = wal

    def execute(self, sql: str, *args):
        if sql.strip().upper() == "COMMIT":
            raise duckdb.TransactionException(
                f'TransactionContext Error: Failed to commit: Could not write file "{self._wal}": No space left on device')
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._con, name)


def test_a_full_disk_is_said_in_words(store: Store, monkeypatch: pytest.MonkeyPatch):
    store.schema_version()
    real_connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: _DiskFullOnCommit(real_connect(*a, **k),
                                                                              store.path.with_suffix(".duckdb.wal")))
    with pytest.raises(DiskFullError) as caught:
        store.append("measurements", _bulk_measurements(10))
    assert str(caught.value) == (f"The disk holding {store.path} is full; free space and try again "
                                 "(nothing was written).")
    monkeypatch.undo()
    assert store.query_one("SELECT count(*) FROM measurements") == (0,)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_really_full_disk_is_said_in_words_and_loses_nothing_stored(small_disk: Path):
    store = Store(small_disk / "planner.duckdb")
    stored = 0
    with pytest.raises(DiskFullError) as caught:
        for _ in range(100):
            store.append("measurements", _bulk_measurements(2_000))
            stored += 2_000
    assert str(caught.value).startswith(f"The disk holding {store.path} is full; free space and try again (")
    assert stored > 0
    assert store.query_one("SELECT count(*) FROM measurements") == (stored,)
