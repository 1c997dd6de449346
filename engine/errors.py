"""Exceptions of the engine, each meant to be shown to a person as it is.

Every message says what was wrong and what to do about it. The CLI turns
:class:`InputError` into exit code 2 (one line per problem) and every other
:class:`PlannerError` into exit code 1; the app shows them with ``st.error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class PlannerError(Exception):
    """Base of every error the engine raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    ``where`` names the place (a file, ``file:row``, or an option such as
    ``--accuracy``), ``column`` the field when there is one, ``message`` what is
    wrong and ``expected`` what would be right.
    """

    where: str
    message: str
    column: str | None = None
    expected: str | None = None

    def __str__(self) -> str:
        head = self.where + (f": column {self.column}" if self.column else "")
        tail = f"; expected {self.expected}" if self.expected else ""
        # A message written as a sentence ("... (N = GPU index).") must not read ".; expected".
        message = self.message.rstrip().removesuffix(".") if tail and not self.message.endswith("...") else self.message
        return f"{head}: {message}{tail}"


class InputError(PlannerError):
    """The user's input is wrong; nothing was changed.

    Carries every problem found, so a file with many bad rows is reported in one go.
    """

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(where="input", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DatabaseBusyError(PlannerError):
    """Another process holds the DuckDB file for writing."""


class SchemaError(PlannerError):
    """The database file has a schema this version cannot use."""


class DatabaseDamagedError(PlannerError):
    """The database file, or the write-ahead log beside it, is damaged; nothing was written to it.

    ``path`` is the database file, ``backup`` the newest backup found beside it (None
    when there is none); the message says how to restore it or start anew.
    """

    def __init__(self, message: str, *, path: Path, backup: Path | None = None):
        super().__init__(message)
        self.path = path
        self.backup = backup


class DatabaseWriteError(PlannerError):
    """The operating system refused to write the database (read-only disk, I/O error, ...).

    The change that failed was not written; what was stored before is kept.
    """


class DiskFullError(DatabaseWriteError):
    """The disk holding the database is full (or the user's quota is spent)."""


class ModelLoadError(PlannerError):
    """A model could not be loaded by its backend."""


class DeviceUnavailableError(PlannerError):
    """The requested device does not exist or cannot be used on this host."""


class TokenCountMismatchError(PlannerError):
    """A backend processed a different number of tokens than was asked for."""


class InferenceError(PlannerError):
    """A backend's library failed while running requests (not a problem with the request)."""
