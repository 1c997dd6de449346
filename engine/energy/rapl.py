"""CPU package and DRAM energy through the Linux powercap (RAPL) tree.

The tree (``/sys/class/powercap``) lists every zone flat: ``intel-rapl:0`` (package-0),
``intel-rapl:0:0`` (its core, uncore or dram subzone), ``intel-rapl:1`` (package-1 or
psys), and the same through other interfaces: ``intel-rapl-mmio:*`` (the package read
through memory-mapped registers, a duplicate of the MSR zone) and ``intel-rapl-tpmi:*``
(Granite Rapids and later). AMD Zen CPUs appear under ``intel-rapl`` with ``package-N``
and ``core`` zones only: there is no DRAM domain there.

What is counted (:func:`plan_rapl_zones`):

* one package zone per socket (per die where dies have their own counters), DRAM
  zones separately;
* ``psys`` (the whole platform, package included) is never added;
* ``core`` and ``uncore`` are parts of their package and never added to it;
* the same package seen through several interfaces is counted once, preferring
  ``intel-rapl`` (MSR), then ``-tpmi``, then ``-mmio``;
* die zones of one package that mirror one package counter (the kernel lists a zone
  per die, all reading the same register, on some multi-die parts) are counted once:
  read back to back, mirrored counters agree to within :data:`MIRROR_TOLERANCE_UJ`,
  while independent die counters, cumulative since boot, practically never do.

Wrap-around: ``energy_uj`` wraps at ``max_energy_range_uj`` (about 262 kJ on Intel,
about 65.7 kJ on AMD: 2^32 units of 15.3 µJ). One wrap between two readings is
unwrapped; more than one cannot be seen, so a background poll keeps consecutive
readings closer in time than the counter can wrap. The poll interval is the range
divided by :data:`ASSUMED_MAX_POWER_W` (a power no single package zone reaches) and by
:data:`POLL_SAFETY_FACTOR`, kept within :data:`POLL_INTERVAL_BOUNDS_S`: 60 s on Intel,
about 16 s on AMD. If two readings are further apart than the counter can wrap at that
power (the process was suspended, say), the window is declared invalid rather than
guessed. A backwards step that a wrap cannot explain (it would mean more than the
assumed maximum power) is a reset and invalidates the window.

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694, a power side
channel); :func:`root_only_message` says how to open it up on a trusted host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.energy.base import DeviceReading, Meter
from engine.energy.cpu_time import CpuSample, ProcessTreeCpu, others_busy_warning, peer_share
from engine.energy.errors import SensorUnavailableError

POWERCAP_ROOT = Path("/sys/class/powercap")

#: Interfaces that expose RAPL zones, in order of preference when the same package is
#: listed by several.
RAPL_INTERFACES = ("intel-rapl", "intel-rapl-tpmi", "intel-rapl-mmio")

#: Watts above which no single RAPL zone is believed to draw (the largest server
#: packages have TDPs around 500 W). Sets the poll interval and tells a wrap from a reset.
ASSUMED_MAX_POWER_W = 1000.0

#: Poll this many times per shortest possible wrap period.
POLL_SAFETY_FACTOR = 4.0

#: The background poll interval is kept within these bounds (seconds).
POLL_INTERVAL_BOUNDS_S = (0.05, 60.0)

#: Poll interval when a zone gives no max_energy_range_uj (seconds).
POLL_INTERVAL_UNKNOWN_RANGE_S = 1.0

#: Two die counters read back to back that agree to within this many µJ are one counter.
MIRROR_TOLERANCE_UJ = 1_000_000

#: RAPL counters update about every millisecond; shorter windows than this are quantised.
MIN_WINDOW_S = 0.01

#: Average busy logical CPUs of *other* processes above which a package reading is flagged.
OTHERS_BUSY_THRESHOLD_CORES = 0.25

ReadText = Callable[[Path], str]

_PACKAGE_RE = re.compile(r"^package-(\d+)(?:-die-(\d+))?$")


def _read_text(path: Path) -> str:
    return path.read_text()


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone.

    Attributes:
        zone_id: the folder name, e.g. ``intel-rapl:0:2``.
        path: the folder.
        interface: ``intel-rapl``, ``intel-rapl-tpmi`` or ``intel-rapl-mmio``.
        name: the zone's ``name`` file: ``package-0``, ``package-0-die-1``, ``dram``,
            ``core``, ``uncore``, ``psys``.
        domain: ``package``, ``dram``, ``core``, ``uncore``, ``psys`` or the name.
        package: the socket, from the zone's (or its parent's) name; ``None`` if unknown.
        die: the die within the package, where the kernel lists dies.
        max_energy_range_uj: where ``energy_uj`` wraps, or ``None`` if not given.
    """

    zone_id: str
    path: Path
    interface: str
    name: str
    domain: str
    package: int | None
    die: int | None
    max_energy_range_uj: int | None

    @property
    def label(self) -> str:
        """``package-0``, ``package-0-die-1``, ``dram-package-0``: unique per counted zone."""
        if self.domain == "package":
            return self.name
        if self.package is None:
            return f"{self.domain}-{self.zone_id}"
        die = "" if self.die is None else f"-die-{self.die}"
        return f"{self.domain}-package-{self.package}{die}"

    @property
    def energy_path(self) -> Path:
        return self.path / "energy_uj"


