"""Workloads: reading and checking the CSV, planning token counts, storing and loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.catalog import CatalogEntry
from engine.errors import InputError, ModelLoadError
from engine.paths import DATA_DIR
from engine.planning import workload as wl
from engine.store import Store

SAMPLE_50 = DATA_DIR / "workloads" / "sample_50.csv"
SAMPLE_TOKENS_200 = DATA_DIR / "workloads" / "sample_tokens_200.csv"


def parse(text: str, **kwargs) -> wl.Workload:
    return wl.parse_workload(text, "w.csv", **kwargs)


def problems_of(exc: pytest.ExceptionInfo) -> list[tuple[str, str | None, str]]:
    return [(p.where, p.column, p.message) for p in exc.value.problems]


def entry(name: str, backend: str = "transformers", path: str | None = "somewhere") -> CatalogEntry:
    return CatalogEntry(name=name, backend=backend, accuracy=0.5, accuracy_source="test", path=path)


# -- header variants ----------------------------------------------------------------------

def test_prompt_only_gets_ids_by_row_position():
    workload = parse("prompt\nHello there\n\nWhat is two plus two?\n")
    queries = workload.queries
    assert list(queries.columns) == list(wl.QUERY_COLUMNS)
    assert queries.query_id.tolist() == ["1", "2"]  # the blank line is not a query
    assert queries.prompt.tolist() == ["Hello there", "What is two plus two?"]
    assert queries.input_tokens.isna().all() and queries.output_tokens.isna().all()
    assert np.isnan(queries.min_accuracy).all() and queries.category.tolist() == [None, None]
    assert workload.name == "w" and workload.source_file == "w.csv" and workload.warnings == []


def test_tokens_only_have_nullable_integer_columns():
    workload = parse("input_tokens,max_output_tokens\n12.0,64\n256,\n")
    queries = workload.queries
    assert queries.input_tokens.tolist() == [12, 256]
    assert str(queries.input_tokens.dtype) == "Int64" and str(queries.max_output_tokens.dtype) == "Int64"
    assert queries.max_output_tokens.isna().tolist() == [False, True]
    assert queries.prompt.tolist() == [None, None]
    assert queries.min_accuracy.dtype == np.float64


def test_given_token_counts_are_kept_even_with_a_prompt():
    workload = parse("id,prompt,input_tokens,output_tokens\na,Some prompt,77,9\n")
    row = workload.queries.iloc[0]
    assert (row.query_id, row.prompt, row.input_tokens, row.output_tokens) == ("a", "Some prompt", 77, 9)


def test_bom_and_upper_case_header_are_read():
    text = "\ufeffID,Prompt,Output_Tokens,Category\nq1,Hi,8,qa\n"
    workload = wl.read_workload_upload(text.encode("utf-8"), "up.csv")
    assert workload.queries.query_id.tolist() == ["q1"]
    assert workload.queries.category.tolist() == ["qa"]
    assert workload.name == "up" and workload.source_file == "up.csv"
    assert parse(text).queries.query_id.tolist() == ["q1"]  # a BOM left in the text is fine too


def test_extra_columns_are_ignored_with_a_warning():
    workload = parse("prompt,notes,owner\nHi,remember this,me\n")
    assert list(workload.queries.columns) == list(wl.QUERY_COLUMNS)
    assert len(workload.warnings) == 1
    assert "'notes'" in workload.warnings[0] and "'owner'" in workload.warnings[0]


def test_header_without_prompt_or_input_tokens_is_refused_on_line_1():
    with pytest.raises(InputError) as exc:
        parse("id,output_tokens\n1,8\n")
    assert problems_of(exc) == [("w.csv:1", None, "has neither a prompt nor an input_tokens column")]


@pytest.mark.parametrize("text", ["", "\n\n", "prompt,output_tokens\n", "prompt,output_tokens\n,\n\n"])
def test_empty_workload_has_no_queries(text: str):
    with pytest.raises(InputError) as exc:
        parse(text)
    assert problems_of(exc) == [("w.csv", None, "has no queries")]


# -- bad rows -----------------------------------------------------------------------------

BAD = (
    "id,prompt,input_tokens,output_tokens,max_output_tokens,min_accuracy\n"
    "a,fine,,8,,\n"         # 2: good
    "b,,nan,,,\n"           # 3: NaN tokens
    "c,x,-3,,,\n"           # 4: negative
    "d,x,,12.5,,\n"         # 5: fractional
    "e,,,8,,\n"             # 6: neither prompt nor tokens
    "f,x,,,,1.5\n"          # 7: accuracy outside [0, 1]
    "a,x,,inf,,\n"          # 8: duplicate id, and infinite
    ",x,,abc,,\n"           # 9: missing id, not a number
    "g,x,,80,64,\n"         # 10: more than the maximum
    "h,ok,5,,,50%\n"        # 11: good
)


def test_every_bad_row_is_reported_at_once_with_its_line():
    with pytest.raises(InputError) as exc:
        parse(BAD)
    found = {(where, column) for where, column, _ in problems_of(exc)}
    assert found == {
        ("w.csv:3", "input_tokens"), ("w.csv:4", "input_tokens"), ("w.csv:5", "output_tokens"),
        ("w.csv:6", None), ("w.csv:7", "min_accuracy"), ("w.csv:8", "id"), ("w.csv:8", "output_tokens"),
        ("w.csv:9", "id"), ("w.csv:9", "output_tokens"), ("w.csv:10", "output_tokens"),
    }
    messages = dict(((w, c), m) for w, c, m in problems_of(exc))
    assert "also used on line 2" in messages[("w.csv:8", "id")]  # names both lines
    assert "not a whole number" in messages[("w.csv:5", "output_tokens")]
    assert "less than 1" in messages[("w.csv:4", "input_tokens")]
    assert "not a finite number" in messages[("w.csv:3", "input_tokens")]
    assert all(p.expected for p in exc.value.problems)


def test_drop_bad_rows_keeps_the_good_ones_and_lists_the_dropped():
    workload = parse(BAD, drop_bad_rows=True)
    assert workload.queries.query_id.tolist() == ["a", "h"]
    assert workload.queries.min_accuracy.tolist() == [pytest.approx(math.nan, nan_ok=True), 0.5]
    assert {p.where for p in workload.dropped} == {f"w.csv:{n}" for n in range(3, 11)}
    assert any("dropped 8 of 10 rows" in w and "2 queries remain" in w for w in workload.warnings)


def test_dropped_rows_keep_the_position_ids_of_the_rest():
    workload = parse("prompt,output_tokens\nfirst,8\nsecond,-1\nthird,8\n", drop_bad_rows=True)
    assert workload.queries.query_id.tolist() == ["1", "3"]
    assert [p.where for p in workload.dropped] == ["w.csv:3"]


def test_drop_bad_rows_with_nothing_left_is_an_error():
    with pytest.raises(InputError) as exc:
        parse("prompt,input_tokens\n,0\n,x\n", drop_bad_rows=True)
    wheres = [p.where for p in exc.value.problems]
    assert wheres[0] == "w.csv" and "no usable queries" in exc.value.problems[0].message
    assert set(wheres[1:]) == {"w.csv:2", "w.csv:3"}


@pytest.mark.parametrize("given, expected", [("64.5%", 0.645), ("0.5", 0.5), ("100%", 1.0), ("0", 0.0)])
def test_min_accuracy_as_fraction_or_percentage(given: str, expected: float):
    workload = parse(f"prompt,min_accuracy\nHi,{given}\n")
    assert workload.queries.min_accuracy.iloc[0] == pytest.approx(expected)


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "big.csv"
    path.write_text("prompt\n" + "a fairly long prompt\n" * 20)
    monkeypatch.setattr(wl, "WORKLOAD_MAX_BYTES", 100)

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    monkeypatch.setattr(Path, "read_text", no_reading)
    monkeypatch.setattr(Path, "open", no_reading)
    with pytest.raises(InputError) as exc:
        wl.read_workload(path)
    assert "larger than the 100 allowed" in exc.value.problems[0].message
    with pytest.raises(InputError, match="larger than the 100 allowed"):
        wl.read_workload_upload(b"prompt\n" + b"x\n" * 100, "big.csv")


def test_read_workload_from_disk_names_the_file(tmp_path: Path):
    path = tmp_path / "june.csv"
    path.write_text("prompt,output_tokens\nHi,8\nBye,x\n")
    with pytest.raises(InputError) as exc:
        wl.read_workload(path)
    assert [p.where for p in exc.value.problems] == [f"{path}:3"]
    path.write_text("prompt,output_tokens\nHi,8\n")
    workload = wl.read_workload(path)
    assert workload.name == "june" and workload.source_file == str(path) and workload.n_queries == 1
    with pytest.raises(InputError, match="file not found"):
        wl.read_workload(tmp_path / "missing.csv")


def test_non_utf8_is_refused(tmp_path: Path):
    data = "prompt\ncafé\n".encode("latin-1")
    with pytest.raises(InputError, match="not UTF-8"):
        wl.read_workload_upload(data, "latin.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes(data)
    with pytest.raises(InputError, match="not UTF-8"):
        wl.read_workload(path)


def test_a_row_with_too_many_fields_is_reported():
    with pytest.raises(InputError) as exc:
        parse("prompt,output_tokens\nHello, world,8\n")
    assert [p.where for p in exc.value.problems] == ["w.csv:2"]


# -- frames -------------------------------------------------------------------------------

def test_workload_from_frame_checks_like_a_file():
    frame = pd.DataFrame({"query_id": ["x", "y", "z"], "input_tokens": [10, np.nan, 3.5],
                          "prompt": [None, "hello", "hi"], "output_tokens": pd.array([4, None, 2], dtype="Int64")})
    with pytest.raises(InputError) as exc:
        wl.workload_from_frame(frame, "bench")
    assert [(p.where, p.column) for p in exc.value.problems] == [("bench:4", "input_tokens")]
    workload = wl.workload_from_frame(frame, "bench", drop_bad_rows=True)
    assert workload.queries.query_id.tolist() == ["x", "y"]
    assert workload.queries.input_tokens.tolist()[0] == 10 and workload.queries.prompt.tolist() == [None, "hello"]
    # a workload's own queries frame goes back through unchanged
    again = wl.workload_from_frame(workload.queries, "again")
    pd.testing.assert_frame_equal(again.queries, workload.queries)


# -- planning token counts ----------------------------------------------------------------

def word_counter_factory(calls: list):
    """A fake tokenizer per model: words × 1 for 'small', × 2 for 'large', none for external models."""
    def factory(model: CatalogEntry):
        if model.backend == "external":
            return None
        scale = 2 if model.name == "large" else 1

        def count(prompts: list[str]) -> np.ndarray:
            calls.append((model.name, list(prompts)))
            return np.array([len(p.split()) * scale for p in prompts])
        return count
    return factory


def test_planning_tokens_counts_prompts_per_model():
    workload = parse("id,prompt,input_tokens,output_tokens,max_output_tokens\n"
                     "a,one two three,,8,\nb,four five,,,16\nc,,40,4,\nd,one two three,,2,\n")
    calls: list = []
    tokens = wl.planning_tokens(workload, [entry("small"), entry("large")],
                                tokenizer_factory=word_counter_factory(calls))
    assert tokens.input_tokens["small"].tolist() == [3, 2, 40, 3]
    assert tokens.input_tokens["large"].tolist() == [6, 4, 40, 6]
    assert tokens.input_tokens["small"].dtype == np.int64
    assert tokens.output_tokens.tolist() == [8, 16, 4, 2] and tokens.output_tokens.dtype == np.int64
    assert tokens.output_source.tolist() == ["output_tokens", "max_output_tokens", "output_tokens", "output_tokens"]
    assert tokens.input_source == {"small": "given for 1 query, tokenizer for 3",
                                   "large": "given for 1 query, tokenizer for 3"}
    # each distinct prompt is counted once per model
    assert calls == [("small", ["one two three", "four five"]), ("large", ["one two three", "four five"])]
    assert any("max_output_tokens" in w for w in tokens.warnings)


def test_given_input_tokens_need_no_tokenizer():
    workload = parse("input_tokens,output_tokens\n5,6\n7,8\n")

    def factory(model):
        raise AssertionError("no tokenizer is needed")

    tokens = wl.planning_tokens(workload, [entry("m")], tokenizer_factory=factory)
    assert tokens.input_tokens["m"].tolist() == [5, 7] and tokens.input_source == {"m": "given"}
    assert tokens.warnings == []


def test_external_models_get_an_estimate_and_a_warning():
    workload = parse("prompt,output_tokens\nabcdefghi,4\nab,4\n")
    tokens = wl.planning_tokens(workload, [entry("ext", backend="external", path=None),
                                           entry("hubbed", path="hub:owner/name")])
    assert tokens.input_tokens["ext"].tolist() == [3, 1]  # ⌈9/4⌉, and at least 1
    assert tokens.input_tokens["hubbed"].tolist() == [3, 1]
    assert tokens.input_source["ext"] == wl.INPUT_SOURCE_ESTIMATE
    assert sum("estimated" in w for w in tokens.warnings) == 2
    with pytest.raises(ModelLoadError, match="no local tokenizer"):
        wl.count_prompt_tokens(entry("ext", backend="external", path=None), ["hi"])


def test_default_output_length_is_used_with_a_warning():
    workload = parse("input_tokens,output_tokens\n5,\n6,9\n7,\n")
    tokens = wl.planning_tokens(workload, [entry("m")], default_output_tokens=128)
    assert tokens.output_tokens.tolist() == [128, 9, 128]
    assert tokens.output_source.tolist() == ["default", "output_tokens", "default"]
    assert "2 queries have no output length; planned with the default of 128 tokens" in tokens.warnings


def test_missing_output_length_without_a_default_is_an_error():
    workload = parse("input_tokens,output_tokens\n5,\n6,9\n7,\n")
    with pytest.raises(InputError) as exc:
        wl.planning_tokens(workload, [entry("m")])
    (problem,) = exc.value.problems
    assert "2 of 3 queries have no output length" in problem.message
    assert problem.expected == "output_tokens or max_output_tokens, or a default output length"
    with pytest.raises(InputError, match="not allowed"):
        wl.planning_tokens(workload, [entry("m")], default_output_tokens=0)


def demo_entry(demo) -> CatalogEntry:
    return CatalogEntry(name=demo.name, backend=demo.backend, accuracy=demo.accuracy,
                        accuracy_source=demo.accuracy_source, path=str(demo.path))


# Counting with each demo model's own tokenizer, and its errors: tests/test_backends_tokens.py


def test_planning_with_the_demo_models_gives_each_its_own_counts(demo_models):
    workload = wl.read_workload(SAMPLE_50)
    models = [demo_entry(demo_models["transformers"]), demo_entry(demo_models["llama.cpp"])]
    tokens = wl.planning_tokens(workload, models)
    for model in models:
        counted = workload.queries.input_tokens.isna().to_numpy()
        assert (tokens.input_tokens[model.name] > 0).all()
        assert tokens.input_tokens[model.name][~counted].tolist() == workload.queries.input_tokens.dropna().tolist()
        assert "tokenizer for" in tokens.input_source[model.name]


# -- storing ------------------------------------------------------------------------------

def test_store_and_load_round_trip(store: Store):
    workload = parse("id,prompt,input_tokens,output_tokens,max_output_tokens,min_accuracy,category\n"
                     "z9,,12,,32,,\nb,Hello there,,8,,55%,qa\na10,Bye,3,4,4,0.25,code\n")
    workload_id = wl.store_workload(store, workload)
    loaded = wl.load_workload(store, workload_id)
    assert loaded.workload_id == workload_id and loaded.name == "w" and loaded.source_file == "w.csv"
    pd.testing.assert_frame_equal(loaded.queries, workload.queries)  # order, None prompts, NaN accuracy
    assert loaded.queries.prompt.iloc[0] is None and math.isnan(loaded.queries.min_accuracy.iloc[0])

    second = wl.store_workload(store, workload, name="again")
    listed = wl.list_workloads(store)
    assert listed.id.tolist() == [second, workload_id]
    assert listed.name.tolist() == ["again", "w"] and listed.n_queries.tolist() == [3, 3]
    assert list(listed.columns) == ["id", "name", "source_file", "n_queries", "created_at"]
    with pytest.raises(InputError, match="no workload with id"):
        wl.load_workload(store, 999)


def test_store_workload_is_all_or_nothing(store: Store):
    import duckdb

    workload = parse("prompt,input_tokens\na,\nb,4\n")
    workload.queries.loc[1, "input_tokens"] = 3_000_000_000  # hand-made: too large for the INTEGER column
    with pytest.raises(duckdb.Error):
        wl.store_workload(store, workload)  # fails after the workloads row was written
    workload.queries.loc[1, "query_id"] = "1"
    with pytest.raises(InputError, match="more than once"):
        wl.store_workload(store, workload)
    assert wl.list_workloads(store).empty
    assert store.query_one("SELECT count(*) FROM workload_queries")[0] == 0


# -- the sample workloads -----------------------------------------------------------------

def test_sample_50_parses_cleanly():
    workload = wl.read_workload(SAMPLE_50)
    queries = workload.queries
    assert workload.n_queries == 50 and workload.warnings == [] and workload.dropped == []
    assert queries.query_id.is_unique
    assert queries.prompt.notna().sum() >= 20 and queries.input_tokens.notna().sum() >= 10
    assert (queries.input_tokens.dropna() <= 256).all()
    assert (queries.output_tokens.fillna(queries.max_output_tokens) <= 64).all()
    assert queries.min_accuracy.notna().any() and set(queries.category.dropna()) == {"qa", "summarise", "code"}
    tokens = wl.planning_tokens(workload, [entry("m", backend="external", path=None)])
    assert (tokens.output_source != "default").all()


def test_sample_tokens_200_parses_cleanly():
    workload = wl.read_workload(SAMPLE_TOKENS_200)
    assert workload.n_queries == 200 and workload.warnings == []
    assert workload.queries.prompt.isna().all()
    assert (workload.queries.input_tokens <= 256).all() and (workload.queries.output_tokens <= 64).all()
