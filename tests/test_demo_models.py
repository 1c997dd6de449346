"""Demo model generation: deterministic, idempotent, self-repairing, honest counts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.backends.gguf_check import inspect_gguf
from engine.demo_models import (
    ACCURACY_SOURCE,
    CORPUS_PATH,
    DEFAULT_MODELS_DIR,
    LARGE_FILE,
    MANIFEST_NAME,
    SMALL_DIR,
    DemoSpec,
    LlamaDims,
    ensure_demo_models,
    main,
    train_tokenizer,
)

# Small enough to build in well under a second (after the torch import).
TINY = DemoSpec(
    vocab_size=300,
    small=LlamaDims(hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=32,
                    context_length=64),
    large=LlamaDims(hidden_size=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64,
                    context_length=128),
)


def file_digests(models_dir: Path) -> dict[str, str]:
    """sha256 of every model file (the lock file and manifest excluded)."""
    return {
        str(p.relative_to(models_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(models_dir.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, ".demo_models.lock")
    }


@pytest.fixture(scope="session")
def real_models():
    """The real demo models (the Makefile also builds them before the tests)."""
    return ensure_demo_models(DEFAULT_MODELS_DIR)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    models_dir = tmp_path_factory.mktemp("tiny-a")
    ensure_demo_models(models_dir, spec=TINY)
    return models_dir


@pytest.fixture()
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny models that a test may damage."""
    copy = tmp_path / "models"
    shutil.copytree(tiny_dir, copy)
    return copy


def test_same_seed_gives_byte_identical_files(tiny_dir, tmp_path):
    other = tmp_path / "tiny-b"
    ensure_demo_models(other, spec=TINY)
    first, second = file_digests(tiny_dir), file_digests(other)
    assert f"{SMALL_DIR}/model.safetensors" in first and LARGE_FILE in first
    assert first == second


def test_other_seed_gives_other_weights(tiny_dir, tmp_path):
    other = tmp_path / "tiny-seed"
    ensure_demo_models(other, spec=dataclasses.replace(TINY, seed=TINY.seed + 1))
    first, second = file_digests(tiny_dir), file_digests(other)
    assert first[LARGE_FILE] != second[LARGE_FILE]
    assert first[f"{SMALL_DIR}/model.safetensors"] != second[f"{SMALL_DIR}/model.safetensors"]
    # The tokenizer does not depend on the seed.
    assert first[f"{SMALL_DIR}/tokenizer.json"] == second[f"{SMALL_DIR}/tokenizer.json"]


