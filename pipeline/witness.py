"""Audit checkpoints kept outside the metadata database, so the database cannot vouch for itself.

A checkpoint is the chain's head at one moment — sequence number, head hash,
entry count, time — signed with the audit signing key. It is written once to a
witness: a folder (``file://DIR``; as safe as that folder's permissions and
backups) or an S3 prefix in a bucket with Object Lock (``s3://bucket/prefix``;
objects cannot be overwritten or deleted before their retention ends). ``audit
verify`` compares the chain with the newest checkpoint, which is how a cut
tail, a wiped table or a database restored from an older copy is noticed.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.awsclient import aws_client
from pipeline.errors import AuditIntegrityError, ConfigError, StoreUnavailable
from pipeline.fsmodes import open_private, private_folder

__all__ = ["Checkpoint", "FileWitness", "S3Witness", "Witness", "open_witness"]


@dataclass(frozen=True)
class Checkpoint:
    """The audit chain's head, signed."""

    seq: int
    head_hash: str
    entries: int
    time: datetime
    signature: str = ""

    def body(self) -> bytes:
        """The signed bytes: canonical JSON of everything but the signature."""
        doc = {"seq": self.seq, "head_hash": self.head_hash, "entries": self.entries, "time": self.time.isoformat()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def name(self) -> str:
        """Object name; sorts by sequence number, then time."""
        return f"checkpoint-{self.seq:015d}-{self.time:%Y%m%dT%H%M%S%fZ}.json"

    @property
    def label(self) -> str:
        return f"checkpoint of {self.time:%Y-%m-%dT%H:%MZ}"

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "time": self.time.isoformat()}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> Checkpoint:
        try:
            doc: dict[str, Any] = json.loads(data)
            return cls(
                int(doc["seq"]),
                str(doc["head_hash"]),
                int(doc["entries"]),
                datetime.fromisoformat(doc["time"]),
                str(doc["signature"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditIntegrityError(0, f"witness checkpoint {name} is malformed: {exc}") from exc


class Witness(ABC):
    """Write-once storage of checkpoints outside the metadata database."""

    url: str

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store a new object; never replaces one.

        :raises StoreUnavailable: the witness cannot be reached
        """

    @abstractmethod
    def names(self) -> list[str]:
        """Every checkpoint object's name."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """One object's bytes."""

    def write(self, checkpoint: Checkpoint) -> None:
        self.put(checkpoint.name, checkpoint.to_json())

    def newest(self) -> Checkpoint | None:
        """The checkpoint with the highest sequence number (then the latest time)."""
        names = sorted(n for n in self.names() if n.startswith("checkpoint-") and n.endswith(".json"))
        return Checkpoint.from_json(names[-1], self.get(names[-1])) if names else None


class FileWitness(Witness):
    """Checkpoints as files in a folder of their own (0700, files 0600, created exclusively)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"file://{path}"

    def put(self, name: str, data: bytes) -> None:
        try:
            private_folder(self.path)
            fd = open_private(self.path / name)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except FileExistsError:
            return  # another process checkpointed the same head at the same instant
        except OSError as exc:
            raise StoreUnavailable(f"audit witness {self.path}: cannot write {name}: {exc.strerror}") from exc

    def names(self) -> list[str]:
        return [p.name for p in self.path.glob("checkpoint-*.json")] if self.path.is_dir() else []

    def get(self, name: str) -> bytes:
        return (self.path / name).read_bytes()


class S3Witness(Witness):
    """Checkpoints as objects under an S3 prefix in a bucket with Object Lock.

    The bucket's default retention applies to each object, so not even the
    writer's credentials can delete or overwrite a checkpoint before it ends.
    """

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.url, self.bucket, self.prefix = url, parsed.netloc, parsed.path.strip("/")
        if not self.bucket:
            raise ConfigError(f"pipeline.audit.witness-url {url!r} names no bucket (s3://bucket/prefix)")
        self._s3, self._errors = aws_client("s3", url, "an S3 witness")
        try:
            lock = self._s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
        except self._errors as exc:
            raise ConfigError(
                f"pipeline.audit.witness-url: bucket {self.bucket!r} has no usable Object Lock: {exc}"
            ) from exc
        if lock.get("ObjectLockEnabled") != "Enabled" or "DefaultRetention" not in lock.get("Rule", {}):
            raise ConfigError(
                f"pipeline.audit.witness-url: bucket {self.bucket!r} needs Object Lock with a default retention"
            )

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> None:
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*")
        except self._errors as exc:
            if getattr(exc, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
                return  # another process checkpointed the same head at the same instant
            raise StoreUnavailable(f"audit witness {self.url}: cannot write {name}: {exc}") from exc

    def names(self) -> list[str]:
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(""))
            return [obj["Key"].rsplit("/", 1)[-1] for page in pages for obj in page.get("Contents", [])]
        except self._errors as exc:
            raise StoreUnavailable(f"audit witness {self.url} unreachable: {exc}") from exc

    def get(self, name: str) -> bytes:
        try:
            return bytes(self._s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read())
        except self._errors as exc:
            raise StoreUnavailable(f"audit witness {self.url}: cannot read {name}: {exc}") from exc


def open_witness(url: str) -> Witness:
    """The witness ``pipeline.audit.witness-url`` names, chosen by its scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileWitness(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Witness(url)
    raise ConfigError(f"pipeline.audit.witness-url: unknown scheme {parsed.scheme!r} in {url!r} (known: file, s3)")
