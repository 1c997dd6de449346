"""User CSV files: the checks every reader shares, and the escaping every writer shares.

A file is UTF-8 text (a BOM is allowed) with a header row; required columns appear once
each; extra columns are ignored with a warning; every row has at most as many fields as
the header. Problems name the file and line, so a person can fix them all in one go.

**Formulas.** A spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or
carriage return as a formula, so text we write (ids, prompts, answers, categories, model
and device names) could run as one in whoever opens an export. Every CSV we write goes
through :func:`csv_text`, which prefixes such a text cell with a single quote (OWASP's
rule); numeric columns are written as numbers (``-4.0`` stays a number). A text cell
that already starts with a quote gets one more, and every reader removes exactly one
quote from a cell that starts with a quote followed by one of those characters or a
quote (before removing the spaces around the cell, as every reader does). So export then
import gives back every value as it was, spaces around it aside: :func:`unescape_cell`
undoes :func:`neutralise_cell` for every string.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import pandas as pd

from engine.errors import InputError, Problem

DEFAULT_MAX_BYTES = 50_000_000
#: The most columns a header may have. Our formats have at most a dozen; a header of
#: thousands is not one of them, and refusing it before any per-column work keeps a
#: hostile file (10⁶ columns in 9 MB) from costing more than reading it.
MAX_COLUMNS = 1_000
#: The longest cell, in characters: as long as the largest file any reader accepts, so
#: a long prompt (a 130,000-token prompt is about 500,000 characters) is one cell, not
#: the csv module's "field larger than field limit (131072)". The reader's buffer grows
#: by doubling, so a huge cell costs linear time.
MAX_CELL_CHARS = 100_000_000
csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL_CHARS))
#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: The prefix that makes a spreadsheet read the rest of the cell as text.
TEXT_MARK = "'"
_ESCAPED_STARTS = frozenset(FORMULA_STARTS + (TEXT_MARK,))


def decode_upload(data: bytes, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The text of an uploaded file, or InputError when it is too large or not UTF-8."""
    if len(data) > max_bytes:
        raise InputError(Problem(name, f"is {len(data):,} bytes, larger than the {max_bytes:,} allowed", None,
                                 "a smaller CSV file"))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(Problem(name, f"is not UTF-8 text (byte {exc.start})", None, "a UTF-8 CSV file")) from None


