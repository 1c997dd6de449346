"""Measurements in and out: the measurements CSV of DESIGN.md, so data measured elsewhere
(another host, a cluster) can be planned with, and data measured here can be shared.

The format (header row, UTF-8, comma)::

    model, device, input_tokens, output_tokens, runtime_s, energy_j
    [, trial, batch_size, energy_source, gpu_energy_j, cpu_energy_j, dram_energy_j, idle_power_w, started_at]

Decisions, so that a person can predict what an import does:

- **All or nothing.** Every row is checked first; any problem refuses the whole file and
  every problem is reported at once (``file:line``, column, what is wrong, what is
  expected). Nothing is written until all rows pass, then they land in one transaction.
- **trial** is a whole number counted from 0 or from 1, or empty: the trials of a design
  point (model, device, input_tokens, output_tokens) whose smallest trial is 0 are
  stored counted from 1, with a warning (tools write both; the database counts from 1).
- **Token counts** are whole numbers from 1 to 10⁷. ``8.0`` is read as 8 (spreadsheets
  and pandas write whole numbers that way when a column has gaps); ``8.5`` is an error.
- **energy_j** is a number of joules > 0. An empty cell means "not measured" and is
  stored as NULL, never 0; a literal 0 or a negative value is an error, because 0 J is
  not a measurement (leave the cell empty instead).
- **Physical bounds** (:mod:`engine.bounds`, the README's table): runtime_s from 1 µs to
  10⁶ s, energy_j from 1 nJ to 1 GJ, energy_j / runtime_s from 1 µW to 100 kW; a value
  outside them is a unit mistake or a corrupt number, and refused.
- **Component energies** (gpu/cpu/dram_energy_j, up to 1 GJ) and **idle_power_w** (up to
  100 kW) are >= 0, or empty. **energy_source** is ``measured`` or ``estimated`` (any case); empty means
  ``measured``. **started_at** is ISO 8601 or empty; a time without an offset is UTC.
- **model** must be a name the catalog can hold (the catalog's own rule), so the data can
  be planned with once the model is added. A model that is not in the catalog yet is
  still imported (measurements may arrive first), with a warning saying to add it.
  **device** is any name up to 64 characters without commas or line breaks: imported data
  comes from other hosts (``a100:0``), so it is not checked against this host's devices.
- Stored rows have ``origin = 'imported'``, no job, no host (the format has no host
  column) and ``energy_method = 'imported from FILE'``.
- **batch_size** is a whole number from 1 to :data:`engine.backends.batch.MAX_BATCH_SIZE`,
  or empty (1: one request at a time). With B > 1 the row's energy_j and runtime_s are
  those of the whole batch of B requests of that shape, as profiling stores them.
- **Duplicates.** Importing the same file twice must not double the data: a row identical
  to one already stored (model, device, tokens, batch size, runtime_s, energy_j, trial, started_at;
  whatever its origin, so an export re-imported into its own database is caught too)
  refuses the import unless ``allow_duplicates=True``. Rows repeated inside one file are
  imported, with a warning.
- **Export** writes exactly the documented columns, in the documented order, so a round
  trip (export, then import) gives the same rows and no warning. Empty energy is an
  empty cell, never 0; floats are written with full precision (``repr``); started_at as
  ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``; rows sorted by model, device, input_tokens,
  output_tokens, batch_size, trial, started_at, then the values. What the format cannot carry (the
  sensor behind ``energy_method``, host, job) is not exported. Every row's batch size is
  written (1 for one request at a time).
- A file with many bad rows lists the first :data:`MAX_PROBLEMS_PER_COLUMN` problems of
  each column and then one line counting the rest, rather than 100,000 lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from engine import bounds, safe_write
from engine.backends.batch import MAX_BATCH_SIZE
from engine.catalog import validate_name
from engine.csvio import DEFAULT_MAX_BYTES, csv_text, decode_upload, parse_csv_text, read_csv_rows
from engine.errors import InputError, Problem
from engine.store import Store, append_frame

MEASUREMENTS_REQUIRED = ("model", "device", "input_tokens", "output_tokens", "runtime_s", "energy_j")
MEASUREMENTS_OPTIONAL = ("trial", "batch_size", "energy_source", "gpu_energy_j", "cpu_energy_j", "dram_energy_j",
                         "idle_power_w", "started_at")
#: Every column of the format, in the documented order (also the export's order).
MEASUREMENTS_COLUMNS = MEASUREMENTS_REQUIRED + MEASUREMENTS_OPTIONAL
ENERGY_SOURCES = ("measured", "estimated")
#: The largest file an import reads (50 MB: about 280,000 rows with every column filled).
MAX_MEASUREMENTS_BYTES = DEFAULT_MAX_BYTES
MAX_PROBLEMS_PER_COLUMN = 20
MAX_DEVICE_NAME_CHARS = 64
#: What makes two rows the same measurement, for duplicate detection.
DUPLICATE_KEY = ("model", "device", "input_tokens", "output_tokens", "batch_size", "runtime_s", "energy_j", "trial",
                 "started_at")

_INT32_MAX = 2**31 - 1
_NON_FINITE_WORDS = {"nan", "inf", "infinity"}
_ISO_FORMAT_SQL = "%Y-%m-%dT%H:%M:%S.%f"


@dataclass(frozen=True)
class MeasurementsImportReport:
    """What an import stored.

    Attributes:
        n_rows: rows stored.
        models, devices: the distinct names among them, sorted.
        models_not_in_catalog: those models the catalog lacks (add them before planning).
        n_rows_without_energy: rows whose energy_j was empty (stored as NULL, not measured).
        warnings: sentences worth showing to the person who imported the file.
    """

    n_rows: int
    models: list[str]
    devices: list[str]
    models_not_in_catalog: list[str] = field(default_factory=list)
    n_rows_without_energy: int = 0
    warnings: list[str] = field(default_factory=list)


# -- import ------------------------------------------------------------------------------

def import_measurements(store: Store, path: str | Path, *, allow_duplicates: bool = False) -> MeasurementsImportReport:
    """Store every row of a measurements CSV file, or none of them when anything is wrong.

    Raises :class:`InputError` listing every problem (nothing is changed then), including
    rows already in the database unless ``allow_duplicates`` is true.
    """
    path = Path(path)
    rows, warnings = read_csv_rows(path, MEASUREMENTS_REQUIRED, MEASUREMENTS_COLUMNS, MAX_MEASUREMENTS_BYTES)
    return _import_rows(store, rows, warnings, str(path), allow_duplicates)


def import_measurements_bytes(store: Store, data: bytes, name: str, *,
                              allow_duplicates: bool = False) -> MeasurementsImportReport:
    """The same for an uploaded file, which arrives as bytes with a file name."""
    text = decode_upload(data, name, MAX_MEASUREMENTS_BYTES)
    rows, warnings = parse_csv_text(text, name, MEASUREMENTS_REQUIRED, MEASUREMENTS_COLUMNS)
    return _import_rows(store, rows, warnings, name, allow_duplicates)


def _import_rows(store: Store, rows: list[tuple[int, dict[str, str]]], warnings: list[str], label: str,
                 allow_duplicates: bool) -> MeasurementsImportReport:
    lines = np.fromiter((line for line, _ in rows), dtype=np.int64, count=len(rows))
    raw = pd.DataFrame({c: [row.get(c, "") for _, row in rows] for c in MEASUREMENTS_COLUMNS}, dtype=object)
    frame = validate_rows(raw, lines, label)
    warnings = list(warnings)
    n_renumbered = count_trials_from_one(frame)
    if n_renumbered:
        warnings.append(f"{label}: trials counted from 0 at {n_renumbered:,} design point"
                        f"{'' if n_renumbered == 1 else 's'}; stored counted from 1 (trial 0 is stored as 1)")
    n_without_energy = int(frame["energy_j"].isna().sum())
    if n_without_energy:
        warnings.append(f"{label}: {_rows(n_without_energy)} without energy_j; stored as not measured (NULL), "
                        "they count for runtime only")
    repeated = frame.duplicated(subset=list(DUPLICATE_KEY), keep="first").to_numpy()
    if repeated.any():
        warnings.append(f"{label}: {_rows(int(repeated.sum()))} that repeat an earlier row of the file exactly "
                        f"(the first on line {lines[repeated][0]}), imported as they are")

    frame["origin"] = "imported"
    frame["energy_method"] = f"imported from {Path(label).name}"
    with store.transaction() as con:
        # The frame's started_at is naive UTC; make the cast to TIMESTAMPTZ read it as UTC
        # whatever this host's time zone (a tz-aware frame would need pytz, which we lack).
        con.execute("SET TimeZone = 'UTC'")
        duplicates = _stored_duplicates(con, frame, lines)
        if duplicates and not allow_duplicates:
            raise InputError(duplicates.problem(label, len(frame)))
        if duplicates:
            warnings.append(f"{label}: {_rows(duplicates.n_rows)} already in the database, now stored a second "
                            "time (duplicates allowed)")
        catalog = {row[0] for row in con.execute("SELECT name FROM models").fetchall()}
        append_frame(con, "measurements", frame)

    models = sorted(frame["model"].unique().tolist())
    missing = [m for m in models if m not in catalog]
    if missing:
        warnings.append(
            f"{label}: not in the catalog: {', '.join(missing)}. Their measurements were imported, but add each "
            "model (e.g. `models add NAME --accuracy 0.6 --source ...`, or on the Models page) before planning with it"
        )
    return MeasurementsImportReport(
        n_rows=len(frame), models=models, devices=sorted(frame["device"].unique().tolist()),
        models_not_in_catalog=missing, n_rows_without_energy=n_without_energy, warnings=warnings,
    )


@dataclass(frozen=True)
class _Duplicates:
    """Rows of a file already in the database: how many, the first lines, where they came from."""

    n_rows: int
    first_lines: list[int]
    sources: list[str]

    def problem(self, label: str, n_file_rows: int) -> Problem:
        more = ", ..." if self.n_rows > len(self.first_lines) else ""
        lines = ", ".join(str(line) for line in self.first_lines) + more
        sources = "; ".join(self.sources[:3]) + ("; ..." if len(self.sources) > 3 else "")
        return Problem(
            label,
            f"{self.n_rows:,} of its {n_file_rows:,} rows are already in the database (lines {lines}: same model, "
            f"device, tokens, batch size, runtime_s, energy_j, trial and started_at; stored from: {sources}); "
            "importing them again would count each of those measurements twice, so nothing was imported",
            None,
            "a file of new measurements only, or --allow-duplicates if they really are new measurements",
        )


def _rows(n: int) -> str:
    return f"{n:,} row{'' if n == 1 else 's'}"


def _stored_duplicates(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame, lines: np.ndarray) -> _Duplicates | None:
    """Rows of ``frame`` identical to rows already stored: how many, where, from what."""
    check = frame[list(DUPLICATE_KEY)].copy()
    check["_line"] = lines
    con.register("_measurements_import_check", check)
    try:
        found = con.execute(
            """
            SELECT i._line AS line, min(m.origin) AS origin, min(m.energy_method) AS method
            FROM _measurements_import_check i JOIN measurements m
              ON m.model = i.model AND m.device = i.device
             AND m.input_tokens = i.input_tokens AND m.output_tokens = i.output_tokens
             AND m.batch_size = i.batch_size
             AND m.runtime_s = i.runtime_s
             AND m.energy_j IS NOT DISTINCT FROM i.energy_j
             AND m.trial IS NOT DISTINCT FROM i.trial
             AND timezone('UTC', m.started_at) IS NOT DISTINCT FROM i.started_at
            GROUP BY i._line ORDER BY i._line
            """
        ).df()
    finally:
        con.unregister("_measurements_import_check")
    if found.empty:
        return None
    sources = []
    for origin, method in found[["origin", "method"]].drop_duplicates().itertuples(index=False):
        text = method if origin == "imported" and isinstance(method, str) else f"{origin} measurements"
        if text not in sources:
            sources.append(text)
    return _Duplicates(n_rows=len(found), first_lines=found["line"].head(5).tolist(), sources=sources)


# -- validation --------------------------------------------------------------------------

class _Findings:
    """Problems found per column; each row gets at most one problem per column."""

    def __init__(self, raw: pd.DataFrame, lines: np.ndarray, label: str):
        self.raw = raw
        self.lines = lines
        self.label = label
        self.by_column: dict[str, list[tuple[int, str, str]]] = {}
        self.flagged: dict[str, np.ndarray] = {}

    def add(self, column: str, mask: pd.Series | np.ndarray, message: Callable[[str], str] | str, expected: str) -> None:
        """Record a problem for each row where ``mask`` holds and the column has none yet."""
        mask = np.asarray(mask, dtype=bool)
        already = self.flagged.setdefault(column, np.zeros(len(mask), dtype=bool))
        mask = mask & ~already
        if not mask.any():
            return
        already |= mask
        cells = self.raw[column].to_numpy()
        bucket = self.by_column.setdefault(column, [])
        for position in np.flatnonzero(mask):  # only the bad rows are visited
            text = message(cells[position]) if callable(message) else message
            bucket.append((int(position), text, expected))

    def problems(self) -> list[Problem]:
        shown: list[tuple[int, int, Problem]] = []
        summaries: list[Problem] = []
        for order, column in enumerate(MEASUREMENTS_COLUMNS):
            bucket = sorted(self.by_column.get(column, []))
            for position, message, expected in bucket[:MAX_PROBLEMS_PER_COLUMN]:
                line = int(self.lines[position])
                shown.append((line, order, Problem(f"{self.label}:{line}", message, column, expected)))
            rest = bucket[MAX_PROBLEMS_PER_COLUMN:]
            if rest:
                rest_lines = [int(self.lines[p]) for p, _, _ in rest]
                summaries.append(Problem(
                    self.label, f"{len(rest):,} more rows have a bad {column} (lines {rest_lines[0]} to {rest_lines[-1]}), "
                    "not listed one by one", column, rest[0][2]))
        return [problem for _, _, problem in sorted(shown, key=lambda item: item[:2])] + summaries


def _show(cell: str) -> str:
    return repr(cell if len(cell) <= 40 else cell[:37] + "...")


def _not_a_number(cell: str) -> str:
    if cell.lower().lstrip("+-") in _NON_FINITE_WORDS:
        return f"{_show(cell)} is not a finite number"
    return f"{_show(cell)} is not a number"


def _parse_floats(cells: np.ndarray) -> np.ndarray:
    """Read text cells as Python reads a float; NaN where a cell is not a number.

    Converting the whole array at once is the fast path (~10 ms per 100,000 cells); only
    a column with a bad cell falls back to one cell at a time, with the same rules.
    """
    try:
        return cells.astype(np.float64)
    except ValueError:
        return np.fromiter((_float_or_nan(cell) for cell in cells), dtype=np.float64, count=len(cells))


def _float_or_nan(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def _numbers(findings: _Findings, column: str, expected: str, *, required: bool) -> tuple[pd.Series, np.ndarray]:
    """The column as floats (NaN where empty or bad) and the mask of rows still usable."""
    text = findings.raw[column]
    empty = (text == "").to_numpy()
    values = pd.Series(_parse_floats(np.where(empty, "nan", text.to_numpy())), index=text.index)
    bad = ~empty & ~np.isfinite(values.to_numpy())
    if required:
        findings.add(column, empty, "is missing", expected)
    findings.add(column, bad, _not_a_number, expected)
    values[bad] = np.nan
    return values, ~empty & ~bad


def _whole_numbers(findings: _Findings, column: str, what: str, *, required: bool, minimum: int = 1,
                   maximum: int = _INT32_MAX, too_large: str = "is too large") -> pd.Series:
    """A column of whole numbers from ``minimum`` to ``maximum`` (``8.0`` is read as 8)."""
    smallest = "a whole number > 0" if minimum == 1 else f"a whole number >= {minimum}"
    expected = f"{what}: {smallest}, e.g. 128 (8.0 is read as 8)"
    values, given = _numbers(findings, column, expected, required=required)
    array = values.to_numpy()
    with np.errstate(invalid="ignore"):
        fractional = given & (np.floor(array) != array)
        below = given & ~fractional & (array < minimum)
        above = given & ~fractional & (array > maximum)
    findings.add(column, fractional, lambda cell: f"{_show(cell)} is not a whole number", expected)
    findings.add(column, below, lambda cell: f"{_show(cell)} is not {'> 0' if minimum == 1 else f'>= {minimum}'}",
                 expected)
    findings.add(column, above, lambda cell: f"{_show(cell)} {too_large}", f"{what}: at most {maximum:,}")
    ok = given & ~fractional & ~below & ~above
    return pd.Series(pd.array(np.where(ok, array, np.nan), dtype="Float64").astype("Int64"), index=values.index)


def _non_negative(findings: _Findings, column: str, expected: str, *, required: bool) -> pd.Series:
    values, given = _numbers(findings, column, expected, required=required)
    negative = given & (values.to_numpy() < 0)
    findings.add(column, negative, lambda cell: f"{_show(cell)} is negative", expected)
    values[negative] = np.nan
    return _within(findings, column, values, expected)


def _within(findings: _Findings, column: str, values: pd.Series, expected: str) -> pd.Series:
    """The values inside the column's physical bound (:mod:`engine.bounds`); a problem for each outside."""
    bound = bounds.COLUMN_BOUNDS[column]
    below, above = bound.below(values.to_numpy()), bound.above(values.to_numpy())
    unit = f" {bound.unit}"
    findings.add(column, below, lambda cell: f"{_show(cell)}{unit} is below {bound.low:g}{unit}, {bound.too_small}",
                 expected)
    findings.add(column, above, lambda cell: f"{_show(cell)}{unit} is above {bound.high:g}{unit}, {bound.too_large}",
                 expected)
    values = values.copy()
    values[below | above] = np.nan
    return values


