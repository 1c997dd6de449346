"""Copies of the database file kept beside it, so a damaged or mis-migrated file can be replaced.

The Store takes one before every schema upgrade of an existing file, and on request
(:meth:`engine.store.Store.backup`). A backup is a byte copy made right after a
CHECKPOINT, so the copy alone holds the whole database; restoring it is copying it back
over the file. Backups beside the file are named ``<file>.backup-v<schema
version>-<UTC time>``; the newest :data:`KEEP_BACKUPS` of those are kept and older ones
deleted. No other file is ever deleted: a copy the user made, or a backup written to a
path the user chose, stays.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import duckdb

KEEP_BACKUPS = 3
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def backup_pattern(db_path: Path) -> re.Pattern[str]:
    """Names of the backups of ``db_path``: version, UTC time, and a counter for the same second."""
    return re.compile(rf"^{re.escape(db_path.name)}\.backup-v(\d+)-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?$")


def list_backups(db_path: Path) -> list[Path]:
    """The backups beside ``db_path``, newest first."""
    pattern = backup_pattern(db_path)
    found = []
    try:
        candidates = list(db_path.parent.iterdir())
    except OSError:
        return []
    for candidate in candidates:
        match = pattern.match(candidate.name)
        if match and candidate.is_file():
            found.append(((match.group(2), int(match.group(3) or 0)), candidate))
    return [path for _key, path in sorted(found, reverse=True)]


def newest_backup(db_path: Path) -> Path | None:
    """The most recent backup beside ``db_path``, or None."""
    backups = list_backups(db_path)
    return backups[0] if backups else None


def next_backup_path(db_path: Path, version: int, now: datetime | None = None) -> Path:
    """A new, unused backup name beside ``db_path`` for a file at schema ``version``."""
    stamp = (now or datetime.now(timezone.utc)).strftime(_STAMP_FORMAT)
    candidate = db_path.with_name(f"{db_path.name}.backup-v{version}-{stamp}")
    counter = 1
    while candidate.exists() or wal_path(candidate).exists():
        counter += 1
        candidate = db_path.with_name(f"{db_path.name}.backup-v{version}-{stamp}-{counter}")
    return candidate


def write_backup(con: duckdb.DuckDBPyConnection, db_path: Path, destination: Path) -> Path:
    """Fold the log into ``db_path`` and copy it (and a log still there) to ``destination``.

    ``con`` is an open connection to ``db_path``: holding it keeps other processes from
    writing during the copy. The copy lands under a temporary name and is renamed when
    complete, so a failed copy (a full disk) never looks like a backup. Raises OSError.
    """
    con.execute("CHECKPOINT")
    pairs = [(db_path, destination)]
    if wal_path(db_path).exists() and wal_path(db_path).stat().st_size:
        pairs.append((wal_path(db_path), wal_path(destination)))
    for source, target in pairs:
        partial = target.with_name(target.name + ".partial")
        try:
            with open(source, "rb") as reader, open(partial, "xb") as writer:
                shutil.copyfileobj(reader, writer, length=1 << 20)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return destination


def prune_backups(db_path: Path, keep: int = KEEP_BACKUPS) -> list[Path]:
    """Delete all but the newest ``keep`` backups beside ``db_path`` (and their logs); returns those deleted."""
    stale = list_backups(db_path)[keep:]
    for backup in stale:
        backup.unlink(missing_ok=True)
        wal_path(backup).unlink(missing_ok=True)
    return stale


def wal_path(db_path: Path) -> Path:
    """The write-ahead log DuckDB keeps beside ``db_path`` until it folds it into the file."""
    return db_path.with_name(db_path.name + ".wal")
