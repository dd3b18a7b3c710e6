"""Durable local queue of sealed batches, replayed after a crash or an outage.

A batch is written once (temporary file, fsync, rename, fsync of the folder)
before it is delivered, and removed once its delivery target accepted it.
Every batch is sealed to the intake public key (:mod:`pipeline.intake`), in
embedded and remote mode alike: nothing in a spool can be read by code on the
cluster, and replaying one needs no secret.

File format: ``MAGIC | sha256(body) | body`` where body is the sealed batch. A
file that fails the checksum is moved to ``corrupt/``; a batch its target
refused for good is moved to ``refused/``. Either is reported with one line;
the rest is still delivered. Beside the batches, ``intake.pub`` remembers the
public key they are sealed to (it is no secret), so that a scheduler starting
while the keyring's database is down can still seal and spool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SpoolError
from pipeline.fsmodes import open_private, private_folder, sync_folder, write_private
from pipeline.intake import MAX_SEALED_BYTES, sealed_batch_id

__all__ = ["SpooledBatch", "Spool", "new_batch_id"]

logger = logging.getLogger(__name__)

MAGIC = b"PLSPOOL2"
_SUFFIX = ".batch"
_PUBLIC_KEY = "intake.pub"
_KEY_TEXT_BYTES = 4096  # a PEM public key's text is far shorter


def new_batch_id() -> str:
    """A unique, time-ordered batch id (so replay keeps arrival order)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class SpooledBatch:
    """A sealed batch waiting in the spool for delivery."""

    batch_id: str
    sealed: bytes


class Spool:
    """A folder of sealed batch files."""

    def __init__(self, directory: Path, *, key_folder: Path | None = None) -> None:
        """:param key_folder: where the intake public key is also kept for every cluster of one home
        (embedded mode: one key for all), so a new cluster's spool has one during an outage"""
        self.directory = directory
        self._key_files = [directory / _PUBLIC_KEY]
        if key_folder is not None and key_folder != directory:
            self._key_files.append(key_folder / _PUBLIC_KEY)
        self.corrupt_dir = directory / "corrupt"
        self.refused_dir = directory / "refused"
        private_folder(directory)

    def _path(self, batch_id: str) -> Path:
        return self.directory / f"{batch_id}{_SUFFIX}"

    def append(self, batch_id: str, sealed: bytes) -> SpooledBatch:
        """Persist a sealed batch durably and return it."""
        path = self._path(batch_id)
        tmp = path.with_suffix(".tmp")
        try:
            with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as fh:
                fh.write(MAGIC + hashlib.sha256(sealed).digest() + sealed)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:  # a full disk: the emitter retries, and each try would leave its file
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        sync_folder(self.directory)
        return SpooledBatch(batch_id, sealed)

    def remember_public_key(self, text: str) -> None:
        """Keep the intake public key (``public_key_text``) for :meth:`remembered_public_key`."""
        for path in self._key_files:
            if _kept_text(path) != text:
                private_folder(path.parent)
                write_private(path, text.encode())

    def remembered_public_key(self) -> tuple[str, Path] | None:
        """The intake public key text an earlier process kept (this cluster's, else its home's), and its
        file; None when there is none."""
        for path in self._key_files:
            if (text := _kept_text(path)) is not None:
                return text, path
        return None

    def remove(self, batch: SpooledBatch) -> None:
        """Forget a delivered batch."""
        self._path(batch.batch_id).unlink(missing_ok=True)
        sync_folder(self.directory)

    def refuse(self, batch: SpooledBatch, reason: str) -> Path:
        """Set aside a batch its target refused for good (kept for an operator, never retried)."""
        target = self._set_aside(self._path(batch.batch_id), self.refused_dir)
        logger.warning("spooled batch %s refused: %s; moved to %s", batch.batch_id, reason, self.refused_dir)
        return target

    def replay(self) -> Iterator[SpooledBatch]:
        """Batches left by an earlier process, oldest first; corrupt files are set aside."""
        for leftover in self.directory.glob("*.tmp"):  # never renamed: not durable, never delivered
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            try:
                batch = self._load(path)
            except (SpoolError, OSError) as exc:  # an unreadable entry (a folder, no permission) is set aside too
                reason = exc if isinstance(exc, SpoolError) else f"spool file {path.name} is unreadable: {exc.strerror}"
                self._set_aside(path, self.corrupt_dir)
                logger.error("%s; moved to %s", reason, self.corrupt_dir)
                continue
            yield batch

    def corrupt_files(self) -> list[Path]:
        return sorted(self.corrupt_dir.glob(f"*{_SUFFIX}")) if self.corrupt_dir.exists() else []

    def refused_files(self) -> list[Path]:
        return sorted(self.refused_dir.glob(f"*{_SUFFIX}")) if self.refused_dir.exists() else []

    def pending_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"))

    def _load(self, path: Path) -> SpooledBatch:
        head = len(MAGIC) + 32
        data = _read_regular(path, head + MAX_SEALED_BYTES)
        if data[: len(MAGIC)] != MAGIC or hashlib.sha256(data[head:]).digest() != data[len(MAGIC) : head]:
            raise SpoolError(f"spool file {path.name} is corrupt (bad header or checksum)")
        batch_id = path.name[: -len(_SUFFIX)]
        if sealed_batch_id(data[head:]) != batch_id:  # renamed or copied: sent under its name, it never goes
            raise SpoolError(f"spool file {ascii(path.name)} is not named after the batch it holds")
        return SpooledBatch(batch_id, data[head:])

    def _set_aside(self, path: Path, folder: Path) -> Path:
        private_folder(folder)
        target = folder / path.name
        os.replace(path, target)
        sync_folder(self.directory)
        return target


def _kept_text(path: Path) -> str | None:
    """A remembered public key's text; ``None`` when there is none to read (missing, unreadable, not a
    regular file, longer than any key's text)."""
    try:
        return _read_regular(path, _KEY_TEXT_BYTES).decode()
    except (OSError, SpoolError, UnicodeDecodeError):
        return None


def _read_regular(path: Path, limit: int) -> bytes:
    """A spool folder's file's bytes, if it is a regular file of at most ``limit`` bytes.

    Code on a cluster can write its spool folder, and whoever delivers it after the scheduler stops (a
    dask-gateway, ``spool replay``) reads it: a FIFO blocked that reader for good, a link to ``/dev/zero``
    filled its memory. Neither is followed nor read.

    :raises SpoolError: not a regular file, or larger than any batch
    :raises OSError: a symbolic link (``ELOOP``), or unreadable
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise SpoolError(f"spool file {ascii(path.name)} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SpoolError(f"spool file {ascii(path.name)} is larger than a sealed batch may be ({limit} bytes)")
    return data
