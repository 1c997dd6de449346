"""engine/energy/cpu_time: peers' CPU time read beside ours, on real processes of this host."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from engine.energy.cpu_time import CpuSample, ProcessTreeCpu, peer_share

BURN = "import time\nwhile time.process_time() < {s}: pass\n"


def spin(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def not_a_child(code: str) -> psutil.Process:
    """A process running ``code`` that is not a descendant of this one (as a sibling device process is not)."""
    launcher = ("import subprocess, sys\n"
                f"print(subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)\n")
    pid = int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout)
    return psutil.Process(pid)


def test_a_peer_is_read_beside_this_process_and_the_share_follows_cpu_time():
    peer = not_a_child("import time; time.sleep(0.5)\n" + BURN.format(s=0.9) + "time.sleep(30)")
    try:
        tree = ProcessTreeCpu(peers=lambda: [peer.pid])
        assert tree.needs_polling and peer.pid not in tree.pids()
        start = tree.sample(opening=True)
        assert set(start.peer_cpu_s) == {peer.pid}
        spin(0.3)
        while sum(peer.cpu_times()[:2]) < 0.85:  # it burns 0.9 CPU-s, most of it inside the window
            time.sleep(0.05)
        end = tree.sample()
    finally:
        peer.kill()
    share = peer_share(start, end)
    assert share is not None and share.peers == 1
    assert share.own_cpu_s == pytest.approx(0.3, abs=0.05)
    assert 0.5 <= share.peers_cpu_s <= 0.95
    assert share.share == pytest.approx(share.own_cpu_s / (share.own_cpu_s + share.peers_cpu_s))


def test_a_peer_that_exits_keeps_its_last_seen_cpu_time():
    peer = not_a_child(BURN.format(s=0.3) + "import time; time.sleep(0.5)")
    tree = ProcessTreeCpu(peers=lambda: [peer.pid])
    tree.sample(opening=True)
    while sum(peer.cpu_times()[:2]) < 0.25:
        time.sleep(0.05)
    tree.poll()
    peer.kill()
    peer.wait(5)
    assert tree.sample().peer_cpu_s[peer.pid] >= 0.25


def test_this_process_is_never_its_own_peer_and_no_peers_means_no_split():
    tree = ProcessTreeCpu(peers=lambda: [0, __import__("os").getpid()])
    assert tree.sample().peer_cpu_s == {}
    assert peer_share(CpuSample(1.0, 2.0), CpuSample(2.0, 3.0)) is None


def test_a_peer_that_appears_mid_window_is_left_out():
    start = CpuSample(1.0, 10.0, peer_cpu_s={11: 1.0})
    end = CpuSample(2.0, 14.0, peer_cpu_s={11: 2.0, 12: 5.0})
    share = peer_share(start, end)
    assert share.peers == 1 and share.share == pytest.approx(0.5)
