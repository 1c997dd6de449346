"""The model catalog: which LLMs can be profiled and planned with, and how good they are.

A model is a Hugging Face model directory (transformers backend), a ``.gguf`` file
(llama.cpp backend), a hub id ``hub:owner/name`` (transformers, needs a reachable hub
when it is loaded), or ``external``: no local weights, only measurements imported from
elsewhere. Every entry carries an accuracy score in [0, 1] and where it came from.

Every write validates first and changes nothing when anything is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from engine.csvio import decode_upload, parse_csv_text, read_csv_rows
from engine.errors import InputError, PlannerError, Problem
from engine.paths import PROJECT_ROOT
from engine.store import Store, append_frame

BACKENDS = ("transformers", "llama.cpp", "external")
HUB_PREFIX = "hub:"
CATALOG_COLUMNS = ("model", "accuracy", "backend", "path", "params_b", "notes")
CATALOG_REQUIRED = ("model", "accuracy")
MAX_CATALOG_BYTES = 5_000_000

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()/:-]{0,99}$")
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog.

    ``accuracy`` is a fraction in [0, 1]; ``accuracy_source`` says where it came from
    (a leaderboard, an eval run, "illustrative"); ``params_b`` is the parameter count in
    billions; ``path`` is as stored (relative paths are relative to the project root).
    """

    name: str
    backend: str
    accuracy: float
    accuracy_source: str
    path: str | None = None
    params_b: float | None = None
    notes: str | None = None
    is_demo: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ImportReport:
    """What an import did: the models it added and the warnings worth showing."""

    added: list[str]
    warnings: list[str]


# -- validation of single values ---------------------------------------------------------

def parse_accuracy(value: object, where: str, column: str = "accuracy") -> float:
    """Read an accuracy score: a fraction in [0, 1], or a percentage written with ``%``."""
    expected = "a fraction in [0, 1] such as 0.645, or a percentage such as 64.5%"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(Problem(where, "is missing", column, expected))
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text.rstrip("%").strip())
    except ValueError:
        raise InputError(Problem(where, f"{text!r} is not a number", column, expected)) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InputError(Problem(where, f"{text!r} is not a finite number", column, expected))
    if percent:
        number /= 100.0
    if not 0.0 <= number <= 1.0:
        hint = f" (did you mean {number / 100:g} or {number:g}%?)" if 1.0 < number <= 100.0 and not percent else ""
        raise InputError(Problem(where, f"{text!r} is outside [0, 1]{hint}", column, expected))
    return number


def validate_name(name: object, where: str, column: str = "model") -> str:
    """A model name: 1-100 characters, letters, digits, space and ``._+()/:-``; no ``@``."""
    text = "" if name is None else str(name).strip()
    if not text:
        raise InputError(Problem(where, "the model name is missing", column, "a name such as llama-2-7b"))
    if not _NAME_PATTERN.match(text):
        raise InputError(Problem(
            where, f"{text!r} is not a usable model name", column,
            "1-100 characters: letters, digits, space and . _ + ( ) / : - (no @), starting with a letter or digit",
        ))
    return text


