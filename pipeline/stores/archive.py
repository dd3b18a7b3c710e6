"""Parquet archive on S3 (``pipeline.archive.url = s3://bucket/prefix``).

The long-term records again, as Parquet that DuckDB, Spark or pyarrow read:
``PREFIX/data_type=T/day=YYYY-MM-DD/<subject_ref>~<user_ref or ->[.<segment_id>].parquet``.
A write puts one object per segment (``.<segment_id>``), created only if absent
(``If-None-Match: *``): no object is ever read and written back by a write, so two
writers never lose each other's rows and a replay writes nothing twice. Once a
day is closed, :meth:`compact` merges each subject's objects of that day into
one (``<subject_ref>~<user_ref>.parquet``), created with ``If-None-Match: *``
or replaced with ``If-Match: <etag>`` of the version it read; a writer or
compactor that lost the race changes nothing, and the merged objects are deleted
only after the merged one is in place. Readers drop a segment seen twice (a
compaction interrupted before its deletes). A day's expiry and an erasure are
whole-object deletes (the day of each segment's newest record, as in the logging store).
In a versioned bucket every delete and rewrite also deletes the object's noncurrent
versions, which would otherwise keep expired or erased rows readable with the live key.

Every object is encrypted with Parquet modular encryption (footer and all
columns): its data keys are wrapped, through :class:`KeyringKms`, by the
data key of that account or person from the keyring. Destroying that key
(crypto-shredding) makes every copy of the object unreadable. A reader with the keyring opens an
object with :func:`decryption_properties`.

Each row carries its segment's id, user ref and kind, so scans give back the
same segments (sealed again under the subject's key). Object metadata holds
only counts. The endpoint comes from ``?endpoint=URL`` or boto3's own
configuration (``AWS_ENDPOINT_URL``, profiles).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any, TypeVar

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from botocore.handlers import add_expect_header
from cryptography.exceptions import InvalidTag

from pipeline.awsclient import error_code, mask_errors, transient
from pipeline.errors import ConfigError, KeyringError, StoreError, StoreUnavailable, UnknownAccountError
from pipeline.keys import Keyring
from pipeline.records import KINDS
from pipeline.redact import first_line, mask_url
from pipeline.segments import NEVER_OPENS, Segment, open_segment, seal
from pipeline.stores.base import Removed, Store, noting_deleted, oldest_first, url_options

__all__ = ["ArchiveStore", "KeyringKms", "decryption_properties", "merged_key", "open_object", "own_key", "read_listed"]

#: columns the archive adds to every record
SEGMENT_COLUMNS = [
    pa.field("_segment_id", pa.string(), nullable=False),
    pa.field("_user_ref", pa.string()),
    pa.field("_subject_ref", pa.string(), nullable=False),
]
_NONCE = 12
#: PUTs of one write sent at once (boto3 clients are thread-safe)
PUT_THREADS = 8
#: a conditional PUT that lost: the object exists (If-None-Match) or changed (If-Match), or a concurrent one won
#: a conditional PUT's condition failed: the object exists (If-None-Match), or changed (If-Match)
_LOST_RACE = {"PreconditionFailed", "412"}
#: another conditional write to the key was under way; S3 says to retry
_CONFLICT = {"ConditionalRequestConflict", "409"}
#: an object's key under the prefix: a segment's own object, or a subject's day once compacted (see ``_key``);
#: the first release named a day's object by its subject ref alone
_OWN_KEY = re.compile(r"data_type=[^/]+/day=\d{4}-\d{2}-\d{2}/[0-9a-f]{64}(~([0-9a-f]{64}|-))?(\.[0-9a-f-]+)?\.parquet")
_T = TypeVar("_T")
logger = logging.getLogger(__name__)


class KeyringKms(pe.KmsClient):  # type: ignore[misc]
    """Wraps Parquet data keys with a data key of the keyring; the key id is ``subject_ref~user_ref``.

    With ``key_version``, only under that version of the data key: rows read under it are never wrapped
    under the next (an erasure destroyed it meanwhile, and a later record made a new one).
    """

    def __init__(self, keyring: Keyring, key_version: int | None = None, key_id: str | None = None) -> None:
        super().__init__()
        self.keyring = keyring
        self.key_version = key_version
        self.key_id = key_id

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        version, cipher = self.keyring.cipher(*_refs(master_key_identifier), create=False)
        if self.key_version is not None and version != self.key_version:
            raise KeyringError(
                f"archive key of subject {master_key_identifier[:12]}… is version {version}, not the "
                f"{self.key_version} the rows were read under: destroyed since"
            )
        nonce = os.urandom(_NONCE)
        sealed = cipher.encrypt(nonce, key_bytes, master_key_identifier.encode())
        return f"{version}:{base64.b64encode(nonce + sealed).decode()}"

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        """The object's key, under the data key version it names.

        :raises KeyringError: that version was destroyed (crypto-shredded: nothing readable is left)
        :raises _Altered: the wrapped key is not under the key its object's name gives, does not open under a
            version that stands, or names a version or subject the keyring never issued (the object was altered)
        """
        subject = master_key_identifier[:12]
        # its footer's key id is in clear; ``ref`` and ``ref~-`` both name an account's own key (a first release's)
        if self.key_id is not None and _refs(master_key_identifier) != _refs(self.key_id):
            raise _Altered(f"archive key is wrapped under subject {subject}…'s key, not the one its name gives")
        version, _, blob = wrapped_key.partition(":")
        try:
            number, raw = int(version), base64.b64decode(blob, validate=True)
        except ValueError:  # binascii.Error too
            raise _Altered(f"archive key of subject {subject}… is malformed") from None
        refs = _refs(master_key_identifier)
        try:
            cipher = self.keyring.cipher_for(*refs, number)
        except UnknownAccountError:  # a key id the keyring never issued: a planted object names what it likes
            raise _Altered(f"archive key of subject {subject}… names a key the keyring never issued") from None
        except KeyringError:
            if not self._shredded(refs, number, raw, master_key_identifier):
                raise _Altered(
                    f"archive key of subject {subject}… names data key version {number}, which the keyring never "
                    "issued, or which was destroyed while the key opens under the live one (its version edited)"
                ) from None
            raise
        try:
            return cipher.decrypt(raw[:_NONCE], raw[_NONCE:], master_key_identifier.encode())
        except (InvalidTag, ValueError):
            raise _Altered(f"archive key of subject {subject}… does not unwrap") from None

    def _shredded(self, refs: tuple[str, str | None], version: int, raw: bytes, key_id: str) -> bool:
        """Whether data key ``version`` of ``refs`` was destroyed, and the wrapped key ``raw`` was sealed under it.

        Below the live version, and not opening under the live one (a version number edited down would make
        a live object look shredded); or of a key id whose keys were all destroyed. A version past the live
        one, or of a key id never issued (an account's users' keys do not count), never was.
        """
        live = self.keyring.live_version(*refs)
        if live is None:
            return self.keyring.key_issued(*refs)
        if not 0 < version < live:
            return False
        try:
            self.keyring.cipher_for(*refs, live).decrypt(raw[:_NONCE], raw[_NONCE:], key_id.encode())
        except (InvalidTag, ValueError):
            return True
        return False


class _Altered(Exception):
    """An object's wrapped key that does not open under a data key version that stands."""


