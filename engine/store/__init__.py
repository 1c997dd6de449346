"""Persistence: one DuckDB file with a versioned schema."""

from engine.store.db import Store, append_frame, current_version, migrate
from engine.store.migrations import LATEST_VERSION, MIGRATIONS, Migration

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Migration", "Store", "append_frame", "current_version", "migrate"]
