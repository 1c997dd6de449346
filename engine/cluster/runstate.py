"""An execution's cluster state: how each device's part stands, and where a device's queries run.

Kept in the execution's ``settings`` (beside the ``devices`` it holds), so it goes with
the run and needs no table of its own:
- ``parts``: per planned device, its status (running, done, failed, cancelled), the
  reason and where it ran; a device whose node was lost is failed here at once while the
  other devices go on (the run as a whole fails when they are done);
- ``placement``: a device whose queries run on another node's device of the same type,
  as the user chose when resuming (:func:`move_device`). Its results carry the device
  that measured them.

A profiling job has one device, so its run's own status is its part's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from engine.cluster.naming import is_qualified, parse_qualified
from engine.errors import DeviceUnavailableError, InputError, Problem
from engine.runs import ACTIVE
from engine.store import Store


@dataclass(frozen=True)
class DevicePart:
    """One planned device's part of an execution: where it runs, how it stands, and why."""

    device: str
    runs_on: str
    status: str
    reason: str | None = None


def _settings(store: Store, execution_id: int) -> dict:
    row = store.query_one("SELECT settings FROM executions WHERE id = ?", [int(execution_id)])
    if row is None:
        raise InputError(Problem("execution", f"no execution with id {execution_id}", None, "an execution id"))
    return json.loads(row[0]) if row[0] else {}


def _save(store: Store, execution_id: int, settings: dict) -> None:
    store.execute("UPDATE executions SET settings = ? WHERE id = ?", [json.dumps(settings), int(execution_id)])


def planned_devices(store: Store, execution_id: int) -> set[str]:
    """The devices the execution's plan assigns queries to."""
    frame = store.query_df("SELECT DISTINCT a.device FROM plan_assignments a JOIN executions e ON e.plan_id = a.plan_id "
                           "WHERE e.id = ?", [int(execution_id)])
    return {str(parse_qualified(d)) if is_qualified(d) else d for d in frame["device"]}


def placement(store: Store, execution_id: int) -> dict[str, str]:
    """Planned device to the device its queries run on, for the devices moved (others run where planned)."""
    return dict(_settings(store, execution_id).get("placement", {}))


def part_states(store: Store, execution_id: int) -> dict[str, DevicePart]:
    """Each planned device's part as the last driver left it (empty before a cluster run)."""
    parts = _settings(store, execution_id).get("parts", {})
    return {device: DevicePart(device, p.get("runs_on", device), p["status"], p.get("reason"))
            for device, p in parts.items()}


def record_part(store: Store, execution_id: int, part: DevicePart) -> None:
    """Keep how one device's part stands."""
    settings = _settings(store, execution_id)
    settings.setdefault("parts", {})[part.device] = {"runs_on": part.runs_on, "status": part.status,
                                                     "reason": part.reason}
    _save(store, execution_id, settings)


def move_device(store: Store, execution_id: int, device: str, to: str, *,
                same_type: Callable[[str, str], str | None] | None = None) -> None:
    """Run a failed or cancelled execution's queries left on ``device`` on ``to`` instead, when it is resumed.

    ``to`` must be a cluster device of the same kind; ``same_type(device, to)`` (from the
    cluster's inventory) returns why the two differ, or None. The execution then holds
    ``to`` as well. Moving a device back to itself undoes the move.
    """
    settings = _settings(store, execution_id)
    status = store.query_one("SELECT status FROM executions WHERE id = ?", [int(execution_id)])[0]
    where = f"execution {execution_id}"
    if status in ACTIVE:
        raise InputError(Problem(where, f"is {status}", None, "a failed or cancelled execution (move, then resume)"))
    moves = settings.setdefault("placement", {})
    planned = planned_devices(store, execution_id)
    source, target = str(parse_qualified(device)), str(parse_qualified(to))
    if source not in planned:
        raise InputError(Problem(where, f"has no device {source}", "device", ", ".join(sorted(planned)) or "none"))
    if parse_qualified(source).kind != parse_qualified(target).kind:
        raise InputError(Problem(where, f"{source} and {target} are different kinds of device", "device",
                                 "a device of the same type on another node"))
    if target in planned and target != source:
        raise InputError(Problem(where, f"{target} runs queries of its own in this execution", "device",
                                 "a device the execution does not use"))
    if any(t == target and s != source for s, t in moves.items()):
        raise InputError(Problem(where, f"another device's queries already move to {target}", "device",
                                 "one device in place of one device"))
    why = same_type(source, target) if same_type is not None and source != target else None
    if why is not None:
        raise InputError(Problem(where, f"{target} cannot stand in for {source}: {why}", "device",
                                 "a device of the same type on another node"))
    if source == target:
        moves.pop(source, None)
    else:
        moves[source] = target
    settings["devices"] = sorted(planned | set(moves.values()))
    _save(store, execution_id, settings)


