"""The two faces of planning: ``python -m engine plan`` (in-process, as tests/test_cli.py does)
and the Plan page (Streamlit's AppTest through app.py's navigation)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.cli import main
from engine.fitting import load_reference_profiles, published_catalog_rows
from engine.formatting import format_energy
from engine.planning import list_plans
from engine.store import Store

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TOKENS = ROOT / "data" / "workloads" / "sample_tokens_200.csv"
SCHEDULE_HEADER = ["id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j",
                   "predicted_runtime_s", "accuracy", "device_start_s"]
PLAN_JSON_KEYS = {"status", "energy_j", "lower_bound_j", "gap", "solve_s", "accuracy", "per_device_runtime_s",
                  "n_queries", "assignments", "baselines"}
BEST_PUBLISHED_ACCURACY = max(row["accuracy"] for row in published_catalog_rows())
MALFORMED = ("id,input_tokens,output_tokens,prompt\n"
             "a,NaN,10,\n"        # line 2: not a finite number
             "b,-5,10,\n"         # line 3: fewer than 1 token
             "c,,10,\n"           # line 4: neither a prompt nor input_tokens
             "d,20,-3,\n"         # line 5: output_tokens below 1
             "e,30,20,\n")        # line 6: fine


def plan(db: Path, *args: str) -> int:
    return main(["plan", *args, "--db", str(db)])


def stored_counts(db: Path) -> tuple[int, int]:
    store = Store(db)
    return (int(store.query_one("SELECT count(*) FROM plans")[0]),
            int(store.query_one("SELECT count(*) FROM workloads")[0]))


@pytest.fixture
def reference_db(isolated_db: Path) -> Path:
    """A database after `python -m engine reference-profiles` (its output kept out of the tests')."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["reference-profiles", "--db", str(isolated_db)]) == 0
    assert "added 7 models" in printed.getvalue()
    return isolated_db


def test_sample_workload_has_token_counts():
    assert SAMPLE_TOKENS.exists()
    with SAMPLE_TOKENS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 200
    assert all(int(r["input_tokens"]) >= 1 and int(r["output_tokens"]) >= 1 for r in rows)


# -- the CLI ------------------------------------------------------------------------------------

def test_plan_json_and_schedule_csv(reference_db: Path, tmp_path: Path, capfd):
    # capfd, not capsys: the solver's C library writes to file descriptor 1 directly.
    out = tmp_path / "schedule.csv"
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "0.6", "--deadline-s", "600",
                "--json", "--out", str(out))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)  # one JSON document and nothing else on stdout
    assert PLAN_JSON_KEYS <= set(document)
    assert document["status"] == "optimal" and document["n_queries"] == 200
    assert document["accuracy"] >= 0.6 - 1e-9
    assert all(seconds <= 600 * (1 + 1e-9) for seconds in document["per_device_runtime_s"].values())
    assert document["gap"] == pytest.approx((document["energy_j"] - document["lower_bound_j"]) / document["energy_j"])
    assert sum(document["assignments"].values()) == 200
    for baseline in document["baselines"].values():
        assert {"energy_j", "accuracy", "makespan_s"} <= set(baseline)
        if baseline["feasible"]:
            assert document["energy_j"] <= baseline["energy_j"] * (1 + 1e-9)
    assert "Traceback" not in captured.err

    schedule = pd.read_csv(out, dtype={"id": str})
    assert list(schedule.columns[:len(SCHEDULE_HEADER)]) == SCHEDULE_HEADER
    workload = pd.read_csv(SAMPLE_TOKENS, dtype={"id": str}).set_index("id")
    assert len(schedule) == 200 and sorted(schedule.id) == sorted(workload.index)
    joined = schedule.merge(workload, left_on="id", right_index=True, suffixes=("", "_given"))
    assert len(joined) == 200
    assert (joined.input_tokens == joined.input_tokens_given).all()
    assert (joined.output_tokens == joined.output_tokens_given).all()
    assert schedule.predicted_energy_j.sum() == pytest.approx(document["energy_j"], rel=1e-5)
    assert (schedule.accuracy.mean()) == pytest.approx(document["accuracy"], abs=1e-6)
    counts = (schedule.model + "@" + schedule.device).value_counts().to_dict()
    assert counts == document["assignments"]
    # The plan is stored under the id the JSON gives.
    assert list_plans(Store(reference_db)).id.tolist() == [document["plan_id"]]