def parse_params_b(value: object, where: str, column: str = "params_b") -> float | None:
    """Parameter count in billions, optional; positive when given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise InputError(Problem(where, f"{value!r} is not a number", column, "parameters in billions, e.g. 7 or 0.125")) from None
    if not number > 0 or number == float("inf"):
        raise InputError(Problem(where, f"{value!r} must be a positive number", column, "parameters in billions, e.g. 7 or 0.125"))
    return number


def resolve_model_path(stored_path: str) -> Path:
    """The file system path of a stored model path (relative ones are under the project root)."""
    path = Path(stored_path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def inspect_model_location(backend: str | None, path: str | None, where: str) -> tuple[str, str | None, float | None, list[str]]:
    """Check that ``path`` is a model the backend can load, without loading it.

    Returns ``(backend, path_to_store, params_b_found, warnings)``. The backend is inferred
    from the path when not given. Raises :class:`InputError` naming the problem.
    """
    backend = (backend or "").strip() or None
    path = (path or "").strip() or None
    if backend is not None and backend not in BACKENDS:
        raise InputError(Problem(where, f"unknown backend {backend!r}", "backend", " or ".join(BACKENDS)))
    if path is None:
        if backend in (None, "external"):
            return "external", None, None, []
        raise InputError(Problem(where, f"backend {backend} needs a path", "path",
                                 "a Hugging Face model directory or a .gguf file"))
    if backend == "external":
        raise InputError(Problem(where, "an external model has no local path", "path",
                                 "an empty path, or backend transformers / llama.cpp"))
    if path.startswith(HUB_PREFIX):
        hub_id = path[len(HUB_PREFIX):]
        if backend not in (None, "transformers"):
            raise InputError(Problem(where, "hub ids are loaded by the transformers backend", "backend", "transformers"))
        if not _HUB_ID_PATTERN.match(hub_id):
            raise InputError(Problem(where, f"{hub_id!r} is not a hub id", "path", "hub:owner/name"))
        return "transformers", path, None, [f"{where}: {hub_id} will be fetched from the model hub when it is first loaded; that needs network access"]

    location, path = _locate(path)
    if not location.exists():
        raise InputError(Problem(where, f"{path} does not exist", "path",
                                 "an existing Hugging Face model directory or .gguf file"))
    if location.is_dir():
        if backend == "llama.cpp":
            raise InputError(Problem(where, f"{path} is a directory, not a .gguf file", "path", "a .gguf file for llama.cpp"))
        params_b, warnings = _inspect_hf_directory(location, where)
        return "transformers", path, params_b, warnings
    if backend == "transformers":
        raise InputError(Problem(where, f"{path} is a file; the transformers backend needs a model directory", "path",
                                 "a directory with config.json and weights"))
    if location.suffix.lower() != ".gguf" and backend is None:
        raise InputError(Problem(where, f"{path} is not a model", "path",
                                 "a Hugging Face model directory (with config.json) or a .gguf file"))
    from engine.backends.gguf_check import inspect_gguf  # local import: keeps catalog import light

    try:
        info = inspect_gguf(location)
    except PlannerError as exc:
        reason = (getattr(exc, "reason", None) or str(exc)).rstrip(".")
        raise InputError(Problem(where, f"{location}: {reason}", "path", "a complete GGUF model file")) from None
    n_params = getattr(info, "n_params", None)
    return "llama.cpp", path, (n_params / 1e9 if n_params else None), []


def _locate(path: str) -> tuple[Path, str]:
    """Where a given path is, and how to store it.

    Paths inside the project are stored relative to its root, so a moved checkout keeps
    working; other paths are stored absolute, since the working directory changes.
    """
    given = Path(path).expanduser()
    if not given.is_absolute() and not given.exists():
        return PROJECT_ROOT / given, str(given)
    location = given.resolve()
    try:
        return location, str(location.relative_to(PROJECT_ROOT))
    except ValueError:
        return location, str(location)


def _inspect_hf_directory(location: Path, where: str) -> tuple[float | None, list[str]]:
    config_file = location / "config.json"
    if not config_file.is_file():
        raise InputError(Problem(where, f"{location} has no config.json, so it is not a Hugging Face model directory",
                                 "path", "a directory saved with save_pretrained (config.json, weights, tokenizer)"))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(Problem(where, f"{config_file} is not valid JSON ({exc})", "path", "a readable config.json")) from None
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise InputError(Problem(where, f"{config_file} names no model_type or architectures", "path",
                                 "a transformers config.json"))
    weights = [f for pattern in _WEIGHT_PATTERNS for f in location.glob(pattern)]
    if not weights:
        raise InputError(Problem(where, f"{location} has no weight files", "path",
                                 "*.safetensors or pytorch_model*.bin beside config.json"))
    warnings = []
    if not any((location / name).exists() for name in _TOKENIZER_FILES):
        warnings.append(f"{where}: {location} has no tokenizer files; prompts given as text cannot be counted for this model")
    if config.get("auto_map"):
        warnings.append(f"{where}: this model ships its own code (auto_map); it stays unloaded unless you allow trust_remote_code for it")
    if not list(location.glob("*.safetensors")):
        return None, warnings  # .bin weights: the count is not in a header, so it is left to the user
    from engine.backends.hf import count_safetensors_params

    try:
        return count_safetensors_params(location) / 1e9, warnings
    except PlannerError as exc:
        raise InputError(Problem(where, str(exc), "path", "readable *.safetensors weight files")) from None


# -- what a model can hold ----------------------------------------------------------------

def model_context_length(entry: CatalogEntry) -> int | None:
    """The context a model was built for, in tokens, read from its files without loading it.

    A ``.gguf`` file's ``{arch}.context_length``; a Hugging Face directory's
    ``max_position_embeddings`` (or ``n_positions``, ``max_sequence_length``). None when the
    files do not say or the model has none here (external, hub id). A damaged GGUF file
    raises :class:`~engine.errors.ModelLoadError`.
    """
    if entry.backend == "external" or not entry.path or entry.path.startswith(HUB_PREFIX):
        return None
    location = resolve_model_path(entry.path)
    if entry.backend == "llama.cpp":
        from engine.backends.gguf_check import inspect_gguf  # local import: keeps catalog import light

        return inspect_gguf(location).context_length
    try:
        config = json.loads((location / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_sequence_length")
    return int(value) if value else None


def runtime_context_length(entry: CatalogEntry, n_ctx: int | None = None) -> int | None:
    """The context, in tokens, the model gets when this project runs it: what a request's
    τin + τout must fit in.

    The transformers backend gives the trained context. The llama.cpp backend gives ``n_ctx``
    when it is set (a backend option), else the trained context capped at its
    ``DEFAULT_MAX_CONTEXT`` (a bigger KV cache costs memory): so a model trained for 32k
    tokens runs here with 4,096. None when it cannot be known here (an external or hub
    model, files gone or unreadable); planning then allows every length and says so.
    """
    try:
        trained = model_context_length(entry)
    except (PlannerError, OSError):
        return None
    if entry.backend != "llama.cpp" or not entry.path:
        return trained
    from engine.backends.llamacpp import DEFAULT_MAX_CONTEXT  # the backend's own rule, not a copy of its number

    return int(n_ctx) if n_ctx else min(trained or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)


# -- reading and writing the catalog -----------------------------------------------------

_ENTRY_COLUMNS = [f for f in CatalogEntry.__dataclass_fields__]


def list_models(store: Store) -> pd.DataFrame:
    """Every catalog entry, by name."""
    return store.query_df(
        f"SELECT {', '.join(_ENTRY_COLUMNS)}, created_at, updated_at FROM models ORDER BY name"
    )


def get_model(store: Store, name: str) -> CatalogEntry | None:
    """One entry, or None when no model has that name."""
    row = store.query_one(f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM models WHERE name = ?", [name])
    return None if row is None else CatalogEntry(**dict(zip(_ENTRY_COLUMNS, row)))


def build_entry(*, name: object, accuracy: object, accuracy_source: str | None = None, backend: str | None = None,
                path: str | None = None, params_b: object = None, notes: str | None = None,
                trust_remote_code: bool = False, where: str = "model") -> tuple[CatalogEntry, list[str]]:
    """Validate every field and return the entry and its warnings; all problems at once."""
    problems: list[Problem] = []
    values: dict[str, object] = {}
    for key, check in (("name", lambda: validate_name(name, where)),
                       ("accuracy", lambda: parse_accuracy(accuracy, where)),
                       ("params_b", lambda: parse_params_b(params_b, where)),
                       ("location", lambda: inspect_model_location(backend, path, where))):
        try:
            values[key] = check()
        except InputError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(problems)
    found_backend, stored_path, found_params_b, warnings = values["location"]
    entry = CatalogEntry(
        name=values["name"], backend=found_backend, accuracy=values["accuracy"],
        accuracy_source=(accuracy_source or "").strip() or "given by the user, source not stated",
        path=stored_path, params_b=values["params_b"] if values["params_b"] is not None else found_params_b,
        notes=(notes or "").strip() or None, trust_remote_code=bool(trust_remote_code),
    )
    return entry, warnings


def add_models(store: Store, entries: list[CatalogEntry], where: Callable[[int], str] | None = None) -> None:
    """Add entries in one transaction; a name already in the catalog refuses them all."""
    names = [entry.name for entry in entries]
    with store.transaction() as con:
        placeholders = ", ".join("?" for _ in names) or "NULL"
        taken = {row[0] for row in con.execute(f"SELECT name FROM models WHERE name IN ({placeholders})", names).fetchall()}
        if taken:
            raise InputError([
                Problem(where(i) if where else "model", f"a model named {entry.name!r} is already in the catalog", "model",
                        "a new name (or `models remove` / `models set-accuracy` for the existing one)")
                for i, entry in enumerate(entries) if entry.name in taken
            ])
        append_frame(con, "models", pd.DataFrame([asdict(entry) for entry in entries]))


def add_model(store: Store, **fields) -> tuple[CatalogEntry, list[str]]:
    """Validate and add one model; returns it with any warnings. Raises InputError, changing nothing."""
    entry, warnings = build_entry(**fields)
    add_models(store, [entry])
    return entry, warnings


def update_model(store: Store, name: str, **changes) -> CatalogEntry:
    """Change fields of an existing entry (accuracy, accuracy_source, params_b, notes, path, backend).

    The result is validated as a whole, like a new entry, before anything is written.
    """
    current = get_model(store, name)
    if current is None:
        raise InputError(Problem("model", f"no model named {name!r} in the catalog", "model", "a name from `models list`"))
    merged = {**asdict(current), **{k: v for k, v in changes.items() if v is not None}}
    location_changed = "path" in changes or "backend" in changes
    if location_changed:
        entry, _ = build_entry(name=name, accuracy=merged["accuracy"], accuracy_source=merged["accuracy_source"],
                               backend=merged["backend"], path=merged["path"], params_b=merged["params_b"],
                               notes=merged["notes"], trust_remote_code=merged["trust_remote_code"], where=name)
        entry = replace(entry, is_demo=current.is_demo)
    else:
        entry = replace(current,
                        accuracy=parse_accuracy(merged["accuracy"], name),
                        accuracy_source=(str(merged["accuracy_source"] or "").strip() or current.accuracy_source),
                        params_b=parse_params_b(merged["params_b"], name),
                        notes=(str(merged["notes"]).strip() or None) if merged["notes"] is not None else None,
                        trust_remote_code=bool(merged["trust_remote_code"]))
    store.execute(
        """UPDATE models SET backend = ?, path = ?, accuracy = ?, accuracy_source = ?, params_b = ?, notes = ?,
           trust_remote_code = ?, updated_at = current_timestamp WHERE name = ?""",
        [entry.backend, entry.path, entry.accuracy, entry.accuracy_source, entry.params_b, entry.notes,
         entry.trust_remote_code, name],
    )
    return entry


def set_accuracy(store: Store, name: str, accuracy: object, source: str | None) -> CatalogEntry:
    """Set a model's accuracy score and where it came from."""
    if not (source or "").strip():
        raise InputError(Problem("--source", "the accuracy needs its source", None,
                                 "where the score came from, e.g. 'Open LLM Leaderboard average, 2024-06'"))
    return update_model(store, name, accuracy=accuracy, accuracy_source=source)


