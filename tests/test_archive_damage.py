"""An archive object changed behind the pipeline's back (overwritten, cut, its wrapped key altered, written in
clear, another subject's copied under its name): named by every read, never taken for a crypto-shredded one or
for the subject's, and never a reason an erasure or a retention pass stops (r29, r31)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import boto3
import dask.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_record, run

from pipeline.retention.requests import file_request, get_request, process_pending
from pipeline.runtime import Pipeline, seal_records
from pipeline.stores.archive import decryption_properties


def _overwritten(body: bytes, url: str) -> bytes:
    return b"not parquet"


def _key_altered(body: bytes, url: str) -> bytes:
    """One character of the object's wrapped data key changed (the Parquet footer stays whole)."""
    at = body.index(b'wrappedDEK":"') + len(b'wrappedDEK":"1:')
    return body[:at] + (b"N" if body[at : at + 1] != b"N" else b"O") + body[at + 1 :]


def _version_never_issued(body: bytes, url: str) -> bytes:
    """The data key version its wrapped keys name, edited to one the keyring never issued (r31)."""
    return body.replace(b'wrappedDEK":"1:', b'wrappedDEK":"9:')


def _in_clear(body: bytes, url: str) -> bytes:
    """Its very rows, as Parquet with no encryption: what anyone who may put objects can write (r31)."""
    table = pq.read_table(pa.BufferReader(body), decryption_properties=decryption_properties(Pipeline.open().keyring))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


def _another_subjects(body: bytes, url: str) -> bytes:
    """Another subject's object, copied under this one's name: it opens with that subject's key (r31)."""
    return next(other for other in _objects(url).values() if other != body)


DAMAGE = pytest.mark.parametrize(
    "damage",
    [_overwritten, _key_altered, _version_never_issued, _in_clear, _another_subjects],
    ids=["overwritten", "wrapped key altered", "version never issued", "in clear", "another subject's"],
)


def _objects(url: str) -> dict[str, bytes]:
    s3, bucket = boto3.client("s3"), urlparse(url).netloc
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


@pytest.fixture
def archived(home: Path, s3_archive_url: str) -> Pipeline:
    """ann's and globex's records of three days ago, each day's objects compacted into one per subject."""
    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        pipeline = Pipeline.open(create=True)
    day = datetime.now(UTC) - timedelta(days=3)
    for minute in range(3):
        pipeline.write_records([make_record(account="acme", user="ann", observed_at=day + timedelta(minutes=minute))])
        pipeline.write_records([make_record(account="globex", observed_at=day + timedelta(minutes=minute))])
    pipeline.stores["archive"].compact(datetime.now(UTC) - timedelta(days=1), lambda segments: None)
    return pipeline


def _damage(url: str, whose: str, damage: Callable[[bytes, str], bytes]) -> str:
    """The key of the first archive object of ``whose`` (a subject or user ref), now damaged."""
    key = min(k for k in _objects(url) if whose in k)
    body = boto3.client("s3").get_object(Bucket=urlparse(url).netloc, Key=key)["Body"].read()
    boto3.client("s3").put_object(Bucket=urlparse(url).netloc, Key=key, Body=damage(body, url))
    return key


@DAMAGE
def test_a_damaged_object_is_named_by_the_report_which_shows_everything_else(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path, damage: Callable[[bytes, str], bytes]
) -> None:
    """Overwritten, it stopped the report (exit 2, no file); its key altered, it was taken for shredded: the
    report passed, its three records gone without a word."""
    key = _damage(s3_archive_url, archived.subject_ref("globex"), damage)
    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        result = run("report", "--out", str(tmp_path), "--format", "json")
    assert result.exit_code == 1, result.output
    assert f"unreadable segment {key} in archive" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [u["segment_id"] for u in report["unreadable_segments"]] == [key]
    archive = {r["data_type"]: r["records"] for r in report["inventory"] if r["store"] == "archive"}
    assert archive["cluster_jobs"] == 3  # ann's, read; globex's three are in the object that does not open


