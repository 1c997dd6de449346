"""Persistence: one DuckDB file with a versioned schema, read through once per process, backed up before upgrades."""

from engine.store.backups import KEEP_BACKUPS, list_backups, newest_backup
from engine.store.db import Store, append_frame, current_version, migrate
from engine.store.migrations import LATEST_VERSION, MIGRATIONS, Migration

__all__ = ["KEEP_BACKUPS", "LATEST_VERSION", "MIGRATIONS", "Migration", "Store", "append_frame", "current_version",
           "list_backups", "migrate", "newest_backup"]
