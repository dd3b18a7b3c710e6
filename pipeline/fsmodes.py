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
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ConfigError, OutputError

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "Staging",
    "check_output_folder",
    "check_private_folder",
    "open_private",
    "output_folder",
    "private_folder",
    "sync_folder",
    "write_all_private",
    "write_private",
    "written_together",
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
    tmp = _temporary_copy(path, data)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


class Staging:
    """Files of one :func:`written_together` block, each under its temporary name until the block ends."""

    def __init__(self) -> None:
        self.copies: dict[Path, Path] = {}
        self.removed: list[Path] = []

    def write(self, path: Path, data: bytes) -> None:
        with self.stream(path) as fh:
            fh.write(data)

    @contextmanager
    def stream(self, path: Path) -> Iterator[BinaryIO]:
        """A file written piece by piece (the whole audit trail, say), never held in memory."""
        with _temporary_file(path) as (tmp, fh):
            self.copies[path] = tmp
            yield fh

    def remove(self, path: Path) -> None:
        """``path`` is to be gone once the others are in place (an earlier run's file this one has not)."""
        self.removed.append(path)


@contextmanager
def written_together() -> Iterator[Staging]:
    """Files that are all put in place when the block ends, or none: each is written under its temporary
    name first, so one that cannot be written (a full disk, no permission, a folder in its place), or an
    error in the block, leaves the others as they were, not some of this run's beside the last run's."""
    staging = Staging()
    try:
        yield staging
        # a folder in a file's place is found before any file moves (an immutable file is not)
        for path in staging.copies:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        for path, tmp in staging.copies.items():
            os.replace(tmp, path)
        for path in staging.removed:
            path.unlink(missing_ok=True)
    finally:
        for tmp in staging.copies.values():
            tmp.unlink(missing_ok=True)
    for folder in {path.parent for path in (*staging.copies, *staging.removed)}:
        sync_folder(folder)


def write_all_private(files: Mapping[Path, bytes]) -> None:
    """:func:`write_private` of several files together, all of them or none (:func:`written_together`)."""
    with written_together() as staging:
        for path, data in files.items():
            staging.write(path, data)


def _temporary_copy(path: Path, data: bytes) -> Path:
    """``data`` durably in a new 0600 file beside ``path``, under a temporary name unique to the call."""
    with _temporary_file(path) as (tmp, fh):
        fh.write(data)
    return tmp


@contextmanager
def _temporary_file(path: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A new 0600 file beside ``path`` under a temporary name unique to the call, synced when the block
    ends; removed if the block raises."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    fd = open_private(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield tmp, fh
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    except OSError as exc:  # the file it could not write, where the error names one
        named = next((f for f in (exc.filename2, exc.filename) if isinstance(f, str)), None)
        raise OutputError(
            f"cannot write to {path if named is None else _written_as(Path(named))}: {exc.strerror or exc}"
        ) from exc


def _written_as(path: Path) -> Path:
    """The file a temporary copy of :func:`write_private` is written for (any other path as it is)."""
    copy = re.fullmatch(r"\.(.+)\.tmp-[0-9a-f]{32}", path.name)
    return path if copy is None else path.with_name(copy[1])


def check_output_folder(path: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made or written in (``/proc/x``, a file):
    found only when writing, after the work, it left that work behind (a cluster registered for nothing).

    :raises OutputError:
    """
    absolute = path.absolute()
    existing = next(p for p in (absolute, *absolute.parents) if p.exists() or p.is_symlink())  # a dangling link too
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