def remove_model(store: Store, name: str) -> int:
    """Remove a catalog entry. Its measurements stay in the database (returns how many).

    Adding a model of the same name again reconnects them.
    """
    with store.transaction() as con:
        if con.execute("SELECT count(*) FROM models WHERE name = ?", [name]).fetchone()[0] == 0:
            raise InputError(Problem("model", f"no model named {name!r} in the catalog", "model", "a name from `models list`"))
        kept = con.execute("SELECT count(*) FROM measurements WHERE model = ?", [name]).fetchone()[0]
        is_demo = con.execute("SELECT is_demo FROM models WHERE name = ?", [name]).fetchone()[0]
        con.execute("DELETE FROM models WHERE name = ?", [name])
        if is_demo:
            # Remembered so that `make run` does not bring back a demo model the user removed.
            con.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, 'true')", [_demo_removed_key(name)])
    return int(kept)


def _demo_removed_key(name: str) -> str:
    return f"demo_removed:{name}"


def register_demo_models(store: Store, demos: list) -> list[str]:
    """Add the generated demo models to the catalog; returns the names added.

    A demo model already in the catalog, or one the user removed before, is left alone.
    ``demos`` are :class:`engine.demo_models.DemoModel` records.
    """
    with store.transaction() as con:
        present = {row[0] for row in con.execute("SELECT name FROM models").fetchall()}
        removed = {row[0] for row in con.execute("SELECT key FROM settings WHERE key LIKE 'demo_removed:%'").fetchall()}
        entries = []
        for demo in demos:
            if demo.name in present or _demo_removed_key(demo.name) in removed:
                continue
            _, stored_path = _locate(str(demo.path))
            entries.append(CatalogEntry(
                name=demo.name, backend=demo.backend, accuracy=demo.accuracy, accuracy_source=demo.accuracy_source,
                path=stored_path, params_b=demo.params_b, notes=demo.notes, is_demo=True))
        if entries:
            append_frame(con, "models", pd.DataFrame([asdict(entry) for entry in entries]))
    return [entry.name for entry in entries]