def test_malformed_workload_exits_2_with_one_line_per_problem_and_stores_nothing(reference_db: Path,
                                                                                 tmp_path: Path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(MALFORMED, encoding="utf-8")
    code = plan(reference_db, "--workload", str(bad), "--accuracy-target", "0.5", "--json")
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"{bad}:2: column input_tokens:") and "finite" in lines[0]
    assert lines[1].startswith(f"{bad}:3: column input_tokens:") and "'-5'" in lines[1]
    assert lines[2].startswith(f"{bad}:4:") and "neither a prompt nor input_tokens" in lines[2]
    assert lines[3].startswith(f"{bad}:5: column output_tokens:") and "'-3'" in lines[3]
    assert all("expected" in line for line in lines)
    assert stored_counts(reference_db) == (0, 0)


def test_infeasible_target_exits_1_naming_the_target_and_the_best_achievable(reference_db: Path, capsys):
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "0.99")
    captured = capsys.readouterr()
    assert code == 1
    sentence = f"accuracy target 0.990 is above the best achievable {BEST_PUBLISHED_ACCURACY:.3f}"
    assert sentence in captured.out + captured.err
    assert "Traceback" not in captured.err

    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "0.99", "--json")
    captured = capsys.readouterr()
    assert code == 1
    document = json.loads(captured.out)
    assert document["status"] == "infeasible" and document["energy_j"] is None
    assert document["best_achievable"]["accuracy"] == pytest.approx(BEST_PUBLISHED_ACCURACY)
    assert any("0.990" in line for line in document["diagnosis"])


@pytest.mark.parametrize("flags, where", [
    (["--device-deadline", "foo"], "--device-deadline"),
    (["--device-deadline", "a100-swing=soon"], "--device-deadline"),
    (["--min-share", "x=abc"], "--min-share"),
    (["--min-share", "llama-2-7b=0.7", "--min-share", "mistral-7b=0.6"], "--min-share"),
    (["--load-cost", "llama-2-7b=12"], "--load-cost"),
    (["--accuracy-target", "1.5"], "--accuracy-target"),
    (["--device-deadline", "tpu0=60"], "--device-deadline"),   # not a device of the options
    (["--min-share", "ghost=0.1"], "--min-share"),             # not a model of the options
])
def test_bad_flags_exit_2_and_store_nothing(reference_db: Path, capsys, flags: list[str], where: str):
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), *flags)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith(where) for line in lines if not line.startswith("warning:")), lines
    assert "Traceback" not in captured.err
    assert stored_counts(reference_db)[0] == 0


def test_out_must_be_a_file_in_an_existing_folder_and_options_must_exist(reference_db: Path, tmp_path: Path,
                                                                        capsys):
    for out in (tmp_path, tmp_path / "missing" / "schedule.csv"):
        assert plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--out", str(out)) == 2
        assert capsys.readouterr().err.startswith("--out")
    assert plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--option", "ghost@tpu0") == 2
    assert "'ghost@tpu0' is not an available option" in capsys.readouterr().err
    assert stored_counts(reference_db) == (0, 0)


def test_out_never_replaces_the_workload_and_an_existing_file_only_with_overwrite(reference_db: Path, tmp_path: Path,
                                                                                  capfd):
    workload = tmp_path / "w.csv"
    workload.write_bytes(SAMPLE_TOKENS.read_bytes())
    for extra in ([], ["--overwrite"]):  # the workload is an input: not even --overwrite replaces it
        assert plan(reference_db, "--workload", str(workload), "--accuracy-target", "0.5", "--out", str(workload),
                    *extra) == 2
        err = capfd.readouterr().err
        assert err.startswith(f"--out: {workload} is the workload (--workload), an input of this command"), err
    assert plan(reference_db, "--workload", str(workload), "--out", str(reference_db), "--overwrite") == 2
    assert "is the database" in capfd.readouterr().err
    assert workload.read_bytes() == SAMPLE_TOKENS.read_bytes() and stored_counts(reference_db) == (0, 0)

    out = tmp_path / "schedule.csv"
    out.write_text("precious\n")
    assert plan(reference_db, "--workload", str(workload), "--accuracy-target", "0.5", "--out", str(out)) == 2
    assert "already exists, so it was not replaced" in capfd.readouterr().err
    assert out.read_text() == "precious\n" and stored_counts(reference_db) == (0, 0)  # refused before planning
    assert plan(reference_db, "--workload", str(workload), "--accuracy-target", "0.5", "--out", str(out),
                "--overwrite") == 0
    capfd.readouterr()
    assert out.read_text().startswith(",".join(SCHEDULE_HEADER))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planner.duckdb", "schedule.csv", "w.csv"]


