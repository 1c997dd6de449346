"""The model catalog: add, edit, remove, import, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from engine import catalog
from engine.errors import InputError
from engine.store import Store


def snapshot(store: Store) -> pd.DataFrame:
    return catalog.list_models(store).drop(columns=["created_at", "updated_at"])


def make_hf_dir(root: Path, *, config: dict | None = None, weights: bool = True) -> Path:
    """A directory shaped like a saved Hugging Face model (no real weights needed to validate)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    if weights:
        header = json.dumps({"w": {"dtype": "F32", "shape": [10, 20], "data_offsets": [0, 800]}}).encode()
        (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(800))
    (root / "tokenizer.json").write_text("{}")
    return root


def test_add_list_edit_remove(store: Store, tmp_path: Path):
    model_dir = make_hf_dir(tmp_path / "my-model")
    entry, warnings = catalog.add_model(store, name="my-model", accuracy="64.5%", accuracy_source="leaderboard",
                                        path=str(model_dir))
    assert warnings == []
    assert entry.backend == "transformers" and entry.accuracy == pytest.approx(0.645)
    assert entry.params_b == pytest.approx(200 / 1e9)  # counted from the safetensors header
    assert entry.trust_remote_code is False
    listed = catalog.list_models(store)
    assert listed.name.tolist() == ["my-model"]

    catalog.set_accuracy(store, "my-model", "0.7", "my own eval, 2026-11")
    changed = catalog.get_model(store, "my-model")
    assert changed.accuracy == 0.7 and changed.accuracy_source == "my own eval, 2026-11"
    catalog.update_model(store, "my-model", notes="quantised", params_b="7")
    assert catalog.get_model(store, "my-model").params_b == 7.0
    assert catalog.get_model(store, "my-model").notes == "quantised"

    assert catalog.remove_model(store, "my-model") == 0
    assert catalog.get_model(store, "my-model") is None


def test_external_model_needs_no_path(store: Store):
    entry, _ = catalog.add_model(store, name="Llama-2 70B", accuracy=0.6452, accuracy_source="Open LLM Leaderboard")
    assert entry.backend == "external" and entry.path is None


def test_hub_id_is_accepted_with_a_warning(store: Store):
    entry, warnings = catalog.add_model(store, name="hub-model", accuracy=0.5, path="hub:meta-llama/Llama-2-7b-hf")
    assert entry.backend == "transformers" and entry.path == "hub:meta-llama/Llama-2-7b-hf"
    assert any("network" in w for w in warnings)


def test_remove_keeps_measurements(store: Store):
    catalog.add_model(store, name="m", accuracy=0.5)
    store.append("measurements", pd.DataFrame({"origin": ["imported"], "model": ["m"], "device": ["cpu"],
                                               "input_tokens": [8], "output_tokens": [8], "runtime_s": [0.1]}))
    assert catalog.remove_model(store, "m") == 1
    assert store.query_one("SELECT count(*) FROM measurements WHERE model = 'm'") == (1,)


@pytest.mark.parametrize("value, fragment", [
    ("1.7", "outside [0, 1]"),
    ("64.5", "did you mean 0.645 or 64.5%"),
    ("-0.1", "outside [0, 1]"),
    ("120%", "outside [0, 1]"),
    ("abc", "is not a number"),
    ("nan", "not a finite number"),
    ("", "is missing"),
])
def test_bad_accuracy_is_refused(store: Store, value: str, fragment: str):
    with pytest.raises(InputError) as caught:
        catalog.add_model(store, name="m", accuracy=value)
    assert fragment in str(caught.value)
    assert catalog.list_models(store).empty


@pytest.mark.parametrize("name", ["", "   ", "a@b", "-leading-dash", "x" * 101])
def test_bad_names_are_refused(store: Store, name: str):
    with pytest.raises(InputError, match="model name"):
        catalog.add_model(store, name=name, accuracy=0.5)
    assert catalog.list_models(store).empty


def test_duplicate_name_is_refused_and_changes_nothing(store: Store):
    catalog.add_model(store, name="m", accuracy=0.5, accuracy_source="first")
    before = snapshot(store)
    with pytest.raises(InputError, match="already in the catalog"):
        catalog.add_model(store, name="m", accuracy=0.9, accuracy_source="second")
    pd.testing.assert_frame_equal(snapshot(store), before)


def test_bad_paths_are_refused(store: Store, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    make_hf_dir(tmp_path / "no-config", config={})
    make_hf_dir(tmp_path / "no-weights", weights=False)
    (tmp_path / "empty-dir").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "notes.txt"): "is not a model",
        str(tmp_path / "empty-dir"): "no config.json",
        str(tmp_path / "no-config"): "names no model_type",
        str(tmp_path / "no-weights"): "no weight files",
    }
    for path, fragment in cases.items():
        with pytest.raises(InputError) as caught:
            catalog.add_model(store, name="m", accuracy=0.5, path=path)
        assert fragment in str(caught.value), path
    with pytest.raises(InputError, match="needs a path"):
        catalog.add_model(store, name="m", accuracy=0.5, backend="llama.cpp")
    with pytest.raises(InputError, match="is a directory, not a .gguf"):
        catalog.add_model(store, name="m", accuracy=0.5, backend="llama.cpp", path=str(tmp_path / "empty-dir"))
    with pytest.raises(InputError, match="is not a hub id"):
        catalog.add_model(store, name="m", accuracy=0.5, path="hub:not a hub id")
    assert catalog.list_models(store).empty


