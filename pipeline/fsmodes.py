"""Owner-only files and folders: everything the pipeline writes is its owner's alone.

Files are created 0600 and folders 0700 whatever the process umask is (a
scheduler or a shell may run with 022), so neither ciphertext, key material,
lock files nor report output with names in clear is readable by other users.
A home folder that others can write is refused, as sshd's StrictModes does:
whoever can write it can swap the database or key file.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ConfigError, OutputError

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "check_output_folder",
    "check_private_folder",
    "open_private",
    "output_folder",
    "private_folder",
    "sync_folder",
    "write_private",
]

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(path: Path) -> Path:
    """Create ``path`` and any missing parents, each created one owner-only (existing ones untouched)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # created concurrently
            continue
        os.chmod(folder, FOLDER_MODE)  # mkdir's mode is masked by the umask; make it exact
    return path


def open_private(path: Path | str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """``os.open`` of a file that is created 0600 (exactly, not umask-dependent)."""
    fd = os.open(path, flags, FILE_MODE)
    if flags & os.O_CREAT:
        os.fchmod(fd, FILE_MODE)
    return fd


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Put ``data`` at ``path`` atomically in a 0600 file: never half-written, never others'.

    Written under a temporary name unique to this call, then moved into place,
    so a concurrent reader sees the whole file or none; the folder is synced, so
    the new name survives a crash. With ``replace=False`` an existing file is kept
    (``FileExistsError``): a hard link never overwrites.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    fd = open_private(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


def stale_copies(path: Path) -> list[Path]:
    """The temporary copies of ``path`` that :func:`write_private` leaves when its process is killed mid-write."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))


def sync_folder(path: Path) -> None:
    """fsync a folder, so that names just created, renamed or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """A folder for a command's output files (created owner-only); an OS error becomes one line naming it.

    :raises OutputError:
    """
    try:
        yield private_folder(path)
    except OSError as exc:
        raise OutputError(f"cannot write to {path}: {exc.strerror or exc}") from exc


def check_output_folder(path: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made or written in (``/proc/x``, a file):
    found only when writing, after the work, it left that work behind (a cluster registered for nothing).

    :raises OutputError:
    """
    absolute = path.absolute()
    existing = next(p for p in (absolute, *absolute.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))  # as root too, where access() says yes
    except OSError as exc:
        raise OutputError(f"cannot write to {path}: {exc.strerror or exc}") from exc


def check_private_folder(path: Path, what: str = "pipeline home") -> None:
    """Refuse a folder that others can write (the fix is named in the message).

    :raises ConfigError:
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{what} {path} is writable by others (mode {mode:04o}); run chmod 700 {path}")
