"""engine.formatting: each format at its unit boundaries, with unknown (None, NaN, inf) and
negative values, and JSON-safe values."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.formatting import (
    UNKNOWN,
    format_accuracy,
    format_count,
    format_duration,
    format_energy,
    format_parameters,
    format_percent,
    format_power,
    format_timestamp,
    format_tokens,
    format_watt_hours,
    json_safe,
)

UNKNOWNS = [None, math.nan, math.inf, -math.inf, np.float64("nan"), pd.NA, pd.NaT]


@pytest.mark.parametrize("formatter", [format_energy, format_watt_hours, format_power, format_duration,
                                       format_percent, format_tokens])
@pytest.mark.parametrize("value", UNKNOWNS)
def test_unknown_is_never_a_number(formatter, value):
    assert formatter(value) == UNKNOWN
    assert formatter(value, unknown="an unknown amount") == "an unknown amount"


@pytest.mark.parametrize("joules, text", [
    (0.0, "0.0 J"),
    (0.00412, "0.00412 J"),
    (0.96, "1.0 J"),
    (24.0, "24.0 J"),
    (999.94, "999.9 J"),
    (999.96, "1.00 kJ"),          # rounding decides the unit: never "1,000.0 J"
    (1_000.0, "1.00 kJ"),
    (125_000.0, "125.00 kJ"),
    (999_994.0, "999.99 kJ"),
    (999_996.0, "1.00 MJ (0.28 kWh)"),
    (3.6e6, "3.60 MJ (1.00 kWh)"),
    (7.2e9, "7,200.00 MJ (2,000.00 kWh)"),
    (np.float32(24.0), "24.0 J"),
    (-4.0, "-4.0 J"),
    (-1500.0, "-1.50 kJ"),
    (-0.0001, "-0.0001 J"),
])
def test_energy(joules, text):
    assert format_energy(joules) == text


@pytest.mark.parametrize("joules, text", [
    (0.5, "0.1389 mWh"),
    (3.5999, "1 mWh"),               # 0.99997 mWh, to four digits
    (3.6, "1 mWh"),
    (36_000.0, "10 Wh"),
    (3_599_000.0, "999.7 Wh"),
    (3_599_900.0, "1 kWh"),          # 999.97 Wh rounds to 1000: the next unit
    (3.6e6, "1 kWh"),
    (3.6e9, "1 MWh"),
    (-36_000.0, "-10 Wh"),
])
def test_watt_hours(joules, text):
    assert format_watt_hours(joules) == text


@pytest.mark.parametrize("watts, text", [
    (0.0, "0.0 W"), (0.35, "0.35 W"), (42.0, "42.0 W"), (999.95, "1.00 kW"), (1250.0, "1.25 kW"),
    (-5.0, "-5.0 W"),
])
def test_power(watts, text):
    assert format_power(watts) == text


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0 s"),
    (0.004, "0.004 s"),
    (0.42, "0.42 s"),
    (0.96, "1.0 s"),
    (1.2, "1.2 s"),
    (9.94, "9.9 s"),
    (9.96, "10 s"),
    (42.4, "42 s"),
    (59.4, "59 s"),
    (59.6, "1 min 00 s"),         # rounding decides the unit: never "60 s"
    (60.0, "1 min 00 s"),
    (185.0, "3 min 05 s"),
    (3599.4, "59 min 59 s"),
    (3599.6, "1 h 00 min"),
    (3600.0, "1 h 00 min"),
    (3720.0, "1 h 02 min"),
    (3629.0, "1 h 00 min"),        # whole minutes from an hour on
    (3631.0, "1 h 01 min"),
    (7199.0, "2 h 00 min"),
    (100 * 3600.0, "100 h 00 min"),
    (-185.0, "-3 min 05 s"),
    (-0.5, "-0.5 s"),
    (np.int64(42), "42 s"),
])
def test_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("fraction, kwargs, text", [
    (0.0, {}, "0.0%"),
    (0.052, {}, "5.2%"),
    (1.0, {}, "100.0%"),
    (0.000123, {"digits": 4}, "0.0123%"),
    (0.87, {"digits": 0}, "87%"),
    (0.2, {"signed": True}, "+20.0%"),
    (-0.031, {"signed": True}, "-3.1%"),
    (-0.031, {}, "-3.1%"),
    (0.0, {"signed": True}, "+0.0%"),
])
def test_percent(fraction, kwargs, text):
    assert format_percent(fraction, **kwargs) == text


def test_accuracy_and_parameters_keep_their_page_wording():
    assert format_accuracy(0.645) == "64.5%"
    assert format_accuracy(None) == format_accuracy(math.nan) == "not set"
    assert format_parameters(0.0013) == "1.3 M"
    assert format_parameters(0.999) == "999.0 M"
    assert format_parameters(1.0) == "1.0 B"
    assert format_parameters(70.0) == "70.0 B"
    assert format_parameters(None) == format_parameters(math.nan) == ""


@pytest.mark.parametrize("count, text", [
    (0, "0 tokens"), (1, "1 token"), (2, "2 tokens"), (1234, "1,234 tokens"), (1_234_567.0, "1,234,567 tokens"),
    (np.int64(8), "8 tokens"), (-1, "-1 token"), (-5, "-5 tokens"),
])
def test_tokens(count, text):
    assert format_tokens(count) == text


@pytest.mark.parametrize("count, noun, text", [
    (1, "query", "1 query"), (2, "query", "2 queries"), (0, "query", "0 queries"), (1, "problem", "1 problem"),
    (3, "problem", "3 problems"), (2, "day", "2 days"), (1500, "row", "1,500 rows"), (np.int64(1), "point", "1 point"),
])
def test_count_with_its_noun_in_the_right_number(count, noun, text):
    assert format_count(count, noun) == text
    assert format_count(2, "analysis", "analyses") == "2 analyses"
    assert format_count(None, "query") == UNKNOWN


@pytest.fixture
def berlin(monkeypatch):
    """This host's local time zone set to Europe/Berlin (UTC+2 in May)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_timestamps_are_local_short_and_without_microseconds(berlin):
    aware = dt.datetime(2024, 5, 1, 12, 0, 5, 123456, tzinfo=dt.timezone.utc)
    assert format_timestamp(aware) == "2024-05-01 14:00"
    assert format_timestamp(aware, seconds=True) == "2024-05-01 14:00:05"
    assert format_timestamp(pd.Timestamp(aware)) == "2024-05-01 14:00"
    assert format_timestamp(pd.Timestamp("2024-05-01 12:00:05.123456")) == "2024-05-01 14:00"  # naive: UTC
    assert format_timestamp("2024-05-01T12:00:00Z") == "2024-05-01 14:00"
    assert format_timestamp("2024-05-01T14:00:00+02:00") == "2024-05-01 14:00"
    assert format_timestamp(np.datetime64("2024-05-01T12:00:00")) == "2024-05-01 14:00"
    assert format_timestamp(aware.timestamp()) == "2024-05-01 14:00"  # seconds since the epoch
    assert format_timestamp(dt.date(2024, 5, 1)) == "2024-05-01 02:00"
    # Midnight boundary: 23:30 UTC is the next day in Berlin.
    assert format_timestamp(dt.datetime(2024, 12, 31, 23, 30, tzinfo=dt.timezone.utc)) == "2025-01-01 00:30"