def test_gguf_files_are_checked(store: Store, tmp_path: Path, demo_models):
    gguf = demo_models["llama.cpp"].path
    entry, _ = catalog.add_model(store, name="good-gguf", accuracy=0.5, path=str(gguf))
    assert entry.backend == "llama.cpp" and entry.params_b == pytest.approx(demo_models["llama.cpp"].params_b, rel=1e-6)

    truncated = tmp_path / "truncated.gguf"
    with open(gguf, "rb") as source:
        truncated.write_bytes(source.read(gguf.stat().st_size // 2))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_text("this is not a gguf file\n" * 100)
    for path in (truncated, not_gguf):
        with pytest.raises(InputError) as caught:
            catalog.add_model(store, name="bad-gguf", accuracy=0.5, path=str(path))
        assert str(path) in str(caught.value)
    assert catalog.list_models(store).name.tolist() == ["good-gguf"]


def test_demo_models_register_once_and_stay_removed(store: Store, demo_models):
    demos = list(demo_models.values())
    assert sorted(catalog.register_demo_models(store, demos)) == sorted(d.name for d in demos)
    assert catalog.register_demo_models(store, demos) == []
    listed = catalog.list_models(store)
    assert listed.is_demo.all() and (listed.accuracy_source.str.contains("illustrative")).all()
    # Demo paths are stored relative to the project, so a moved checkout still finds them.
    assert not any(Path(p).is_absolute() for p in listed.path)
    removed = demos[0].name
    catalog.remove_model(store, removed)
    assert catalog.register_demo_models(store, demos) == []
    assert removed not in catalog.list_models(store).name.tolist()


# -- catalog CSV -----------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "catalog.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_import_catalog_adds_every_row(store: Store, tmp_path: Path):
    path = write(tmp_path, "model,accuracy,params_b,notes,color\nLlama-2 7B,50.97%,6.7,paper,red\nMistral 7B,0.6097,7.2,,blue\n")
    report = catalog.import_catalog(store, path)
    assert report.added == ["Llama-2 7B", "Mistral 7B"]
    assert any("ignored column 'color'" in w for w in report.warnings)
    got = catalog.get_model(store, "Llama-2 7B")
    assert got.accuracy == pytest.approx(0.5097) and got.backend == "external"
    assert got.accuracy_source == "catalog file catalog.csv"


@pytest.mark.parametrize("text, fragments", [
    ("name,accuracy\nm,0.5\n", ["catalog.csv:1", "missing column model"]),
    ("model,notes\nm,x\n", ["missing column accuracy"]),
    ("model,accuracy\nm,1.5\nn,0.4\nm2,abc\n", ["catalog.csv:2: column accuracy", "catalog.csv:4: column accuracy"]),
    ("model,accuracy\nm,0.5\nm,0.6\n", ["catalog.csv:3", "already appears on line 2"]),
    ("model,accuracy,path\nm,0.5,/no/such/model\n", ["catalog.csv:2: column path", "does not exist"]),
    ("model,accuracy,backend\nm,0.5,vllm\n", ["unknown backend 'vllm'"]),
    ("model,accuracy\n", ["has a header but no rows"]),
    ("", ["is empty"]),
    ("model,accuracy,accuracy\nm,0.5,0.5\n", ["more than once"]),
    ("model,accuracy\nm,0.5,extra\n", ["has 3 fields but the header has 2"]),
])
def test_bad_catalog_files_change_nothing(store: Store, tmp_path: Path, text: str, fragments: list[str]):
    catalog.add_model(store, name="existing", accuracy=0.3)
    before = snapshot(store)
    with pytest.raises(InputError) as caught:
        catalog.import_catalog(store, write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(caught.value)
    pd.testing.assert_frame_equal(snapshot(store), before)


def test_catalog_name_clash_with_existing_model_changes_nothing(store: Store, tmp_path: Path):
    catalog.add_model(store, name="existing", accuracy=0.3)
    before = snapshot(store)
    with pytest.raises(InputError, match="catalog.csv:3: column model: a model named 'existing'"):
        catalog.import_catalog(store, write(tmp_path, "model,accuracy\nnew-one,0.5\nexisting,0.6\n"))
    pd.testing.assert_frame_equal(snapshot(store), before)


def test_non_utf8_and_binary_files_are_refused(store: Store, tmp_path: Path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("model,accuracy\ncaf\xe9,0.5\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        catalog.import_catalog(store, latin)
    with pytest.raises(InputError, match="NUL bytes"):
        catalog.import_catalog_bytes(store, b"model,accuracy\n\x00\x01,0.5\n", "upload.csv")
    with pytest.raises(InputError, match="file not found"):
        catalog.import_catalog(store, tmp_path / "nope.csv")
    assert catalog.list_models(store).empty