def test_tokenizer_training_is_deterministic_across_processes():
    here = hashlib.sha256(train_tokenizer(CORPUS_PATH, 2048).to_str().encode()).hexdigest()
    code = (
        "import hashlib; from engine.demo_models import train_tokenizer, CORPUS_PATH; "
        "print(hashlib.sha256(train_tokenizer(CORPUS_PATH, 2048).to_str().encode()).hexdigest())"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    assert here == there


def test_tokenizer_has_the_asked_vocab_and_special_tokens():
    tokenizer = train_tokenizer(CORPUS_PATH, 2048)
    assert tokenizer.get_vocab_size() == 2048
    assert [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]
    text = "Energy per token, measured: 42 J!\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: lossless


def test_second_call_rewrites_nothing(tiny_copy):
    before = {p: p.stat().st_mtime_ns for p in tiny_copy.rglob("*") if p.is_file()}
    digests = file_digests(tiny_copy)
    lines: list[str] = []
    ensure_demo_models(tiny_copy, lines.append, spec=TINY)
    after = {p: p.stat().st_mtime_ns for p in tiny_copy.rglob("*") if p.is_file()}
    assert after == before
    assert file_digests(tiny_copy) == digests
    assert lines == ["demo-small: up to date", "demo-large: up to date"]


def test_missing_file_is_regenerated_identically(tiny_copy):
    digests = file_digests(tiny_copy)
    (tiny_copy / LARGE_FILE).unlink()
    (tiny_copy / SMALL_DIR / "model.safetensors").unlink()
    lines: list[str] = []
    ensure_demo_models(tiny_copy, lines.append, spec=TINY)
    assert file_digests(tiny_copy) == digests
    assert "demo-large: done" in lines and "demo-small: done" in lines


def test_truncated_file_is_regenerated_and_the_other_model_kept(tiny_copy):
    digests = file_digests(tiny_copy)
    gguf = tiny_copy / LARGE_FILE
    gguf.write_bytes(gguf.read_bytes()[:1000])  # as if a copy was interrupted
    small_mtime = (tiny_copy / SMALL_DIR / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    ensure_demo_models(tiny_copy, lines.append, spec=TINY)
    assert file_digests(tiny_copy) == digests
    assert "demo-small: up to date" in lines
    assert (tiny_copy / SMALL_DIR / "model.safetensors").stat().st_mtime_ns == small_mtime


def test_spec_change_rebuilds_only_the_changed_model(tiny_copy):
    bigger = dataclasses.replace(TINY, large=dataclasses.replace(TINY.large, n_layers=3))
    lines: list[str] = []
    models = ensure_demo_models(tiny_copy, lines.append, spec=bigger)
    assert "demo-small: up to date" in lines and "demo-large: done" in lines
    assert inspect_gguf(models[1].path).block_count == 3
    manifest = json.loads((tiny_copy / MANIFEST_NAME).read_text())
    assert manifest["models"]["demo-large"]["fingerprint"]["dims"]["n_layers"] == 3


def test_leftover_temp_file_is_not_taken_for_a_model(tiny_copy):
    (tiny_copy / LARGE_FILE).rename(tiny_copy / f".{LARGE_FILE}.tmp-99999")
    models = ensure_demo_models(tiny_copy, spec=TINY)
    assert inspect_gguf(models[1].path).n_params > 0


def test_tiny_params_match_the_spec(tiny_dir):
    small, large = ensure_demo_models(tiny_dir, spec=TINY)
    vocab = 300
    s = TINY.small
    small_expected = 2 * vocab * s.hidden_size + s.hidden_size + s.n_layers * (
        2 * s.hidden_size * s.hidden_size  # q, o
        + 2 * s.hidden_size * s.n_kv_heads * s.head_dim  # k, v
        + 3 * s.hidden_size * s.intermediate_size  # gate, up, down
        + 2 * s.hidden_size  # norms
    )
    assert round(small.params_b * 1e9) == small_expected
    assert large.params_b * 1e9 == inspect_gguf(large.path).n_params


def test_real_params_counted_from_the_weights(real_models):
    import gguf
    from transformers import AutoModelForCausalLM

    small, large = real_models
    model = AutoModelForCausalLM.from_pretrained(small.path, local_files_only=True)
    assert round(small.params_b * 1e9) == sum(p.numel() for p in model.parameters())
    reader = gguf.GGUFReader(large.path)
    assert round(large.params_b * 1e9) == sum(int(t.n_elements) for t in reader.tensors)
    assert large.params_b > 20 * small.params_b  # two clearly different sizes


def test_real_models_describe_themselves(real_models):
    small, large = real_models
    assert (small.name, small.backend) == ("demo-small", "transformers")
    assert (large.name, large.backend) == ("demo-large", "llama.cpp")
    assert (small.path / "config.json").is_file() and large.path.suffix == ".gguf"
    assert small.accuracy < large.accuracy
    assert all(m.accuracy_source == ACCURACY_SOURCE for m in real_models)
    assert "not a benchmark result" in ACCURACY_SOURCE
    info = inspect_gguf(large.path)
    assert (info.architecture, info.context_length, info.file_type_name) == ("llama", 4096, "MOSTLY_F16")


def test_cli_prints_one_line_per_model(real_models, capsys):
    assert main(["--models-dir", str(DEFAULT_MODELS_DIR), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["demo-small", "demo-large"]
