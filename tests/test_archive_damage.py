"""An archive object changed behind the pipeline's back (overwritten, cut, its wrapped key altered): named by
every read, never taken for a crypto-shredded one, and never a reason an erasure or a retention pass stops (r29)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import boto3
import dask.config
import pytest
from conftest import make_record, run

from pipeline.retention.requests import file_request, get_request, process_pending
from pipeline.runtime import Pipeline


def _overwritten(body: bytes) -> bytes:
    return b"not parquet"


def _key_altered(body: bytes) -> bytes:
    """One character of the object's wrapped data key changed (the Parquet footer stays whole)."""
    at = body.index(b'wrappedDEK":"') + len(b'wrappedDEK":"1:')
    return body[:at] + (b"N" if body[at : at + 1] != b"N" else b"O") + body[at + 1 :]


DAMAGE = pytest.mark.parametrize("damage", [_overwritten, _key_altered], ids=["overwritten", "wrapped key altered"])


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


def _damage(url: str, whose: str, damage: Callable[[bytes], bytes]) -> str:
    """The key of the first archive object of ``whose`` (a subject or user ref), now damaged."""
    s3, bucket = boto3.client("s3"), urlparse(url).netloc
    key = min(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if whose in o["Key"])
    s3.put_object(Bucket=bucket, Key=key, Body=damage(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
    return key


@DAMAGE
def test_a_damaged_object_is_named_by_the_report_which_shows_everything_else(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path, damage: Callable[[bytes], bytes]
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
    archived: Pipeline, s3_archive_url: str, damage: Callable[[bytes], bytes]
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
