"""ui.background: long work runs off the script thread, its progress shows while it runs, the
outcome shows once when it ends, and a new request supersedes an old one.

The pages are driven by AppTest, where fragments do not rerun on their own: :func:`run_until`
reruns the app until the outcome shows, as a browser's polling fragment would.
"""

from __future__ import annotations

import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

from tests.apptest_wait import run_until
from ui.background import TaskCancelled, TaskProgress


def script():
    """A page with one slot: a button starts work of ``steps`` steps; its outcome is shown."""
    import time

    import streamlit as st

    from ui import background

    outcome = background.take_outcome("work")
    if outcome is not None:
        st.session_state["shown"] = st.session_state.get("shown", []) + [outcome.value]
        if outcome.error is not None:
            st.error(f"failed: {outcome.error}")
        else:
            st.success(f"result {outcome.value}")
    steps = st.number_input("steps", value=3, key="steps")
    delay = st.number_input("delay", value=0.2, key="delay")
    fail = st.checkbox("fail", key="fail")

    def work(progress, steps=int(steps), delay=float(delay), fail=fail):
        progress.report("counting", total=steps)
        for step in range(steps):
            progress.check()
            time.sleep(delay)
            progress.report(done=step + 1)
        if fail:
            raise ValueError("the work failed")
        return steps * 10

    if st.button("Go"):
        background.start("work", "Counting", work, request=int(steps))
    background.show_progress("work", poll_s=0.2)


def app() -> AppTest:
    return AppTest.from_function(script, default_timeout=30).run()


def test_progress_shows_while_it_runs_and_the_outcome_once_when_it_ends():
    at = app()
    at.number_input(key="steps").set_value(10)
    at.button[0].click().run()  # the script returns at once: the work runs in its thread
    assert not at.success
    assert any("Counting: counting…" in p.proto.text for p in at.get("progress"))
    run_until(at, lambda a: any("result 100" in s.value for s in a.success))
    at.run()
    assert not at.success  # shown once
    assert at.session_state["shown"] == [100]


def test_the_script_thread_is_not_held_while_the_work_runs():
    at = app()
    at.number_input(key="steps").set_value(20)
    at.number_input(key="delay").set_value(0.25)
    started = time.monotonic()
    at.button[0].click().run()
    at.run()
    assert time.monotonic() - started < 4.0  # 5 s of work still going
    assert any("of 20" in p.proto.text for p in at.get("progress"))
    assert any(b.label == "Stop" for b in at.button)


def test_a_new_request_supersedes_the_one_before():
    at = app()
    at.number_input(key="steps").set_value(8)
    at.button[0].click().run()
    at.number_input(key="steps").set_value(2)
    at.button[0].click().run()
    run_until(at, lambda a: bool(a.success))
    assert [s.value for s in at.success] == ["result 20"]
    time.sleep(2.0)  # the superseded work stops at its next step and is never shown
    at.run()
    assert not at.success and at.session_state["shown"] == [20]


def test_stop_drops_the_task():
    at = app()
    at.number_input(key="steps").set_value(30)
    at.button[0].click().run()
    next(b for b in at.button if b.label == "Stop").click().run()
    assert not at.get("progress")
    time.sleep(0.5)
    at.run()
    assert not at.success and "shown" not in at.session_state


def test_an_error_of_the_work_is_the_outcome():
    at = app()
    at.checkbox(key="fail").check()
    at.number_input(key="steps").set_value(1)
    at.button[0].click().run()
    run_until(at, lambda a: bool(a.error))
    assert at.error[0].value == "failed: the work failed"


def test_task_progress_is_consistent_across_threads():
    progress = TaskProgress()
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            progress.report(f"step {n}", done=n, total=n)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2000):
            message, done, total = progress.snapshot()
            assert message == (f"step {done}" if done else "") and total == (done or None)
    finally:
        stop.set()
        thread.join()
    progress.cancel()
    with pytest.raises(TaskCancelled):
        progress.check()
