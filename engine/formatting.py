"""One way to present numbers: energy, power, durations, percentages, token counts, times,
and values made safe for strict JSON.

The CLI, the pages and the engine's own messages all format through here, so "3 min 05 s"
means the same thing everywhere. Every formatter takes ``unknown``, the text for a value
that is not known (None, NaN, infinite): "—" by default, which reads well in a table or a
metric; sentences pass their own words ("an unknown amount"). Unknown is never shown as 0.
Negative values keep their sign ("-4.0 J": a saving written as a negative cost).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd

UNKNOWN = "—"

#: Joules in one watt-hour.
J_PER_WH = 3600.0


def _number(value: Any) -> float | None:
    """The value as a finite float, or None when it is missing, NaN, infinite or not a number."""
    if value is None or isinstance(value, (str, bytes)) or value is pd.NA or value is pd.NaT:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _scaled(value: float, units: list[tuple[float, str, Callable[[float], str]]]) -> str:
    """The value in the first unit (smallest first) whose formatted magnitude stays below 1000,
    or in the last unit. Deciding on the formatted text, not the raw value, keeps 999.96 J
    from reading "1,000.0 J": it becomes "1.00 kJ"."""
    for position, (factor, unit, write) in enumerate(units):
        text = write(abs(value) / factor)
        last = position == len(units) - 1
        if last or float(text.replace(",", "")) < 1000:
            return f"{'-' if value < 0 and float(text.replace(',', '')) != 0 else ''}{text} {unit}"
    raise AssertionError("unreachable")


def _fixed(decimals: int) -> Callable[[float], str]:
    def write(magnitude: float) -> str:
        return f"{magnitude:,.{decimals}f}"
    return write


def _small_or_fixed(decimals: int) -> Callable[[float], str]:
    """Fixed decimals, but three significant digits below 1 (0.00412 J, not 0.0 J)."""
    def write(magnitude: float) -> str:
        if 0 < magnitude < 1 and round(magnitude, decimals) < 1:
            return f"{magnitude:.3g}"
        return f"{magnitude:,.{decimals}f}"
    return write


def _significant(digits: int) -> Callable[[float], str]:
    def write(magnitude: float) -> str:
        return f"{magnitude:,.{digits}g}"
    return write


# -- energy and power ------------------------------------------------------------------------

def format_energy(joules: float | None, *, unknown: str = UNKNOWN) -> str:
    """Joules as J, kJ or MJ; from 1 MJ the kWh beside it.

    ``24.0 J``, ``0.00412 J``, ``1.25 kJ``, ``3.60 MJ (1.00 kWh)``, ``-4.0 J``.
    """
    number = _number(joules)
    if number is None:
        return unknown
    text = _scaled(number, [(1.0, "J", _small_or_fixed(1)), (1e3, "kJ", _fixed(2)), (1e6, "MJ", _fixed(2))])
    if text.endswith("MJ"):
        text += f" ({number / (1000 * J_PER_WH):,.2f} kWh)"
    return text


def format_watt_hours(joules: float | None, *, unknown: str = UNKNOWN) -> str:
    """Joules written in watt-hours (mWh, Wh, kWh, MWh), four significant digits.

    ``0.5 J`` is ``0.1389 mWh``; ``36 kJ`` is ``10 Wh``; ``3.6 MJ`` is ``1 kWh``.
    """
    number = _number(joules)
    if number is None:
        return unknown
    return _scaled(number / J_PER_WH, [(1e-3, "mWh", _significant(4)), (1.0, "Wh", _significant(4)),
                                       (1e3, "kWh", _significant(4)), (1e6, "MWh", _significant(4))])


def format_power(watts: float | None, *, unknown: str = UNKNOWN) -> str:
    """Watts as W or kW: ``42.0 W``, ``0.35 W``, ``1.25 kW``."""
    number = _number(watts)
    if number is None:
        return unknown
    return _scaled(number, [(1.0, "W", _small_or_fixed(1)), (1e3, "kW", _fixed(2))])


# -- time ---------------------------------------------------------------------------------------

def format_duration(seconds: float | None, *, unknown: str = UNKNOWN) -> str:
    """Seconds as ``0.42 s``, ``4.2 s``, ``42 s``, ``3 min 05 s`` or ``1 h 02 min``.

    Below 10 s with a decimal (a deadline of 1.2 s is not "1 s"); from a minute on, whole
    seconds; from an hour on, whole minutes. Rounding happens before the unit is chosen,
    so 59.6 s is ``1 min 00 s``, never ``60 s``.
    """
    number = _number(seconds)
    if number is None:
        return unknown
    sign = "-" if number < 0 else ""
    magnitude = abs(number)
    if magnitude < 1 and round(magnitude, 1) < 1:
        return f"{sign}{magnitude:.2g} s" if magnitude else "0 s"
    if round(magnitude, 1) < 10:
        return f"{sign}{magnitude:.1f} s"
    whole_seconds = int(round(magnitude))
    if whole_seconds < 60:
        return f"{sign}{whole_seconds} s"
    if whole_seconds < 3600:
        return f"{sign}{whole_seconds // 60} min {whole_seconds % 60:02d} s"
    whole_minutes = int(round(magnitude / 60))
    return f"{sign}{whole_minutes // 60:,} h {whole_minutes % 60:02d} min"


def _as_datetime(value: Any) -> dt.datetime | None:
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = _number(value)
        return None if number is None else dt.datetime.fromtimestamp(number, tz=dt.timezone.utc)
    if isinstance(value, pd.Timestamp):
        stamp = value.to_pydatetime(warn=False)  # nanoseconds are below what is shown
    elif isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    else:
        try:
            parsed = pd.Timestamp(value)
        except (TypeError, ValueError):
            return None
        if parsed is pd.NaT:
            return None
        stamp = parsed.to_pydatetime(warn=False)
    # The store keeps naive times in UTC (TIMESTAMPTZ comes back aware).
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.timezone.utc)


def format_timestamp(value: Any, *, seconds: bool = False, unknown: str = UNKNOWN) -> str:
    """A point in time in this host's local time, to the minute: ``2024-05-01 14:00``.

    Takes a datetime or pandas Timestamp (naive ones are UTC, the store's convention), an
    ISO 8601 string, or seconds since the epoch (``time.time()``). ``seconds`` adds them
    (``14:00:05``); never microseconds.
    """
    stamp = _as_datetime(value)
    if stamp is None:
        return unknown
    return stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


# -- fractions and counts -------------------------------------------------------------------------

def format_percent(fraction: float | None, digits: int = 1, *, signed: bool = False, unknown: str = UNKNOWN) -> str:
    """A fraction as a percentage: ``0.052`` is ``5.2%``; ``signed`` writes ``+5.2%`` (errors, deltas)."""
    number = _number(fraction)
    if number is None:
        return unknown
    return f"{number:{'+' if signed else ''}.{digits}%}"


def format_accuracy(fraction: float | None, *, unknown: str = "not set") -> str:
    """An accuracy score (a fraction) as a percentage, ``64.5%``; "not set" when unknown."""
    return format_percent(fraction, 1, unknown=unknown)


def format_tokens(count: float | None, *, unknown: str = UNKNOWN) -> str:
    """A token count with thousands separators: ``1 token``, ``1,234 tokens``."""
    number = _number(count)
    if number is None:
        return unknown
    whole = int(round(number))
    return f"{whole:,} token" + ("" if abs(whole) == 1 else "s")


def format_count(count: float | None, noun: str, plural: str | None = None, *, unknown: str = UNKNOWN) -> str:
    """A count with its noun in the right number: ``1 query``, ``2 queries``, ``1,234 problems``.

    The plural is ``noun`` + "s" (a consonant and "y" become "ies") unless ``plural`` is given.
    """
    number = _number(count)
    if number is None:
        return unknown
    whole = int(round(number))
    if abs(whole) == 1:
        return f"{whole:,} {noun}"
    if plural is None:
        plural = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"
    return f"{whole:,} {plural}"


def format_parameters(params_b: float | None, *, unknown: str = "") -> str:
    """A parameter count given in billions: ``1.3 M`` below a billion, else ``7.0 B``; empty when unknown."""
    number = _number(params_b)
    if number is None:
        return unknown
    return f"{number * 1e3:.1f} M" if abs(number) < 1 else f"{number:.1f} B"


# -- JSON -------------------------------------------------------------------------------------------

def json_safe(value: Any) -> Any:
    """The value as plain JSON data: what ``json.dumps(..., allow_nan=False)`` accepts.

    NaN and ±inf become None (null); numpy scalars and arrays become Python numbers and
    lists; dataclasses become dicts of their fields; mappings get string keys; tuples and
    sets become lists; datetimes and Timestamps become ISO 8601 text (NaT becomes None);
    paths and anything else become their text.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.datetime64):
        return json_safe(pd.Timestamp(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (dt.timedelta, pd.Timedelta)):
        return json_safe(value.total_seconds())
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, PurePath):
        return str(value)
    return str(value)


__all__ = ["J_PER_WH", "UNKNOWN", "format_accuracy", "format_count", "format_duration", "format_energy", "format_parameters",
           "format_percent", "format_power", "format_timestamp", "format_tokens", "format_watt_hours", "json_safe"]
