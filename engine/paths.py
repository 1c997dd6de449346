"""Where the project keeps its files, and how a user overrides them."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
DEFAULT_DB_PATH = DATA_DIR / "planner.duckdb"
DEFAULT_MODELS_DIR = DATA_DIR / "models"
DB_ENV_VAR = "PLANNER_DB"


def resolve_db_path(explicit: str | os.PathLike | None = None) -> Path:
    """The database file to use: ``explicit`` (``--db``), else ``$PLANNER_DB``, else the default."""
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(DB_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_DB_PATH