def _zone_sort_key(zone_id: str) -> tuple:
    interface, _, ids = zone_id.partition(":")
    return (interface, tuple(int(i) if i.isdigit() else -1 for i in ids.split(":")))


def find_rapl_zones(root: Path = POWERCAP_ROOT, read_text: ReadText = _read_text) -> list[RaplZone]:
    """Every RAPL zone under ``root``, subzones included, in tree order.

    Raises:
        SensorUnavailableError: ``root`` does not exist (no powercap in this kernel).
    """
    if not root.exists():
        raise SensorUnavailableError(
            "rapl",
            f"{root} does not exist: this kernel exposes no RAPL energy counters "
            "(typical of virtual machines and non-x86 CPUs)",
            "Run on bare metal with the intel_rapl_common / intel_rapl_msr kernel modules loaded "
            "(they serve Intel and AMD Zen CPUs).")
    raw: dict[str, tuple[Path, str, str, int | None]] = {}
    for entry in root.iterdir():
        interface, sep, ids = entry.name.partition(":")
        if interface not in RAPL_INTERFACES or not sep or not ids:
            continue  # the control-type folder (``intel-rapl``) or another powercap driver
        try:
            name = read_text(entry / "name").strip()
        except OSError:
            name = entry.name
        try:
            max_range: int | None = int(read_text(entry / "max_energy_range_uj").strip())
        except (OSError, ValueError):
            max_range = None
        raw[entry.name] = (entry, interface, name, max_range)

    zones = []
    for zone_id in sorted(raw, key=_zone_sort_key):
        path, interface, name, max_range = raw[zone_id]
        domain, package, die = _classify(name)
        if package is None and zone_id.count(":") >= 2:  # a subzone: its parent names the package
            parent = raw.get(zone_id.rsplit(":", 1)[0])
            if parent is not None:
                _, package, die = _classify(parent[2])
        zones.append(RaplZone(zone_id, path, interface, name, domain, package, die, max_range))
    return zones


def _classify(name: str) -> tuple[str, int | None, int | None]:
    match = _PACKAGE_RE.match(name)
    if match:
        return "package", int(match.group(1)), None if match.group(2) is None else int(match.group(2))
    return name, None, None


@dataclass(frozen=True)
class RaplPlan:
    """Which zones a meter adds up, and why each other zone is left out."""

    counted: tuple[RaplZone, ...]
    skipped: tuple[tuple[RaplZone, str], ...]

    def reason(self, zone: RaplZone) -> str | None:
        """Why ``zone`` is not counted, or ``None`` if it is."""
        for skipped, why in self.skipped:
            if skipped.zone_id == zone.zone_id:
                return why
        return None


def read_energy_uj(zone: RaplZone, read_text: ReadText = _read_text) -> int:
    """The zone's counter, in µJ. Raises ``OSError`` (``PermissionError``) or ``ValueError``."""
    return int(read_text(zone.energy_path).strip())