def test_schedule_csv_neutralises_formula_ids_and_reads_back_exactly(reference_db: Path, tmp_path: Path, capfd):
    from engine.csvio import read_csv_rows

    ids = ["=1+1", "+SUM(A1)", "-3", "@x", "'kept", "plain", "'"]  # a quote before ordinary text is text
    workload = tmp_path / "w.csv"
    with workload.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "input_tokens", "output_tokens", "category"])
        writer.writerows([[query_id, 100, 50, "=cmd()"] for query_id in ids])
    out = tmp_path / "schedule.csv"
    assert plan(reference_db, "--workload", str(workload), "--accuracy-target", "0.5", "--out", str(out)) == 0
    capfd.readouterr()
    cells = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))[1:]
    assert all(row[0][:1] not in "=+-@" for row in cells)
    assert sorted(row[0] for row in cells) == sorted(["'=1+1", "'+SUM(A1)", "'-3", "'@x", "''kept", "plain", "''"])
    rows, _ = read_csv_rows(out, ("id",), tuple(SCHEDULE_HEADER))  # the reader every schedule import uses
    assert sorted(row["id"] for _, row in rows) == sorted(ids)
    assert all(float(row["predicted_energy_j"]) > 0 for _, row in rows)


def test_unreadable_number_is_refused_by_the_parser(isolated_db: Path, capsys):
    with pytest.raises(SystemExit) as caught:
        plan(isolated_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "abc")
    assert caught.value.code == 2
    assert "'abc' is not a number" in capsys.readouterr().err


def test_empty_database_exits_2_with_nothing_to_plan_with(isolated_db: Path, capsys):
    code = plan(isolated_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "0.5")
    captured = capsys.readouterr()
    assert code == 2
    assert "nothing to plan with" in captured.err
    assert "Traceback" not in captured.err
    assert stored_counts(isolated_db) == (0, 0)


# -- the Plan page --------------------------------------------------------------------------------

def plan_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/plan.py").run()
    assert not at.exception, at.exception
    return at


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_page_on_an_empty_database_offers_the_reference_profiles(store: Store):
    at = plan_page()
    assert any("Nothing to plan with yet" in i.value for i in at.info)
    assert not at.metric
    button(at, "Load the published A100 reference profiles").click().run()
    assert not at.exception, at.exception
    at.run()
    assert not at.exception, at.exception
    assert any(e.label == "7 options available (model on device)" for e in at.expander)
    assert not any("Nothing to plan with yet" in i.value for i in at.info)
    assert "llama-2-70b" in set(at.dataframe[0].value.model)


def test_page_plans_the_sample_workload(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    source = at.radio(key="plan_source")
    source.set_value(next(o for o in source.options if o.startswith("Sample workload"))).run()
    assert not at.exception, at.exception
    assert any("queries read from" in s.value for s in at.success)
    target = at.number_input(key="plan_target").value
    button(at, "Plan").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]

    metrics = {m.label: m.value for m in at.metric}
    assert {"Energy", "Per query", "Mean accuracy", "Proven gap"} <= set(metrics)
    plans = list_plans(store)
    assert len(plans) == 1 and plans.status.iloc[0] == "optimal"
    stored = plans.iloc[0]
    assert metrics["Energy"] == format_energy(stored.energy_j)
    assert metrics["Mean accuracy"] == f"{stored.accuracy:.4f}"
    assert float(metrics["Mean accuracy"]) >= target - 5e-5
    assert metrics["Proven gap"] == f"{stored.gap:.4%}"

    downloads = at.get("download_button")
    assert any(d.label == "Download the schedule (CSV)" for d in downloads)
    baselines = next(d.value for d in at.dataframe if "schedule" in d.value.columns)
    names = set(baselines.schedule)
    assert {"round-robin", "random", "greedy cheapest-first"} <= names
    assert sum(name.startswith("only ") for name in names) == 7


def test_page_lists_every_problem_of_an_uploaded_malformed_csv(store: Store):
    load_reference_profiles(store)
    at = plan_page()
    assert at.radio(key="plan_source").value == "Upload a CSV"
    at.file_uploader(key="workload_upload").set_value(("bad.csv", MALFORMED.encode(), "text/csv"))
    at.run()
    assert not at.exception, at.exception
    assert any("The workload has 4 problems" in e.value for e in at.error)
    problems = next(d.value for d in at.dataframe if "where" in d.value.columns)
    assert list(problems["where"]) == ["bad.csv:2", "bad.csv:3", "bad.csv:4", "bad.csv:5"]
    assert list(problems["column"]) == ["input_tokens", "input_tokens", "", "output_tokens"]
    assert button(at, "Plan").disabled
    assert list_plans(store).empty
