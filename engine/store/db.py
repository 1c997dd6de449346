"""The one DuckDB file everything lives in.

Connections are short-lived: each operation opens the file, does its work and closes
it, so the app, the CLI and a profiling worker can take turns writing. DuckDB lets one
process at a time hold the file; a process that finds it held retries for a moment and
then gets one clear sentence (:class:`DatabaseBusyError`), never a traceback.
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

from engine.errors import DatabaseBusyError, SchemaError
from engine.paths import resolve_db_path
from engine.store.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE, Migration

_LOCK_PATTERN = re.compile(r"Could not set lock on file|Conflicting lock", re.IGNORECASE)
# Within one process, DuckDB shares one database instance per file among its connections;
# a thread that connects while another closes the last connection can find the file
# "already attached" for a moment. Opening and closing take turns, and that case is retried.
_ATTACH_RACE_PATTERN = re.compile(r"Unique file handle conflict|already attached", re.IGNORECASE)
_open_close_lock = threading.Lock()
_PID_PATTERN = re.compile(r"\(PID (\d+)\)")

# Paths this process has already brought to the latest schema (checked once per process).
_migrated_paths: set[Path] = set()
_migrate_lock = threading.Lock()


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
        deadline = time.monotonic() + self.busy_timeout_s
        delay_s = 0.05
        while True:
            try:
                with _open_close_lock:
                    return duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                if not _LOCK_PATTERN.search(str(exc)):
                    raise SchemaError(f"Cannot open the database {self.path} ({_first_line(exc)}); choose another --db path.") from exc
                if time.monotonic() >= deadline:
                    raise DatabaseBusyError(_busy_sentence(self.path, str(exc))) from None
            except duckdb.Error as exc:
                if not _ATTACH_RACE_PATTERN.search(str(exc)) or time.monotonic() >= deadline:
                    raise SchemaError(
                        f"{self.path} is not a Joule Planner database that DuckDB can open "
                        f"({_first_line(exc)}); choose another --db path."
                    ) from exc
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file (at the latest schema), yield a connection, close it afterwards."""
        if not self.path.exists():  # a new (or deleted and re-created) file needs its schema again
            _migrated_paths.discard(self.path.resolve())
        con = self._open()
        try:
            self._ensure_schema(con)
            yield con
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
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- schema ------------------------------------------------------------------------

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        key = self.path.resolve()
        if key in _migrated_paths and self.migrations == MIGRATIONS:
            return
        with _migrate_lock:
            migrate(con, self.migrations, self.path)
            if self.migrations == MIGRATIONS:
                _migrated_paths.add(key)

    def schema_version(self) -> int:
        """The version the file is at (the latest, once opened through this class)."""
        with self.connect() as con:
            return current_version(con)

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


def _busy_sentence(path: Path, message: str) -> str:
    pid = _PID_PATTERN.search(message)
    holder = f"process {pid.group(1)}" if pid else "another process"
    return (
        f"The database {path} is in use by {holder}; wait for it to finish, "
        "or pass --db (or set PLANNER_DB) to use another file."
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