def plan_rapl_zones(zones: list[RaplZone], read_text: ReadText = _read_text) -> RaplPlan:
    """Choose the zones to add up: one per package (or independent die) and per DRAM.

    Reads the counters of multi-die packages to tell mirrored die zones from independent
    ones; a die zone that cannot be read is kept (the meter reports it).
    """
    counted: list[RaplZone] = []
    skipped: list[tuple[RaplZone, str]] = []
    chosen: dict[tuple, RaplZone] = {}
    for zone in sorted(zones, key=lambda z: RAPL_INTERFACES.index(z.interface)):
        if zone.domain == "psys":
            skipped.append((zone, "platform (psys) energy includes the package and more: listed, never added "
                                  "to the package"))
            continue
        if zone.domain in ("core", "uncore"):
            part_of = f"package-{zone.package}" if zone.package is not None else "its package"
            skipped.append((zone, f"{zone.domain} is part of {part_of}: never added to it"))
            continue
        if zone.domain not in ("package", "dram"):
            skipped.append((zone, f"unknown RAPL domain {zone.name!r}: not added"))
            continue
        key = (zone.domain, zone.package if zone.package is not None else zone.zone_id, zone.die)
        if key in chosen:
            first = chosen[key]
            skipped.append((zone, f"the same {zone.name} as {first.zone_id} read through {zone.interface}: counted once"))
            continue
        chosen[key] = zone
        counted.append(zone)

    # Mirrored die zones: keep the first die of each (domain, package) whose counters agree.
    by_package: dict[tuple, list[RaplZone]] = {}
    for zone in counted:
        if zone.die is not None:
            by_package.setdefault((zone.domain, zone.package), []).append(zone)
    mirrors: set[str] = set()
    for dies in by_package.values():
        if len(dies) < 2:
            continue
        first = dies[0]
        for other in dies[1:]:
            if _mirrored(first, other, read_text):
                mirrors.add(other.zone_id)
                skipped.append((other, f"mirrors the counter of {first.name} ({first.zone_id}): counted once"))
    counted = [z for z in counted if z.zone_id not in mirrors]
    order = {z.zone_id: i for i, z in enumerate(zones)}
    counted.sort(key=lambda z: order.get(z.zone_id, 0))
    skipped.sort(key=lambda s: order.get(s[0].zone_id, 0))
    return RaplPlan(tuple(counted), tuple(skipped))


def _mirrored(a: RaplZone, b: RaplZone, read_text: ReadText, attempts: int = 3) -> bool:
    """Whether two zones read the same counter: equal within tolerance in any of a few tries."""
    for _ in range(attempts):
        try:
            first, second = read_energy_uj(a, read_text), read_energy_uj(b, read_text)
        except (OSError, ValueError):
            return False
        if abs(first - second) <= MIRROR_TOLERANCE_UJ:
            return True
    return False


def root_only_message(path: Path) -> tuple[str, str]:
    """Why ``energy_uj`` cannot be read, and how to make it readable."""
    return (
        f"{path} is readable by root only (Linux 5.10 and newer restrict RAPL counters since CVE-2020-8694)",
        "Either run as root, or make the counters readable on a host you trust: "
        "`sudo chmod a+r /sys/class/powercap/intel-rapl*/energy_uj` (until the next boot), or for good a udev "
        "rule in /etc/udev/rules.d/90-powercap.rules: "
        "`ACTION==\"add\", SUBSYSTEM==\"powercap\", RUN+=\"/bin/chmod a+r /sys%p/energy_uj\"`.",
    )


def device_name(zone: RaplZone) -> str:
    """The device name a counted zone's readings carry: ``cpu:package-0``, ``dram:package-0``."""
    if zone.domain == "package":
        return f"cpu:{zone.label}"
    return f"{zone.domain}:{zone.label.removeprefix(zone.domain + '-')}"


def poll_interval_for(max_energy_range_uj: int | None, max_power_w: float = ASSUMED_MAX_POWER_W) -> float:
    """Seconds between polls so that a counter of this range cannot wrap twice unseen."""
    if not max_energy_range_uj:
        return POLL_INTERVAL_UNKNOWN_RANGE_S
    wrap_s = max_energy_range_uj / 1e6 / max_power_w
    low, high = POLL_INTERVAL_BOUNDS_S
    return min(high, max(low, wrap_s / POLL_SAFETY_FACTOR))


