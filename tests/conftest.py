"""Shared fixtures: every test gets its own database file, never data/planner.duckdb."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine.store import Store  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point PLANNER_DB at a fresh file for each test, and clear Streamlit's caches."""
    path = tmp_path / "planner.duckdb"
    monkeypatch.setenv("PLANNER_DB", str(path))
    if "streamlit" in sys.modules:  # only the app tests load it; clear what they cached
        import streamlit as st

        st.cache_data.clear()
        st.cache_resource.clear()
    return path


@pytest.fixture
def store(isolated_db: Path) -> Store:
    return Store(isolated_db)


@pytest.fixture(scope="session")
def demo_models():
    """The real demo models under data/models (generated once; `make test` prepares them)."""
    from engine.demo_models import ensure_demo_models
    from engine.paths import DEFAULT_MODELS_DIR

    return {demo.backend: demo for demo in ensure_demo_models(DEFAULT_MODELS_DIR)}


def write_grid_csv(path: Path, energy_source: str = "measured") -> Path:
    """A measurements CSV of a known surface: runtime 0.05 + 0.0002·τin + 0.02·τout s at 250 W, ±2% noise."""
    rows = ["model,device,input_tokens,output_tokens,runtime_s,energy_j,trial,energy_source"]
    for i in (8, 32, 128, 512):
        for o in (8, 32, 128):
            for trial, wobble in enumerate((0.98, 1.0, 1.02), start=1):
                runtime = (0.05 + 0.0002 * i + 0.02 * o) * wobble
                rows.append(f"sim,gpu0,{i},{o},{runtime},{runtime * 250},{trial},{energy_source}")
    path.write_text("\n".join(rows) + "\n")
    return path
