"""ui.navigation: the one private Streamlit switch the app relies on still means what we use it for.

Streamlit keeps an older multipage mode for apps with a ``pages/`` folder. On a deep link to
a fresh server it runs the page file directly (not app.py) and lists every file of the
folder in the sidebar. ``ensure_app_navigation`` turns it off through the private class
attribute ``PagesManager.uses_pages_directory``. These tests fail the day Streamlit renames
it, stops deriving it from the ``pages/`` folder, or stops consulting it before running the
script; then ensure_app_navigation must be revisited (tests/test_browser.py's deep-link test
shows the symptom in a real browser).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import script_runner

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pages_flag():
    saved = PagesManager.uses_pages_directory
    yield
    PagesManager.uses_pages_directory = saved


def test_the_switch_is_a_class_attribute_set_from_the_pages_folder(pages_flag, tmp_path: Path):
    assert "uses_pages_directory" in vars(PagesManager)
    PagesManager.uses_pages_directory = None
    PagesManager(str(ROOT / "app.py"), setup_watcher=False)
    assert PagesManager.uses_pages_directory is True  # this app has a pages/ folder: the old mode is on

    (tmp_path / "app.py").write_text("")
    PagesManager.uses_pages_directory = None
    PagesManager(str(tmp_path / "app.py"), setup_watcher=False)
    assert PagesManager.uses_pages_directory is False  # no pages/ folder: off


def test_a_switch_once_off_stays_off(pages_flag):
    PagesManager.uses_pages_directory = False
    PagesManager(str(ROOT / "app.py"), setup_watcher=False)
    assert PagesManager.uses_pages_directory is False


def test_the_script_runner_runs_the_pages_folder_only_while_the_switch_is_on():
    source = inspect.getsource(script_runner.ScriptRunner)
    assert "if PagesManager.uses_pages_directory:" in source
    assert "_mpa_v1(" in source.split("if PagesManager.uses_pages_directory:", 1)[1].splitlines()[1]
    assert 'pages_folder: Final = resolved_main_script_path.parent / "pages"' in inspect.getsource(script_runner._mpa_v1)


def test_ensure_app_navigation_turns_the_old_mode_off(pages_flag, monkeypatch):
    import ui.navigation as navigation

    reruns = []
    monkeypatch.setattr(navigation.st, "rerun", lambda: reruns.append(True))
    monkeypatch.setattr(navigation, "_navigation_repaired", False)
    PagesManager.uses_pages_directory = True
    navigation.ensure_app_navigation()
    assert PagesManager.uses_pages_directory is False and reruns == [True]  # the first time, this run is mended too
    PagesManager.uses_pages_directory = True
    navigation.ensure_app_navigation()
    assert PagesManager.uses_pages_directory is False and reruns == [True]  # later, the switch alone
