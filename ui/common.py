"""What the pages share: the store handle, the way errors are shown, and flashed messages.

Numbers are written by :mod:`engine.formatting`, as in the CLI.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from engine.errors import InputError, PlannerError, Problem
from engine.formatting import format_count
from engine.paths import PROJECT_ROOT
from engine.store import Store

#: The favicon, shipped with the app: a material icon would be fetched from the internet.
PAGE_ICON = PROJECT_ROOT / "ui" / "assets" / "icon.png"


@st.cache_resource
def get_store() -> Store:
    """The database of this app (``$PLANNER_DB`` or data/planner.duckdb).

    A Store holds a path, not an open connection, so the CLI and workers can write
    between the app's reads.
    """
    return Store()


def show_error(exc: BaseException) -> None:
    """One ``st.error`` in words: every problem of an InputError on its own line."""
    if isinstance(exc, InputError):
        st.error("Nothing was changed:\n\n" + "\n".join(f"- {p}" for p in exc.problems))
    elif isinstance(exc, PlannerError):
        st.error(str(exc))
    else:
        st.error(f"Unexpected error ({type(exc).__name__}): {exc}")


def problems_table(problems: list[Problem], *, expected: bool = True) -> pd.DataFrame:
    """Problems as rows (where, column, problem[, expected]) for ``st.dataframe``."""
    rows = [{"where": p.where, "column": p.column or "", "problem": p.message,
             **({"expected": p.expected or ""} if expected else {})} for p in problems]
    return pd.DataFrame(rows)


def problems_heading(problems: list[Problem], what: str) -> str:
    """``The workload has 1 problem; nothing was planned. Fix it, ...`` with the right number."""
    return f"{what} has {format_count(len(problems), 'problem')}"


def flash(message: str, warnings: list[str] | None = None) -> None:
    """Keep a success message (and warnings) to show after the next rerun."""
    st.session_state["_flash"] = (message, list(warnings or []))


def show_flash() -> None:
    """Show, once, what :func:`flash` kept."""
    kept = st.session_state.pop("_flash", None)
    if kept:
        message, warnings = kept
        st.success(message)
        for warning in warnings:
            st.warning(warning)