def _powers(findings: _Findings, energy: pd.Series, runtime: pd.Series) -> None:
    """energy_j / runtime_s of each row, where both are known, within :data:`engine.bounds.POWER_W`."""
    power = bounds.power_w(energy.to_numpy(), runtime.to_numpy())
    expected = f"an energy and runtime whose ratio is a power one device can draw ({bounds.POWER_W.describe()})"
    for mask, word, limit, reason in ((bounds.POWER_W.below(power), "below", bounds.POWER_W.low,
                                       bounds.POWER_W.too_small),
                                      (bounds.POWER_W.above(power), "above", bounds.POWER_W.high,
                                       bounds.POWER_W.too_large)):
        findings.add("energy_j", mask, lambda cell, word=word, limit=limit, reason=reason: (
            f"{_show(cell)} J is {word} {limit:g} W on average over its runtime, {reason}; "
            "are energy_j and runtime_s in joules and seconds?"), expected)


def _device_problem(name: str) -> str | None:
    if not name:
        return "is missing"
    if any(char in name for char in ",\r\n\t"):
        return f"{_show(name)} contains a comma, tab or line break"
    if len(name) > MAX_DEVICE_NAME_CHARS:
        return f"{_show(name)} is longer than {MAX_DEVICE_NAME_CHARS} characters"
    return None


