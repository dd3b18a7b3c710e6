"""Audit checkpoints kept outside the metadata database, so the database cannot vouch for itself.

A checkpoint is the chain's head at one moment — sequence number, head hash,
entry count, time — signed with the audit signing key. It is written once to a
witness: a folder (``file://DIR``; as safe as that folder's permissions and
backups) or an S3 prefix in a bucket with Object Lock (``s3://bucket/prefix``;
objects cannot be overwritten or deleted before their retention ends). ``audit
verify`` compares the chain with the newest checkpoint, which is how a cut
tail, a wiped table or a database restored from an older copy is noticed.

The newest checkpoint is the validly signed one with the highest sequence
number among every file, and every version of every object: names, listing
order and S3 delete markers decide nothing, since whoever holds the pipeline's
own credentials can add objects and delete markers. A name only orders the
reading: objects are read from the highest sequence number their name claims
down, and reading stops below the best signed one found, because the pipeline
names what it writes truthfully and nobody else can sign; an object whose name
claims nothing is always read. So a verification reads the listing and a few
objects, not every checkpoint ever written. Each verifier also keeps
the newest checkpoint it has seen in a 0600 file (:class:`HighWater`), so a
witness that loses checkpoints is named rather than believed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.awsclient import aws_client, error_code, transient
from pipeline.errors import AuditIntegrityError, ConfigError, StoreUnavailable
from pipeline.fsmodes import private_folder, write_private
from pipeline.redact import first_line

__all__ = ["Checkpoint", "FileWitness", "HighWater", "S3Witness", "Stored", "Witness", "open_witness"]

log = logging.getLogger(__name__)


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
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:  # 1e999; [[[…]]]
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
    def objects(self) -> list[Stored]:
        """Every stored object, every version of it where the store keeps versions (nothing read yet).

        :raises StoreUnavailable: the witness cannot be listed
        """

    def write(self, checkpoint: Checkpoint) -> None:
        self.put(checkpoint.name, checkpoint.to_json())

    def newest(self, trusted: Callable[[Checkpoint], bool]) -> Checkpoint | None:
        """The ``trusted`` checkpoint with the highest sequence number (then the latest time) of every object.

        :raises StoreUnavailable: the witness cannot be read
        """
        return self.survey(trusted)[0]

    def survey(self, trusted: Callable[[Checkpoint], bool]) -> tuple[Checkpoint | None, list[Checkpoint]]:
        """:meth:`newest`, and the well-formed checkpoints that ``trusted`` rejects, highest first: those past
        its seq, and the first one ever written if it is one. The caller tells another key's from a forgery (an
        older key that a hand-over names, say).

        The first one written is read too: whoever replaced the signing key file can write checkpoints of
        their own past the old key's, and a reading that stops at the newest one trusted would never reach
        what the old key signed; the first checkpoint of a locked bucket they cannot write. The first
        well-formed one: an object written before any checkpoint (the folder marker a console's "Create
        folder" writes, a note) is passed over, or it would have hidden the first checkpoint.

        :raises StoreUnavailable: the witness cannot be read
        """
        stored = self.objects()
        best: Checkpoint | None = None
        rejected: list[Checkpoint] = []
        read: dict[str, Checkpoint | None] = {}
        for claimed, obj in sorted(((_claimed_seq(o.name), o) for o in stored), key=lambda c: -c[0]):
            if best is not None and claimed < best.seq:
                break  # every later object claims less than a checkpoint already trusted
            found = read[obj.where] = self._checkpoint(obj)
            if found is None:
                continue
            if not trusted(found):
                rejected.append(found)
            elif best is None or (found.seq, found.time) > (best.seq, best.time):
                best = found
        floor = best.seq if best is not None else 0
        past = [c for c in rejected if c.seq > floor]
        # whatever its seq, and whether or not the loop read it: a name claiming less is anyone's to choose
        for obj in sorted(stored, key=lambda o: (o.written, o.name)):
            first = read[obj.where] if obj.where in read else self._checkpoint(obj)
            if first is not None:
                past += [first] if not trusted(first) and first not in past else []
                break
        return best, sorted(past, key=lambda c: (c.seq, c.time), reverse=True)

    def _checkpoint(self, stored: Stored) -> Checkpoint | None:
        """The checkpoint an object holds; None for planted junk (a locked bucket cannot be rid of it)."""
        try:
            return Checkpoint.from_json(stored.where, stored.read())
        except AuditIntegrityError as exc:
            log.warning("audit witness %s: %s", self.url, exc.reason)
            return None


@dataclass(frozen=True)
class Stored:
    """One stored object (or object version) of a witness: its name, where it is, when it was written (seconds
    since the epoch, as the store says), how to read it."""

    name: str
    where: str
    written: float
    read: Callable[[], bytes]


def _claimed_seq(name: str) -> float:
    """The sequence number a name claims (``checkpoint-<seq>-…``); infinity when it claims none."""
    parts = name.split("-")
    claims = len(parts) > 2 and parts[0] == "checkpoint" and parts[1].isascii() and parts[1].isdigit()  # not "²"
    return int(parts[1]) if claims else math.inf


class FileWitness(Witness):
    """Checkpoints as files in a folder of their own (0700, files 0600, each appearing whole and never replaced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"file://{path}"

    def put(self, name: str, data: bytes) -> None:
        try:
            write_private(private_folder(self.path) / name, data, replace=False)  # readers see all or nothing
        except FileExistsError:
            return  # another process checkpointed the same head at the same instant
        except OSError as exc:
            raise StoreUnavailable(f"audit witness {self.path}: cannot write {name}: {exc.strerror}") from exc

    def objects(self) -> list[Stored]:
        if not self.path.is_dir():
            return []
        files = [p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")]  # not temp files
        return [Stored(p.name, str(p), p.stat().st_mtime, functools.partial(self._read, p)) for p in files]

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreUnavailable(f"audit witness: cannot read {path}: {exc.strerror}") from exc


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
        self._locked = False
        try:
            self._check_lock()
        except StoreUnavailable as exc:  # checked again before its first use: the rest of the pipeline runs on
            log.warning("%s", exc)

    def _check_lock(self) -> None:
        """:raises ConfigError: the bucket has no Object Lock in COMPLIANCE mode
        :raises StoreUnavailable: S3 did not answer"""
        if self._locked:
            return
        try:
            lock = self._s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
        except self._errors as exc:
            if transient(exc):
                raise StoreUnavailable(f"audit witness {self.url} unreachable: {first_line(exc)}") from exc
            raise ConfigError(
                f"pipeline.audit.witness-url: bucket {self.bucket!r} has no usable Object Lock: {exc}"
            ) from exc
        if lock.get("ObjectLockEnabled") != "Enabled" or "DefaultRetention" not in lock.get("Rule", {}):
            raise ConfigError(
                f"pipeline.audit.witness-url: bucket {self.bucket!r} needs Object Lock with a default retention"
            )
        mode = lock["Rule"]["DefaultRetention"].get("Mode")
        if mode != "COMPLIANCE":  # GOVERNANCE: whoever may bypass it (s3:BypassGovernanceRetention) deletes checkpoints
            raise ConfigError(
                f"pipeline.audit.witness-url: bucket {self.bucket!r} keeps objects in {mode} mode; "
                "a witness needs COMPLIANCE mode, which no one can bypass"
            )
        self._locked = True

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> None:
        self._check_lock()
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*")
        except self._errors as exc:
            if error_code(exc) == "PreconditionFailed":
                return  # another process checkpointed the same head at the same instant
            raise StoreUnavailable(f"audit witness {self.url}: cannot write {name}: {exc}") from exc

    def objects(self) -> list[Stored]:
        """Every version of every object under the prefix; delete markers hide nothing here."""
        self._check_lock()
        try:
            pages = self._s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=self._key(""))
            versions = [v for page in pages for v in page.get("Versions", [])]
        except self._errors as exc:
            raise StoreUnavailable(f"audit witness {self.url} unreachable: {exc}") from exc
        return [
            Stored(
                v["Key"].rsplit("/", 1)[-1],
                f"{v['Key']} (version {v['VersionId']})",
                v["LastModified"].timestamp(),
                functools.partial(self._read, v["Key"], v["VersionId"]),
            )
            for v in versions
        ]

    def _read(self, key: str, version: str) -> bytes:
        try:
            return bytes(self._s3.get_object(Bucket=self.bucket, Key=key, VersionId=version)["Body"].read())
        except self._errors as exc:
            raise StoreUnavailable(f"audit witness {self.url}: cannot read {key} ({version}): {exc}") from exc


class HighWater:
    """The newest checkpoint this host has seen in one witness, in a 0600 file (outside database and witness).

    It names the witness it is about: pointing ``pipeline.audit.witness-url`` at
    a new place starts a new mark instead of reporting the new place as rolled back.
    """

    def __init__(self, path: Path, witness_url: str) -> None:
        self.path = path
        self.witness_url = witness_url

    def read(self) -> Checkpoint | None:
        """The mark as the file holds it, whoever signed it.

        :raises AuditIntegrityError: the file is malformed
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            about = json.loads(data).get("witness")
        except (ValueError, AttributeError) as exc:
            raise AuditIntegrityError(0, f"audit high-water mark {self.path} is malformed: {exc}") from exc
        return Checkpoint.from_json(str(self.path), data) if about == self.witness_url else None

    def seen(self, trusted: Callable[[Checkpoint], bool]) -> Checkpoint | None:
        """The mark, once ``trusted`` vouches for it: one it rejects is named, never ignored.

        :raises AuditIntegrityError: the file is malformed, or its checkpoint was not signed by a trusted key
            (the mark edited, or the signing key replaced and the trail rewritten)
        """
        seen = self.read()
        if seen is not None and not trusted(seen):
            raise AuditIntegrityError(
                0,
                f"audit high-water mark {self.path} holds the {seen.label} recording seq {seen.seq}, "
                "whose signature does not verify with the trusted audit signing key "
                "(the mark was edited, or the signing key was replaced and the trail rewritten)",
            )
        return seen

    def raise_to(self, checkpoint: Checkpoint, trusted: Callable[[Checkpoint], bool]) -> None:
        """Remember ``checkpoint`` if it is newer than the mark, which ``trusted`` must vouch for: an edited
        seq compared as it stands would keep every later checkpoint out.

        :raises AuditIntegrityError: the file is malformed, or ``trusted`` rejects its checkpoint
        """
        seen = self.seen(trusted)
        if seen is None or (checkpoint.seq, checkpoint.time) > (seen.seq, seen.time):
            doc = {**json.loads(checkpoint.to_json()), "witness": self.witness_url}
            write_private(private_folder(self.path.parent) / self.path.name, json.dumps(doc, sort_keys=True).encode())


def open_witness(url: str) -> Witness:
    """The witness ``pipeline.audit.witness-url`` names, chosen by its scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileWitness(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Witness(url)
    raise ConfigError(f"pipeline.audit.witness-url: unknown scheme {parsed.scheme!r} in {url!r} (known: file, s3)")
