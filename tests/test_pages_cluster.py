"""The pages' cluster parts, through AppTest, against a fake node list (no Ray, no cluster).

``engine.cluster.inventory.read_inventory_in_subprocess`` (what the pages call, off the
script thread) is replaced by a function returning a known inventory: two nodes alive,
one that left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import catalog, runs
from engine.cluster import inventory as inventory_module
from engine.cluster.errors import ClusterUnreachableError
from engine.runs.cluster import ADDRESS_ENV, saved_address, use_cluster
from engine.store import Store
from tests.apptest_wait import page_text, run_until
from tests.test_cluster import (EXECUTION_FAKES, FakeCluster, drive_execution, make_plan, two_nodes_one_left)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_cluster_in_the_environment(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    use_cluster(None)
    yield
    use_cluster(None)


@pytest.fixture
def fake_nodes(monkeypatch):
    """The node list the pages read: two nodes alive (nodeA, nodeC) and nodeB, which left; the addresses asked."""
    asked = []
    monkeypatch.setattr(inventory_module, "read_inventory_in_subprocess",
                        lambda address, probe=True: asked.append(address) or two_nodes_one_left())
    return asked


def app(page: str = "pages/home.py") -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def table_with(at: AppTest, column: str):
    return next(frame.value for frame in [*at.dataframe, *at.table] if column in frame.value.columns)


def has_table(column: str):
    return lambda at: any(column in frame.value.columns for frame in [*at.dataframe, *at.table])


def submit(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception
    return at


def test_home_without_a_cluster_says_everything_runs_here_and_asks_nothing(store: Store, fake_nodes):
    at = app()
    assert "No cluster: everything runs on this host" in page_text(at)
    assert fake_nodes == []


def test_home_saves_the_address_and_lists_two_nodes_and_one_that_left(store: Store, fake_nodes):
    at = app()
    at.text_input(key="cluster_address").input("head.lab:port")
    submit(at, "Save")
    assert "'head.lab:port' is not a cluster address" in page_text(at) and saved_address(store) is None
    at.text_input(key="cluster_address").input("10.0.0.5")
    submit(at, "Save")
    assert saved_address(store) == "10.0.0.5:6379"
    run_until(at, has_table("Node status"), timeout_s=60)
    assert fake_nodes == ["10.0.0.5:6379"]
    nodes = table_with(at, "Note").set_index("Node")
    assert nodes.Status.to_dict() == {"nodeA": "alive", "nodeC": "alive", "nodeB": "left"}
    assert nodes.loc["nodeB", "Note"] == "left the cluster (killed)"
    devices = table_with(at, "Node status")
    assert devices[["Device", "Node status"]].values.tolist() == [["nodeA/cpu", "alive"], ["nodeC/cpu", "alive"],
                                                                  ["nodeB/cpu", "left"]]
    assert "2 of 3 nodes alive" in page_text(at)
    at.run()  # read once a minute, not on every run
    assert fake_nodes == ["10.0.0.5:6379"]
    submit(at, "Forget the address")
    assert saved_address(store) is None and at.text_input(key="cluster_address").value == ""
    assert "No cluster: everything runs on this host" in page_text(at)


def test_home_says_why_the_node_list_could_not_be_read_and_the_environment_wins(store: Store, monkeypatch):
    def unreachable(address, probe=True):
        raise ClusterUnreachableError(f"cannot reach the Ray cluster's head at {address} (Connection refused)")

    monkeypatch.setattr(inventory_module, "read_inventory_in_subprocess", unreachable)
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.9:6379")
    at = app()
    assert at.text_input(key="cluster_address").disabled
    run_until(at, lambda at: any("cannot reach" in e.value for e in at.error), timeout_s=60)
    assert "cannot reach the Ray cluster's head at 10.0.0.9:6379 (Connection refused)" in page_text(at)
    assert f"`{ADDRESS_ENV}=10.0.0.9:6379` is set in the app's environment" in page_text(at)


@pytest.fixture
def demo_store(store: Store, demo_models) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


def test_profile_offers_the_devices_of_the_live_nodes(demo_store: Store, fake_nodes):
    from engine.runs.cluster import save_address

    at = app("pages/profile.py")
    assert at.selectbox(key="profile_device").options == ["cpu"]  # a single host: its own devices only
    save_address(demo_store, "10.0.0.5:6379")
    at.run()
    run_until(at, lambda at: "nodeA/cpu" in at.selectbox(key="profile_device").options, timeout_s=60)
    assert at.selectbox(key="profile_device").options == ["cpu", "nodeA/cpu", "nodeC/cpu"]  # nodeB left


def test_execute_shows_parts_by_node_and_resumes_a_failed_device_on_another_node(demo_store: Store, fake_nodes,
                                                                                 monkeypatch):
    from engine import execution
    from engine.cluster.runstate import placement
    from engine.errors import PlannerError
    from engine.runs.cluster import save_address

    save_address(demo_store, "10.0.0.5:6379")
    use_cluster("10.0.0.5:6379")
    run = execution.create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 3, "nodeB/cpu": 4}))
    with pytest.raises(PlannerError):
        drive_execution(demo_store, run.id, FakeCluster({"nodeB/cpu": {"lose_after": 1}}), measuring=EXECUTION_FAKES,
                        poll_s=0.01)
    runs.set_status(demo_store, runs.EXECUTION, run.id, "failed", "nodeB/cpu: node nodeB was lost")
    started = []
    monkeypatch.setattr(execution, "start_worker", lambda store, execution_id, **_: started.append(execution_id))

    at = app("pages/execute.py")
    parts = table_with(at, "Part").set_index("Device")
    assert parts.loc["nodeA/cpu", ["Node", "Queries", "Part"]].tolist() == ["nodeA", "3 of 3", "done"]
    assert parts.loc["nodeB/cpu", ["Node", "Queries", "Part"]].tolist() == ["nodeB", "1 of 4", "failed"]
    assert "node nodeB was lost" in parts.loc["nodeB/cpu", "Reason"]
    assert any(e.value.startswith("nodeB/cpu: failed after 1 of 4 queries: nodeB/cpu: node nodeB was lost")
               for e in at.error)
    key = f"resume_on_{run.id}_nodeB/cpu"
    run_until(at, lambda at: "nodeC/cpu (same type)" in at.selectbox(key=key).options, timeout_s=60)
    # Its own node, or the live device of its type (nodeA/cpu runs its own queries; nodeB itself has left).
    assert at.selectbox(key=key).options == ["nodeB/cpu (its own node)", "nodeC/cpu (same type)"]
    at.selectbox(key=key).select("nodeC/cpu").run()
    next(b for b in at.button if b.label.startswith("Resume (3 queries left)")).click().run()
    assert not at.exception, at.exception
    assert placement(demo_store, run.id) == {"nodeB/cpu": "nodeC/cpu"} and started == [run.id]
    assert execution.get_execution(demo_store, run.id).status == "queued"