def validate_rows(raw: pd.DataFrame, lines: np.ndarray, label: str) -> pd.DataFrame:
    """Check every cell of a measurements file at once; return the rows to store.

    ``raw`` holds the stripped text of every column of :data:`MEASUREMENTS_COLUMNS` ("" when
    empty or absent), ``lines`` each row's line in the file. Raises :class:`InputError`
    with every problem found. The result has the ``measurements`` table's column names
    and types; ``started_at`` is naive UTC.
    """
    findings = _Findings(raw, lines, label)
    out = pd.DataFrame(index=raw.index)
    out["model"] = _model_names(findings)
    out["device"] = _device_names(findings)
    for column, what in (("input_tokens", "input tokens"), ("output_tokens", "output tokens")):
        out[column] = _whole_numbers(findings, column, what, required=True, maximum=int(bounds.TOKENS.high),
                                     too_large=f"is too large: more than {bounds.TOKENS.high:,.0f} tokens, "
                                               f"{bounds.TOKENS.too_large}")
    out["trial"] = _whole_numbers(findings, "trial", "the trial number (counted from 0 or from 1), or empty",
                                  required=False, minimum=0)
    out["batch_size"] = _whole_numbers(findings, "batch_size", "requests run together (1: one at a time), or empty",
                                       required=False, maximum=MAX_BATCH_SIZE,
                                       too_large=f"is too large: more than {MAX_BATCH_SIZE} requests in one batch"
                                       ).fillna(1)
    out["runtime_s"] = _non_negative(findings, "runtime_s", f"seconds: a number from {bounds.RUNTIME_S.describe()}",
                                     required=True)
    out["energy_j"] = _energies(findings)
    _powers(findings, out["energy_j"], out["runtime_s"])
    out["energy_source"] = _energy_sources(findings)
    for column in ("gpu_energy_j", "cpu_energy_j", "dram_energy_j"):
        out[column] = _non_negative(findings, column, f"joules: a number from {bounds.COMPONENT_ENERGY_J.describe()}, "
                                    "or empty", required=False)
    out["idle_power_w"] = _non_negative(findings, "idle_power_w", f"watts: a number from {bounds.IDLE_POWER_W.describe()}, "
                                        "or empty", required=False)
    out["started_at"] = _start_times(findings)
    problems = findings.problems()
    if problems:
        raise InputError(problems)
    return out


