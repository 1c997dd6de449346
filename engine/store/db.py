"""The one DuckDB file everything lives in.

Connections are short-lived: each operation opens the file, does its work and closes
it, so the app, the CLI and a profiling worker can take turns writing. DuckDB lets one
process at a time hold the file; a process that finds it held retries for a moment and
then gets one clear sentence (:class:`DatabaseBusyError`), never a traceback.

The first time a process opens a file, it reads the whole of it once
(:func:`~engine.store.health.verify_readable`) before anything is written: a damaged file
is refused with :class:`DatabaseDamagedError`, and stays refused in this process until the
file is replaced. Before a schema upgrade of an existing file, a backup is copied beside
it (:mod:`engine.store.backups`). DuckDB's storage errors met later (a damaged block, a
full disk) become sentences too (:func:`~engine.store.health.translate`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from engine.errors import DatabaseBusyError, DatabaseDamagedError, DatabaseWriteError, SchemaError
from engine import safe_write
from engine.paths import resolve_db_path
from engine.store import backups
from engine.store.health import translate, translate_os_error, verify_readable
from engine.store.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE, Migration

_LOCK_PATTERN = re.compile(r"Could not set lock on file|Conflicting lock", re.IGNORECASE)
# Within one process, DuckDB shares one database instance per file among its connections;
# a thread that connects while another closes the last connection can find the file
# "already attached" for a moment. Opening and closing take turns, and that case is retried.
_ATTACH_RACE_PATTERN = re.compile(r"Unique file handle conflict|already attached", re.IGNORECASE)
_open_close_lock = threading.Lock()
_PID_PATTERN = re.compile(r"\(PID (\d+)\)")

# Files this process has read through once and brought to the latest schema, by path, with
# the (device, inode, size) they had then: a file replaced under the same name, or cut
# short, is checked again (a file grows a block at a time, so this is rare for our own writes).
_checked_files: dict[Path, tuple[int, int, int]] = {}
_check_lock = threading.Lock()
# Files found damaged, with what they looked like then and the sentence: refused without
# opening them again until they change (a backup copied over them, a log moved away).
_damaged_files: dict[Path, tuple[tuple, DatabaseDamagedError]] = {}


class Store:
    """A handle on the database file; it holds a path, not an open connection.

    ``busy_timeout_s`` is how long to keep retrying while another process holds the file.
    """

    def __init__(self, path: str | Path | None = None, *, busy_timeout_s: float = 5.0,
                 migrations: Sequence[Migration] = MIGRATIONS):
        self.path = resolve_db_path(path)
        self.busy_timeout_s = busy_timeout_s
        self.migrations = tuple(migrations)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- connections -------------------------------------------------------------------

    def _open(self) -> duckdb.DuckDBPyConnection:
        if self.path.exists() and self.path.is_dir():
            raise SchemaError(f"{self.path} is a directory; --db needs a database file.")
        if not self.path.parent.exists():
            raise SchemaError(f"The folder {self.path.parent} does not exist; create it or choose another --db path.")
        existed = self.path.exists()
        deadline = time.monotonic() + self.busy_timeout_s
        delay_s = 0.05
        while True:
            try:
                with _open_close_lock:
                    return duckdb.connect(str(self.path))
            except duckdb.Error as exc:
                in_words = translate(exc, self.path)
                if isinstance(in_words, DatabaseWriteError) and not existed:
                    _remove_empty_leftover(self.path)  # a full disk leaves an empty file DuckDB would then refuse
                if in_words is not None:
                    raise in_words from exc
                if isinstance(exc, duckdb.IOException):
                    if not _LOCK_PATTERN.search(str(exc)):
                        raise SchemaError(f"Cannot open the database {self.path} ({_first_line(exc)}); "
                                          "choose another --db path.") from exc
                    if time.monotonic() >= deadline:
                        raise DatabaseBusyError(_busy_sentence(self.path, str(exc))) from None
                elif not _ATTACH_RACE_PATTERN.search(str(exc)) or time.monotonic() >= deadline:
                    raise SchemaError(
                        f"{self.path} is not a Joule Planner database that DuckDB can open "
                        f"({_first_line(exc)}); choose another --db path."
                    ) from exc
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file (read through once per process, at the latest schema), yield a
        connection, close it afterwards.

        A damaged file raises :class:`DatabaseDamagedError` and is never written to; DuckDB's
        storage errors inside the block (a damaged block, a full disk) become sentences.
        """
        key = self.path.resolve()
        _refuse_known_damage(key, self.path)
        if not self.path.exists():  # a new (or deleted and re-created) file needs its schema again
            _checked_files.pop(key, None)
        try:
            con = self._open()
        except DatabaseDamagedError as exc:
            _remember_damage(key, self.path, exc)
            raise
        try:
            self._check(con, key)
            yield con
        except duckdb.Error as exc:
            in_words = translate(exc, self.path)
            if in_words is None:
                raise
            if isinstance(in_words, DatabaseDamagedError):
                _keep_from_writing(con)
                _remember_damage(key, self.path, in_words)
            raise in_words from exc
        finally:
            with _open_close_lock:
                con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside one transaction: all of it lands, or none of it."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                _roll_back(con)
                raise
            con.execute("COMMIT")

    # -- schema ------------------------------------------------------------------------

    def _check(self, con: duckdb.DuckDBPyConnection, key: Path) -> None:
        """Once per process and file: read it all through, back it up before an upgrade, migrate."""
        identity = _identity(self.path)
        if _checked_files.get(key) == identity and self.migrations == MIGRATIONS:
            return
        with _check_lock:
            if _checked_files.get(key) != identity:
                verify_readable(con)
            version = current_version(con)
            latest = self.migrations[-1].version if self.migrations else 0
            if 0 < version < latest:
                self._backup_with(con, version, None)
            migrate(con, self.migrations, self.path)
            if self.migrations == MIGRATIONS:
                _checked_files[key] = identity

    def schema_version(self) -> int:
        """The version the file is at (the latest, once opened through this class)."""
        with self.connect() as con:
            return current_version(con)

    # -- backups -----------------------------------------------------------------------

    def backup(self, path: str | Path | None = None) -> Path:
        """Copy the whole database, read through and checkpointed, and return where it went.

        Without ``path`` the copy goes beside the file as ``<file>.backup-v<version>-<UTC
        time>`` and only the newest backups there are kept; a ``path`` that is a folder
        gets that name inside it; an existing file is never overwritten.
        """
        with self.connect() as con:
            verify_readable(con)
            return self._backup_with(con, current_version(con), path)

    def _backup_with(self, con: duckdb.DuckDBPyConnection, version: int, path: str | Path | None) -> Path:
        if path is None:
            destination = backups.next_backup_path(self.path, version)
        else:
            destination = Path(path).expanduser()
            if destination.is_dir() and not destination.is_symlink():
                destination = backups.next_backup_path(destination / self.path.name, version)
            # The same rules as every file we write: a new regular file only, never through a
            # link, never over the database itself.
            safe_write.check_destination(destination, overwrite=False, inputs=safe_write.database_inputs(self.path))
        try:
            backups.write_backup(con, self.path, destination)
        except OSError as exc:
            raise translate_os_error(exc, self.path, f"copy {self.path} to {destination}") from exc
        if path is None:
            backups.prune_backups(self.path)
        return destination

    # -- reading and writing -----------------------------------------------------------

    def query_df(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a query with bound parameters and return its rows as a DataFrame."""
        with self.connect() as con:
            return con.execute(sql, list(params)).df()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of a query, or None."""
        with self.connect() as con:
            return con.execute(sql, list(params)).fetchone()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement with bound parameters."""
        with self.connect() as con:
            con.execute(sql, list(params))

    def append(self, table: str, frame: pd.DataFrame) -> None:
        """Append a DataFrame to a table in one statement (columns matched by name)."""
        with self.transaction() as con:
            append_frame(con, table, frame)


def append_frame(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    """``INSERT INTO table BY NAME`` from a DataFrame: one statement, never row by row.

    Columns the frame lacks take the table's defaults. ``table`` is an identifier from
    our own code, checked against the catalog of tables, never user input.
    """
    known = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if table not in known:
        raise ValueError(f"unknown table {table!r}")
    if frame.empty:
        return
    con.register("_incoming_frame", frame)
    try:
        con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _incoming_frame')
    finally:
        try:
            con.unregister("_incoming_frame")
        except duckdb.TransactionException:
            pass  # the insert failed and aborted the transaction; the rollback drops the view too


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied to this file, 0 for an empty file."""
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    return int(version or 0)


def migrate(con: duckdb.DuckDBPyConnection, migrations: Sequence[Migration] = MIGRATIONS,
            path: Path | None = None) -> int:
    """Apply, in order, each migration newer than the file; each in its own transaction.

    Returns the version reached. A file newer than this code is refused, not touched.
    """
    latest = migrations[-1].version if migrations else 0
    version = current_version(con)
    if version > latest:
        raise SchemaError(
            f"The database {path or ''} is at schema version {version}, newer than this "
            f"Joule Planner understands ({latest}); update Joule Planner or choose another --db file."
        )
    if version == 0:
        _reject_foreign_file(con, path)
    for migration in migrations:
        if migration.version <= version:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(SCHEMA_VERSION_TABLE)
            for statement in migration.statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                [migration.version, migration.description],
            )
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        version = migration.version
    return version


