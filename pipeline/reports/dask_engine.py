"""``report --engine dask``: the record sections over the S3 Parquet archive, computed on a Dask cluster.

The client (on the control-plane host, with the keyring) lists the archive's objects
(``PREFIX/data_type=T/day=D/<subject_ref>~<user_ref>[.<segment_id>].parquet``) and groups
them by data type, day and key id: a subject's per-segment objects and its compacted one
alike. Each group goes to a worker with the one data key that opens it. The worker reads
the objects with :func:`~pipeline.stores.archive.decryption_properties`, keeps each segment
once, reduces the records with :class:`ReportDB` as a local report does, and hands back the
small tables; the client adds them up and computes every section. Deletion requests and
the audit trail come from the control plane's database, as in a local report.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import ConfigError, KeyringError, StoreError
from pipeline.keys import Keyring
from pipeline.records import utcnow
from pipeline.redact import first_line
from pipeline.reports.collect import Bounds, Found, assemble, bounds_at, to_slice
from pipeline.reports.model import Report
from pipeline.reports.queries import ReportDB, slice_schema
from pipeline.retention.policy import Policy
from pipeline.retention.schedule import since_last_pass
from pipeline.runtime import Pipeline, Unreadable
from pipeline.stores.archive import decryption_properties, open_object, own_key, read_listed
from pipeline.stores.base import url_options

__all__ = ["ARCHIVE", "DataKeys", "build_archive_report"]

#: the store the Dask engine reports on
ARCHIVE = "archive"


@dataclasses.dataclass(frozen=True)
class DataKeys:
    """Data keys by key id (user_ref, else subject_ref): all a worker holds to open a group's objects.

    Stands in for the keyring in :class:`~pipeline.stores.archive.KeyringKms` (which calls
    :meth:`cipher_for`, and the other two to tell a shredded object from an altered one): no master
    key, no database, no other subject's key.
    """

    keys: dict[str, tuple[int, bytes]]

    def live_version(self, subject_ref: str, user_ref: str | None = None) -> int | None:
        held = self.keys.get(user_ref or subject_ref)
        return None if held is None else held[0]

    def key_issued(self, subject_ref: str, user_ref: str | None = None) -> bool:
        """A key this worker was not sent is no key of the group's objects: one naming it was altered."""
        return (user_ref or subject_ref) in self.keys

    def cipher_for(self, subject_ref: str, user_ref: str | None, key_version: int) -> AESGCM:
        key_id = user_ref or subject_ref
        version, key = self.keys.get(key_id, (0, b""))
        if version != key_version:
            raise KeyringError(f"data key version {key_version} of subject {key_id[:12]}… was destroyed")
        return AESGCM(key)


@dataclasses.dataclass(frozen=True)
class Group:
    """One subject's (or person's) objects of one data type and day, and the key that opens them."""

    bucket: str
    options: tuple[tuple[str, str], ...]  # endpoint / region of the archive URL
    data_type: str
    objects: tuple[str, ...]
    key_id: str  # subject_ref~user_ref
    subject: int
    data_key: tuple[int, bytes]


@dataclasses.dataclass
class Part:
    """What a worker hands back for one group."""

    tables: dict[str, pa.Table]
    unreadable: list[Unreadable]
    account: str | None


def build_archive_report(
    pipeline: Pipeline, scheduler: str, *, now: datetime | None = None, show_names: bool = False, plots: bool = True
) -> Report:
    """The report over the archive, its records reduced on the Dask cluster at ``scheduler``.

    :raises ConfigError: no archive is configured, or the scheduler cannot be reached
    :raises StoreError: a worker cannot read the archive (its S3 credentials or endpoint)
    """
    from distributed import Client, as_completed

    if ARCHIVE not in pipeline.stores:
        raise ConfigError("report --engine dask reads the S3 archive: set pipeline.archive.url")
    now = now or utcnow()
    policy = dataclasses.replace(pipeline.policy, retention={ARCHIVE: pipeline.policy.retention[ARCHIVE]})
    found = Found(names={} if show_names else None)
    try:
        client = Client(scheduler)
    except (OSError, ValueError) as exc:  # refused, timed out, or not an address
        raise ConfigError(f"Dask scheduler {scheduler} cannot be reached: {first_line(exc)}") from exc
    grace = since_last_pass(pipeline.settings.retention_cron, now)
    with ReportDB(policy, now, folder=pipeline.settings.home, usage_store=ARCHIVE, grace=grace) as db, client:
        groups = list(_groups(pipeline, found))
        reduce = functools.partial(
            _reduce, policy=policy, now=now, grace=grace, bounds=bounds_at(now), names=show_names
        )
        futures = client.map(reduce, groups, pure=False)
        group_of = dict(zip(futures, groups, strict=True))
        for future in as_completed(futures):
            group = group_of.pop(future)
            try:
                part: Part = future.result()
            except (BotoCoreError, ClientError) as exc:  # the worker's S3 credentials or endpoint
                raise StoreError(f"a Dask worker could not read {group.objects[0]}: {first_line(exc)}") from exc
            except Exception as exc:  # e.g. a worker with another release of the pipeline installed
                raise ConfigError(
                    f"a Dask worker failed on {group.objects[0]}: {type(exc).__name__}: {first_line(exc)} "
                    "(are the workers running this release of metadata-pipeline?)"
                ) from exc
            db.add_partials(part.tables)
            found.unreadable += part.unreadable
            if found.names is not None and part.account is not None:
                found.names.setdefault(group.key_id.partition("~")[0], part.account)
            future.release()
        return assemble(pipeline, db, now, found, plots=plots, stores={ARCHIVE})