def count_trials_from_one(frame: pd.DataFrame) -> int:
    """Renumber, in place, the trials of each design point counted from 0 so they count from 1.

    Tools number trials from 0 or from 1 (the paper's published CSVs from 0); the database
    counts from 1. A point (model, device, input_tokens, output_tokens, batch_size) whose
    smallest trial is 0 has all its trials moved up by one; other points are left as they
    are. Returns how many points were renumbered.
    """
    point = ["model", "device", "input_tokens", "output_tokens", "batch_size"]
    first = frame["trial"].groupby([frame[column] for column in point], dropna=False).transform("min")
    from_zero = (first == 0).fillna(False).to_numpy(dtype=bool)
    if not from_zero.any():
        return 0
    frame.loc[from_zero, "trial"] = frame.loc[from_zero, "trial"] + 1
    return int(frame.loc[from_zero, point].drop_duplicates().shape[0])


def _model_names(findings: _Findings) -> pd.Series:
    """The model column, checked by the catalog's own naming rule once per distinct name."""
    names = findings.raw["model"]
    model_problems: dict[str, str] = {}
    for name in names.unique():
        try:
            validate_name(name, findings.label)
        except InputError as exc:
            model_problems[name] = exc.problems[0].message
    if model_problems:
        findings.add("model", names.isin(list(model_problems)).to_numpy(), lambda cell: model_problems[cell],
                     "a model name: letters, digits, space and . _ + ( ) / : -, starting with a letter or digit")
    return names.astype(str)


