"""The CLI: exit codes, one line per problem, JSON on stdout only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from tests.conftest import write_grid_csv

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args, "--db", str(db)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_models_add_list_and_json(isolated_db: Path):
    added = run_cli("models", "add", "Mistral 7B", "--accuracy", "60.97%", "--source", "Open LLM Leaderboard",
                    db=isolated_db)
    assert added.returncode == 0, added.stderr
    listed = run_cli("models", "list", "--json", db=isolated_db)
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)  # stdout holds the JSON document and nothing else
    assert [r["name"] for r in rows] == ["Mistral 7B"]
    assert rows[0]["accuracy"] == pytest.approx(0.6097)
    assert rows[0]["accuracy_source"] == "Open LLM Leaderboard"


def test_bad_input_exits_2_with_one_line_per_problem(isolated_db: Path, tmp_path: Path):
    bad = tmp_path / "catalog.csv"
    bad.write_text("model,accuracy\na,1.5\nb,0.5\nc,oops\n")
    result = run_cli("import-catalog", str(bad), db=isolated_db)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{bad}:2: column accuracy:") and "expected" in lines[0]
    assert lines[1].startswith(f"{bad}:4: column accuracy:")
    assert "Traceback" not in result.stderr
    listed = run_cli("models", "list", "--json", db=isolated_db)
    assert json.loads(listed.stdout) == []


def test_set_accuracy_and_remove_unknown_model(isolated_db: Path, capsys):
    assert main(["models", "add", "m", "--accuracy", "0.5", "--db", str(isolated_db)]) == 0
    assert main(["models", "set-accuracy", "m", "0.61", "--source", "eval", "--db", str(isolated_db)]) == 0
    assert main(["models", "set-accuracy", "m", "2", "--source", "eval", "--db", str(isolated_db)]) == 2
    assert main(["models", "remove", "ghost", "--db", str(isolated_db)]) == 2
    err = capsys.readouterr().err
    assert "no model named 'ghost'" in err
    assert main(["models", "remove", "m", "--db", str(isolated_db)]) == 0


def test_add_with_missing_path_exits_2(isolated_db: Path, tmp_path: Path, capsys):
    code = main(["models", "add", "m", "--accuracy", "0.5", "--path", str(tmp_path / "nothing.gguf"),
                 "--db", str(isolated_db)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_sensors_json_reports_every_source(isolated_db: Path):
    result = run_cli("sensors", "--json", db=isolated_db)
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    sources = {s["source"] for s in statuses}
    # Every kind of source is reported, found or missing (nvml-counter, rapl-package, ... count as their kind).
    assert {source.split("-")[0] for source in sources} >= {"nvml", "rapl", "estimate"}
    assert all(s["status"] in ("measured", "estimated", "missing") for s in statuses)
    assert all(s["detail"] for s in statuses)


def test_status_json(isolated_db: Path):
    result = run_cli("status", "--json", db=isolated_db)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["measurements"] == 0 and document["latest_plan"] is None


def test_fit_predict_and_reference_profiles(isolated_db: Path, tmp_path: Path):
    """Measurements in, fits out in the DESIGN.md JSON shape, predictions with the domain flag."""
    import math

    grid = write_grid_csv(tmp_path / "grid.csv")
    assert run_cli("import-measurements", str(grid), db=isolated_db).returncode == 0
    fitted = run_cli("fit", "--json", db=isolated_db)
    assert fitted.returncode == 0, fitted.stderr
    fits = json.loads(fitted.stdout)
    assert {(f["model"], f["target"]) for f in fits} == {("sim", "energy"), ("sim", "runtime")}
    for f in fits:
        assert {"model", "device", "target", "form", "coefficients", "r2", "cv_mape", "n_points", "domain"} <= set(f)
        assert f["cv_mape"] < 0.05 and f["n_points"] == 12
        assert f["domain"] == {"input_tokens": [8, 512], "output_tokens": [8, 128]}
    points = tmp_path / "points.csv"
    points.write_text("model,device,input_tokens,output_tokens\nsim,gpu0,64,64\nsim,gpu0,4096,64\n")
    predicted = run_cli("predict", "--points", str(points), db=isolated_db)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    header = lines[0].split(",")
    first, second = (dict(zip(header, line.split(","))) for line in lines[1:3])
    expected_runtime = 0.05 + 0.0002 * 64 + 0.02 * 64
    assert math.isclose(float(first["runtime_s"]), expected_runtime, rel_tol=0.05)
    assert first["in_domain"] == "True" and second["in_domain"] == "False"
    missing = tmp_path / "missing.csv"
    missing.write_text("model,device,input_tokens,output_tokens\nghost,cpu,8,8\n")
    refused = run_cli("predict", "--points", str(missing), db=isolated_db)
    assert refused.returncode == 2 and f"{missing}:2" in refused.stderr
    loaded = run_cli("reference-profiles", db=isolated_db)
    assert loaded.returncode == 0 and "added 7 models" in loaded.stdout
    again = run_cli("reference-profiles", db=isolated_db)
    assert again.returncode == 0 and "added 0 models" in again.stdout


def test_predict_out_refuses_its_points_file_and_an_existing_file_unless_overwrite(isolated_db: Path, tmp_path: Path):
    assert run_cli("import-measurements", str(write_grid_csv(tmp_path / "grid.csv")), db=isolated_db).returncode == 0
    assert run_cli("fit", db=isolated_db).returncode == 0
    points = tmp_path / "points.csv"
    points.write_text("model,device,input_tokens,output_tokens\nsim,gpu0,64,64\n")
    for extra in ([], ["--overwrite"]):
        same = run_cli("predict", "--points", str(points), "--out", str(points), *extra, db=isolated_db)
        assert same.returncode == 2 and "is the points file (--points), an input of this command" in same.stderr
    assert points.read_text() == "model,device,input_tokens,output_tokens\nsim,gpu0,64,64\n"
    out = tmp_path / "predictions.csv"
    out.write_text("precious\n")
    kept = run_cli("predict", "--points", str(points), "--out", str(out), db=isolated_db)
    assert kept.returncode == 2 and "already exists" in kept.stderr and out.read_text() == "precious\n"
    replaced = run_cli("predict", "--points", str(points), "--out", str(out), "--overwrite", db=isolated_db)
    assert replaced.returncode == 0, replaced.stderr
    assert out.read_text().startswith("model,device,input_tokens,output_tokens,energy_j")


def test_export_measurements_refuses_a_symlink_and_the_database(isolated_db: Path, tmp_path: Path):
    assert run_cli("import-measurements", str(write_grid_csv(tmp_path / "grid.csv")), db=isolated_db).returncode == 0
    target = tmp_path / "target.csv"
    target.write_text("keep\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    through = run_cli("export-measurements", str(link), "--overwrite", db=isolated_db)
    assert through.returncode == 2 and "is a symbolic link" in through.stderr and "Traceback" not in through.stderr
    assert link.is_symlink() and target.read_text() == "keep\n"
    over_db = run_cli("export-measurements", str(isolated_db), "--overwrite", db=isolated_db)
    assert over_db.returncode == 2 and "is the database" in over_db.stderr
    written = run_cli("export-measurements", str(tmp_path / "all.csv"), db=isolated_db)
    assert written.returncode == 0 and "wrote 36 measurements" in written.stdout


def test_fit_with_nothing_measured_exits_2(isolated_db: Path):
    result = run_cli("fit", db=isolated_db)
    assert result.returncode == 2 and "Traceback" not in result.stderr