def parts_table(devices: pd.DataFrame, parts: Mapping[str, DevicePart]) -> pd.DataFrame:
    """Each planned device's progress with its node and its part: ``node, device, runs_on, done, total, status,
    reason``.

    ``devices`` is an execution's per-device progress (``device, done, total``, as
    :func:`engine.execution.execution_progress` gives it); ``parts`` its
    :func:`part_states`. A device of this host has node ``""`` (this host); a device
    without a part yet has status ``waiting``.
    """
    rows = []
    for row in devices.itertuples(index=False):
        device = str(row.device)
        part = parts.get(str(parse_qualified(device)) if is_qualified(device) else device)
        rows.append({"node": parse_qualified(device).node if is_qualified(device) else "",
                     "device": device, "runs_on": part.runs_on if part else device,
                     "done": int(row.done), "total": int(row.total),
                     "status": part.status if part else "waiting", "reason": part.reason if part else None})
    return pd.DataFrame(rows, columns=["node", "device", "runs_on", "done", "total", "status", "reason"])


def move_candidates(device: str, planned: Iterable[str], live: Iterable[str],
                    same_type: Callable[[str, str], str | None]) -> list[str]:
    """The devices a planned cluster device's queries may move to: live (``live``, qualified names), of the
    same type (``same_type`` returns None), and not running queries of their own (not in ``planned``)."""
    taken = set(planned)
    return [candidate for candidate in live
            if candidate != device and candidate not in taken and same_type(device, candidate) is None]


def apply_moves(store: Store, execution_id: int, moves: Mapping[str, str], *,
                same_type: Callable[[str, str], str | None] | None = None) -> dict[str, str]:
    """:func:`move_device` for each ``planned device -> device`` (a device to itself undoes its move);
    returns the placement after. All are checked before any is kept."""
    planned = planned_devices(store, execution_id)
    problems = []
    for device, to in moves.items():
        try:
            source, target = str(parse_qualified(device)), str(parse_qualified(to))
        except DeviceUnavailableError as exc:
            problems.append(Problem(f"execution {execution_id}", str(exc).rstrip("."), "device", "NODE/DEVICE"))
            continue
        if source not in planned:
            problems.append(Problem(f"execution {execution_id}", f"has no device {source}", "device",
                                    ", ".join(sorted(planned)) or "none"))
        elif source != target and same_type is not None and same_type(source, target) is not None:
            problems.append(Problem(f"execution {execution_id}", f"{target} cannot stand in for {source}: "
                                    f"{same_type(source, target)}", "device", "a device of the same type on another node"))
    targets = [str(parse_qualified(t)) for t in moves.values() if is_qualified(t)]
    if len(targets) != len(set(targets)):
        problems.append(Problem(f"execution {execution_id}", "two devices move to one", "device",
                                "one device in place of one device"))
    if problems:
        raise InputError(problems)
    for device, to in moves.items():
        move_device(store, execution_id, device, to, same_type=same_type)
    return placement(store, execution_id)
