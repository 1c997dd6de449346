"""Workloads: the queries a plan is made for, read from a CSV file, checked, and stored.

A workload CSV has a header row and one row per query (see DESIGN.md):
``[id,] prompt | input_tokens [, output_tokens | max_output_tokens] [, min_accuracy, category]``.
Each row needs a prompt or input_tokens; every bad row is reported at once, by line.

Planning needs two numbers per query and model: the prompt length τin (given, or
counted with that model's own tokenizer, or estimated for a model without local files)
and the answer length τout (given, else the stated maximum, else a default).
:func:`planning_tokens` works them out and says where each came from. Counting is the
backends' own (:mod:`engine.backends.tokens`), so a counted τin is the number of tokens
the backend then feeds the model; the ≈4 characters-per-token estimate stays here, as
it is a planning fallback for models that no local backend runs.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine.backends.tokens import TokenCounter, prompt_counter
from engine.catalog import HUB_PREFIX, CatalogEntry, parse_accuracy, resolve_model_path
from engine.csvio import check_column_count, decode_upload, duplicated_columns, parse_csv_text
from engine.errors import InputError, ModelLoadError, Problem
from engine.store import Store, append_frame

WORKLOAD_MAX_BYTES = 100_000_000
WORKLOAD_COLUMNS = ("id", "prompt", "input_tokens", "output_tokens", "max_output_tokens", "min_accuracy", "category")
QUERY_COLUMNS = ("query_id", "prompt", "input_tokens", "output_tokens", "max_output_tokens", "min_accuracy", "category")
TOKEN_COLUMNS = ("input_tokens", "output_tokens", "max_output_tokens")
MAX_TOKENS_PER_QUERY = 10_000_000  # far beyond any context length; also keeps counts inside INTEGER columns
CHARS_PER_TOKEN_ESTIMATE = 4
INPUT_SOURCE_GIVEN = "given"
INPUT_SOURCE_TOKENIZER = "tokenizer"
INPUT_SOURCE_ESTIMATE = f"estimate (≈{CHARS_PER_TOKEN_ESTIMATE} characters per token)"

_TOKENS_EXPECTED = f"a whole number of tokens from 1 to {MAX_TOKENS_PER_QUERY:,}, or an empty cell"
_HEADER_EXPECTED = ("a header row with prompt or input_tokens (optional: id, output_tokens, max_output_tokens, "
                    "min_accuracy, category)")
_MAX_LINES_LISTED = 10

TokenizerFactory = Callable[[CatalogEntry], "TokenCounter | None"]


@dataclass
class Workload:
    """A checked workload.

    ``queries`` has the columns of :data:`QUERY_COLUMNS`, in that order: ``query_id``
    (str), ``prompt`` (str or None), ``input_tokens``, ``output_tokens`` and
    ``max_output_tokens`` (nullable Int64), ``min_accuracy`` (float, NaN when the query
    sets none) and ``category`` (str or None). ``warnings`` are sentences for the user;
    ``dropped`` are the problems of rows left out (only with ``drop_bad_rows``).
    """

    name: str
    queries: pd.DataFrame
    warnings: list[str]
    dropped: list[Problem]
    source_file: str | None = None
    workload_id: int | None = None

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.queries)


@dataclass
class PlanningTokens:
    """The token counts a plan uses, per query (in the workload's row order).

    ``input_tokens`` maps each model name to its τin per query (int64): prompts are
    counted with that model's own tokenizer, so one query can have a different τin per
    model. ``output_tokens`` is τout per query; ``output_source`` says where each came
    from (``"output_tokens"``, ``"max_output_tokens"`` or ``"default"``), and
    ``input_source`` where each model's τin came from, as a short phrase.
    """

    input_tokens: dict[str, np.ndarray]
    output_tokens: np.ndarray
    output_source: np.ndarray
    input_source: dict[str, str]
    warnings: list[str] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------

def read_workload(path: Path | str, *, drop_bad_rows: bool = False) -> Workload:
    """Read and check a workload CSV file; files over :data:`WORKLOAD_MAX_BYTES` are refused unread."""
    path = Path(path)
    label = str(path)
    if not path.exists():
        raise InputError(Problem(label, "file not found", None, "a path to an existing workload CSV file"))
    if path.is_dir():
        raise InputError(Problem(label, "is a directory", None, "a workload CSV file"))
    size = path.stat().st_size
    if size > WORKLOAD_MAX_BYTES:  # checked before reading, so a huge file is never loaded
        raise InputError(Problem(label, f"is {size:,} bytes, larger than the {WORKLOAD_MAX_BYTES:,} allowed", None,
                                 "a smaller workload CSV file (split it into several workloads)"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(Problem(label, f"cannot be read ({exc.strerror or exc})", None, "a readable file")) from None
    workload = parse_workload(decode_upload(data, label, WORKLOAD_MAX_BYTES), label,
                              drop_bad_rows=drop_bad_rows, name=path.stem)
    workload.source_file = str(path)
    return workload


def read_workload_upload(data: bytes, filename: str, *, drop_bad_rows: bool = False) -> Workload:
    """The same for an uploaded file, which arrives as bytes with a file name."""
    text = decode_upload(data, filename, WORKLOAD_MAX_BYTES)
    return parse_workload(text, filename, drop_bad_rows=drop_bad_rows, name=Path(filename).stem)


def parse_workload(text: str, label: str, *, drop_bad_rows: bool = False, name: str | None = None) -> Workload:
    """Check the text of a workload CSV; ``label`` names it in problems (``label:line``).

    Raises :class:`InputError` with one problem per bad row. With ``drop_bad_rows`` the
    bad rows are left out instead, listed in ``dropped`` and counted in a warning; rows
    the CSV reader cannot split (more fields than the header) still refuse the file.
    """
    text = text.removeprefix("\ufeff")
    if "\x00" not in text:  # parse_csv_text refuses NUL bytes with its own sentence
        _check_header_and_rows(text, label)
    rows, warnings = parse_csv_text(text, label, (), WORKLOAD_COLUMNS)
    has_id = "id" in rows[0][1]
    workload = _build_workload(rows, label, has_id, warnings, drop_bad_rows, name or Path(label).stem or label)
    workload.source_file = label
    return workload


def workload_from_frame(frame: pd.DataFrame, name: str, *, drop_bad_rows: bool = False) -> Workload:
    """Check a workload given as a DataFrame (the CSV's columns; ``query_id`` is read as ``id``).

    Problems name row ``n`` as ``name:line``, with ``line = n + 1``: the line the row would
    have in the CSV file, under its header.
    """
    check_column_count(len(frame.columns), name)
    columns = [str(c).strip().lower() for c in frame.columns]
    if "query_id" in columns and "id" not in columns:
        columns = ["id" if c == "query_id" else c for c in columns]
    problems = []
    duplicated = duplicated_columns(columns)
    if duplicated:
        problems.append(Problem(f"{name}:1", f"columns appear more than once: {', '.join(duplicated)}", None, "each column once"))
    if "prompt" not in columns and "input_tokens" not in columns:
        problems.append(Problem(f"{name}:1", "has neither a prompt nor an input_tokens column", None, _HEADER_EXPECTED))
    if problems:
        raise InputError(problems)
    if frame.empty:
        raise InputError(_no_queries(name))
    warnings = []
    extra = [c for c in columns if c not in WORKLOAD_COLUMNS]
    if extra:
        warnings.append(f"{name}: ignored column{'s' if len(extra) > 1 else ''} {', '.join(repr(c) for c in extra)}")
    cells = {c: [_cell_text(v) for v in frame.iloc[:, i]] for i, c in enumerate(columns) if c in WORKLOAD_COLUMNS}
    rows = [(i + 2, {c: values[i] for c, values in cells.items()}) for i in range(len(frame))]
    return _build_workload(rows, name, "id" in cells, warnings, drop_bad_rows, name)


def _cell_text(value: object) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


def _no_queries(label: str) -> Problem:
    return Problem(label, "has no queries", None, "a header row with prompt or input_tokens, then one row per query")


def _check_header_and_rows(text: str, label: str) -> None:
    """Refuse a file without queries, or whose header has neither prompt nor input_tokens.

    Reads only up to the first data row; everything else is left to ``parse_csv_text``.
    """
    if not text.strip():
        raise InputError(_no_queries(label))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(_no_queries(label)) from None
    except csv.Error:
        return
    check_column_count(len(header), label)
    columns = {cell.strip().lower() for cell in header}
    if "prompt" not in columns and "input_tokens" not in columns:
        raise InputError(Problem(f"{label}:1", "has neither a prompt nor an input_tokens column", None, _HEADER_EXPECTED))
    try:
        has_rows = any(any(cell.strip() for cell in record) for record in reader)
    except csv.Error:
        return
    if not has_rows:
        raise InputError(_no_queries(label))


# -- checking rows ------------------------------------------------------------------------

def _build_workload(rows: list[tuple[int, dict[str, str]]], label: str, has_id: bool, warnings: list[str],
                    drop_bad_rows: bool, name: str) -> Workload:
    parsed: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    bad_lines: set[int] = set()
    first_line_of_id: dict[str, int] = {}
    for position, (line, row) in enumerate(rows, start=1):
        where = f"{label}:{line}"
        values, row_problems = _parse_row(row, where)
        if has_id:
            query_id = row.get("id", "")
            if not query_id:
                row_problems.append(Problem(where, "the id is missing", "id",
                                            "a unique id on every row (or no id column at all)"))
            elif query_id in first_line_of_id:
                row_problems.append(Problem(where, f"id {query_id!r} is also used on line {first_line_of_id[query_id]}",
                                            "id", "a unique id on every row"))
            else:
                first_line_of_id[query_id] = line
        else:
            query_id = str(position)  # the row's position in the file, so it stays put when rows are dropped
        if row_problems:
            problems.extend(row_problems)
            bad_lines.add(line)
            continue
        parsed.append((line, {"query_id": query_id, **values}))

    dropped: list[Problem] = []
    if problems:
        if not drop_bad_rows:
            raise InputError(problems)
        if not parsed:
            raise InputError([Problem(label, f"has no usable queries: all {len(rows)} rows have problems", None,
                                      "at least one row with a prompt or input_tokens and valid values"), *problems])
        dropped = problems
        lines = sorted(bad_lines)
        listed = ", ".join(str(n) for n in lines[:_MAX_LINES_LISTED])
        more = f" and {len(lines) - _MAX_LINES_LISTED} more" if len(lines) > _MAX_LINES_LISTED else ""
        warnings = [*warnings, f"{label}: dropped {len(lines)} of {len(rows)} rows with problems "
                               f"(line{'s' if len(lines) > 1 else ''} {listed}{more}); {len(parsed)} queries remain"]
    return Workload(name=name, queries=_queries_frame([values for _, values in parsed]), warnings=list(warnings),
                    dropped=dropped)


def _parse_row(row: dict[str, str], where: str) -> tuple[dict, list[Problem]]:
    """The values of one row, and its problems (all of them, not only the first)."""
    values: dict = {"prompt": row.get("prompt") or None, "category": row.get("category") or None}
    problems: list[Problem] = []
    for column in TOKEN_COLUMNS:
        try:
            values[column] = _parse_token_count(row.get(column, ""), where, column)
        except InputError as exc:
            problems.extend(exc.problems)
            values[column] = None
    accuracy_text = row.get("min_accuracy", "")
    values["min_accuracy"] = math.nan
    if accuracy_text:
        try:
            values["min_accuracy"] = parse_accuracy(accuracy_text, where, "min_accuracy")
        except InputError as exc:
            problems.extend(exc.problems)
    input_unreadable = any(p.column == "input_tokens" for p in problems)
    if values["prompt"] is None and values["input_tokens"] is None and not input_unreadable:
        problems.append(Problem(where, "has neither a prompt nor input_tokens", None,
                                "a prompt, or input_tokens (a whole number of tokens > 0)"))
    output, maximum = values["output_tokens"], values["max_output_tokens"]
    if output is not None and maximum is not None and output > maximum:
        problems.append(Problem(where, f"{output} is more than max_output_tokens ({maximum})", "output_tokens",
                                "output_tokens no larger than max_output_tokens"))
    return values, problems


def _parse_token_count(text: str, where: str, column: str) -> int | None:
    """A token count: empty (None) or a whole number from 1 to MAX_TOKENS_PER_QUERY; ``12.0`` is 12."""
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise InputError(Problem(where, f"{text!r} is not a number", column, _TOKENS_EXPECTED)) from None
    if not math.isfinite(number):
        raise InputError(Problem(where, f"{text!r} is not a finite number", column, _TOKENS_EXPECTED))
    if number != int(number):
        raise InputError(Problem(where, f"{text!r} is not a whole number", column, _TOKENS_EXPECTED))
    if number < 1:
        raise InputError(Problem(where, f"{text!r} is less than 1 token", column, _TOKENS_EXPECTED))
    if number > MAX_TOKENS_PER_QUERY:
        raise InputError(Problem(where, f"{text!r} is more than the {MAX_TOKENS_PER_QUERY:,} tokens allowed", column,
                                 _TOKENS_EXPECTED))
    return int(number)


def _queries_frame(records: list[dict]) -> pd.DataFrame:
    """The ``queries`` frame of a workload, with its documented dtypes."""
    column = {name: [record[name] for record in records] for name in QUERY_COLUMNS}
    return pd.DataFrame({
        "query_id": pd.Series(column["query_id"], dtype=object),
        "prompt": pd.Series(column["prompt"], dtype=object),
        **{name: pd.array(column[name], dtype="Int64") for name in TOKEN_COLUMNS},
        "min_accuracy": np.asarray(column["min_accuracy"], dtype=np.float64),
        "category": pd.Series(column["category"], dtype=object),
    })


# -- planning token counts ----------------------------------------------------------------

def planning_tokens(workload: Workload, models: list[CatalogEntry], default_output_tokens: int | None = None,
                    *, tokenizer_factory: TokenizerFactory | None = None) -> PlanningTokens:
    """τin per model and τout per query, as a plan uses them, and where each came from.

    τout is ``output_tokens``, else ``max_output_tokens`` (an upper bound), else
    ``default_output_tokens``. τin is ``input_tokens`` when given; otherwise the prompt
    is counted with each model's own tokenizer, including the BOS token the backends put
    first, or estimated at ≈4 characters per token for a model without local files.
    ``tokenizer_factory(entry)`` replaces the tokenizers (tests); it may return None to
    ask for the estimate.

    Raises:
        InputError: some queries have no output length and there is no default.
        ModelLoadError: a model's tokenizer could not be loaded.
    """
    queries = workload.queries
    warnings: list[str] = []
    output_tokens, output_source = _planning_output_tokens(workload, default_output_tokens, warnings)

    given = queries["input_tokens"]
    given_mask = given.notna().to_numpy()
    given_values = given.fillna(0).to_numpy(dtype=np.int64)
    to_count = ~given_mask
    n_given, n_count = int(given_mask.sum()), int(to_count.sum())
    # Each distinct prompt is counted once, however often it repeats.
    codes, unique_prompts = pd.factorize(queries["prompt"].to_numpy(dtype=object)[to_count])
    unique_prompts = [str(p) for p in unique_prompts]

    input_tokens: dict[str, np.ndarray] = {}
    input_source: dict[str, str] = {}
    for entry in models:
        tokens = given_values.copy()
        method = None
        if n_count:
            counter = tokenizer_factory(entry) if tokenizer_factory is not None else _local_counter(entry)
            if counter is None:
                counts, method = estimate_prompt_tokens(unique_prompts), INPUT_SOURCE_ESTIMATE
                warnings.append(
                    f"{entry.name} has no local tokenizer ({_why_no_tokenizer(entry)}), so the length of "
                    f"{n_count} prompt{'s' if n_count > 1 else ''} was estimated at ≈{CHARS_PER_TOKEN_ESTIMATE} "
                    "characters per token; give input_tokens in the workload for exact counts")
            else:
                counts, method = _checked_counts(counter(unique_prompts), len(unique_prompts), entry), INPUT_SOURCE_TOKENIZER
            tokens[to_count] = counts[codes]
        input_tokens[entry.name] = tokens
        input_source[entry.name] = _describe_input_source(n_given, n_count, method)
    return PlanningTokens(input_tokens=input_tokens, output_tokens=output_tokens, output_source=output_source,
                          input_source=input_source, warnings=warnings)


def _planning_output_tokens(workload: Workload, default_output_tokens: int | None,
                            warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    queries = workload.queries
    if default_output_tokens is not None and (
            isinstance(default_output_tokens, bool) or not isinstance(default_output_tokens, (int, np.integer))
            or not 1 <= default_output_tokens <= MAX_TOKENS_PER_QUERY):
        raise InputError(Problem("default output length", f"{default_output_tokens!r} is not allowed", None,
                                 f"a whole number of tokens from 1 to {MAX_TOKENS_PER_QUERY:,}"))
    exact = queries["output_tokens"].notna().to_numpy()
    bounded = ~exact & queries["max_output_tokens"].notna().to_numpy()
    missing = ~exact & ~bounded
    source = np.where(exact, "output_tokens", np.where(bounded, "max_output_tokens", "default")).astype(object)
    n_missing, n_bounded = int(missing.sum()), int(bounded.sum())
    if n_missing and default_output_tokens is None:
        ids = queries["query_id"].to_numpy()[missing]
        listed = ", ".join(repr(i) for i in ids[:_MAX_LINES_LISTED]) + (" ..." if n_missing > _MAX_LINES_LISTED else "")
        raise InputError(Problem(
            workload.name, f"{n_missing} of {len(queries)} queries have no output length (id {listed})",
            "output_tokens", "output_tokens or max_output_tokens, or a default output length"))
    tokens = (queries["output_tokens"].fillna(queries["max_output_tokens"])
              .fillna(default_output_tokens if n_missing else 0).to_numpy(dtype=np.int64))
    if n_bounded:
        warnings.append(f"{n_bounded} {'queries give' if n_bounded > 1 else 'query gives'} only max_output_tokens; "
                        "planned as if the answer is that long, so their energy is an upper bound")
    if n_missing:
        warnings.append(f"{n_missing} {'queries have' if n_missing > 1 else 'query has'} no output length; "
                        f"planned with the default of {default_output_tokens} tokens")
    return tokens, source


def _describe_input_source(n_given: int, n_counted: int, method: str | None) -> str:
    if not n_counted:
        return INPUT_SOURCE_GIVEN
    if not n_given:
        return method
    return f"{INPUT_SOURCE_GIVEN} for {n_given} {'queries' if n_given > 1 else 'query'}, {method} for {n_counted}"


def _checked_counts(counts: object, n: int, entry: CatalogEntry) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.shape != (n,):
        raise ModelLoadError(f"The token counter of {entry.name} returned {counts.shape} counts for {n} prompts.")
    return np.maximum(counts.astype(np.int64), 1)


def estimate_prompt_tokens(prompts: Sequence[str]) -> np.ndarray:
    """τin estimated from the length: ⌈characters / 4⌉, at least 1 (for models without a tokenizer)."""
    chars = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    return np.maximum(-(-chars // CHARS_PER_TOKEN_ESTIMATE), 1)


def count_prompt_tokens(entry: CatalogEntry, prompts: list[str]) -> np.ndarray:
    """Tokens each prompt has for ``entry``, counted with the model's own tokenizer.

    The count is what the model's backend would run (:func:`engine.backends.tokens.prompt_counter`):
    the prompt's tokens plus the BOS token the backends put first when the model defines one.

    Raises:
        ModelLoadError: the model has no local tokenizer, or it could not be loaded.
    """
    counter = _local_counter(entry)
    if counter is None:
        raise ModelLoadError(f"{entry.name} has no local tokenizer ({_why_no_tokenizer(entry)}); its prompts can "
                             "only be estimated, or given as input_tokens in the workload.")
    return _checked_counts(counter(list(prompts)), len(prompts), entry)


# -- tokenizers ---------------------------------------------------------------------------

def _why_no_tokenizer(entry: CatalogEntry) -> str:
    if entry.path and entry.path.startswith(HUB_PREFIX):
        return "a hub model that is not downloaded"
    return "an external model with measurements only"


def _local_counter(entry: CatalogEntry) -> TokenCounter | None:
    """The token counter of a model with local files, as its backend counts (cached there); None for
    external and hub models."""
    if entry.backend == "external" or not entry.path or entry.path.startswith(HUB_PREFIX):
        return None
    return prompt_counter(entry.backend, resolve_model_path(entry.path), model_name=entry.name,
                          trust_remote_code=bool(entry.trust_remote_code))


# -- storing ------------------------------------------------------------------------------

def store_workload(store: Store, workload: Workload, name: str | None = None) -> int:
    """Store a workload and its queries in one transaction; returns its new id."""
    name = (name if name is not None else workload.name or "").strip()
    if not name:
        raise InputError(Problem("name", "the workload needs a name", None, "a short name such as 'support-tickets'"))
    rows = workload.queries.loc[:, list(QUERY_COLUMNS)].copy()
    if not rows["query_id"].is_unique:
        raise InputError(Problem(name, "query ids appear more than once", "query_id", "a unique id for each query"))
    with store.transaction() as con:
        workload_id = int(con.execute(
            "INSERT INTO workloads (name, source_file, n_queries) VALUES (?, ?, ?) RETURNING id",
            [name, workload.source_file, len(rows)]).fetchone()[0])
        rows.insert(0, "workload_id", workload_id)
        append_frame(con, "workload_queries", rows)  # NaN min_accuracy and <NA> counts land as NULL
    return workload_id


def load_workload(store: Store, workload_id: int) -> Workload:
    """A stored workload, its queries in their original order."""
    head = store.query_one("SELECT name, source_file FROM workloads WHERE id = ?", [int(workload_id)])
    if head is None:
        raise InputError(Problem("workload", f"no workload with id {workload_id}", None, "an id from the list of workloads"))
    frame = store.query_df(
        f"SELECT {', '.join(QUERY_COLUMNS)} FROM workload_queries WHERE workload_id = ? ORDER BY rowid",
        [int(workload_id)])
    queries = pd.DataFrame({
        "query_id": frame["query_id"].astype(str).astype(object),
        "prompt": _none_for_null(frame["prompt"]),
        **{c: frame[c].astype("Int64") for c in TOKEN_COLUMNS},
        "min_accuracy": frame["min_accuracy"].astype(np.float64),
        "category": _none_for_null(frame["category"]),
    })
    return Workload(name=head[0], queries=queries, warnings=[], dropped=[], source_file=head[1],
                    workload_id=int(workload_id))


def _none_for_null(column: pd.Series) -> pd.Series:
    """A text column as objects, with None (not NaN) where the database has NULL."""
    return column.astype(object).where(column.notna(), None)


def list_workloads(store: Store) -> pd.DataFrame:
    """Every stored workload, newest first: id, name, source_file, n_queries, created_at."""
    return store.query_df(
        "SELECT id, name, source_file, n_queries, created_at FROM workloads ORDER BY created_at DESC, id DESC")