def _device_names(findings: _Findings) -> pd.Series:
    """The device column, checked once per distinct name (a file holds a few devices, many rows)."""
    device = findings.raw["device"]
    device_problems = {name: problem for name in device.unique() if (problem := _device_problem(name))}
    if device_problems:
        findings.add("device", device.isin(list(device_problems)).to_numpy(), lambda cell: device_problems[cell],
                     f"a device name such as cpu, cuda:0 or a100:0 (at most {MAX_DEVICE_NAME_CHARS} characters)")
    return device.astype(str)


def _energies(findings: _Findings) -> pd.Series:
    """energy_j: a positive number, or empty when not measured (0 J is never a measurement)."""
    expected = (f"joules: a number from {bounds.ENERGY_J.describe()}, or an empty cell when the energy was not "
                "measured")
    energy, given = _numbers(findings, "energy_j", expected, required=False)
    zero = given & (energy.to_numpy() == 0)
    negative = given & (energy.to_numpy() < 0)
    findings.add("energy_j", zero, lambda cell: f"{_show(cell)}: 0 J is not a measurement; leave energy_j empty "
                 "when the energy is unknown", expected)
    findings.add("energy_j", negative, lambda cell: f"{_show(cell)} J is negative, which no measurement is; leave "
                 "energy_j empty when the energy is unknown", expected)
    energy[zero | negative] = np.nan
    return _within(findings, "energy_j", energy, expected)