class _NotOurs(Exception):
    """An object that opens but is not what this store writes under its name."""


class _Unopenable(StoreError):
    """An object that is not the Parquet this store wrote, or whose key was altered: named, never taken
    for a crypto-shredded one (which holds nothing readable, on purpose)."""


def _factory(keyring: Keyring, key_version: int | None = None, key_id: str | None = None) -> pe.CryptoFactory:
    return pe.CryptoFactory(lambda _config: KeyringKms(keyring, key_version, key_id))


def decryption_properties(keyring: Keyring, key_id: str | None = None) -> Any:
    """What ``pq.read_table(..., decryption_properties=...)`` needs to open an archive object; with ``key_id``
    (``subject_ref~user_ref``, as the object's name gives), only one whose keys are wrapped under that key."""
    return _factory(keyring, key_id=key_id).file_decryption_properties(
        pe.KmsConnectionConfig(), pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=60))
    )


class ArchiveStore(Store):
    """Segments as rows of encrypted Parquet objects on S3: one per segment, one per subject and closed day."""

    #: opened with the keyring: it decrypts segments to write records and re-seals them on scan
    needs_keyring = True

    def __init__(self, url: str, *, keyring: Keyring) -> None:
        form = "s3://BUCKET/PREFIX[?endpoint=URL&region=R]"
        parsed, query = url_options(url, ("endpoint", "region"), form)
        if not parsed.netloc:
            raise ConfigError(f"store URL must be {form}, got {mask_url(url)!r}")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.keyring = keyring
        self._foreign: set[str] = set()
        self._unopenable: set[str] = set()  # named once a process
        try:
            s3 = boto3.client("s3", endpoint_url=query.get("endpoint"), region_name=query.get("region"))
        except (BotoCoreError, ValueError) as exc:  # ValueError: "Invalid endpoint: URL"
            raise ConfigError(f"store URL {mask_url(url)!r}: {first_line(exc)}") from exc
        self._s3 = mask_errors(s3)
        # objects are small: waiting for "100 Continue" before each body costs a round trip and saves nothing
        self._s3.meta.events.unregister("before-call.s3", add_expect_header)

    # -- S3 calls, errors mapped at the boundary -----------------------------------------

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        where = f"s3://{self.bucket}/{self.prefix}"
        try:
            return fn()
        except EndpointConnectionError as exc:
            raise StoreUnavailable(f"{where} unreachable during {action}: {first_line(exc)}") from exc
        except ClientError as exc:
            code = error_code(exc)
            if transient(exc):
                raise StoreUnavailable(f"{where} unavailable during {action}: {code}") from exc
            raise StoreError(f"{where} refused {action}: {code} {first_line(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{where} unreachable during {action}: {first_line(exc)}") from exc

    def _key(self, data_type: str, day: str, key_id: str, segment_id: str | None = None) -> str:
        """A segment's own object, or (without ``segment_id``) the day's compacted object."""
        name = f"{key_id}.{segment_id}.parquet" if segment_id else f"{key_id}.parquet"
        return "/".join(p for p in (self.prefix, f"data_type={data_type}", f"day={day}", name) if p)

    def _base(self, data_type: str | None = None) -> str:
        """The key prefix of the archive's objects (or of one data type's)."""
        base = "/".join(p for p in (self.prefix, f"data_type={data_type}/" if data_type else "") if p)
        return base + "/" if base and not base.endswith("/") else base

    def _keys(self, data_type: str | None = None) -> Iterator[str]:
        """The archive's object keys under the prefix (or one data type), oldest day first.

        A Parquet file of another layout (a summary a query engine wrote beside the partitions) is not
        one of its objects: skipped and listed by :meth:`foreign_files`, never read, merged or deleted.
        """
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._base(data_type))
        keys = [o["Key"] for page in self._call("list", lambda: list(pages)) for o in page.get("Contents", [])]
        own = []
        for key in (k for k in keys if k.endswith(".parquet")):
            if own_key(key, self.prefix):
                own.append(key)
            elif key not in self._foreign:
                self._foreign.add(key)
                logger.warning("skipped s3://%s/%s: not an object of this archive", self.bucket, key)
        yield from sorted(own, key=lambda k: (_part(k, "day"), k))

    def foreign_files(self) -> list[str]:
        return sorted(f"s3://{self.bucket}/{key}" for key in self._foreign)

    def _groups(self) -> Iterator[tuple[str, str, str, list[str]]]:
        """(data type, day, key id, object keys): one subject's (or person's) objects of a type and day."""
        parts = lambda k: (_part(k, "data_type"), _part(k, "day"), _key_of(k))  # noqa: E731
        for (data_type, day, key_id), keys in groupby(self._keys(), parts):
            yield data_type, day, key_id, list(keys)

    def _readable(self, key: str) -> pa.Table | None:
        """The object's rows; None when its subject's key was destroyed (nothing readable is left).

        :raises KeyServiceError: the key service failed: the object is whole, and left out it would go unnamed
        :raises _Unopenable: the object does not open (overwritten, cut, altered)
        """
        try:
            return self._read_versioned(key)[0]
        except KeyringError:
            return None

    def _read_versioned(self, key: str) -> tuple[pa.Table, str]:
        """The object's rows and the ETag of the version read (for a conditional replace)."""
        got = self._call("read", lambda: self._s3.get_object(Bucket=self.bucket, Key=key))
        body = self._call("read", got["Body"].read)
        return open_object(key, body, decryption_properties(self.keyring, _key_of(key))), got["ETag"]

    def _stand_in(self, key: str, exc: _Unopenable) -> Segment:
        """What an object that does not open holds, as far as its key says, with a payload no key opens.

        Counts, erasure and expiry see it under its subject and day; a reader gets a decryption failure
        and names it (the segment id is the object's key), where leaving it out would lose its records
        without a word, and one unreadable object stopped every read, report and erasure of the archive.
        Which kinds it held is unknown: it stands as the first kind of its data type, so a read of every
        kind (a report reads them one by one) names it once.
        """
        if key not in self._unopenable:
            self._unopenable.add(key)
            logger.warning("%s", exc)
        subject_ref, user_ref = _refs(_key_of(key))
        data_type = _part(key, "data_type")
        day = datetime.strptime(_part(key, "day"), "%Y-%m-%d").replace(tzinfo=UTC)
        return Segment(
            segment_id=key,
            subject_ref=subject_ref,
            user_ref=user_ref,
            data_type=data_type,
            kind=next(k.name for k in KINDS.values() if k.data_type == data_type),
            key_version=self.keyring.live_version(subject_ref, user_ref) or 0,
            min_observed_at=day,
            max_observed_at=day + timedelta(days=1) - timedelta(microseconds=1),
            n_records=0,
            payload=NEVER_OPENS,
        )

    def _put(
        self,
        key: str,
        table: pa.Table,
        *,
        if_match: str | None = None,
        key_version: int | None = None,
        retry_conflict: bool = False,
    ) -> bool:
        """Write an object only if absent, or only over the version ``if_match``; False if that lost a race
        (or met another write under way: a rewrite or compaction the next pass does again).

        :raises KeyringError: ``key_version`` is not the subject's live data key version (see :class:`KeyringKms`)
        :raises StoreUnavailable: with ``retry_conflict`` (a segment's own object, nothing else writes it later),
            S3 answered with a conflict (409): retry
        """
        footer_key = _key_of(key)  # subject_ref~user_ref: whose key wraps it
        properties = _factory(self.keyring, key_version).file_encryption_properties(
            pe.KmsConnectionConfig(),
            pe.EncryptionConfiguration(footer_key=footer_key, uniform_encryption=True, double_wrapping=False),
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, encryption_properties=properties, compression="zstd")
        body = sink.getvalue().to_pybytes()
        n_segments = len(pc.unique(table.column("_segment_id")))
        metadata = {"segments": str(n_segments), "records": str(table.num_rows)}
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        put = functools.partial(self._s3.put_object, Bucket=self.bucket, Key=key, Body=body, Metadata=metadata)
        try:
            self._call("write", lambda: put(**condition))
        except StoreError as exc:
            code = _code(exc)
            if code in _LOST_RACE or (not retry_conflict and code in _CONFLICT):  # the next pass tries again
                return False
            if code in _CONFLICT:  # not written: taken for a replay, the segment would never reach the archive
                raise StoreUnavailable(f"{exc}; another write to the object was under way") from exc
            raise
        return True

    def _drop(self, key: str) -> Removed:
        head = self._call("delete", lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
        counts = head.get("Metadata", {})
        self._delete(key)
        return Removed(int(counts.get("segments", 0)), int(counts.get("records", 0)), (f"s3://{self.bucket}/{key}",))

    def _delete(self, key: str) -> None:
        self._call("delete", lambda: self._s3.delete_object(Bucket=self.bucket, Key=key))
        self._forget_versions(key)

    @functools.cached_property
    def _versioned(self) -> bool:
        """Whether the bucket keeps versions (enabled now, or suspended with some kept): asked on the first delete."""
        answer = self._call("delete", lambda: self._s3.get_bucket_versioning(Bucket=self.bucket))
        return answer.get("Status") in ("Enabled", "Suspended")

    def _forget_versions(self, prefix: str) -> None:
        """Delete every noncurrent version and delete marker of the objects under ``prefix`` (one object's
        key, or the archive's); the current ones stay, so a write that lands meanwhile is never lost. In a
        versioned bucket a delete or a rewrite leaves the old data as a noncurrent version, still readable
        with the live data key. Expiry and erasure sweep the whole archive so: a delete whose own sweep
        failed left versions that no listing of current objects shows again."""
        if not self._versioned:
            return
        pages = self._s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in self._call("delete", lambda: list(pages)):
            for version in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if not version["IsLatest"]:
                    self._call(
                        "delete",
                        functools.partial(
                            self._s3.delete_object,
                            Bucket=self.bucket,
                            Key=version["Key"],
                            VersionId=version["VersionId"],
                        ),
                    )

    def _keep(self, key: str, keep: Callable[[pa.Table], pa.Array]) -> Removed:
        """Rewrite an object with the rows ``keep`` selects (delete it when none are left).

        The rewrite replaces only the version read; one that changed meanwhile (a
        compaction) is left for the next pass.
        """
        try:
            table, etag = self._read_versioned(key)
        except KeyringError:  # crypto-shredded: expiry by day or the subject's erasure drops it whole
            return Removed()
        except _Unopenable as exc:  # its rows cannot be chosen: expiry by day or an erasure drops it whole
            logger.warning("%s: left as it is", exc)
            return Removed()
        mask = keep(table)
        kept = table.filter(mask)
        if kept.num_rows == table.num_rows:
            return Removed()
        if kept.num_rows == 0:
            return self._drop(key)
        gone = table.filter(pc.invert(mask))
        if not self._put(key, kept, if_match=etag):
            return Removed()
        self._forget_versions(key)  # the version read still holds the rows gone
        return Removed(len(pc.unique(gone.column("_segment_id"))), gone.num_rows)

    # -- the Store protocol --------------------------------------------------------------

    def write(self, segments: Sequence[Segment]) -> int:
        def put(s: Segment) -> bool:  # False: a replay, already there
            key = self._key(s.data_type, _day(s), _key_id(s.subject_ref, s.user_ref), s.segment_id)
            return self._put(key, _rows(self.keyring, s), retry_conflict=True)

        unique = list({s.segment_id: s for s in segments}.values())
        if len(unique) == 1:
            return int(put(unique[0]))
        with ThreadPoolExecutor(min(PUT_THREADS, len(unique)), thread_name_prefix="archive-put") as pool:
            return sum(pool.map(put, unique))  # S3 answers each PUT in tens of ms: send them side by side

    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        def held() -> Iterator[Segment]:
            seen: set[str] = set()  # a segment in its own object and a compacted one: once
            for key in self._keys(data_type):
                if not _owned(key, subject_ref, user_ref):
                    continue
                try:
                    table = read_listed(key, self._readable)
                except _Unopenable as exc:
                    stand_in = self._stand_in(key, exc)
                    if not kind or stand_in.kind == kind:
                        yield stand_in if with_payload else stand_in.header()
                    continue
                for segment in _segments(self.keyring, table) if table is not None else ():
                    if segment.segment_id in seen or (kind and segment.kind != kind):
                        continue
                    seen.add(segment.segment_id)
                    yield segment if with_payload else segment.header()

        # objects are listed day by day; the day of a segment is that of its newest record
        return oldest_first(held(), _day, lambda s: (s.min_observed_at, s.segment_id))

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        ids = pa.array(list(segment_ids), pa.string())
        removed = Removed()
        for key in self._keys():
            removed += self._keep(key, lambda t: pc.invert(pc.is_in(t.column("_segment_id"), ids)))
        return removed

    def expire(self, data_type: str, before: datetime) -> Removed:
        self._forget_versions(self._base(data_type))
        removed = Removed()
        for key in self._keys(data_type):
            start = datetime.strptime(_part(key, "day"), "%Y-%m-%d").replace(tzinfo=UTC)
            if start >= before:
                break
            if start <= before - timedelta(days=1):  # every segment in it is older than the limit
                removed += self._drop(key)
            else:
                removed += self._keep(key, lambda t: _segment_max_at_least(t, before))
        return removed

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        self._forget_versions(self._base())
        removed = Removed()
        deleted: list[str] = []
        with noting_deleted(deleted):
            for key in self._keys():
                if _owned(key, subject_ref, user_ref):
                    # named first: a DELETE whose answer was lost deleted all the same, and a resumed erasure
                    # no longer lists the object (one whose DELETE failed is listed, and deleted, again)
                    deleted.append(f"s3://{self.bucket}/{key}")
                    removed += self._drop(key)
                elif user_ref is not None and _key_of(key) == subject_ref:
                    removed += self._erase_rows(key, user_ref)
        return removed

    def _erase_rows(self, key: str, user_ref: str) -> Removed:
        """A first-release object (every user's rows of a day, under the account's key) less one user's rows,
        as that release erased a user; the user's key does not shred them.

        :raises StoreUnavailable: the object changed as its rows were erased (a compaction): erase again
        """

        def users(table: pa.Table) -> pa.ChunkedArray:
            return pc.fill_null(pc.equal(table.column("_user_ref"), user_ref), False)

        removed = self._keep(key, lambda table: pc.invert(users(table)))
        if removed.records:
            return removed
        try:
            left = self._readable(key)
        except _Unopenable as exc:  # her rows cannot be told from the others': it goes whole, none of it readable
            logger.warning("%s: deleted whole by a person's erasure", exc)
            return self._drop(key)
        if left is not None and pc.any(users(left)).as_py():
            raise StoreUnavailable(f"s3://{self.bucket}/{key} changed as a user's rows were erased from it; retry")
        return removed

    def compact(self, closed_before: datetime, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        """Merge each subject's objects of every day closed before ``closed_before`` into one object.

        Segments stay as they are (rows keep their segment id), so ``merge`` is not used
        and nothing is reported as merged away.
        """
        closed = closed_before.astimezone(UTC).strftime("%Y-%m-%d")
        for data_type, day, key_id, keys in self._groups():
            if day < closed and keys != [self._key(data_type, day, key_id)]:
                self._compact_day(data_type, day, key_id, keys)
        return Removed()

    def _compact_day(self, data_type: str, day: str, key_id: str, keys: list[str]) -> None:
        try:
            self._merge_day(data_type, day, key_id, keys)
        except StoreError as exc:
            if _code(exc) != "NoSuchKey":
                raise
            # an object listed is gone: another compactor or an erasure is at this day; the next pass retries

    def _merge_day(self, data_type: str, day: str, key_id: str, keys: list[str]) -> None:
        try:  # what it reads opens under this version or not at all: the merge is put under it or not at all
            live, _cipher = self.keyring.cipher(*_refs(key_id), create=False)
        except (KeyringError, UnknownAccountError):  # shredded: left for the erasure or expiry that drops it whole
            return
        target = self._key(data_type, day, key_id)
        base: pa.Table | None = None
        etag: str | None = None
        if target in keys:
            try:
                base, etag = self._read_versioned(target)
            except KeyringError:  # shredded: left for the erasure or expiry that drops it whole
                return
            except _Unopenable as exc:  # no merge may replace it: left, named, for expiry or an erasure
                logger.warning("%s: its day is not compacted", exc)
                return
        tables, merged_keys = [base] if base is not None else [], []
        present = set(base.column("_segment_id").to_pylist()) if base is not None else set()
        for key in keys:
            if key == target:
                continue
            try:
                table = self._readable(key)
            except _Unopenable as exc:  # left as it is, named; the rest of the day is merged
                logger.warning("%s: left out of its day's compaction", exc)
                continue
            if table is None:  # shredded: left for the erasure or expiry that drops it whole
                continue
            fresh = table.filter(pc.invert(pc.is_in(table.column("_segment_id"), pa.array(present, pa.string()))))
            present.update(fresh.column("_segment_id").to_pylist())
            tables.append(fresh)
            merged_keys.append(key)
        try:
            put = bool(merged_keys) and self._put(
                target, pa.concat_tables(tables, promote_options="default"), if_match=etag, key_version=live
            )
        except KeyringError:  # shredded since it was read: the erasure that did it deletes the objects
            return
        if not put:
            return  # another compactor or a rewrite got there first: the next pass tries again
        self._forget_versions(target)
        for key in merged_keys:
            self._delete(key)

    def close(self) -> None:
        self._s3.close()


def _key_id(subject_ref: str, user_ref: str | None) -> str:
    return f"{subject_ref}~{user_ref or '-'}"


def _refs(key_id: str) -> tuple[str, str | None]:
    subject_ref, _, user_ref = key_id.partition("~")
    return subject_ref, None if user_ref in ("", "-") else user_ref


def open_object(key: str, body: bytes, properties: Any) -> pa.Table:
    """The rows of the object ``key`` read as ``body``, opened with ``properties`` (:func:`decryption_properties`).

    :raises KeyringError: it was written under a data key version since destroyed (crypto-shredded)
    :raises StoreError: it does not open (overwritten, cut, its wrapped key altered), or is not what this store
        writes there: its footer in clear (anyone may write that), another layout, or rows of another subject
        (an object copied under this one's name, which would hide this one's rows and be nobody's to erase)
    """
    try:
        if body[-4:] != _ENCRYPTED_FOOTER:
            raise _NotOurs("its footer is not encrypted: not an object this store wrote")
        table = pq.read_table(pa.BufferReader(body), decryption_properties=properties)
        _check_layout(key, table)
    except (OSError, pa.ArrowException, _Altered, _NotOurs) as exc:  # ArrowInvalid: not Parquet (cut)
        raise _Unopenable(f"archive object {key} does not open: {first_line(exc)}") from exc
    return table


#: the last bytes of a Parquet file whose footer is encrypted (``PAR1`` ends one in clear)
_ENCRYPTED_FOOTER = b"PARE"


def _check_layout(key: str, table: pa.Table) -> None:
    """Refuse rows that are not this store's, or not of the subject (and person) the object's name gives.

    :raises _NotOurs: naming what is wrong
    """
    missing = {"_segment_id", "_subject_ref", "_user_ref", "kind"} - set(table.column_names)
    if missing:
        raise _NotOurs(f"not this store's layout: no column {', '.join(sorted(missing))}")
    kinds = set(pc.unique(table.column("kind")).to_pylist())
    for kind in kinds:
        spec = KINDS.get(kind) if isinstance(kind, str) else None
        if spec is None or spec.data_type != _part(key, "data_type"):
            raise _NotOurs(f"rows of kind {str(kind)[:40]!r}, not one of its data type")
    key_id = _key_of(key)
    subject_ref, user_ref = _refs(key_id)
    subjects = table.column("_subject_ref")
    if pc.any(pc.fill_null(pc.not_equal(subjects, subject_ref), True)).as_py():
        raise _NotOurs("rows of another subject than its name gives")
    users = table.column("_user_ref")
    if "~" in key_id and (  # a first-release object (subject_ref.parquet) holds every person's rows of its subject
        pc.any(pc.is_valid(users)).as_py()
        if user_ref is None
        else pc.any(pc.fill_null(pc.not_equal(users, user_ref), True)).as_py()
    ):
        raise _NotOurs("rows of another person than its name gives")


def read_listed(key: str, read: Callable[[str], _T]) -> _T | None:
    """``read`` of a listed object. When it is gone since the listing (a retention pass in another process
    merged it), ``read`` of its day's merged object, which holds its rows; None when that is gone too
    (expired, erased). ``read`` raises botocore's error, or this store's with it as the cause."""
    for name in dict.fromkeys((key, merged_key(key))):
        try:
            return read(name)
        except (ClientError, StoreError) as exc:
            if (_code(exc) if isinstance(exc, StoreError) else error_code(exc)) != "NoSuchKey":
                raise
    return None


def merged_key(key: str) -> str:
    """The key of the object compaction merges an object's day (of its subject and type) into."""
    return f"{key.rsplit('/', 1)[0]}/{_key_of(key)}.parquet"


def _key_of(key: str) -> str:
    """``subject_ref~user_ref`` of an object: whose data key wraps it."""
    return key.rsplit("/", 1)[1].split(".", 1)[0]


def _code(exc: StoreError) -> str:
    return error_code(exc.__cause__) if exc.__cause__ is not None else ""


def _owned(key: str, subject_ref: str | None, user_ref: str | None) -> bool:
    """Whether an object holds data of ``subject_ref`` (every person of it, or only ``user_ref``)."""
    subject, user = _refs(_key_of(key))
    return (subject_ref is None or subject == subject_ref) and (user_ref is None or user == user_ref)


def _day(segment: Segment) -> str:
    return segment.max_observed_at.astimezone(UTC).strftime("%Y-%m-%d")


def own_key(key: str, prefix: str) -> bool:
    """Whether ``key`` (under the archive's ``prefix``) names one of its objects; another is a foreign file."""
    return bool(_OWN_KEY.fullmatch(key.removeprefix(f"{prefix}/" if prefix else ""))) and _valid_parts(key)


def _valid_parts(key: str) -> bool:
    """Whether an object's data type is one of the records' and its day a date (``day=2026-19-40`` is not)."""
    try:
        datetime.strptime(_part(key, "day"), "%Y-%m-%d")
    except ValueError:
        return False
    return _part(key, "data_type") in {kind.data_type for kind in KINDS.values()}


def _part(key: str, name: str) -> str:
    for part in key.split("/"):
        if part.startswith(f"{name}="):
            return part[len(name) + 1 :]
    raise StoreError(f"archive object {key} is not under {name}=…/")


def _rows(keyring: Keyring, segment: Segment) -> pa.Table:
    """A segment's records with the columns that bring the segment back."""
    table = open_segment(keyring, segment)
    n = table.num_rows
    extra = [
        pa.array([segment.segment_id] * n, pa.string()),
        pa.array([segment.user_ref] * n, pa.string()),
        pa.array([segment.subject_ref] * n, pa.string()),
    ]
    return pa.Table.from_arrays(table.columns + extra, schema=pa.schema([*table.schema, *SEGMENT_COLUMNS]))


def _segments(keyring: Keyring, table: pa.Table) -> Iterator[Segment]:
    """The segments an object holds, sealed again under the subject's current key."""
    ids = table.column("_segment_id")
    for segment_id in pc.unique(ids).to_pylist():
        rows = table.filter(pc.equal(ids, segment_id))
        kind = KINDS[rows.column("kind")[0].as_py()]
        # a field added since an object was written reads as null, as ingest fills it for an older cluster
        columns = [
            rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
            for f in kind.schema
        ]
        records = pa.Table.from_arrays(columns, schema=kind.schema)
        yield seal(
            keyring,
            rows.column("_subject_ref")[0].as_py(),
            rows.column("_user_ref")[0].as_py(),
            records,
            segment_id=segment_id,
        )


def _segment_max_at_least(table: pa.Table, moment: datetime) -> pa.Array:
    """Rows of segments whose newest record is at or after ``moment`` (the rest are past the limit)."""
    ids = table.column("_segment_id")
    grouped = table.group_by("_segment_id").aggregate([("observed_at", "max")])
    newest = grouped.column("observed_at_max")
    young = grouped.filter(pc.greater_equal(newest, pa.scalar(moment, newest.type)))
    return pc.is_in(ids, young.column("_segment_id"))
