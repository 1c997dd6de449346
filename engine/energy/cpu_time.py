"""CPU seconds of the measured processes, and of everything else on the host.

Used twice: the estimate multiplies the measured processes' CPU seconds by watts per
logical CPU, and the sensors that read a whole device (a RAPL package) warn when
*other* processes kept the CPU busy during the window, since their share is in the
reading too.

Which processes are "measured":

* by default this process and all its descendants. This process is read through
  ``time.process_time`` and ``getrusage(RUSAGE_CHILDREN)`` (nanosecond and microsecond
  resolution); live descendants through ``psutil`` (``/proc``, 10 ms ticks), including
  what their own reaped children used;
* or the given ``pids`` and their descendants (the profiler can name a worker process).
  A named process that exits mid-window keeps the CPU time last seen, so it is polled.

A descendant reaped during the window is not lost: its final CPU time moves into its
parent's "children" times, which are counted. Counting stays consistent because a
vanished descendant is dropped while its parent's children times grow by exactly its
total.

*Peers* are processes that do other devices' work of the same run at the same time (an
execution runs one process per device). They are not measured, but their CPU time is
read beside the measured processes', so that a reading of a device they share (a RAPL
package) can be split between them by CPU time (:func:`peer_share`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds at one moment: the measured processes' total, the host's busy total, each peer's total."""

    process_cpu_s: float
    host_busy_cpu_s: float | None
    exited_pids: tuple[int, ...] = ()
    peer_cpu_s: Mapping[int, float] = field(default_factory=dict)


def host_busy_cpu_s() -> float | None:
    """Seconds all logical CPUs of the host spent busy since boot (not idle, not iowait).

    ``steal`` is left out: it is time the hypervisor gave to other guests.
    """
    try:
        t = psutil.cpu_times()
    except (OSError, RuntimeError):
        return None
    busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return float(busy)


def _proc_total_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