def _energy_sources(findings: _Findings) -> pd.Series:
    """energy_source in lower case; empty means measured."""
    cells = findings.raw["energy_source"]
    sources = {text: text.lower() or "measured" for text in cells.unique()}
    findings.add("energy_source", ~cells.map(sources).isin(ENERGY_SOURCES).to_numpy(),
                 lambda cell: f"{_show(cell)} is not an energy source", "measured or estimated (empty means measured)")
    return cells.map(sources).astype(str)


def _start_times(findings: _Findings) -> pd.Series:
    """started_at as naive UTC at microsecond precision: what DuckDB stores, so duplicate checks compare equal."""
    started_text = findings.raw["started_at"]
    started = pd.to_datetime(started_text.where(started_text != "", None), format="ISO8601", utc=True, errors="coerce")
    findings.add("started_at", ((started_text != "") & started.isna()).to_numpy(),
                 lambda cell: f"{_show(cell)} is not an ISO 8601 time",
                 "an ISO 8601 time such as 2024-05-01T12:00:00Z (no offset means UTC), or empty")
    return started.dt.tz_localize(None).dt.floor("us").astype("datetime64[us]")


# -- export ------------------------------------------------------------------------------

def measurements_frame(store: Store, model: str | None = None, device: str | None = None) -> pd.DataFrame:
    """The stored measurements (all, or of one model and/or device) in the export layout.

    Columns are :data:`MEASUREMENTS_COLUMNS`; missing values are NA (written as empty
    cells, never 0); ``started_at`` is ISO 8601 text in UTC. Rows are in a stable order.
    """
    params = [model, model, device, device]
    selection = "(? IS NULL OR model = ?) AND (? IS NULL OR device = ?)"
    with store.connect() as con:
        frame = con.execute(
            f"""
            SELECT model, device, input_tokens, output_tokens, runtime_s, energy_j, trial, batch_size, energy_source,
                   gpu_energy_j, cpu_energy_j, dram_energy_j, idle_power_w,
                   strftime(timezone('UTC', started_at), '{_ISO_FORMAT_SQL}') || '+00:00' AS started_at
            FROM measurements WHERE {selection}
            ORDER BY model, device, input_tokens, output_tokens, batch_size, trial NULLS LAST, started_at NULLS LAST,
                     runtime_s, energy_j NULLS LAST, energy_source, gpu_energy_j NULLS LAST,
                     cpu_energy_j NULLS LAST, dram_energy_j NULLS LAST, idle_power_w NULLS LAST, id
            """,
            params,
        ).df()
    for column in ("input_tokens", "output_tokens", "trial", "batch_size"):
        frame[column] = frame[column].astype("Int64")
    for column in ("runtime_s", "energy_j", "gpu_energy_j", "cpu_energy_j", "dram_energy_j", "idle_power_w"):
        frame[column] = frame[column].astype("float64")
    return frame[list(MEASUREMENTS_COLUMNS)].reset_index(drop=True)


