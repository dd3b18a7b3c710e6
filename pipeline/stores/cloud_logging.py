"""Logging store in Google Cloud Logging (``gcp-logging://PROJECT?bucket=B&location=L``).

Each segment is one or more structured log entries: pseudonymous labels only
(subject ref, user ref, data type, kind, segment id) and a JSON payload holding
the sealed segment in base64, split into chunks below Cloud Logging's 256 KB
entry limit. The service sets three rules, and the store follows them:

* **Deleted log names stay deleted.** ``logs.delete`` also removes entries that
  arrive later with a timestamp before the delete. So every segment has a log of
  its own, ``metadata-pipeline.<subject_ref>.<day>.<segment_id>`` (the day of its
  newest record): removing a segment deletes its log and nothing else, and the
  only entries ever sent to a deleted name again are that segment's (a replay of
  what was meant to go).
* **Listings lag behind writes.** Nothing written depends on what a listing
  shows: an entry's ``insertId`` (segment id and chunk) and timestamp make a
  replay a duplicate the service drops, and :meth:`scan` drops any copy left.
* **``logs.delete`` reaches the ``_Default`` bucket only.** By default the
  entries go to a bucket of the pipeline's own (``bucket=metadata-pipeline``),
  which :meth:`set_up` (``metadata-pipeline init``) creates through
  ConfigServiceV2 with the policy's retention, a sink that routes only this
  store's logs into it and an exclusion that keeps them out of ``_Default``.
  There, entries cannot be deleted: the bucket's retention expires them by whole
  days, and an erasure is crypto-shredding (the subject's key is destroyed) plus
  that expiry, which :meth:`erase` reports with the moment by which the last entry goes.
  With ``bucket=_Default`` the store deletes logs itself, exactly.

Each pass, :meth:`apply_retention` brings the bucket's retention in line with the
policy, unless the bucket holds other logs (``_Default``, or one another sink
routes into): that is never changed, and the pass reports FAIL naming it.

Every list filter carries an explicit timestamp range: the client otherwise
adds a 24-hour window of its own. Entries are stamped with the segment's
newest record time. Options in the URL query: ``bucket`` (default
``metadata-pipeline``), ``location`` (``global``), ``endpoint`` (REST base
URL, e.g. an emulator's ``http://127.0.0.1:8080``) and ``config-endpoint``
(``HOST:PORT`` of a plaintext gRPC ConfigServiceV2); either endpoint makes the
client anonymous.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud.logging_v2 import Client

from pipeline.bounds import CLOCK_SKEW
from pipeline.errors import ConfigError, StoreError, StoreUnavailable
from pipeline.redact import first_line, mask_url
from pipeline.segments import Segment
from pipeline.stores.base import Removed, Store, noting_deleted, oldest_first, url_options
from pipeline.stores.log_bucket import LogBucketConfig, guarded

__all__ = ["CloudLoggingStore"]

LOG_PREFIX = "metadata-pipeline"
#: the bucket of the pipeline's own, and the name of its sink and its exclusion on _Default
OWN_BUCKET = "metadata-pipeline"
#: base64 of a sealed segment per entry: well below the 256 KB entry limit with labels
CHUNK = 180_000
#: one entries.write request stays below the API's 10 MB limit
BATCH_BYTES = 8_000_000
PAGE_SIZE = 1000
#: a listing that spends the project's read quota (60 entries.list a minute) waits this long for it to
#: refill before it gives up: a minute's worth, so a subject of a million entries is listed at the quota's
#: pace rather than started over by every attempt
QUOTA_WAIT = 65.0
#: Cloud Logging keeps entries at most 3650 days and refuses ones more than a day ahead
_OLDEST = timedelta(days=3651)
_AHEAD = timedelta(days=2)
_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
_T = TypeVar("_T")


class CloudLoggingStore(Store):
    """Encrypted segments as structured entries in Google Cloud Logging."""

    def __init__(self, url: str) -> None:
        form = "gcp-logging://PROJECT?bucket=B&location=L[&endpoint=URL&config-endpoint=HOST:PORT]"
        parsed, query = url_options(url, ("bucket", "location", "endpoint", "config-endpoint"), form)
        if not parsed.netloc or parsed.path not in ("", "/"):
            raise ConfigError(f"store URL must be {form}, got {mask_url(url)!r}")
        self.url = url
        self.project = parsed.netloc
        self.location = f"projects/{self.project}/locations/{query.get('location', 'global')}"
        self.bucket_id = query.get("bucket", OWN_BUCKET)
        self.bucket = f"{self.location}/buckets/{self.bucket_id}"
        #: what the sink routes into the bucket and the exclusion keeps out of _Default: this store's logs only
        self.log_filter = f'logName:"projects/{self.project}/logs/{LOG_PREFIX}."'
        endpoint, config_endpoint = query.get("endpoint"), query.get("config-endpoint")
        self._bucket = LogBucketConfig(self.bucket, self.log_filter, config_endpoint)
        #: logs.delete removes entries only in _Default; elsewhere the bucket's retention does
        self.deletes = self._bucket.is_default
        # a project's listing reads _Default; a bucket of its own is read through its view
        self._read_from = f"projects/{self.project}" if self.deletes else f"{self.bucket}/views/_AllLogs"
        self._bucket_found = self.deletes  # _Default always exists; a bucket of its own is looked up once
        self._resource = {"type": "global", "labels": {"project_id": self.project}}
        anonymous = {"credentials": AnonymousCredentials()} if endpoint or config_endpoint else {}
        options = {"api_endpoint": endpoint} if endpoint else None
        try:
            self._client = Client(project=self.project, client_options=options, _use_grpc=False, **anonymous)
        except DefaultCredentialsError as exc:
            raise ConfigError(f"Cloud Logging {self.project}: no Google credentials: {first_line(exc)}") from exc

    # -- calls, with errors mapped at the boundary ---------------------------------------

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        return guarded(f"Cloud Logging {self.project}", action, fn)

    def _require_bucket(self) -> None:
        if not self._bucket_found:
            self._bucket.require()
            self._bucket_found = True

    def _list(self, action: str, clauses: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Entries matching every clause, oldest first, as the API's JSON."""
        self._require_bucket()
        now = datetime.now(UTC)
        filter_ = " AND ".join(
            [*clauses, f'timestamp>="{_stamp(now - _OLDEST)}"', f'timestamp<="{_stamp(now + _AHEAD)}"']
        )
        api = self._client.logging_api
        token: str | None = None
        while True:
            body: dict[str, Any] = {
                "resourceNames": [self._read_from],
                "filter": filter_,
                "orderBy": "timestamp asc",
                "pageSize": PAGE_SIZE,
            }
            if token:
                body["pageToken"] = token
            page = self._page(
                action, functools.partial(api.api_request, method="POST", path="/entries:list", data=body)
            )
            yield from page.get("entries", [])
            token = page.get("nextPageToken")
            if not token:
                return

    def _page(self, action: str, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One page of a listing; a 429 (the read quota spent) is waited out, up to :data:`QUOTA_WAIT`."""
        waited, pause = 0.0, 0.25
        while True:
            try:
                return self._call(action, read)
            except StoreUnavailable as exc:
                if not isinstance(exc.__cause__, gexc.TooManyRequests) or waited >= QUOTA_WAIT:
                    raise
            time.sleep(pause)
            waited, pause = waited + pause, min(pause * 2, 8.0)

    def _write_entries(self, action: str, entries: Sequence[dict[str, Any]]) -> None:
        """One entries.write per batch below the request size limit; all-or-nothing per batch."""
        self._require_bucket()
        batches: list[list[dict[str, Any]]] = [[]]
        size = 0
        for entry in entries:
            length = len(entry["jsonPayload"]["sealed"]) + 1024
            if batches[-1] and size + length > BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(entry)
            size += length
        write = self._client.logging_api.write_entries
        for batch in filter(None, batches):
            self._call(action, functools.partial(write, batch, resource=self._resource, partial_success=False))

    def _delete_log(self, action: str, log_name: str) -> None:
        try:
            self._call(action, lambda: self._client.logging_api.logger_delete(log_name))
        except StoreError as exc:
            if not isinstance(exc.__cause__, gexc.NotFound):  # already gone: a rerun after a crash
                raise

    # -- entries <-> segments ------------------------------------------------------------

    def _log_name(self, segment: Segment) -> str:
        """One log per segment: deleting it removes that segment only, and no name is reused."""
        day = segment.max_observed_at.astimezone(UTC).strftime("%Y-%m-%d")
        return f"projects/{self.project}/logs/{LOG_PREFIX}.{segment.subject_ref}.{day}.{segment.segment_id}"

    def _entries(self, segment: Segment) -> list[dict[str, Any]]:
        sealed = base64.b64encode(segment.payload).decode()
        chunks = max(1, math.ceil(len(sealed) / CHUNK))
        labels = {
            "subject_ref": segment.subject_ref,
            "data_type": segment.data_type,
            "kind": segment.kind,
            "segment_id": segment.segment_id,
        }
        if segment.user_ref:
            labels["user_ref"] = segment.user_ref
        return [
            {
                "logName": self._log_name(segment),
                "insertId": f"{segment.segment_id}.{i}",
                "timestamp": _stamp(segment.max_observed_at),
                "severity": "INFO",
                "labels": labels,
                "jsonPayload": {
                    "key_version": segment.key_version,
                    "min_observed_at": _stamp(segment.min_observed_at),
                    "n_records": segment.n_records,
                    "chunk": i,
                    "chunks": chunks,
                    "sealed": sealed[i * CHUNK : (i + 1) * CHUNK],
                },
            }
            for i in range(chunks)
        ]

    def _segments(
        self, action: str, clauses: Sequence[str], with_payload: bool = True, *, every_copy: bool = False
    ) -> Iterator[_Held]:
        """Whole segments (chunks joined) oldest first, with their log.

        A copy left in a second log by a crashed rewrite is dropped, unless ``every_copy``
        (removals must reach every log that holds a segment).
        """
        seen: set[str] = set()
        parts: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)

        def whole() -> Iterator[_Held]:
            for entry in self._list(action, clauses):
                segment_id = entry["labels"]["segment_id"]
                if segment_id in seen and not every_copy:
                    continue
                payload, key = entry["jsonPayload"], (entry["logName"], segment_id)
                parts[key][int(payload["chunk"])] = entry
                if len(parts[key]) == int(payload["chunks"]):
                    seen.add(segment_id)
                    yield _held(parts.pop(key), with_payload)

        return oldest_first(whole(), lambda h: h.day, _order)

    # -- the Store protocol --------------------------------------------------------------

    def write(self, segments: Sequence[Segment]) -> int:
        """Write every entry: ``insertId`` and timestamp make a replay a duplicate the service drops.

        Nothing is listed: a listing lags behind writes, so it could not tell a replay anyway, and
        reads have a quota of their own (60 a minute per project by default) that ingest, one
        write per group commit, would spend and then fail on. So every segment sent counts as new.
        """
        unique = {s.segment_id: s for s in segments}
        if unique:
            self._write_entries("write", [e for s in unique.values() for e in self._entries(s)])
        return len(unique)

    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        for held in self._segments("scan", _clauses(subject_ref, user_ref, data_type, kind), with_payload):
            yield held.segment

    def _remove(self, action: str, doomed: Sequence[_Held]) -> Removed:
        """Remove segments (every copy) by deleting the logs they are in.

        A segment's log holds nothing else, so no survivor is read back or moved. A log
        shared by several segments (written by an earlier release) first has its other
        segments written to their own logs, names that were never deleted.
        """
        unique = {h.segment.segment_id: h.segment for h in doomed}
        deleted: list[str] = []
        with noting_deleted(deleted):
            for log_name in sorted({h.log for h in doomed}):
                if log_name.rsplit(".", 1)[1] not in unique:  # not one segment's own log
                    held = self._segments(action, [f'logName="{log_name}"'], every_copy=True)
                    kept = {h.segment.segment_id: h.segment for h in held if h.segment.segment_id not in unique}
                    self._write_entries(action, [e for s in kept.values() for e in self._entries(s)])
                self._delete_log(action, log_name)
                deleted.append(log_name)
        return Removed(len(unique), sum(s.n_records for s in unique.values()), tuple(deleted))

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        if not self.deletes:  # never called: straddling() gives nothing to cut there
            return Removed()
        doomed = [
            held
            for segment_id in dict.fromkeys(segment_ids)
            for held in self._segments("delete", [_label("segment_id", segment_id)], False, every_copy=True)
        ]
        return self._remove("delete", doomed)

    def expire(self, data_type: str, before: datetime) -> Removed:
        if not self.deletes:  # the bucket's retention expires entries, by whole days
            return Removed()
        # an entry's timestamp is its segment's newest record: older than ``before`` means past the limit
        clauses = [_label("data_type", data_type), f'timestamp<"{_stamp(before)}"']
        return self._remove("expire", list(self._segments("expire", clauses, False, every_copy=True)))

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        """Delete the subject's logs (``_Default``), or nothing (a bucket of its own, where nothing can be
        deleted: no listing); either way, some entries may stay until the bucket's retention.

        In a bucket of its own every entry stays, until now plus the clock skew ingest allows (no entry is
        newer) plus the bucket's retention. In ``_Default`` an entry written shortly before may not be listed
        yet, or not reached by ``logs.delete`` ("log entries written shortly before the delete operation
        might not be deleted", Google's reference). Such entries are unreadable once the key is destroyed,
        and gone by the moment given: the newest entry's time, or now plus the clock skew ingest allows
        (nothing listed late is newer), plus the bucket's retention.
        """
        retention = timedelta(days=self._bucket.retention_days())
        if not self.deletes:  # nothing to find: the caller counted the entries, none is newer than the bounds let in
            return Removed(expires_at=datetime.now(UTC) + CLOCK_SKEW + retention)
        held = list(self._segments("erase", _clauses(subject_ref, user_ref), False, every_copy=True))
        unique = {h.segment.segment_id: h.segment for h in held}
        removed = self._remove("erase", held)
        newest = max([datetime.now(UTC) + CLOCK_SKEW, *(s.max_observed_at for s in unique.values())])
        return dataclasses.replace(removed, expires_at=newest + retention)

    def straddling(self, data_type: str, at: datetime) -> Iterator[Segment]:
        if not self.deletes:  # the original could not be deleted: a cut copy would double its records
            return
        clauses = [_label("data_type", data_type), f'timestamp>="{_stamp(at)}"']
        for held in self._segments("scan", clauses):
            if held.segment.min_observed_at < at:
                yield held.segment

    def apply_retention(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        return self._bucket.apply_retention(limits)

    def set_up(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        return self._bucket.set_up(limits)

    def close(self) -> None:
        self._bucket.close()
        self._client.close()


@dataclass(frozen=True)
class _Held:
    """A segment read back, and the log its chunks are in."""

    segment: Segment
    log: str
    day: str


def _held(chunks: Mapping[int, Mapping[str, Any]], with_payload: bool) -> _Held:
    first = chunks[0]
    labels, payload = first["labels"], first["jsonPayload"]
    try:
        sealed = base64.b64decode("".join(chunks[i]["jsonPayload"]["sealed"] for i in sorted(chunks)))
        segment = Segment(
            segment_id=labels["segment_id"],
            subject_ref=labels["subject_ref"],
            user_ref=labels.get("user_ref"),
            data_type=labels["data_type"],
            kind=labels["kind"],
            key_version=int(payload["key_version"]),
            min_observed_at=_parse(payload["min_observed_at"]),
            max_observed_at=_parse(first["timestamp"]),
            n_records=int(payload["n_records"]),
            payload=sealed if with_payload else b"",
        )
    except (KeyError, ValueError) as exc:
        reason = first_line(exc)
        raise StoreError(f"log entry {first.get('insertId')!r} is not a segment of this store: {reason}") from exc
    return _Held(segment, first["logName"], first["timestamp"][:10])


def _order(held: _Held) -> tuple[datetime, str]:
    return held.segment.min_observed_at, held.segment.segment_id


def _label(name: str, value: str) -> str:
    return f'labels.{name}="{value}"'


def _clauses(
    subject_ref: str | None, user_ref: str | None, data_type: str | None = None, kind: str | None = None
) -> list[str]:
    values = {"subject_ref": subject_ref, "user_ref": user_ref, "data_type": data_type, "kind": kind}
    return [_label(name, value) for name, value in values.items() if value is not None]


def _by(segments: Sequence[Segment], key: Callable[[Segment], str]) -> dict[str, list[Segment]]:
    groups: dict[str, list[Segment]] = defaultdict(list)
    for segment in segments:
        groups[key(segment)].append(segment)
    return groups


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
