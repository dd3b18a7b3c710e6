"""Durable local queue of sealed batches, replayed after a crash or an outage.

A batch is written once (temporary file, fsync, rename, fsync of the folder)
before any store sees it, and removed only when every store it is routed to
has acknowledged it. Acknowledgements are marker files, so a restart resends a
batch only to the stores that had not taken it. Payloads are already encrypted:
nothing in the spool is plaintext.

File format: ``MAGIC | sha256(body) | body`` where body is an Arrow IPC stream
of the batch's segments. A file that fails the checksum or does not parse is
moved to ``corrupt/`` and reported; the rest is still delivered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.errors import SpoolError
from pipeline.fsmodes import open_private, private_folder
from pipeline.segments import Segment, ipc_bytes

__all__ = ["Batch", "Spool"]

logger = logging.getLogger(__name__)

MAGIC = b"PLSPOOL1"
_SUFFIX = ".batch"
_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("subject_ref", pa.string()),
        ("user_ref", pa.string()),
        ("data_type", pa.string()),
        ("kind", pa.string()),
        ("key_version", pa.int32()),
        ("min_observed_at", pa.timestamp("us", tz="UTC")),
        ("max_observed_at", pa.timestamp("us", tz="UTC")),
        ("n_records", pa.int64()),
        ("payload", pa.binary()),
    ]
)


@dataclass
class Batch:
    """Sealed segments delivered together; ``targets`` are the stores that must ack."""

    batch_id: str
    segments: list[Segment]
    targets: frozenset[str]
    acked: set[str] = field(default_factory=set)

    @property
    def waiting_for(self) -> frozenset[str]:
        return self.targets - self.acked


class Spool:
    """A folder of batch files with per-store acknowledgement markers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.corrupt_dir = directory / "corrupt"
        private_folder(directory)

    def _path(self, batch_id: str) -> Path:
        return self.directory / f"{batch_id}{_SUFFIX}"

    def append(self, segments: Sequence[Segment], targets: frozenset[str]) -> Batch:
        """Persist a new batch durably and return it."""
        # time-ordered ids keep replay in arrival order
        batch = Batch(f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}", list(segments), targets)
        table = pa.Table.from_pylist(
            [{name: getattr(s, name) for name in _SCHEMA.names} for s in segments], schema=_SCHEMA
        )
        table = table.replace_schema_metadata({"targets": ",".join(sorted(targets))})
        body = ipc_bytes(table)
        path = self._path(batch.batch_id)
        tmp = path.with_suffix(".tmp")
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as fh:
            fh.write(MAGIC + hashlib.sha256(body).digest() + body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._fsync_dir()
        return batch

    def ack(self, batch: Batch, store: str) -> None:
        """Record that ``store`` holds the batch; remove the batch once all stores do."""
        batch.acked.add(store)
        if not batch.waiting_for:
            self.remove(batch)
        else:
            os.close(open_private(self._path(batch.batch_id).with_suffix(f".ack-{store}"), os.O_WRONLY | os.O_CREAT))

    def remove(self, batch: Batch) -> None:
        self._path(batch.batch_id).unlink(missing_ok=True)
        for marker in self.directory.glob(f"{batch.batch_id}.ack-*"):
            marker.unlink(missing_ok=True)
        self._fsync_dir()

    def replay(self) -> Iterator[Batch]:
        """Batches left by an earlier process, oldest first; corrupt files are set aside."""
        for leftover in self.directory.glob("*.tmp"):  # never renamed: not durable, never acked
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            try:
                yield self._load(path)
            except SpoolError as exc:
                private_folder(self.corrupt_dir)
                os.replace(path, self.corrupt_dir / path.name)
                logger.error("%s; moved to %s", exc, self.corrupt_dir)

    def corrupt_files(self) -> list[Path]:
        return sorted(self.corrupt_dir.glob(f"*{_SUFFIX}")) if self.corrupt_dir.exists() else []

    def pending_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}"))

    def _load(self, path: Path) -> Batch:
        data = path.read_bytes()
        head = len(MAGIC) + 32
        if data[: len(MAGIC)] != MAGIC or hashlib.sha256(data[head:]).digest() != data[len(MAGIC) : head]:
            raise SpoolError(f"spool file {path.name} is corrupt (bad header or checksum)")
        try:
            table = pa.ipc.open_stream(data[head:]).read_all()
            targets = frozenset((table.schema.metadata or {}).get(b"targets", b"").decode().split(","))
            segments = [Segment(**row) for row in table.to_pylist()]
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise SpoolError(f"spool file {path.name} is corrupt: {exc}") from exc
        batch_id = path.name[: -len(_SUFFIX)]
        acked = {m.suffix[len(".ack-") :] for m in self.directory.glob(f"{batch_id}.ack-*")}
        return Batch(batch_id, segments, targets - {""}, acked)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