class ProcessTreeCpu:
    """Cumulative CPU seconds of a set of processes and their descendants.

    Call :meth:`sample` at the start and the end of a window (and :meth:`poll` in
    between when named ``pids`` are measured); the difference of two samples'
    ``process_cpu_s`` is what the tree used in between.

    Args:
        pids: the measured processes; ``None`` (the default) measures this process.
        peers: returns the pids of the peer processes at the moment (see the module docstring).
    """

    def __init__(self, pids: Iterable[int] | None = None, peers: Callable[[], Iterable[int]] | None = None):
        self.peers = peers
        self._peer_procs: dict[int, psutil.Process] = {}
        self._peer_last_s: dict[int, float] = {}
        self.own = pids is None
        self.root_pids: tuple[int, ...] = () if pids is None else tuple(int(p) for p in pids)
        self._roots: dict[int, psutil.Process] = {}
        for pid in self.root_pids:
            try:
                self._roots[pid] = psutil.Process(pid)
            except psutil.Error:
                pass  # gone already: counted as 0 and reported by sample()
        # Last CPU time seen of each named root, kept when it exits mid-window.
        self._root_last_s: dict[int, float] = {}

    @property
    def needs_polling(self) -> bool:
        """Named processes and peers can exit mid-window; polling keeps their last CPU time."""
        return not self.own or self.peers is not None

    def describe(self) -> str:
        if self.own:
            return f"process {os.getpid()} and its children"
        return "processes " + ", ".join(map(str, self.root_pids)) + " and their children"

    def sample(self, opening: bool = False) -> CpuSample:
        """CPU seconds now, of the tree and of the host.

        Listing descendants costs a few milliseconds of CPU (a scan of /proc). So that
        the estimate does not count that cost as the measured work, this process's own
        time is read *after* the scan when a window opens (``opening=True``) and
        *before* it when it closes.
        """
        if self.own:
            if opening:
                host = host_busy_cpu_s()
                peers = self._peers_s()
                descendants = self._descendants_s([psutil.Process()])
                own = self._own_s()
            else:
                own = self._own_s()
                descendants = self._descendants_s([psutil.Process()])
                peers = self._peers_s()
                host = host_busy_cpu_s()
            return CpuSample(own + descendants, host, peer_cpu_s=peers)
        host = host_busy_cpu_s()
        peers = self._peers_s()
        total, exited = 0.0, []
        live = []
        for pid in self.root_pids:
            proc = self._roots.get(pid)
            try:
                if proc is None or not proc.is_running():
                    raise psutil.NoSuchProcess(pid)
                self._root_last_s[pid] = _proc_total_s(proc)
                live.append(proc)
            except psutil.Error:
                exited.append(pid)
            total += self._root_last_s.get(pid, 0.0)
        total += self._descendants_s(live)
        return CpuSample(total, host, tuple(exited), peers)

    @staticmethod
    def _own_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + usage.ru_utime + usage.ru_stime

    def poll(self) -> None:
        """Refresh the last-seen CPU time of the named processes and the peers."""
        if not self.own:
            self.sample()
        elif self.peers is not None:
            self._peers_s()

    def _peers_s(self) -> dict[int, float]:
        """Each peer's CPU seconds (with its descendants); one that exited keeps its last-seen time."""
        if self.peers is None:
            return {}
        out: dict[int, float] = {}
        for pid in {int(p) for p in self.peers() if p and int(p) != os.getpid()}:
            try:
                proc = self._peer_procs.get(pid) or self._peer_procs.setdefault(pid, psutil.Process(pid))
                if not proc.is_running():
                    raise psutil.NoSuchProcess(pid)
                self._peer_last_s[pid] = _proc_total_s(proc) + self._descendants_s([proc])
            except psutil.Error:
                pass
            if pid in self._peer_last_s:
                out[pid] = self._peer_last_s[pid]
        return out

    @staticmethod
    def _descendants_s(parents: list[psutil.Process]) -> float:
        total, seen = 0.0, set()
        for parent in parents:
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                if child.pid in seen:
                    continue
                seen.add(child.pid)
                try:
                    total += _proc_total_s(child)
                except psutil.Error:
                    pass  # exited between listing and reading: its parent's children times hold it
        return total

    def pids(self) -> set[int]:
        """The processes of the tree now (to tell them from other users of a GPU)."""
        roots = [psutil.Process()] if self.own else [p for p in self._roots.values()]
        found: set[int] = set()
        for proc in roots:
            try:
                found.add(proc.pid)
                found.update(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                pass
        return found


@dataclass(frozen=True)
class PeerShare:
    """The measured processes' part of a reading shared with their peers, by CPU time in one window.

    Attributes:
        share: own CPU seconds / (own + the peers'), in [0, 1]; an equal split when none
            of them used measurable CPU time.
        own_cpu_s, peers_cpu_s: the CPU seconds behind it.
        peers: how many peers were counted.
    """

    share: float
    own_cpu_s: float
    peers_cpu_s: float
    peers: int

    def describe(self) -> str:
        return (f"{self.share:.3f} of the reading, by CPU time: this process tree {self.own_cpu_s:.3f} CPU-s, "
                f"{self.peers} other device process{'es' if self.peers != 1 else ''} {self.peers_cpu_s:.3f} CPU-s")


def peer_share(start: CpuSample, end: CpuSample) -> PeerShare | None:
    """The measured processes' share of a shared reading over a window, or ``None`` without peers.

    Only peers seen at both ends of the window count (one started mid-window is left out).
    """
    common = [pid for pid in end.peer_cpu_s if pid in start.peer_cpu_s]
    if not common:
        return None
    own = max(end.process_cpu_s - start.process_cpu_s, 0.0)
    peers = sum(max(end.peer_cpu_s[pid] - start.peer_cpu_s[pid], 0.0) for pid in common)
    share = own / (own + peers) if own + peers > 0 else 1.0 / (1 + len(common))
    return PeerShare(share, own, peers, len(common))


def others_busy_warning(start: CpuSample, end: CpuSample, duration_s: float,
                        threshold_cores: float) -> str | None:
    """A warning when processes outside the measured tree (and its peers) kept the CPU busy.

    ``threshold_cores`` is the average number of busy logical CPUs (beyond the measured
    processes and their peers, whose share is split off) above which a whole-package
    reading is called contaminated.
    """
    if start.host_busy_cpu_s is None or end.host_busy_cpu_s is None or duration_s <= 0:
        return None
    peers_s = sum(max(end.peer_cpu_s[p] - start.peer_cpu_s[p], 0.0) for p in end.peer_cpu_s if p in start.peer_cpu_s)
    others_s = (end.host_busy_cpu_s - start.host_busy_cpu_s) - (end.process_cpu_s - start.process_cpu_s) - peers_s
    others_cores = others_s / duration_s
    if others_cores <= threshold_cores:
        return None
    return (f"other processes kept {others_cores:.2f} logical CPUs busy on average during the window: "
            "the package reading includes their share")
