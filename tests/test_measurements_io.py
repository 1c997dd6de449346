"""Measurements CSV in and out: the round trip, every kind of bad input, duplicates, export rules."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import catalog
from engine import measurements_io as mio
from engine.errors import InputError
from engine.store import Store

HEADER = "model,device,input_tokens,output_tokens,runtime_s,energy_j"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def stored(store: Store) -> pd.DataFrame:
    return store.query_df("SELECT * FROM measurements ORDER BY id")


def count(store: Store) -> int:
    return store.query_one("SELECT count(*) FROM measurements")[0]


def problems_of(excinfo: pytest.ExceptionInfo[InputError]) -> list[tuple[str, str | None, str]]:
    return [(p.where, p.column, p.message) for p in excinfo.value.problems]


def seed_profiled(store: Store) -> None:
    """Rows as profiling stores them: every optional field, NULL energy, awkward floats and times."""
    rows = pd.DataFrame({
        "origin": "profiled", "job_id": 7, "host": "lab-1",
        "model": ["tiny (q4)", "tiny (q4)", "tiny (q4)", "big-model 7B", "big-model 7B"],
        "device": ["cpu", "cpu", "cpu", "cuda:0", "a100:0"],
        "input_tokens": [8, 8, 32, 128, 128], "output_tokens": [16, 16, 8, 64, 64],
        "trial": pd.array([1, 2, None, 1, 1], dtype="Int64"),
        "runtime_s": [0.1 + 0.2, 0.5, 1 / 3, 1e3 / 7, 12.25],
        "energy_j": [12.5, np.nan, 2.5e-3, 1e5 / 3, 301.0],
        "energy_source": ["estimated", "estimated", "measured", "measured", "measured"],
        "energy_method": "nvml-counter [cuda:0]",
        "gpu_energy_j": [np.nan, np.nan, np.nan, 30000.0, 250.5],
        "cpu_energy_j": [12.5, np.nan, 2.5e-3, 3333.25, 50.0],
        "dram_energy_j": [np.nan, np.nan, np.nan, 0.0, 0.5],
        "idle_power_w": [3.5, 3.5, np.nan, 61.2, 55.0],
        "started_at": pd.to_datetime(["2024-05-01T12:00:00.123456", "2024-05-01T12:00:01", None,
                                      "2024-05-02T00:00:00", "2024-05-03T08:30:00.5"], format="ISO8601").astype("datetime64[us]"),
    })
    store.append("measurements", rows)


# -- the round trip ----------------------------------------------------------------------

def test_export_then_import_into_a_fresh_database_gives_the_same_rows(store: Store, tmp_path: Path):
    seed_profiled(store)
    exported = tmp_path / "exported.csv"
    assert mio.export_measurements(store, exported) == 5

    fresh = Store(tmp_path / "fresh.duckdb")
    catalog.add_model(fresh, name="tiny (q4)", accuracy=0.4, accuracy_source="test")
    catalog.add_model(fresh, name="big-model 7B", accuracy=0.6, accuracy_source="test")
    report = mio.import_measurements(fresh, exported)

    assert report.n_rows == 5
    assert report.models == ["big-model 7B", "tiny (q4)"] and report.devices == ["a100:0", "cpu", "cuda:0"]
    assert report.models_not_in_catalog == [] and report.n_rows_without_energy == 1
    assert not any("ignored column" in w for w in report.warnings)  # the export writes only the documented columns
    pd.testing.assert_frame_equal(mio.measurements_frame(fresh), mio.measurements_frame(store))
    again = tmp_path / "again.csv"
    mio.export_measurements(fresh, again)
    assert again.read_bytes() == exported.read_bytes()

    rows = stored(fresh)
    assert set(rows.origin) == {"imported"} and rows.job_id.isna().all() and rows.host.isna().all()
    assert set(rows.energy_method) == {"imported from exported.csv"}
    # the missing energy is NULL in the database, not 0 and not NaN
    assert fresh.query_one("SELECT count(*) FROM measurements WHERE energy_j IS NULL")[0] == 1
    assert fresh.query_one("SELECT count(*) FROM measurements WHERE isnan(energy_j) OR energy_j = 0")[0] == 0


FORMULA_DEVICES = ['=HYPERLINK("http://evil")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "'=1", "''",
                   "'plain", "a100:0"]


def test_export_neutralises_formulas_in_text_cells_and_import_gives_them_back_exactly(store: Store, tmp_path: Path):
    n = len(FORMULA_DEVICES)
    store.append("measurements", pd.DataFrame({
        "origin": "profiled", "model": "m", "device": FORMULA_DEVICES, "input_tokens": 8, "output_tokens": 8,
        "trial": pd.array([1] * n, dtype="Int64"), "runtime_s": 1.5, "energy_j": 3.0, "energy_source": "measured"}))
    path = tmp_path / "out.csv"
    mio.export_measurements(store, path)
    records = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    assert all(r["device"][:1] not in "=+-@\t\r" for r in records)  # nothing a spreadsheet runs
    assert {r["device"] for r in records} == {"'=HYPERLINK(\"http://evil\")", "'+cmd|' /C calc'!A0", "'-2+3",
                                              "'@SUM(A1)", "''=1", "'''", "''plain", "a100:0"}
    assert {r["runtime_s"] for r in records} == {"1.5"}  # numbers stay numbers

    fresh = Store(tmp_path / "fresh.duckdb")
    mio.import_measurements(fresh, path)
    assert sorted(stored(fresh).device) == sorted(FORMULA_DEVICES)
    pd.testing.assert_frame_equal(mio.measurements_frame(fresh), mio.measurements_frame(store))


def test_export_layout_is_the_documented_columns_with_empty_cells_for_unknown_energy(store: Store, tmp_path: Path):
    seed_profiled(store)
    path = tmp_path / "out.csv"
    mio.export_measurements(store, path)
    records = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    assert tuple(records[0]) == mio.MEASUREMENTS_COLUMNS
    # stable order: model, device, tokens, trial
    assert [(r["model"], r["device"], r["input_tokens"], r["trial"]) for r in records] == [
        ("big-model 7B", "a100:0", "128", "1"), ("big-model 7B", "cuda:0", "128", "1"),
        ("tiny (q4)", "cpu", "8", "1"), ("tiny (q4)", "cpu", "8", "2"), ("tiny (q4)", "cpu", "32", "")]
    unmeasured = records[3]
    assert unmeasured["energy_j"] == "" and unmeasured["gpu_energy_j"] == ""  # never "0"
    assert records[2]["runtime_s"] == "0.30000000000000004"  # full precision
    assert records[2]["started_at"] == "2024-05-01T12:00:00.123456+00:00"
    assert records[4]["started_at"] == ""


def test_export_selects_by_model_and_device(store: Store, tmp_path: Path):
    seed_profiled(store)
    assert mio.export_measurements(store, tmp_path / "a.csv", model="tiny (q4)") == 3
    assert mio.export_measurements(store, tmp_path / "b.csv", model="big-model 7B", device="cuda:0") == 1
    assert set(mio.measurements_frame(store, device="cpu").device) == {"cpu"}
    with pytest.raises(InputError, match="no measurements for model 'nope'"):
        mio.export_measurements(store, tmp_path / "c.csv", model="nope")
    assert not (tmp_path / "c.csv").exists()


# -- import: what is stored --------------------------------------------------------------

def test_import_reads_every_documented_column(store: Store, tmp_path: Path):
    catalog.add_model(store, name="known", accuracy=0.5, accuracy_source="test")
    path = write(tmp_path / "m.csv",
                 "model,device,input_tokens,output_tokens,runtime_s,energy_j,trial,energy_source,gpu_energy_j,"
                 "cpu_energy_j,dram_energy_j,idle_power_w,started_at,note\n"
                 "known,cuda:0,8.0,16,0.5,12.5,1,Estimated,10,2.5,0,40.5,2024-05-01T14:00:00+02:00,hello\n"
                 "newcomer,a100:0,32,8,0.25,,,,,,,,2024-05-01T12:00:00,\n")
    report = mio.import_measurements(store, path)

    assert report.n_rows == 2 and report.models_not_in_catalog == ["newcomer"]
    assert any("ignored column 'note'" in w for w in report.warnings)
    assert any("newcomer" in w and "models add" in w for w in report.warnings)
    rows = stored(store)
    first, second = rows.iloc[0], rows.iloc[1]
    assert first.input_tokens == 8 and first.energy_source == "estimated" and first.trial == 1
    assert (first.gpu_energy_j, first.cpu_energy_j, first.dram_energy_j, first.idle_power_w) == (10, 2.5, 0, 40.5)
    assert pd.isna(second.energy_j) and second.energy_source == "measured" and pd.isna(second.trial)
    assert second.runtime_s == 0.25 and second.batch_size == 1
    times = store.query_df("SELECT strftime(timezone('UTC', started_at), '%Y-%m-%dT%H:%M') AS t FROM measurements "
                           "ORDER BY id").t.tolist()
    assert times == ["2024-05-01T12:00", "2024-05-01T12:00"]  # +02:00 converted; no offset read as UTC


@pytest.fixture
def new_york_time():
    """The process (and so DuckDB's session) in a time zone other than UTC, for one test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_times_without_offset_are_utc_whatever_the_local_time_zone(store: Store, tmp_path: Path, new_york_time):
    path = write(tmp_path / "m.csv", f"{HEADER},started_at\nm,cpu,8,8,1,1,2024-05-01T12:00:00\n")
    mio.import_measurements(store, path)
    assert mio.measurements_frame(store).started_at.tolist() == ["2024-05-01T12:00:00.000000+00:00"]
    with pytest.raises(InputError, match="already in the database"):  # and the duplicate check agrees
        mio.import_measurements(store, path)


def test_upload_bytes_with_a_bom(store: Store):
    data = ("\ufeff" + f"{HEADER}\nm,cpu,8,8,1,2\n").encode("utf-8")
    report = mio.import_measurements_bytes(store, data, "upload.csv")
    assert report.n_rows == 1
    assert stored(store).energy_method.tolist() == ["imported from upload.csv"]
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements_bytes(store, f"{HEADER}\nm,cpu,8,8,1,0\n".encode(), "upload.csv")
    assert problems_of(excinfo)[0][:2] == ("upload.csv:2", "energy_j")


# -- import: bad input -------------------------------------------------------------------

def test_trials_counted_from_zero_are_stored_counted_from_one_per_design_point(store: Store, tmp_path: Path):
    path = write(tmp_path / "paper.csv", f"{HEADER},trial\n"
                 "m,a100:0,8,8,1,2,0\nm,a100:0,8,8,1.1,2.1,1\nm,a100:0,8,8,1.2,2.2,2\n"   # counted from 0
                 "m,a100:0,16,8,1,2,1\nm,a100:0,16,8,1.1,2.1,2\n"                     # counted from 1
                 "m,a100:1,8,8,1,2,0\n"                                               # another device, from 0
                 "m,a100:0,32,8,1,2,\n")                                              # no trial number
    report = mio.import_measurements(store, path)
    rows = store.query_df("SELECT device, input_tokens, trial FROM measurements ORDER BY id")
    assert rows.trial.tolist()[:6] == [1, 2, 3, 1, 2, 1] and pd.isna(rows.trial.iloc[6])
    assert any("trials counted from 0 at 2 design points; stored counted from 1" in w for w in report.warnings)
    with pytest.raises(InputError, match="7 of its 7 rows are already in the database"):  # the same file again
        mio.import_measurements(store, path)
    exported = tmp_path / "out.csv"
    mio.export_measurements(store, exported)
    assert sorted(int(r["trial"]) for r in csv.DictReader(exported.open()) if r["trial"]) == [1, 1, 1, 2, 2, 3]


def test_zero_energy_is_refused_with_advice(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", f"{HEADER}\nm,cpu,8,8,1,0\nm,cpu,8,8,1,-3\n")
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    (where0, column0, zero), (where1, _, negative) = problems_of(excinfo)
    assert (where0, column0) == (f"{path}:2", "energy_j") and where1 == f"{path}:3"
    assert "0 J is not a measurement" in zero and "leave energy_j empty" in zero
    assert "negative" in negative and "leave energy_j empty" in negative
    assert count(store) == 0


@pytest.mark.parametrize("column, cell, fragment", [
    ("input_tokens", "0", "is not > 0"),
    ("input_tokens", "-4", "is not > 0"),
    ("input_tokens", "8.5", "is not a whole number"),
    ("input_tokens", "many", "is not a number"),
    ("input_tokens", "", "is missing"),
    ("output_tokens", "99999999999", "is too large"),
    ("runtime_s", "-0.5", "is negative"),
    ("runtime_s", "nan", "is not a finite number"),
    ("runtime_s", "1,5", "is not a number"),
    ("energy_j", "inf", "is not a finite number"),
    ("energy_j", "12 J", "is not a number"),
    ("trial", "-1", "is not >= 0"),
    ("trial", "first", "is not a number"),
    ("batch_size", "0", "is not > 0"),
    ("batch_size", "-4", "is not > 0"),
    ("batch_size", "2.5", "is not a whole number"),
    ("batch_size", "300", "more than 256 requests in one batch"),
    ("energy_source", "sensor", "is not an energy source"),
    ("gpu_energy_j", "-1", "is negative"),
    ("dram_energy_j", "x", "is not a number"),
    ("idle_power_w", "-2", "is negative"),
    ("started_at", "yesterday", "is not an ISO 8601 time"),
    # physical bounds (engine/bounds.py): unit mistakes and corrupt numbers
    ("runtime_s", "0", "'0' s is below 1e-06 s"),
    ("runtime_s", "2e6", "is above 1e+06 s"),
    ("energy_j", "1e200", "'1e200' J is above 1e+09 J"),
    ("energy_j", "1e-200", "'1e-200' J is below 1e-09 J"),
    ("energy_j", "5e5", "J is above 100000 W on average over its runtime"),   # over 1 s
    ("energy_j", "1e-8", "J is below 1e-06 W on average over its runtime"),   # over 1 s
    ("gpu_energy_j", "1e10", "is above 1e+09 J"),
    ("idle_power_w", "1e6", "is above 100000 W"),
    ("input_tokens", "20000000", "more than 10,000,000 tokens"),
    ("started_at", "2024-13-01", "is not an ISO 8601 time"),
    ("model", "", "the model name is missing"),
    ("model", "a@b", "is not a usable model name"),
    ("device", "", "is missing"),
    ("device", "gpu,0", "contains a comma"),
    ("device", "x" * 65, "longer than 64 characters"),
])
def test_each_bad_field_is_reported_with_line_and_column(store: Store, tmp_path: Path, column: str, cell: str,
                                                         fragment: str):
    good = {"model": "m", "device": "cpu", "input_tokens": "8", "output_tokens": "8", "runtime_s": "1",
            "energy_j": "2", "trial": "1", "batch_size": "1", "energy_source": "measured", "gpu_energy_j": "",
            "dram_energy_j": "", "idle_power_w": "", "started_at": "2024-05-01T12:00:00Z"}
    bad = {**good, column: cell}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(good), lineterminator="\n")
    writer.writeheader()
    writer.writerows([good | {"trial": "2"}, bad])
    path = write(tmp_path / "m.csv", buffer.getvalue())
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    [problem] = excinfo.value.problems
    assert (problem.where, problem.column) == (f"{path}:3", column)
    assert fragment in problem.message and problem.expected


def test_missing_column(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", "model,device,input_tokens,output_tokens,runtime_s\nm,cpu,8,8,1\n")
    with pytest.raises(InputError, match="missing column energy_j"):
        mio.import_measurements(store, path)


def test_not_utf8_empty_and_header_only_files(store: Store, tmp_path: Path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"{HEADER}\nmodèle,cpu,8,8,1,2\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        mio.import_measurements(store, latin1)
    with pytest.raises(InputError, match="is empty"):
        mio.import_measurements(store, write(tmp_path / "empty.csv", ""))
    with pytest.raises(InputError, match="no rows"):
        mio.import_measurements(store, write(tmp_path / "header.csv", HEADER + "\n"))
    with pytest.raises(InputError, match="file not found"):
        mio.import_measurements(store, tmp_path / "absent.csv")
    assert count(store) == 0


def test_three_bad_rows_are_all_reported_with_their_lines(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", f"{HEADER}\n"
                 "m,cpu,8,8,1,2\n"
                 "m,cpu,0,8,1,2\n"      # line 3
                 "m,cpu,8,8,1,2.5\n"
                 "m,cpu,8,8,1,zero\n"   # line 5
                 "m,cpu,16,8,1,3\n"
                 "m,cpu,8,8,soon,2\n"  # line 7
                 "m,cpu,32,8,1,4\n")
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    assert [(where, column) for where, column, _ in problems_of(excinfo)] == [
        (f"{path}:3", "input_tokens"), (f"{path}:5", "energy_j"), (f"{path}:7", "runtime_s")]
    assert count(store) == 0


def test_three_bad_values_are_all_reported_in_line_order(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", f"{HEADER},energy_source\n"
                 "m,cpu,8,8,1,2,\n"
                 "m,cpu,8,8,1,2,guessed\n"  # line 3
                 "m,cpu,8,8,1,2,\n"
                 "m,cpu,8,8.5,1,2,\n"       # line 5
                 "m,cpu,8,8,-1,0,\n")       # line 6: two problems on one line
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    assert [(where, column) for where, column, _ in problems_of(excinfo)] == [
        (f"{path}:3", "energy_source"), (f"{path}:5", "output_tokens"), (f"{path}:6", "runtime_s"),
        (f"{path}:6", "energy_j")]


def test_many_bad_rows_are_listed_up_to_a_limit_then_counted(store: Store, tmp_path: Path):
    body = "".join(f"m,cpu,8,8,1,{'0' if i % 2 else '1'}\n" for i in range(200))
    path = write(tmp_path / "m.csv", f"{HEADER}\n{body}")
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    problems = excinfo.value.problems
    assert len(problems) == mio.MAX_PROBLEMS_PER_COLUMN + 1
    assert problems[0].where == f"{path}:3"
    assert "80 more rows have a bad energy_j" in problems[-1].message


def test_a_failed_import_changes_nothing(store: Store, tmp_path: Path):
    mio.import_measurements(store, write(tmp_path / "first.csv", f"{HEADER}\nm,cpu,8,8,1,2\n"))
    before = stored(store)
    body = "".join(f"m,cpu,{n},8,1,2\n" for n in range(1, 50)) + "m,cpu,8,8,1,0\n"
    with pytest.raises(InputError):
        mio.import_measurements(store, write(tmp_path / "second.csv", f"{HEADER}\n{body}"))
    pd.testing.assert_frame_equal(stored(store), before)


# -- duplicates --------------------------------------------------------------------------

def test_importing_the_same_file_twice_is_refused_unless_allowed(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", f"{HEADER},trial\nm,cpu,8,8,1,2,1\nm,cpu,8,8,1.5,,2\n")
    mio.import_measurements(store, path)
    with pytest.raises(InputError) as excinfo:
        mio.import_measurements(store, path)
    [problem] = excinfo.value.problems
    assert "2 of its 2 rows are already in the database" in problem.message
    assert "imported from m.csv" in problem.message and "--allow-duplicates" in problem.expected
    assert count(store) == 2

    report = mio.import_measurements(store, path, allow_duplicates=True)
    assert count(store) == 4 and any("stored a second time" in w for w in report.warnings)


def test_new_rows_beside_old_ones_are_not_duplicates(store: Store, tmp_path: Path):
    mio.import_measurements(store, write(tmp_path / "a.csv", f"{HEADER},trial\nm,cpu,8,8,1,2,1\n"))
    mio.import_measurements(store, write(tmp_path / "b.csv", f"{HEADER},trial\nm,cpu,8,8,1,2,2\n"))  # another trial
    mio.import_measurements(store, write(tmp_path / "c.csv", f"{HEADER},trial\nm,cuda:0,8,8,1,2,1\n"))
    assert count(store) == 3


def test_an_export_imported_back_into_its_own_database_is_refused(store: Store, tmp_path: Path):
    seed_profiled(store)
    path = tmp_path / "out.csv"
    mio.export_measurements(store, path)
    with pytest.raises(InputError, match="5 of its 5 rows are already in the database.*profiled measurements"):
        mio.import_measurements(store, path)
    assert count(store) == 5


def test_rows_repeated_inside_one_file_are_imported_with_a_warning(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", f"{HEADER}\nm,cpu,8,8,1,2\nm,cpu,8,8,1,2\n")
    report = mio.import_measurements(store, path)
    assert count(store) == 2 and any("repeat an earlier row" in w and "line 3" in w for w in report.warnings)


# -- export: the file --------------------------------------------------------------------

def test_export_does_not_replace_a_file_unless_asked(store: Store, tmp_path: Path):
    seed_profiled(store)
    path = write(tmp_path / "out.csv", "precious\n")
    with pytest.raises(InputError, match="already exists"):
        mio.export_measurements(store, path)
    assert path.read_text() == "precious\n"
    assert mio.export_measurements(store, path, overwrite=True) == 5
    assert path.read_text().startswith("model,device,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "planner.duckdb"]  # no temporary file left


def test_export_overwrite_writes_a_regular_file_only_never_through_a_link_or_a_fifo(store: Store, tmp_path: Path):
    seed_profiled(store)
    target = write(tmp_path / "elsewhere.csv", "not ours\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with pytest.raises(InputError, match="is a symbolic link"):
        mio.export_measurements(store, link, overwrite=True)
    assert link.is_symlink() and target.read_text() == "not ours\n"
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="named pipe"):
        mio.export_measurements(store, fifo, overwrite=True)
    assert os.path.exists(fifo) and not fifo.is_file()
    with pytest.raises(InputError, match="is the database"):
        mio.export_measurements(store, store.path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.csv", "link.csv", "pipe.csv", "planner.duckdb"]


def test_export_gets_the_users_umask_and_a_replaced_file_keeps_its_mode(store: Store, tmp_path: Path):
    seed_profiled(store)
    old = os.umask(0o022)
    try:
        mio.export_measurements(store, tmp_path / "new.csv")
        replaced = write(tmp_path / "old.csv", "old\n")
        replaced.chmod(0o664)
        mio.export_measurements(store, replaced, overwrite=True)  # was written as a 0o600 temporary file
    finally:
        os.umask(old)
    assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o644
    assert replaced.stat().st_mode & 0o777 == 0o664 and replaced.read_text().startswith("model,")


def test_export_refuses_a_missing_folder_and_a_directory(store: Store, tmp_path: Path):
    seed_profiled(store)
    with pytest.raises(InputError, match="does not exist") as excinfo:
        mio.export_measurements(store, tmp_path / "nowhere" / "out.csv")
    assert "create the folder" in excinfo.value.problems[0].expected
    with pytest.raises(InputError, match="is a directory"):
        mio.export_measurements(store, tmp_path)


def test_export_of_an_empty_database_writes_nothing(store: Store, tmp_path: Path):
    with pytest.raises(InputError, match="no measurements in the database"):
        mio.export_measurements(store, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    assert list(mio.measurements_frame(store).columns) == list(mio.MEASUREMENTS_COLUMNS)


def test_rows_at_batch_size_above_one_are_exported_with_their_batch_size_and_come_back_as_they_were(
        store: Store, tmp_path: Path):
    store.append("measurements", pd.DataFrame({
        "origin": "profiled", "model": "m", "device": "cpu", "input_tokens": [8, 8], "output_tokens": [8, 8],
        "batch_size": [1, 4], "trial": [1, 1], "runtime_s": [1.0, 2.0], "energy_j": [2.0, 5.0]}))
    mio.export_measurements(store, tmp_path / "out.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert [(r["batch_size"], r["energy_j"]) for r in rows] == [("1", "2.0"), ("4", "5.0")]

    other = Store(tmp_path / "other.duckdb")
    report = mio.import_measurements(other, tmp_path / "out.csv")
    assert report.n_rows == 2 and not [w for w in report.warnings if "catalog" not in w and "models add" not in w]
    back = other.query_df("SELECT batch_size, energy_j FROM measurements ORDER BY batch_size")
    assert back.batch_size.tolist() == [1, 4] and back.energy_j.tolist() == [2.0, 5.0]
    # A batch of 4 and one request of the same shape and figures are different measurements, not duplicates.
    with pytest.raises(InputError, match="already in the database"):
        mio.import_measurements(other, tmp_path / "out.csv")


def test_an_empty_batch_size_is_one_request_at_a_time(store: Store, tmp_path: Path):
    path = write(tmp_path / "m.csv", "model,device,input_tokens,output_tokens,runtime_s,energy_j,batch_size\n"
                                     "m,cpu,8,8,1,2,\nm,cpu,8,8,2,5,16\n")
    mio.import_measurements(store, path)
    assert store.query_df("SELECT batch_size FROM measurements ORDER BY runtime_s").batch_size.tolist() == [1, 16]


# -- size --------------------------------------------------------------------------------

def test_twenty_thousand_rows_import_in_well_under_the_budget(store: Store, tmp_path: Path):
    n = 20_000
    rng = np.random.default_rng(1)
    runtime_s = rng.uniform(0.01, 30, n)
    frame = pd.DataFrame({"model": "m", "device": rng.choice(["cpu", "cuda:0"], n),
                          "input_tokens": rng.integers(1, 4096, n), "output_tokens": rng.integers(1, 1024, n),
                          "runtime_s": runtime_s, "energy_j": runtime_s * rng.uniform(10, 700, n),  # 10 to 700 W
                          "trial": np.arange(1, n + 1)})
    frame.loc[::7, "energy_j"] = np.nan
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    started = time.perf_counter()
    report = mio.import_measurements(store, path)
    elapsed_s = time.perf_counter() - started
    assert report.n_rows == n and report.n_rows_without_energy == len(frame.loc[::7])
    assert elapsed_s < 5.0  # a row-by-row insert takes minutes; this is ~1 s
    assert store.query_one("SELECT sum(trial) FROM measurements")[0] == n * (n + 1) // 2
