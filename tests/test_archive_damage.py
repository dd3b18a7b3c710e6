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


def _first_release_object(archived: Pipeline, without: list[str] | None = None) -> str:
    """The key of an object as the first release wrote it: a day of acme's, ann's and bob's rows together under
    the account's key, named ``<account ref>.parquet`` (less the columns ``without``, fields added since)."""
    from pipeline.stores.archive import _rows

    archive, keyring = archived.stores["archive"], archived.keyring
    day = datetime.now(UTC) - timedelta(days=5)
    seal_records(keyring, [make_record(account="acme", observed_at=day)])  # the account's key: that release's only
    segments = seal_records(keyring, [make_record(account="acme", user=u, observed_at=day) for u in ("ann", "bob")])
    legacy = archive._key(segments[0].data_type, f"{day:%Y-%m-%d}", keyring.subject_ref("acme"))
    assert archive._put(legacy, pa.concat_tables([_rows(keyring, s) for s in segments]).drop_columns(without or []))
    return legacy


def test_a_damaged_object_the_first_release_wrote_goes_whole_in_a_persons_erasure(
    archived: Pipeline, s3_archive_url: str
) -> None:
    """That release's object holds every person's rows of an account's day under the account's key: one that did
    not open failed each of the account's user erasures, before her key was destroyed (r31)."""
    keyring = archived.keyring
    acme, ann = keyring.subject_ref("acme"), keyring.user_ref("acme", "ann")
    legacy = _first_release_object(archived)
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


def _report(url: str, tmp_path: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    with dask.config.set({"pipeline.archive.url": url}):
        result = run("report", "--out", str(tmp_path), "--format", "json")
    return result.exit_code, json.loads((tmp_path / "report.json").read_text())


def _put_body(url: str, key: str, body: bytes) -> None:
    boto3.client("s3").put_object(Bucket=urlparse(url).netloc, Key=key, Body=body)


def test_an_object_relabelled_with_a_shredded_subjects_key_id_is_named_not_taken_for_shredded(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path
) -> None:
    """The key id its footer names is in clear: edited to an erased subject's, the object passed for shredded
    and its records went unnamed (r33)."""
    day = datetime.now(UTC) - timedelta(days=3)
    archived.write_records([make_record(account="acme", observed_at=day)])  # acme's own object: ref~-
    archived.stores["archive"].compact(datetime.now(UTC) - timedelta(days=1), lambda segments: None)
    acme, globex = archived.subject_ref("acme"), archived.subject_ref("globex")
    archived.keyring.destroy(globex)
    key = min(k for k in _objects(s3_archive_url) if f"{acme}~-" in k)
    _put_body(s3_archive_url, key, _objects(s3_archive_url)[key].replace(f"{acme}~-".encode(), f"{globex}~-".encode()))
    status, report = _report(s3_archive_url, tmp_path)
    assert status == 1 and [u["segment_id"] for u in report["unreadable_segments"]] == [key]


def test_a_live_object_whose_version_was_edited_down_to_a_destroyed_one_is_named(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path
) -> None:
    """After ann's erasure a record of hers made key version 2; her object's wrapped keys edited to name version
    1, destroyed, made it pass for shredded (r33). It still opens under the live key: named."""
    ann = archived.keyring.user_ref("acme", "ann")
    file_request(archived, "acme", "ann")
    process_pending(archived)
    archived.write_records([make_record(account="acme", user="ann")])
    key = min(k for k in _objects(s3_archive_url) if ann in k)
    _put_body(s3_archive_url, key, _objects(s3_archive_url)[key].replace(b'wrappedDEK":"2:', b'wrappedDEK":"1:'))
    status, report = _report(s3_archive_url, tmp_path)
    assert status == 1 and [u["segment_id"] for u in report["unreadable_segments"]] == [key]


def test_a_backup_of_an_erased_accounts_object_is_shredded_though_a_user_of_it_has_a_key_since(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path
) -> None:
    """The account's own key destroyed, then a record of its user made her a key: the account "active" by its
    users' keys, a restored copy of the account's object was named as altered on every report (r33)."""
    globex = archived.subject_ref("globex")
    backup = {k: v for k, v in _objects(s3_archive_url).items() if globex in k}
    file_request(archived, "globex")
    process_pending(archived)
    archived.write_records([make_record(account="globex", user="gil")])
    for key, body in backup.items():
        _put_body(s3_archive_url, key, body)
    status, report = _report(s3_archive_url, tmp_path)
    assert status == 0 and report["unreadable_segments"] == []


def test_an_object_written_before_later_fields_reads_them_as_null_and_a_persons_erasure_keeps_the_rest(
    archived: Pipeline, s3_archive_url: str
) -> None:
    """A first-release object lacks the fields added since (a snapshot's jobs_running): refused as another
    layout, it went whole in ann's erasure, the account's and bob's rows with it (r33)."""
    from pipeline.records import rows_from_table
    from pipeline.segments import open_segment

    archive, keyring = archived.stores["archive"], archived.keyring
    acme, ann = keyring.subject_ref("acme"), keyring.user_ref("acme", "ann")
    _first_release_object(archived, without=["jobs_running"])
    assert archive.erase(acme, ann).records == 1 + 3  # her row in it, and her own three of the fixture
    left = [r for s in archive.scan(subject_ref=acme) for r in rows_from_table(open_segment(keyring, s))]
    assert [(r["user"], r["jobs_running"]) for r in left] == [("bob", None)]


def test_an_object_under_a_key_id_never_issued_is_named_not_a_stopped_report(
    archived: Pipeline, s3_archive_url: str, tmp_path: Path
) -> None:
    """A copy under a made-up key id, in its name and its footer alike: the keyring's "unknown account" escaped
    every read, and the report stopped, exit 2 (r34)."""
    globex = archived.subject_ref("globex")
    key, body = min((k, v) for k, v in _objects(s3_archive_url).items() if globex in k)
    planted = key.replace(globex, "ab" * 32)
    _put_body(s3_archive_url, planted, body.replace(globex.encode(), b"ab" * 32))
    status, report = _report(s3_archive_url, tmp_path)
    assert status == 1 and [u["segment_id"] for u in report["unreadable_segments"]] == [planted]
