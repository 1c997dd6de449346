"""Is the database file whole? DuckDB's storage errors, and the operating system's, in words.

What DuckDB 2.0 reports, measured on a real planner database (see tests/test_store.py):

- a file cut short: it often *opens* (the catalog sits at the front), answers
  ``count(*)`` from its statistics, and even accepts writes; only reading a column whose
  block is gone fails, with ``IOException: Could not read enough bytes from file "...":
  attempted to read N bytes from location L``. Cut into the headers, opening fails so.
- flipped bytes in a data block: ``duckdb.Error: Corrupt database file: computed checksum
  X does not match stored checksum Y in block at location L``, on the first read of that
  block (in a header: on open). Blocks of a primary-key index are read only when a row is
  inserted, so damage there shows on the first write, which then fails and is rolled back.
- a damaged write-ahead log: on open, ``duckdb.Error: Failure while replaying WAL file
  "...wal": Corrupt WAL file: entry at byte position P computed checksum ...``. (A log
  cut short is DuckDB's torn last write: it replays what is whole, silently.)
- a full disk: ``TransactionException: Failed to commit: Could not write file "...wal":
  No space left on device`` on commit; ``IOException: Could not write file ...`` when
  creating a file; ``FatalException: Failed to create checkpoint ...`` on a checkpoint.

So a cheap look at open would miss most damage: :func:`verify_readable` reads every
column of every table once (every data block passes DuckDB's checksum), the Store does
that on the first open of a file in each process, and :func:`translate` turns any of the
errors above, wherever they surface later, into one sentence.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import duckdb

from engine.errors import DatabaseDamagedError, DatabaseWriteError, DiskFullError, PlannerError
from engine.store.backups import newest_backup, wal_path

_CORRUPT_BLOCK = re.compile(r"Corrupt database file: .*?in block at location (\d+)", re.IGNORECASE)
_SHORT_READ = re.compile(r"Could not read enough bytes from file \"[^\"]*\": attempted to read \d+ bytes "
                         r"from location (\d+)", re.IGNORECASE)
_CORRUPT_WAL = re.compile(r"Failure while replaying WAL file|Corrupt WAL file", re.IGNORECASE)
_WAL_POSITION = re.compile(r"entry at byte position (\d+)", re.IGNORECASE)
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded", re.IGNORECASE)
_CHECKPOINT_FAILED = re.compile(r"Failed to create checkpoint", re.IGNORECASE)
_OS_WRITE_FAILED = re.compile(r"(?:Could not write|Cannot open|Could not truncate|Could not fsync) file "
                              r"\"([^\"]*)\": ([^\n\"]+)", re.IGNORECASE)


def verify_readable(con: duckdb.DuckDBPyConnection) -> None:
    """Read every column of every table once, so every data block passes its checksum.

    Raises DuckDB's own error on the first damaged or missing block (:func:`translate`
    words it). Costs one pass over the data; a hash keeps the result one row per table.
    """
    tables = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "ORDER BY schema_name, table_name"
    ).fetchall()
    for schema, table in tables:
        con.execute(f"SELECT max(hash(COLUMNS(*))) FROM {_quote(schema)}.{_quote(table)}").fetchall()


def translate(exc: BaseException, db_path: Path) -> PlannerError | None:
    """The sentence for a storage error of DuckDB's, or None when ``exc`` is not one."""
    if not isinstance(exc, duckdb.Error):
        return None
    text = str(exc)
    if _DISK_FULL.search(text):
        return disk_full_error(db_path, checkpoint=bool(_CHECKPOINT_FAILED.search(text)))
    if _CORRUPT_WAL.search(text):
        position = _WAL_POSITION.search(text)
        where = f"a checksum does not match at byte {position.group(1)}" if position else "it cannot be replayed"
        return damaged_error(db_path, where, wal_damaged=True)
    block = _CORRUPT_BLOCK.search(text)
    if block:
        return damaged_error(db_path, f"a checksum does not match in the block at byte {block.group(1)}")
    short = _SHORT_READ.search(text)
    if short:
        return damaged_error(db_path, f"the file is cut short: it ends before byte {short.group(1)}, "
                                      "where DuckDB expects data")
    os_failure = _OS_WRITE_FAILED.search(text)
    if os_failure and Path(os_failure.group(1)).name in (db_path.name, wal_path(db_path).name):
        return DatabaseWriteError(
            f"Cannot write the database {db_path}: {os_failure.group(2).strip().lower()}; "
            "nothing was written. Make the disk writable, or pass --db (or set PLANNER_DB) to use another file."
        )
    return None


def translate_os_error(exc: OSError, db_path: Path, doing: str) -> PlannerError:
    """The sentence for an OS error while the store copies or writes a file itself."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(db_path)
    return DatabaseWriteError(f"Could not {doing}: {exc.strerror or exc}; nothing was written.")


def disk_full_error(db_path: Path, *, checkpoint: bool = False) -> DiskFullError:
    """The disk holding ``db_path`` is full; say what was kept."""
    if checkpoint:  # the changes are safe in the log; only folding them into the file failed
        kept = f"what was saved is kept in {wal_path(db_path)} until there is room to fold it into the file"
    else:
        kept = "nothing was written"
    return DiskFullError(f"The disk holding {db_path} is full; free space and try again ({kept}).")


def damaged_error(db_path: Path, reason: str, *, wal_damaged: bool = False) -> DatabaseDamagedError:
    """One sentence: which file is damaged, that it was left alone, and how to get going again."""
    backup = newest_backup(db_path)
    wal = wal_path(db_path)
    if wal_damaged:
        head = (f"The database {db_path} cannot be opened: its write-ahead log {wal} is damaged ({reason}); "
                "nothing was written to either.")
        skip_log = (f"move {wal} away to open the database as of its last checkpoint "
                    "(the changes kept only in that log are lost)")
        if backup is not None:
            fix = f"Restore the newest backup (move {wal} away, then copy {backup} over {db_path}), or {skip_log}."
        else:
            fix = f"No backup was found beside it; {skip_log}."
    else:
        head = f"The database {db_path} is damaged ({reason}); nothing was written to it."
        also_wal = f" and {wal}" if wal.exists() else ""
        if backup is not None:
            fix = (f"Restore the newest backup (copy {backup} over {db_path}"
                   f"{f', and move {wal} away' if also_wal else ''}), or move {db_path}{also_wal} away "
                   "to start a new database.")
        else:
            fix = (f"No backup was found beside it; move {db_path}{also_wal} away to start a new database, "
                   "or pass --db (or set PLANNER_DB) to use another file.")
    return DatabaseDamagedError(f"{head} {fix}", path=db_path, backup=backup)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