def read_csv_rows(path: Path, required: tuple[str, ...], known: tuple[str, ...],
                  max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """Read a UTF-8 CSV with a header row into ``(line, row)`` pairs and warnings.

    Checks what every format shares: the file exists and is text, the header has the
    required columns once each. Extra columns are ignored with a warning.
    """
    label = str(path)
    if not path.exists():
        raise InputError(Problem(label, "file not found", None, "a path to an existing CSV file"))
    if path.is_dir():
        raise InputError(Problem(label, "is a directory", None, "a CSV file"))
    if path.stat().st_size > max_bytes:  # checked before reading, so a huge file is never loaded
        raise InputError(Problem(label, f"is {path.stat().st_size:,} bytes, larger than the {max_bytes:,} allowed", None,
                                 "a smaller CSV file"))
    return parse_csv_text(decode_upload(path.read_bytes(), label, max_bytes), label, required, known)


def parse_csv_text(text: str, label: str, required: tuple[str, ...],
                   known: tuple[str, ...]) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """The text half of :func:`read_csv_rows` (also used for uploads, which arrive as bytes)."""
    if "\x00" in text:
        raise InputError(Problem(label, "contains NUL bytes, so it is not a text CSV file", None, "a UTF-8 CSV file"))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(Problem(label, "is empty", None, f"a header row with {', '.join(required)}")) from None
    except csv.Error as exc:
        raise InputError(Problem(f"{label}:1", f"cannot be read as CSV ({exc})", None, "comma-separated values")) from None
    check_column_count(len(header), label)
    columns = [c.strip().lower() for c in header]
    problems = []
    duplicated = duplicated_columns(columns)
    if duplicated:
        problems.append(Problem(f"{label}:1", f"columns appear more than once: {', '.join(duplicated)}", None, "each column once"))
    missing = [c for c in required if c not in columns]
    if missing:
        problems.append(Problem(f"{label}:1", f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                                None, f"a header row with {', '.join(required)} (optional: {', '.join(c for c in known if c not in required)})"))
    if problems:
        raise InputError(problems)
    warnings = []
    extra = [c for c in columns if c not in known]
    if extra:
        warnings.append(f"{label}: ignored column{'s' if len(extra) > 1 else ''} {', '.join(repr(c) for c in extra)}")
    kept = [(i, c) for i, c in enumerate(columns) if c in known]  # so each row costs the known columns, not all
    rows = []
    try:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            line = reader.line_num
            if len(record) > len(columns):
                problems.append(Problem(f"{label}:{line}", f"has {len(record):,} fields but the header has {len(columns)}",
                                        None, f"{len(columns)} comma-separated fields (quote fields that contain commas)"))
                continue
            rows.append((line, {c: (unescape_cell(record[i]).strip() if i < len(record) else "") for i, c in kept}))
    except csv.Error as exc:
        problems.append(Problem(f"{label}:{reader.line_num}", f"cannot be read as CSV ({exc})", None, "comma-separated values"))
    if problems:
        raise InputError(problems)
    if not rows:
        raise InputError(Problem(label, "has a header but no rows", None, "at least one row below the header"))
    return rows, warnings




def check_column_count(n_columns: int, label: str) -> None:
    """Refuse a header of more than :data:`MAX_COLUMNS` columns, before any per-column work."""
    if n_columns > MAX_COLUMNS:
        raise InputError(Problem(f"{label}:1", f"has {n_columns:,} columns, more than the {MAX_COLUMNS:,} a CSV file "
                                 "here may have", None, "the columns of the format (a dozen at most); extra columns "
                                 "are ignored, but not thousands of them"))


def duplicated_columns(columns: list[str]) -> list[str]:
    """The non-empty column names that appear more than once, sorted (linear time)."""
    return sorted(name for name, n in Counter(columns).items() if n > 1 and name)


# -- writing -----------------------------------------------------------------------------

def neutralise_cell(text: str) -> str:
    """A text cell as written: a quote in front when it starts like a formula or with a quote."""
    return TEXT_MARK + text if text[:1] in _ESCAPED_STARTS else text


def unescape_cell(text: str) -> str:
    """A cell as read: one leading quote removed when a formula character or a quote follows it.

    ``unescape_cell(neutralise_cell(s)) == s`` for every string ``s``; a hand-written
    ``'hello`` (a quote before an ordinary character) is kept as it is.
    """
    return text[1:] if text[:1] == TEXT_MARK and text[1:2] in _ESCAPED_STARTS else text


def _text_columns(frame: pd.DataFrame) -> list:
    """The columns that may hold text (numeric, boolean and time columns are written as numbers)."""
    return [column for column in frame.columns
            if pd.api.types.is_object_dtype(frame[column].dtype) or pd.api.types.is_string_dtype(frame[column].dtype)]


def neutralise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells are :func:`neutralise_cell`-ed.

    Decided per column: numeric, boolean and time columns are left alone (they are
    written as numbers), and in text columns only string values change.
    """
    out = frame.copy()
    for column in _text_columns(out):
        values = out[column]
        first = values.map(lambda value: value[:1] if isinstance(value, str) else "")
        needs_mark = first.isin(_ESCAPED_STARTS).to_numpy()
        if needs_mark.any():
            values = values.astype(object).copy()
            values[needs_mark] = [TEXT_MARK + text for text in values[needs_mark]]
            out[column] = values
    return out


def csv_text(frame: pd.DataFrame, **to_csv_options) -> str:
    """The CSV text of ``frame`` without its index, text cells neutralised: what every export writes.

    ``to_csv_options`` go to :meth:`pandas.DataFrame.to_csv` (``float_format``, ``na_rep``, ...).
    Lines end in ``\n``, except in a file whose text holds a carriage return: that one is
    written with RFC 4180's ``\r\n``, because the csv writer quotes a field only for the
    characters of its line terminator, and an unquoted CR (in a generated answer, say)
    would split its row in two when the file is read back.
    """
    out = neutralise_frame(frame)
    has_cr = any(out[column].map(lambda value: isinstance(value, str) and "\r" in value).any()
                 for column in _text_columns(out))
    return out.to_csv(index=False, lineterminator="\r\n" if has_cr else "\n", **to_csv_options)