def _groups(pipeline: Pipeline, found: Found) -> Iterator[Group]:
    """The archive's objects by data type, day and key id, each with its live data key (shredded: left out)."""
    import boto3

    store: Any = pipeline.stores[ARCHIVE]
    parsed, options = url_options(store.url, ("endpoint", "region"), "s3://BUCKET/PREFIX")
    s3 = boto3.client("s3", endpoint_url=options.get("endpoint"), region_name=options.get("region"))
    prefix = parsed.path.strip("/")
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=parsed.netloc, Prefix=f"{prefix}/" if prefix else ""
    ):
        for entry in page.get("Contents", []):
            key = entry["Key"]
            if not own_key(key, prefix):  # as the store lists it: never read, counted or named unreadable
                if key.endswith(".parquet"):
                    found.foreign_files.append((ARCHIVE, f"s3://{parsed.netloc}/{key}"))
                continue
            parts = key.removeprefix(f"{prefix}/").split("/")
            key_id = parts[2].split(".", 1)[0]
            grouped.setdefault((parts[0].removeprefix("data_type="), parts[1], key_id), []).append(key)
    s3.close()
    for (data_type, _day, key_id), objects in sorted(grouped.items()):
        subject_ref, _, user = key_id.partition("~")
        try:
            data_key = pipeline.keyring.data_key(subject_ref, None if user in ("", "-") else user)
        except KeyringError:
            continue  # crypto-shredded: unreadable on purpose, as in a local report
        yield Group(
            parsed.netloc,
            tuple(sorted(options.items())),
            data_type,
            tuple(sorted(objects)),
            key_id,
            found.subject(subject_ref),
            data_key,
        )


@functools.cache
def _s3(options: tuple[tuple[str, str], ...]) -> Any:
    import boto3

    given = dict(options)
    return boto3.client("s3", endpoint_url=given.get("endpoint"), region_name=given.get("region"))


def _reduce(group: Group, *, policy: Policy, now: datetime, grace: timedelta, bounds: Bounds, names: bool) -> Part:
    """On a worker: open a group's objects, keep each segment once, reduce them as a local report does."""
    subject_ref, _, user = group.key_id.partition("~")
    keys = DataKeys({(user if user not in ("", "-") else subject_ref): group.data_key})
    properties = decryption_properties(cast(Keyring, keys), group.key_id)  # KeyringKms calls only what DataKeys has
    unreadable: list[Unreadable] = []
    tables: list[pa.Table] = []
    seen = pa.array([], pa.string())
    s3 = _s3(group.options)  # one client for the group's objects
    for key in group.objects:
        body = read_listed(key, lambda name: bytes(s3.get_object(Bucket=group.bucket, Key=name)["Body"].read()))
        if body is None:  # expired or erased since the listing
            continue
        try:
            table = open_object(key, body, properties)
        except KeyringError:
            continue  # written under a destroyed key version: shredded
        except StoreError as exc:  # not Parquet (a truncated object), or its key altered
            unreadable.append(Unreadable(ARCHIVE, key, str(exc)))
            continue
        table = table.filter(pc.invert(pc.is_in(table.column("_segment_id"), seen)))  # kept once (compaction)
        seen = pa.concat_arrays([seen, pc.unique(table.column("_segment_id"))])
        tables.append(table)
    account = None
    with ReportDB(
        policy, now, in_memory=True, usage_store=ARCHIVE, grace=grace
    ) as db:  # nothing decrypted on a worker's disk
        if tables:
            rows = pa.concat_tables(tables, promote_options="default")
            db.add_headers([(ARCHIVE, group.data_type, len(seen), rows.num_rows)])
            for kind in pc.unique(rows.column("kind")).to_pylist():
                records = rows.filter(pc.equal(rows.column("kind"), kind))
                schema = slice_schema(kind, usage=True)
                part, bad = to_slice(records, schema, group.subject, bounds)
                if bad:
                    ids, segments = records.column("record_id").to_pylist(), records.column("_segment_id").to_pylist()
                    unreadable += [Unreadable(ARCHIVE, segments[row], why, ids[row]) for row, why in bad.items()]
                db.add_slice(ARCHIVE, kind, pa.RecordBatchReader.from_batches(schema, part.to_batches()))
                if names and part.num_rows:
                    account = records.column("account")[0].as_py()
        return Part(db.partials(), unreadable, account)
