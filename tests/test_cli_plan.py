"""``python -m engine plan`` (in-process, as tests/test_cli.py does): JSON and schedule CSVs, bad
input and flags, infeasible targets, --out, learned output lengths. The Plan page is
tests/test_pages_plan.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from engine.cli import main
from engine.fitting import published_catalog_rows
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
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "-2"], "--batch-sizes"),
    (["--batch-sizes", "1,2.5"], "--batch-sizes"),
    (["--batch-sizes", "4,abc"], "--batch-sizes"),
    (["--batch-sizes", "1,,4"], "--batch-sizes"),
    (["--batch-sizes", "257"], "--batch-sizes"),               # above the backends' maximum, 256
])
def test_bad_flags_exit_2_and_store_nothing(reference_db: Path, capsys, flags: list[str], where: str):
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), *flags)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith(where) for line in lines if not line.startswith("warning:")), lines
    assert "Traceback" not in captured.err
    assert stored_counts(reference_db)[0] == 0


def test_each_bad_batch_size_gets_its_own_line(reference_db: Path, capsys):
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--batch-sizes", "0,-3,2.5,300,4")
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2
    assert lines == [
        "--batch-sizes: 0 is not allowed: a batch holds at least one request; expected a whole number of requests "
        "from 1 to 256",
        "--batch-sizes: -3 is not allowed: a batch holds at least one request; expected a whole number of requests "
        "from 1 to 256",
        "--batch-sizes: '2.5' is not a whole number of requests; expected a whole number of requests from 1 to 256",
        "--batch-sizes: 300 is more than the 256 requests one batch may hold here; expected a whole number of "
        "requests from 1 to 256"]
    assert stored_counts(reference_db) == (0, 0)


def test_published_profiles_plan_at_batch_one_and_say_so(reference_db: Path, tmp_path: Path, capfd):
    out = tmp_path / "schedule.csv"
    code = plan(reference_db, "--workload", str(SAMPLE_TOKENS), "--accuracy-target", "0.6", "--batch-sizes",
                "1,8,32", "--json", "--out", str(out))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    # Every batch holds one query: the energy is the assignment's, and the gap is as before batching.
    assert document["batch_sizes"] == {f"{row['name']}@a100-swing": [1] for row in published_catalog_rows()}
    assert document["assignment_energy_j"] == pytest.approx(document["energy_j"])
    assert document["formation_overhead_j"] == pytest.approx(0.0, abs=1e-6)
    assert document["n_batches"] == 200 and document["batching_saving"] is None
    assert document["gap"] == pytest.approx((document["energy_j"] - document["lower_bound_j"]) / document["energy_j"])
    assert "warning: The published profiles (" in captured.err and "are of single requests" in captured.err
    schedule = pd.read_csv(out, dtype={"id": str})
    assert list(schedule.columns[9:11]) == ["batch_id", "batch_size"]
    assert sorted(schedule.batch_id) == list(range(1, 201)) and (schedule.batch_size == 1).all()


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


def store_executed_lengths(db: Path, lengths: dict[str, list[int]]) -> None:
    """Execution results of prompts whose answers had these output lengths, per category."""
    from engine.store import append_frame

    rows = [{"execution_id": 1, "query_id": f"{category}-{i}", "model": "llama-2-7b", "device": "a100-swing",
             "input_tokens": 20, "output_tokens": length, "prompt_kind": "text", "category": category,
             "stopped": "end of answer"}
            for category, values in lengths.items() for i, length in enumerate(values)]
    with Store(db).transaction() as con:
        append_frame(con, "execution_results", pd.DataFrame(rows))


def test_learned_output_lengths_fill_queries_without_one(reference_db: Path, tmp_path: Path, capfd):
    store_executed_lengths(reference_db, {"chat": [30, 40, 50], "code": [200, 220, 240]})
    workload = tmp_path / "w.csv"
    workload.write_text("id,input_tokens,output_tokens,category\na,100,7,chat\nb,100,,chat\nc,100,,code\n"
                        "d,100,,poetry\n", encoding="utf-8")
    out = tmp_path / "schedule.csv"
    code = plan(reference_db, "--workload", str(workload), "--learned-output-lengths", "--out", str(out), "--no-save")
    captured = capfd.readouterr()
    assert code == 0, captured.err
    lengths = pd.read_csv(out, dtype={"id": str}).set_index("id").output_tokens.to_dict()
    # Given stays; chat and code get their medians; poetry (none learned) the median of all six answers.
    assert lengths == {"a": 7, "b": 40, "c": 220, "d": 125}
    assert "warning: 3 queries planned with output lengths learned from executed prompts" in captured.err

    code = plan(reference_db, "--workload", str(workload), "--out", str(tmp_path / "default.csv"), "--no-save",
                "--default-output-tokens", "64")
    assert code == 0
    assert pd.read_csv(tmp_path / "default.csv", dtype={"id": str}).set_index("id").output_tokens.to_dict() == \
        {"a": 7, "b": 64, "c": 64, "d": 64}


def test_learned_output_lengths_with_nothing_learned_says_so(reference_db: Path, tmp_path: Path, capfd):
    workload = tmp_path / "w.csv"
    workload.write_text("id,input_tokens\na,100\n", encoding="utf-8")
    assert plan(reference_db, "--workload", str(workload), "--learned-output-lengths", "--no-save",
                "--default-output-tokens", "64") == 0
    assert "no output lengths have been learned yet" in capfd.readouterr().err


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