@pytest.mark.parametrize("value", [None, pd.NaT, math.nan, "not a time", pd.NA])
def test_unknown_timestamps(value):
    assert format_timestamp(value) == UNKNOWN
    assert format_timestamp(value, unknown="never") == "never"


@dataclasses.dataclass(frozen=True)
class _Reading:
    energy_j: float
    at: dt.datetime
    tags: tuple[str, ...] = ()


def test_json_safe_makes_strict_json():
    stamp = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    value = {
        "nan": math.nan, "inf": math.inf, "minus_inf": -math.inf, "np_nan": np.float64("nan"),
        "np_float": np.float32(1.5), "np_int": np.int64(7), "np_bool": np.bool_(True), "bool": False,
        "negative": -2.5, "array": np.array([1.0, np.nan, 3.0]), "tuple": (1, 2), "set": {3},
        "reading": _Reading(energy_j=math.nan, at=stamp, tags=("a",)), "timestamp": pd.Timestamp(stamp),
        "nat": pd.NaT, "na": pd.NA, "path": Path("data/planner.duckdb"), 3: "int key", "nested": [{"x": math.inf}],
        "duration": dt.timedelta(minutes=1, seconds=5), "datetime64": np.datetime64("2024-05-01T12:00:00"),
    }
    safe = json_safe(value)
    text = json.dumps(safe, allow_nan=False)  # strict JSON: raises on any NaN left
    assert json.loads(text) == safe
    assert safe["nan"] is None and safe["inf"] is None and safe["minus_inf"] is None and safe["np_nan"] is None
    assert safe["np_float"] == 1.5 and type(safe["np_float"]) is float
    assert safe["np_int"] == 7 and type(safe["np_int"]) is int
    assert safe["np_bool"] is True and safe["bool"] is False and safe["negative"] == -2.5
    assert safe["array"] == [1.0, None, 3.0] and safe["tuple"] == [1, 2] and safe["set"] == [3]
    assert safe["reading"] == {"energy_j": None, "at": "2024-05-01T12:00:00+00:00", "tags": ["a"]}
    assert safe["timestamp"] == "2024-05-01T12:00:00+00:00"
    assert safe["nat"] is None and safe["na"] is None
    assert safe["path"] == "data/planner.duckdb" and safe["3"] == "int key"
    assert safe["nested"] == [{"x": None}]
    assert safe["duration"] == 65.0
    assert safe["datetime64"] == "2024-05-01T12:00:00"


def test_json_safe_leaves_plain_json_alone():
    plain = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert json_safe(plain) == plain
