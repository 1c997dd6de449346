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


# -- formulas: neutralised on export, exact round trip -----------------------------------

SPECIAL = ["=", "+", "-", "@", "\t", "\r", "'", " ", "\n", ",", '"', "a", "1", "é", "\x0b"]


def some_strings() -> list[str]:
    """Every string of up to 3 characters over the awkward alphabet, plus long random ones."""
    import itertools
    import random

    strings = [""] + ["".join(chars) for n in (1, 2, 3) for chars in itertools.product(SPECIAL, repeat=n)]
    rng = random.Random(16)
    alphabet = SPECIAL + ["b", "Z", "0", ".", ";", "(", ")", "€", "\u2028"]
    strings += ["".join(rng.choices(alphabet, k=rng.randint(1, 14))) for _ in range(3_000)]
    strings += ["=HYPERLINK(\"http://x\",\"y\")", "=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "'", "''",
                "'=1", "''=1", "'hello", "-4.0", "\t=1", "\r=1"]
    return strings


def test_unescape_undoes_neutralise_for_every_string():
    for text in some_strings():
        written = csvio.neutralise_cell(text)
        assert csvio.unescape_cell(written) == text, repr(text)
        assert written[:1] not in csvio.FORMULA_STARTS, repr(text)  # nothing a spreadsheet would run


def test_hand_written_quotes_before_ordinary_text_are_kept():
    assert csvio.unescape_cell("'hello") == "'hello" and csvio.unescape_cell("'") == "'"
    assert csvio.unescape_cell("'=1+1") == "=1+1"  # a spreadsheet's own text marker is read as one


def test_only_text_cells_are_neutralised_numbers_stay_numbers():
    frame = pd.DataFrame({"id": ["=1+1", "-4", "ok", None], "energy_j": [-4.0, 1.5, 2.0, None],
                          "n": [-3, 1, 2, 3], "flag": [True, False, True, False],
                          "name": pd.array(["@a", "+b", None, "'c"], dtype="string")})
    text = csvio.csv_text(frame)
    assert text.splitlines() == ["id,energy_j,n,flag,name", "'=1+1,-4.0,-3,True,'@a", "'-4,1.5,1,False,'+b",
                                 "ok,2.0,2,True,", ",,3,False,''c"]
    assert frame.loc[0, "id"] == "=1+1"  # the caller's frame is not changed


def test_a_csv_we_write_reads_back_exactly_spaces_around_a_value_aside():
    values = some_strings()
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(len(values))], "value": values, "number": -1.5})
    rows, _ = csvio.parse_csv_text(csvio.csv_text(frame), "out.csv", ("key", "value"), ("key", "value", "number"))
    assert len(rows) == len(values)
    for (_, row), text in zip(rows, values):
        assert row["value"] == text.strip(), repr(text)  # every reader strips the spaces around a cell
        assert row["number"] == "-1.5"
    exact = [text for text in values if text == text.strip()]
    assert len(exact) > 1_000  # most values have no surrounding spaces: those come back exactly


def test_lines_end_in_newline_unless_a_text_cell_holds_a_carriage_return():
    assert csvio.csv_text(pd.DataFrame({"a": ["x", "y"]})) == "a\nx\ny\n"
    text = csvio.csv_text(pd.DataFrame({"a": ["x\ry", "z"]}))
    assert text == 'a\r\n"x\ry"\r\nz\r\n'  # quoted, so the row stays whole
    rows, _ = csvio.parse_csv_text(text, "cr.csv", ("a",), ("a",))
    assert [row["a"] for _, row in rows] == ["x\ry", "z"]
