"""Waiting for background work in AppTest runs.

AppTest does not rerun ``@st.fragment(run_every=...)`` fragments on its own; a page whose
work runs in the background (ui.background) shows its outcome on a later run. These
helpers rerun the app, as a browser's polling fragment would, until the outcome shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamlit.testing.v1 import AppTest


def page_text(at: AppTest) -> str:
    """What the page says in words: markdown, captions, titles, alerts, and tables as text."""
    parts = [e.value for kind in ("markdown", "caption", "title", "subheader", "success", "warning", "info", "error")
             for e in getattr(at, kind)]
    parts += [p.proto.text for p in at.get("progress")]
    for frame in list(at.dataframe) + list(at.table):
        parts.append(frame.value.to_string())
    return "\n".join(str(p) for p in parts)


def run_until(at: AppTest, done: Callable[[AppTest], bool], timeout_s: float = 180.0, pause_s: float = 0.3) -> AppTest:
    """Rerun ``at`` until ``done(at)``, or fail after ``timeout_s`` saying what the page shows."""
    deadline = time.monotonic() + timeout_s
    while not done(at):
        assert not at.exception, at.exception
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {timeout_s} s; the page says:\n{page_text(at)}")
        time.sleep(pause_s)
        at.run()
    assert not at.exception, at.exception
    return at


def has_metric(label: str) -> Callable[[AppTest], bool]:
    """A ``done`` for :func:`run_until`: a metric with this label shows."""
    return lambda at: any(m.label == label for m in at.metric)