class WrappingCounter:
    """Energy accumulated from a counter that wraps at ``max_range_uj`` (RAPL ``energy_uj``).

    Feed it every reading with :meth:`advance`. It unwraps one wrap between two
    readings, and sets :attr:`invalid` (a sentence) instead of guessing when a reading
    cannot be explained: a backwards step no wrap explains (a reset), or two readings
    further apart than the counter can wrap at ``max_power_w``.
    """

    def __init__(self, value_uj: int, now_s: float, max_range_uj: int | None,
                 max_power_w: float = ASSUMED_MAX_POWER_W):
        self.max_range_uj, self.max_power_w = max_range_uj, max_power_w
        self.last_uj, self.last_s = value_uj, now_s
        self.total_uj = 0
        self.wraps = 0
        self.invalid: str | None = None

    @property
    def safe_gap_s(self) -> float:
        """Longest time between two readings in which the counter cannot wrap twice."""
        if not self.max_range_uj:
            return float("inf")
        return self.max_range_uj / 1e6 / self.max_power_w

    def advance(self, value_uj: int, now_s: float) -> None:
        """Account for one more reading taken at ``now_s``."""
        if self.invalid:
            return
        gap_s = now_s - self.last_s
        if gap_s > self.safe_gap_s:
            self.invalid = (f"{gap_s:.0f} s passed between two readings, longer than the {self.safe_gap_s:.0f} s "
                            f"in which this counter can wrap at {self.max_power_w:.0f} W: a wrap may have gone "
                            "unseen, so this window is invalid")
            return
        if value_uj >= self.last_uj:
            delta = value_uj - self.last_uj
        elif not self.max_range_uj:
            self.invalid = (f"the counter went backwards ({self.last_uj} -> {value_uj} µJ) and the zone gives no "
                            "max_energy_range_uj to unwrap it: this window is invalid")
            return
        else:
            delta = self.max_range_uj - self.last_uj + value_uj
            implied_w = float("inf") if gap_s <= 0 else delta / 1e6 / gap_s
            if implied_w > self.max_power_w:
                self.invalid = (f"the counter went backwards ({self.last_uj} -> {value_uj} µJ) in {gap_s:.3g} s, "
                                f"which a wrap could explain only at {implied_w:.0f} W: it was reset, "
                                "so this window is invalid")
                return
            self.wraps += 1
        self.total_uj += delta
        self.last_uj, self.last_s = value_uj, now_s


