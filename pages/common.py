"""What the pages share: the store handle and the way errors are shown.

Not a page itself; app.py lists the pages. Numbers are written by :mod:`engine.formatting`,
as in the CLI.
"""

from __future__ import annotations

import streamlit as st

from engine.errors import InputError, PlannerError
from engine.store import Store


_navigation_repaired = False


def ensure_app_navigation() -> None:
    """Run every page through app.py's navigation, even on a deep link to a fresh server.

    Streamlit keeps an older mode for apps with a ``pages/`` folder: when the very first
    request of a new server names a page (``/profile``), it runs that file directly, lists
    every file of the folder in the sidebar, and stays so for the server's life. Switching
    the mode off mends every later run; the first time, a rerun also mends this one (a
    first request carries no widget input to lose). AppTest re-enters the old mode on each
    run, so it only ever gets the switch, never a rerun that would drop its input.
    """
    global _navigation_repaired
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not _navigation_repaired:
            _navigation_repaired = True
            st.rerun()


@st.cache_resource
def get_store() -> Store:
    """The database of this app (``$PLANNER_DB`` or data/planner.duckdb).

    A Store holds a path, not an open connection, so the CLI and workers can write
    between the app's reads.
    """
    return Store()


def show_error(exc: Exception) -> None:
    """One ``st.error`` in words: every problem of an InputError on its own line."""
    if isinstance(exc, InputError):
        st.error("Nothing was changed:\n\n" + "\n".join(f"- {p}" for p in exc.problems))
    elif isinstance(exc, PlannerError):
        st.error(str(exc))
    else:
        st.error(f"Unexpected error ({type(exc).__name__}): {exc}")


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
