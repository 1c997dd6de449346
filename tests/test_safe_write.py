"""engine/safe_write.py: only regular files (or new ones), all or nothing, never an input."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from engine import safe_write
from engine.errors import InputError


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(call) -> str:
    """The one problem of the InputError ``call`` raises, as the CLI prints it."""
    with pytest.raises(InputError) as excinfo:
        call()
    [problem] = excinfo.value.problems
    return str(problem)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- what is written ---------------------------------------------------------------------

def test_a_new_file_is_written_whole_with_the_users_umask(tmp_path: Path):
    old = os.umask(0o027)
    try:
        path = safe_write.write_text(tmp_path / "new.csv", "a,b\n1,2\n")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~0o027, not tempfile's 0o600
    assert listing(tmp_path) == ["new.csv"]


def test_a_replaced_file_keeps_its_permissions_and_only_with_overwrite(tmp_path: Path, umask_022):
    path = tmp_path / "old.csv"
    path.write_text("precious\n")
    path.chmod(0o604)
    assert "already exists, so it was not replaced" in refused(lambda: safe_write.write_text(path, "new\n"))
    assert path.read_text() == "precious\n"
    safe_write.write_text(path, "new\n", overwrite=True)
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o604
    assert listing(tmp_path) == ["old.csv"]


def test_text_is_written_as_utf8_with_its_own_line_endings(tmp_path: Path):
    path = safe_write.write_text(tmp_path / "t.csv", "naïve,\r\nx\n")
    assert path.read_bytes() == "naïve,\r\nx\n".encode()


# -- what is refused ---------------------------------------------------------------------

def test_a_symlink_is_refused_even_with_overwrite_and_its_target_is_untouched(tmp_path: Path):
    target = tmp_path / "target.csv"
    target.write_text("keep me\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    for overwrite in (False, True):
        message = refused(lambda: safe_write.write_text(link, "x\n", overwrite=overwrite))
        assert "is a symbolic link" in message and "never written through a link" in message
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "keep me\n"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    assert "symbolic link" in refused(lambda: safe_write.write_text(dangling, "x\n", overwrite=True))
    assert not (tmp_path / "nowhere.csv").exists()
    assert listing(tmp_path) == ["dangling.csv", "link.csv", "target.csv"]


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def attempt() -> None:  # opening a FIFO for writing blocks until a reader comes: run it where it cannot hang us
        for overwrite in (False, True):
            try:
                safe_write.write_text(fifo, "x\n", overwrite=overwrite)
                outcome.append("written")
            except InputError as exc:
                outcome.append(str(exc.problems[0]))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "write_text blocked on the FIFO"
    assert len(outcome) == 2 and all("named pipe (FIFO)" in message for message in outcome)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO, not replaced by a file
    assert listing(tmp_path) == ["pipe.csv"]


def test_a_character_device_is_refused(tmp_path: Path):
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs root (CI runs as root)")
    for overwrite in (False, True):
        assert "is a character device" in refused(lambda: safe_write.write_text(device, "x\n", overwrite=overwrite))
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert listing(tmp_path) == ["null"]


def test_a_socket_and_a_directory_are_refused(tmp_path: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "is a directory" in refused(lambda: safe_write.write_text(folder, "x\n", overwrite=True))
    sock_path = tmp_path / "s.sock"
    if len(str(sock_path)) >= 100:  # AF_UNIX paths are limited to ~107 bytes
        pytest.skip("tmp_path too long for a UNIX socket")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock_path))
        assert "is a socket" in refused(lambda: safe_write.write_text(sock_path, "x\n", overwrite=True))
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_a_missing_folder_is_refused_and_named(tmp_path: Path):
    message = refused(lambda: safe_write.write_text(tmp_path / "nowhere" / "out.csv", "x\n"))
    assert "folder that does not exist" in message and "create the folder first" in message


def test_an_input_of_the_command_is_never_written_even_with_overwrite(tmp_path: Path):
    workload = tmp_path / "w.csv"
    workload.write_text("prompt\nhello\n")
    inputs = {"the workload (--workload)": workload}
    for spelling in (workload, tmp_path / "." / "w.csv", Path(os.path.relpath(workload))):
        message = refused(lambda: safe_write.write_text(spelling, "x\n", overwrite=True, inputs=inputs, where="--out"))
        assert message.startswith("--out: ") and "is the workload (--workload), an input of this command" in message
    hard_link = tmp_path / "same-inode.csv"
    os.link(workload, hard_link)
    assert "an input of this command" in refused(
        lambda: safe_write.write_text(hard_link, "x\n", overwrite=True, inputs=inputs))
    assert workload.read_text() == "prompt\nhello\n"
    # a database that does not exist yet is protected by its path alone
    db = tmp_path / "planner.duckdb"
    assert "is the database" in refused(
        lambda: safe_write.write_text(db, "x\n", inputs=safe_write.database_inputs(db)))
    assert not db.exists()


# -- all or nothing ----------------------------------------------------------------------

def test_an_error_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "out.csv"
    path.write_text("old content\n")
    real_write = os.write
    calls = []

    def write_then_fail(fd, data):  # the first chunk lands, then the disk is full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(safe_write, "_CHUNK_BYTES", 4)
    monkeypatch.setattr(safe_write.os, "write", write_then_fail)
    message = refused(lambda: safe_write.write_text(path, "new content that is long\n", overwrite=True))
    assert "cannot be written (No space left on device)" in message and len(calls) == 2
    assert path.read_text() == "old content\n"
    assert listing(tmp_path) == ["out.csv"]

    calls.clear()
    monkeypatch.setattr(safe_write.os, "write", lambda fd, data: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        safe_write.write_text(tmp_path / "new.csv", "x\n")
    assert listing(tmp_path) == ["out.csv"]  # neither a half-written new file nor a temporary one


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path: Path, monkeypatch):
    path = tmp_path / "out.csv"
    real_fsync = os.fsync

    def someone_else_creates_it(fd):
        real_fsync(fd)
        if not path.exists():
            path.write_text("theirs\n")

    monkeypatch.setattr(safe_write.os, "fsync", someone_else_creates_it)
    assert "already exists" in refused(lambda: safe_write.write_text(path, "ours\n"))
    assert path.read_text() == "theirs\n" and listing(tmp_path) == ["out.csv"]