class RaplMeter(Meter):
    """Every counted RAPL zone of this host: one reading per package (or die) and per DRAM.

    Args:
        root: the powercap folder (tests pass a fake tree).
        read_text: reads one sysfs file (tests inject errors through it: CI runs as
            root, where file permissions do not stop a read).
        assumed_max_power_w: see :data:`ASSUMED_MAX_POWER_W`.
        process_cpu: the measured processes, to warn when *others* kept the CPU busy
            (a package reading includes them); ``None`` measures this process tree. When
            it has peers (other device processes of the same execution, see
            :mod:`engine.energy.cpu_time`), each reading is split between them: this
            tree is charged its share of the CPU time they all used in the window
            (:func:`~engine.energy.cpu_time.peer_share`), and the method says so.
        others_threshold_cores: see :data:`OTHERS_BUSY_THRESHOLD_CORES`.

    Raises:
        SensorUnavailableError: no powercap tree, no package zone, or a counted
            ``energy_uj`` that cannot be read (with the fix for root-only files).
    """

    def __init__(self, root: Path = POWERCAP_ROOT, *, read_text: ReadText = _read_text,
                 assumed_max_power_w: float = ASSUMED_MAX_POWER_W,
                 process_cpu: ProcessTreeCpu | None = None,
                 others_threshold_cores: float = OTHERS_BUSY_THRESHOLD_CORES):
        self.root, self.read_text = root, read_text
        self.assumed_max_power_w = assumed_max_power_w
        self.process_cpu = process_cpu if process_cpu is not None else ProcessTreeCpu()
        self.others_threshold_cores = others_threshold_cores
        try:
            self.plan = plan_rapl_zones(find_rapl_zones(root, read_text), read_text)
        except OSError as exc:  # the tree itself cannot be listed
            raise SensorUnavailableError("rapl", f"cannot list {root}: {exc}", None) from None
        if not any(z.domain == "package" for z in self.plan.counted):
            raise SensorUnavailableError("rapl", f"{root} has no RAPL package zone", None)
        for zone in self.plan.counted:
            try:
                read_energy_uj(zone, read_text)
            except PermissionError:
                detail, fix = root_only_message(zone.energy_path)
                raise SensorUnavailableError("rapl", detail, fix) from None
            except (OSError, ValueError) as exc:
                raise SensorUnavailableError("rapl", f"cannot read {zone.energy_path}: {exc}", None) from None
        self.zones: tuple[RaplZone, ...] = self.plan.counted
        self.poll_interval_s = min(poll_interval_for(z.max_energy_range_uj, assumed_max_power_w) for z in self.zones)
        self._counters: dict[str, WrappingCounter | None] = {}
        self._errors: dict[str, list[str]] = {}
        self._cpu_start: CpuSample | None = None
        self._start_s = 0.0

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self._device(z) for z in self.zones)

    @property
    def description(self) -> str:
        return "RAPL " + ", ".join(f"{z.label} ({z.zone_id})" for z in self.zones)

    @staticmethod
    def _device(zone: RaplZone) -> str:
        return device_name(zone)

    def begin(self, now_s: float) -> None:
        self._start_s = now_s
        self._counters, self._errors = {}, {z.zone_id: [] for z in self.zones}
        self._cpu_start = self.process_cpu.sample(opening=True)
        for zone in self.zones:
            try:
                value = read_energy_uj(zone, self.read_text)
            except (OSError, ValueError) as exc:
                self._counters[zone.zone_id] = None
                self._errors[zone.zone_id].append(f"could not read {zone.energy_path} at the start of the window: {exc}")
                continue
            self._counters[zone.zone_id] = WrappingCounter(value, now_s, zone.max_energy_range_uj,
                                                           self.assumed_max_power_w)

    def poll(self, now_s: float) -> None:
        self.process_cpu.poll()
        for zone in self.zones:
            counter = self._counters.get(zone.zone_id)
            if counter is None or counter.invalid:
                continue
            try:
                counter.advance(read_energy_uj(zone, self.read_text), now_s)
            except (OSError, ValueError) as exc:
                # A missed poll is harmless unless the next good reading comes too late,
                # which WrappingCounter checks.
                self._errors[zone.zone_id].append(f"a poll of {zone.energy_path} failed ({exc}); the next reading covers it")

    def end(self, now_s: float) -> tuple[DeviceReading, ...]:
        duration_s = now_s - self._start_s
        cpu_end = self.process_cpu.sample()
        shared = []
        split = None
        if self._cpu_start is not None:
            busy = others_busy_warning(self._cpu_start, cpu_end, duration_s, self.others_threshold_cores)
            if busy:
                shared.append(busy)
            split = peer_share(self._cpu_start, cpu_end)
        if duration_s < MIN_WINDOW_S:
            shared.append(f"the window lasted {duration_s * 1e3:.1f} ms, under the {MIN_WINDOW_S * 1e3:.0f} ms "
                          "below which RAPL's ~1 ms updates quantise the reading")
        readings = []
        for zone in self.zones:
            warnings = list(self._errors.get(zone.zone_id, []))
            counter = self._counters.get(zone.zone_id)
            energy_j: float | None = None
            if counter is not None:
                try:
                    counter.advance(read_energy_uj(zone, self.read_text), now_s)
                except (OSError, ValueError) as exc:
                    warnings.append(f"could not read {zone.energy_path} at the end of the window ({exc}): "
                                    "energy unknown")
                else:
                    if counter.invalid:
                        warnings.append(counter.invalid)
                    elif counter.total_uj == 0:
                        # A package or DRAM never draws 0 W: a counter that did not move
                        # measured nothing, and "nothing measured" is not 0 J.
                        why = ("the window is shorter than its update interval" if duration_s < MIN_WINDOW_S
                               else "it looks frozen")
                        warnings.append(f"{zone.energy_path} did not advance in {duration_s:.3f} s ({why}): "
                                        "energy unknown")
                    else:
                        energy_j = counter.total_uj / 1e6
            source = f"rapl-{zone.domain}"
            method, detail = source, f"{zone.name} ({zone.path})"
            if split is not None:  # shared with the other device processes of this run
                method = f"{source} split by CPU time between device processes"
                detail = f"{detail}; {split.describe()}"
                energy_j = None if energy_j is None else energy_j * split.share
            readings.append(DeviceReading(
                device=self._device(zone), kind="cpu" if zone.domain == "package" else "dram",
                energy_j=energy_j, duration_s=duration_s, source=source, method=method,
                detail=detail, warnings=tuple(warnings + shared)))
        return tuple(readings)