def measurements_csv(frame: pd.DataFrame) -> str:
    """The CSV text of a :func:`measurements_frame` (what export writes; for a download button),
    text cells neutralised against spreadsheet formulas (:func:`engine.csvio.csv_text`)."""
    return csv_text(frame, na_rep="")


def export_measurements(store: Store, path: str | Path, model: str | None = None, device: str | None = None, *,
                        overwrite: bool = False, inputs: dict[str, str | Path] | None = None) -> int:
    """Write the stored measurements (all, or of one model and/or device) as a measurements
    CSV file; returns the number of rows written.

    The file is written by :func:`engine.safe_write.write_text`: a regular file or a new
    one, all or nothing, never through a symbolic link, never over the database or over
    another of ``inputs``. Refuses (:class:`InputError`, nothing written) an existing
    file unless ``overwrite``, a folder that does not exist, and a selection with no
    measurements.
    """
    path = Path(path)
    inputs = {**safe_write.database_inputs(store.path), **(inputs or {})}
    safe_write.check_destination(path, overwrite=overwrite, inputs=inputs)
    frame = measurements_frame(store, model, device)
    if frame.empty:
        chosen = " and ".join(part for part in (f"model {model!r}" if model else "", f"device {device!r}" if device else "")
                              if part)
        raise InputError(Problem("export", f"no measurements{' for ' + chosen if chosen else ''} in the database, "
                                 "so no file was written", None,
                                 "a model and device that have measurements (see the Home page or `fit`)"))
    safe_write.write_text(path, measurements_csv(frame), overwrite=overwrite, inputs=inputs)
    return len(frame)