@DAMAGE
def test_a_damaged_object_of_the_subject_never_stops_her_erasure(
    archived: Pipeline, s3_archive_url: str, damage: Callable[[bytes, str], bytes]
) -> None:
    """The erasure counted what each store held by reading it: one object of hers that did not open failed the
    request, before her key was destroyed, on every retry; her other objects stayed readable."""
    acme, ann = archived.subject_ref("acme"), archived.keyring.user_ref("acme", "ann")
    key = _damage(s3_archive_url, ann, damage)
    archived.write_records([make_record(account="acme", user="ann")])  # today's object, whole
    request = file_request(archived, "acme", "ann")
    process_pending(archived)
    done = get_request(archived, request.request_id)
    assert done.state == "completed", done.error
    assert f"s3://{urlparse(s3_archive_url).netloc}/{key}" in done.receipt["stores"]["archive"]["deleted"]
    listed = boto3.client("s3").list_objects_v2(Bucket=urlparse(s3_archive_url).netloc)["Contents"]
    assert [o["Key"] for o in listed if ann in o["Key"]] == []
    assert archived.keyring.key_state(acme, ann) == "destroyed"


def test_a_retention_pass_leaves_a_damaged_object_and_compacts_the_rest_of_its_day(
    archived: Pipeline, s3_archive_url: str
) -> None:
    """A compaction meeting an object that does not open failed the whole retention pass."""
    key = _damage(s3_archive_url, archived.subject_ref("globex"), _overwritten)
    day = datetime.now(UTC) - timedelta(days=2)
    archived.write_records([make_record(account="globex", observed_at=day + timedelta(minutes=m)) for m in (0, 1)])
    archived.write_records([make_record(account="globex", observed_at=day + timedelta(minutes=2))])
    archive = archived.stores["archive"]
    archive.compact(datetime.now(UTC) - timedelta(days=1), lambda segments: None)
    s3, bucket = boto3.client("s3"), urlparse(s3_archive_url).netloc
    globex = [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if archived.subject_ref("globex") in o["Key"]
    ]
    assert key in globex and len(globex) == 2  # the damaged day as it was; the other day merged into one object
    assert sum(s.n_records for s in archive.scan(subject_ref=archived.subject_ref("globex"))) == 3


def test_a_damaged_object_the_first_release_wrote_goes_whole_in_a_persons_erasure(
    archived: Pipeline, s3_archive_url: str
) -> None:
    """That release's object holds every person's rows of an account's day under the account's key: one that did
    not open failed each of the account's user erasures, before her key was destroyed (r31)."""
    from pipeline.stores.archive import _rows

    archive, keyring = archived.stores["archive"], archived.keyring
    acme, ann = keyring.subject_ref("acme"), keyring.user_ref("acme", "ann")
    day = datetime.now(UTC) - timedelta(days=5)
    seal_records(keyring, [make_record(account="acme", observed_at=day)])  # the account's key: that release's only
    segments = seal_records(keyring, [make_record(account="acme", user=u, observed_at=day) for u in ("ann", "bob")])
    legacy = archive._key(segments[0].data_type, f"{day:%Y-%m-%d}", acme)  # <account ref>.parquet
    assert archive._put(legacy, pa.concat_tables([_rows(keyring, s) for s in segments]))
    boto3.client("s3").put_object(Bucket=urlparse(s3_archive_url).netloc, Key=legacy, Body=b"not parquet")
    request = file_request(archived, "acme", "ann")
    process_pending(archived)
    done = get_request(archived, request.request_id)
    assert done.state == "completed", done.error
    assert f"s3://{urlparse(s3_archive_url).netloc}/{legacy}" in done.receipt["stores"]["archive"]["deleted"]
    assert legacy not in _objects(s3_archive_url)
    assert keyring.key_state(acme, ann) == "destroyed"


def test_an_object_whose_data_type_or_day_is_none_of_the_stores_is_foreign_never_a_traceback(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path
) -> None:
    """A key the layout pattern matches, under ``data_type=bogus`` or ``day=2026-19-40``, was read: the report
    stopped on a traceback (r31). It is listed as a file of another layout, never read, merged or deleted."""
    s3, bucket = boto3.client("s3"), urlparse(s3_archive_url).netloc
    globex = min(k for k in _objects(s3_archive_url) if archived.subject_ref("globex") in k)
    prefix, name = globex.split("/data_type=")[0], globex.rsplit("/", 1)[1]
    odd = [f"{prefix}/data_type=bogus/day=2026-12-01/{name}", f"{prefix}/data_type=cluster_jobs/day=2026-19-40/{name}"]
    for key in odd:
        s3.put_object(Bucket=bucket, Key=key, Body=b"not parquet")
    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        result = run("report", "--out", str(tmp_path), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(f["path"] for f in report["foreign_files"]) == sorted(f"s3://{bucket}/{key}" for key in odd)
