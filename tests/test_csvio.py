"""engine/csvio.py: the checks every CSV reader shares, and what every CSV writer shares."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from engine import csvio
from engine.errors import InputError
from engine.planning.workload import parse_workload, workload_from_frame


def problems_of(excinfo: pytest.ExceptionInfo[InputError]) -> list[str]:
    return [str(p) for p in excinfo.value.problems]


# -- wide and long inputs ----------------------------------------------------------------

def test_a_million_columns_are_refused_by_the_column_cap_before_any_per_column_work():
    n = 1_000_000  # 9 MB of header: the quadratic duplicate check did not finish in 2 minutes
    text = ",".join(f"c{i}" for i in range(n)) + "\n" + ",".join("1" for _ in range(n)) + "\n"
    started = time.perf_counter()
    for read in (lambda: csvio.parse_csv_text(text, "wide.csv", ("model",), ("model",)),
                 lambda: parse_workload(text, "wide.csv")):
        with pytest.raises(InputError) as excinfo:
            read()
        [problem] = excinfo.value.problems
        assert problem.where == "wide.csv:1"
        assert f"has {n:,} columns, more than the {csvio.MAX_COLUMNS:,}" in problem.message
    print(f"two readers refused 10^6 columns in {time.perf_counter() - started:.2f} s")


def test_the_column_cap_is_inclusive_and_duplicates_are_still_named():
    at_cap = ",".join(["model"] + [f"x{i}" for i in range(csvio.MAX_COLUMNS - 1)])
    rows, warnings = csvio.parse_csv_text(at_cap + "\nm\n", "ok.csv", ("model",), ("model",))
    assert rows == [(2, {"model": "m"})] and "ignored columns" in warnings[0]
    with pytest.raises(InputError, match="more than the 1,000"):
        csvio.parse_csv_text(at_cap + ",one_more\nm\n", "big.csv", ("model",), ("model",))
    with pytest.raises(InputError) as excinfo:
        csvio.parse_csv_text("model,B,b,a,A,,\nm\n", "dup.csv", ("model",), ("model",))
    assert problems_of(excinfo) == ["dup.csv:1: columns appear more than once: a, b; expected each column once"]


def test_duplicated_columns_is_linear_and_ignores_empty_names():
    assert csvio.duplicated_columns(["a", "b", "a", "", "", "c", "b", "a"]) == ["a", "b"]
    many = [f"c{i}" for i in range(200_000)] + ["c7"]
    assert csvio.duplicated_columns(many) == ["c7"]


def test_a_wide_data_frame_workload_is_refused_by_the_same_cap():
    frame = pd.DataFrame([[1] * 5_000], columns=[f"c{i}" for i in range(5_000)])
    with pytest.raises(InputError, match="has 5,000 columns, more than the 1,000"):
        workload_from_frame(frame, "edited")


def test_a_long_prompt_is_one_cell_not_a_field_limit_error(tmp_path: Path):
    prompt = "word " * 200_000  # 1 MB: the csv module's default limit is 131,072 characters
    workload = parse_workload(f'id,prompt\nq1,"{prompt}"\nq2,short\n', "long.csv")
    assert workload.queries.prompt.tolist() == [prompt.strip(), "short"]


def test_a_row_with_a_million_fields_is_one_problem():
    text = "model,device\n" + "m," * 1_000_000 + "\nm,cpu\n"
    with pytest.raises(InputError) as excinfo:
        csvio.parse_csv_text(text, "row.csv", ("model",), ("model", "device"))
    assert problems_of(excinfo) == ["row.csv:2: has 1,000,001 fields but the header has 2; expected 2 "
                                    "comma-separated fields (quote fields that contain commas)"]
