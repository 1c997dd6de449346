"""Every page runs through app.py's navigation, even on a deep link to a fresh server.

This is the app's one use of a private Streamlit attribute
(``streamlit.runtime.pages_manager.PagesManager.uses_pages_directory``);
tests/test_ui_navigation.py fails the day Streamlit changes what it means.
"""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

_navigation_repaired = False


def ensure_app_navigation() -> None:
    """Switch off Streamlit's older mode for apps with a ``pages/`` folder.

    In that mode, when the very first request of a new server names a page (``/profile``),
    Streamlit runs that file directly instead of app.py, lists every file of the folder
    in the sidebar, and stays so for the server's life. Switching the mode off mends every
    later run; the first time, a rerun also mends this one (a first request carries no
    widget input to lose). AppTest re-enters the old mode on each run, so it only ever
    gets the switch, never a rerun that would drop its input.
    """
    global _navigation_repaired
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not _navigation_repaired:
            _navigation_repaired = True
            st.rerun()