def _reject_foreign_file(con: duckdb.DuckDBPyConnection, path: Path | None) -> None:
    """A file with tables but no schema_version is someone else's database: leave it alone."""
    tables = con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0]
    if tables:
        raise SchemaError(
            f"{path or 'The database'} holds {tables} tables but no Joule Planner schema; "
            "it looks like another program's database, so it was not changed. Choose another --db file."
        )


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size


def _looks(path: Path) -> tuple:
    """What a file and its log look like now: changed when either is replaced, moved or written."""
    looks = []
    for file in (path, backups.wal_path(path)):
        try:
            stat = file.stat()
            looks.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            looks.append(None)
    return tuple(looks)


def _refuse_known_damage(key: Path, path: Path) -> None:
    known = _damaged_files.get(key)
    if known is None:
        return
    looks, error = known
    if looks == _looks(path):
        raise DatabaseDamagedError(str(error), path=error.path, backup=error.backup)
    _damaged_files.pop(key, None)  # the file was replaced or its log moved away: look at it afresh
    _checked_files.pop(key, None)


def _remember_damage(key: Path, path: Path, error: DatabaseDamagedError) -> None:
    _damaged_files[key] = (_looks(path), error)
    _checked_files.pop(key, None)


def _roll_back(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back, without hiding the error that got us here behind the rollback's own."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # DuckDB already aborted it (a failed commit, a connection it invalidated)


def _keep_from_writing(con: duckdb.DuckDBPyConnection) -> None:
    """Closing the last connection folds a replayed log into the file: not into a damaged one."""
    try:
        con.execute("PRAGMA disable_checkpoint_on_shutdown")
    except duckdb.Error:
        pass  # a connection DuckDB has already given up on writes nothing either


def _remove_empty_leftover(path: Path) -> None:
    try:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def _busy_sentence(path: Path, message: str) -> str:
    pid = _PID_PATTERN.search(message)
    holder = f"process {pid.group(1)}" if pid else "another process"
    return (
        f"The database {path} is in use by {holder}; wait for it to finish, "
        "or pass --db (or set PLANNER_DB) to use another file."
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
