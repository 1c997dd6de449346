"""Writing a file the user named (an export, a schedule, predictions), and nothing else.

Every command that writes a user's file goes through :func:`write_text`, so they share
one set of rules (the README's "Files we write"):

- **Only a regular file, or a new one.** A symbolic link is refused, even with
  ``overwrite``: writing through it would change a file the user did not name, and
  replacing it would silently turn the link into a file. A FIFO, a device node, a socket
  or a directory is refused without being opened (opening a FIFO blocks; writing to a
  device sends the CSV to the device).
- **An existing file is replaced only when the user says so** (``overwrite``), and never
  when it is also an input of the same command (the workload a plan was made from, the
  points of a prediction, the database), compared by resolved path and by inode so a
  hard link or another spelling of the path is caught too.
- **All or nothing.** The text goes to a temporary file in the same folder, which is
  flushed to disk and then renamed over the target in one step: a failure part-way
  (disk full, an exception, a kill) leaves the old file as it was and no temporary
  file behind. Without ``overwrite`` the new file is linked into place, which fails if
  a file appeared at the path in the meantime, so nothing is replaced by a race either.
- **Permissions.** A new file gets the user's umask (``0o666 & ~umask``, as any editor
  or shell redirection would give it), not the ``0o600`` of a temporary file; a
  replaced file keeps its own permission bits. Replacing a file that has other hard
  links gives this name the new content and leaves the other names the old one.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from engine.errors import InputError, Problem

_NEW_FILE_MODE = 0o666  # the kernel applies the umask to it
_CHUNK_BYTES = 1 << 20
_NOT_REGULAR = (
    (stat.S_ISDIR, "is a directory", "a file name for the CSV file"),
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file, so nothing was written to it", None),
    (stat.S_ISCHR, "is a character device, not a regular file, so nothing was written to it", None),
    (stat.S_ISBLK, "is a block device, not a regular file, so nothing was written to it", None),
    (stat.S_ISSOCK, "is a socket, not a regular file, so nothing was written to it", None),
)
_NEW_NAME = "a path to a regular file, or a new file name"


def check_destination(path: str | Path, *, overwrite: bool = False, inputs: Mapping[str, str | Path] | None = None,
                      where: str | None = None) -> Path:
    """Refuse (:class:`InputError`) what :func:`write_text` would refuse, before any work is done.

    ``inputs`` names the files the command reads (``{"the workload (--workload)": path}``);
    none of them is ever written, even with ``overwrite``. ``where`` is how problems name
    the destination (an option such as ``--out``); by default its path. Returns the path.
    """
    path = Path(path)
    info = _lstat(path)
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise InputError(_problem(path, where, f"is a symbolic link (to {os.readlink(path)}); a file is never "
                                      "written through a link, even with --overwrite", "the path of the file itself, "
                                      "or a new file name"))
        for is_kind, message, expected in _NOT_REGULAR:
            if is_kind(info.st_mode):
                raise InputError(_problem(path, where, message, expected or _NEW_NAME))
    if not path.parent.is_dir():
        raise InputError(_problem(path, where, f"is in a folder that does not exist ({path.parent})",
                                  "a path in an existing folder (create the folder first)"))
    for what, input_path in (inputs or {}).items():
        if _same_file(path, Path(input_path)):
            raise InputError(_problem(path, where, f"is {what}, an input of this command; writing it would replace "
                                      "that input, so nothing was written (not even with --overwrite)",
                                      "another file name for the output"))
    if info is not None and not overwrite:
        raise InputError(_problem(path, where, "already exists, so it was not replaced",
                                  "a new file name, or --overwrite to replace it"))
    return path


def database_inputs(db_path: str | Path) -> dict[str, Path]:
    """The database file and its write-ahead log: inputs of every command, never written over."""
    return {"the database": Path(db_path), "the database's write-ahead log": Path(f"{db_path}.wal")}


def write_text(path: str | Path, text: str, *, overwrite: bool = False,
               inputs: Mapping[str, str | Path] | None = None, where: str | None = None) -> Path:
    """Write ``text`` (UTF-8, line endings as given) to ``path``, all of it or nothing.

    The rules are the module's: see its docstring. Raises :class:`InputError` (nothing
    written, nothing left behind) for a destination :func:`check_destination` refuses
    and for a write the system refuses (no permission, disk full). Returns the path.
    """
    path = check_destination(path, overwrite=overwrite, inputs=inputs, where=where)
    data = text.encode("utf-8")
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        _write_temporary(temporary, data, _lstat(path))
        if overwrite:
            check_destination(path, overwrite=True, inputs=inputs, where=where)  # still a regular file (or none)?
            os.replace(temporary, path)  # replaces a name, never writes through one
        else:
            _link_new(temporary, path, where)
        _sync_folder(path.parent)
    except OSError as exc:
        raise InputError(_problem(path, where, f"cannot be written ({exc.strerror or exc})",
                                  "a path in a folder you can write to, on a disk with room")) from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _write_temporary(temporary: Path, data: bytes, replaced: os.stat_result | None) -> None:
    """The new content, on disk, in a file only this process created (``O_EXCL``)."""
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _NEW_FILE_MODE)
    try:
        if replaced is not None:  # the replaced file's own permissions and, where allowed, its owner
            os.fchmod(fd, stat.S_IMODE(replaced.st_mode))
            try:
                os.fchown(fd, replaced.st_uid, replaced.st_gid)
            except OSError:
                pass  # another owner's file replaced by us: ours now, as with any editor
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_CHUNK_BYTES])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(temporary: Path, path: Path, where: str | None) -> None:
    """Put the finished file at ``path`` only if nothing is there (a file that appeared meanwhile stays)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise InputError(_problem(path, where, "already exists, so it was not replaced",
                                  "a new file name, or --overwrite to replace it")) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # A file system without hard links (FAT, some network mounts): check, then rename.
        if _lstat(path) is not None:
            raise InputError(_problem(path, where, "already exists, so it was not replaced",
                                      "a new file name, or --overwrite to replace it")) from None
        os.replace(temporary, path)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file: reported as a missing folder
        return None


def _same_file(path: Path, other: Path) -> bool:
    """The same file by resolved path, or by device and inode (a hard link, another spelling)."""
    try:
        if path.resolve() == other.resolve():
            return True
    except (OSError, RuntimeError):
        pass
    try:
        return os.path.samefile(path, other)
    except (OSError, ValueError):
        return False  # one of them does not exist


def _problem(path: Path, where: str | None, message: str, expected: str) -> Problem:
    if where is None:
        return Problem(str(path), message, None, expected)
    return Problem(where, f"{path} {message}", None, expected)