# -- catalog CSV -------------------------------------------------------------------------

def import_catalog(store: Store, path: str | Path) -> ImportReport:
    """Add every model of a catalog CSV file, or none of them when any row is wrong."""
    path = Path(path)
    rows, warnings = read_csv_rows(path, CATALOG_REQUIRED, CATALOG_COLUMNS, MAX_CATALOG_BYTES)
    return _import_rows(store, rows, warnings, str(path))


def import_catalog_bytes(store: Store, data: bytes, name: str) -> ImportReport:
    """The same for an uploaded file, which arrives as bytes with a file name."""
    text = decode_upload(data, name, MAX_CATALOG_BYTES)
    rows, warnings = parse_csv_text(text, name, CATALOG_REQUIRED, CATALOG_COLUMNS)
    return _import_rows(store, rows, warnings, name)


def _import_rows(store: Store, rows: list[tuple[int, dict[str, str]]], warnings: list[str], label: str) -> ImportReport:
    entries: list[CatalogEntry] = []
    lines: list[int] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    source = f"catalog file {Path(label).name}"
    for line, row in rows:
        where = f"{label}:{line}"
        try:
            entry, row_warnings = build_entry(
                name=row.get("model"), accuracy=row.get("accuracy"), backend=row.get("backend"), path=row.get("path"),
                params_b=row.get("params_b"), notes=row.get("notes"), accuracy_source=source, where=where)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        if entry.name in seen:
            problems.append(Problem(where, f"model {entry.name!r} already appears on line {seen[entry.name]}", "model",
                                    "each model once"))
            continue
        seen[entry.name] = line
        entries.append(entry)
        lines.append(line)
        warnings.extend(row_warnings)
    if problems:
        raise InputError(problems)
    add_models(store, entries, where=lambda i: f"{label}:{lines[i]}")
    return ImportReport(added=[e.name for e in entries], warnings=warnings)
