"""The S3 Parquet archive over moto's server (real HTTP): layout, readers, crypto-shredding.

The behaviour suite (test_stores.py) covers write/scan/expire/erase; these tests
cover what only the archive promises.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_record
from faultproxy import FaultProxy

from pipeline.errors import ConfigError, KeyringError, StoreUnavailable
from pipeline.records import rows_from_table
from pipeline.runtime import seal_records
from pipeline.segments import open_segment
from pipeline.stores import open_store
from pipeline.stores.archive import decryption_properties

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _objects(url: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    bucket = urlparse(url).netloc
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _write(url: str, keyring, records):  # noqa: ANN001, ANN202
    store = open_store(url, keyring=keyring)
    store.write(seal_records(keyring, records))
    return store


def test_a_write_puts_objects_of_its_own_and_compaction_one_per_type_day_and_subject(s3_archive_url, keyring) -> None:  # noqa: ANN001
    records = [
        make_record(kind, account=account, user="ann@example.com", observed_at=T0 + timedelta(days=d, minutes=m))
        for account in ("Acme Corp", "Globex")
        for d in (0, 1)
        for m in (0, 1)
        for kind in ("cluster_snapshot", "job")
    ]
    store = _write(s3_archive_url, keyring, records)
    acme, ann = keyring.subject_ref("Acme Corp"), keyring.user_ref("Acme Corp", "ann@example.com")
    written = sorted(k for k in _objects(s3_archive_url) if acme in k)
    assert len(written) == 4  # one per segment (kind), each named after it
    assert all(
        k.startswith("metadata/data_type=cluster_jobs/day=2026-01-0") and f"/{acme}~{ann}." in k for k in written
    )
    before = sorted(s.segment_id for s in store.scan())
    store.compact(datetime(2026, 1, 3, tzinfo=UTC), lambda segments: None)
    objects = _objects(s3_archive_url)
    assert sorted(k for k in objects if acme in k) == [
        f"metadata/data_type=cluster_jobs/day=2026-01-01/{acme}~{ann}.parquet",
        f"metadata/data_type=cluster_jobs/day=2026-01-02/{acme}~{ann}.parquet",
    ]
    assert len(objects) == 4
    assert sorted(s.segment_id for s in store.scan()) == before
    for body in objects.values():  # footer and columns encrypted: no name, no schema in clear
        assert b"Acme Corp" not in body and b"ann@example.com" not in body and b"n_workers" not in body
        assert body[-4:] == b"PARE"  # Parquet with an encrypted footer


def test_two_writers_and_two_compactors_at_once_lose_nothing(s3_archive_url, keyring) -> None:  # noqa: ANN001
    batches = [
        seal_records(keyring, [make_record(observed_at=T0 + timedelta(minutes=w * 100 + b), n_workers=w * 100 + b)])
        for w in (0, 1)
        for b in range(15)
    ]
    stores = [open_store(s3_archive_url, keyring=keyring) for _ in range(4)]
    closed = datetime(2026, 1, 2, tzinfo=UTC)
    done = threading.Event()

    def writer(store, mine) -> None:  # noqa: ANN001
        for batch in mine:
            store.write(batch)

    def compactor(store) -> None:  # noqa: ANN001
        while not done.is_set():
            store.compact(closed, lambda segments: None)

    with ThreadPoolExecutor(4) as pool:
        compactors = [pool.submit(compactor, stores[c]) for c in (2, 3)]
        writers = [pool.submit(writer, stores[w], batches[w * 15 : (w + 1) * 15]) for w in (0, 1)]
        for future in writers:
            future.result()
        done.set()
        for future in compactors:
            future.result()
    stores[2].compact(closed, lambda segments: None)
    workers = sorted(r["n_workers"] for s in stores[0].scan() for r in rows_from_table(open_segment(keyring, s)))
    assert workers == sorted(w * 100 + b for w in (0, 1) for b in range(15))
    assert len(_objects(s3_archive_url)) == 1  # the closed day, compacted


def test_whoever_holds_the_keys_reads_the_records_with_pyarrow(s3_archive_url, keyring) -> None:  # noqa: ANN001
    _write(s3_archive_url, keyring, [make_record(observed_at=T0 + timedelta(minutes=i), n_workers=i) for i in range(3)])
    [body] = _objects(s3_archive_url).values()
    table = pq.read_table(pa.BufferReader(body), decryption_properties=decryption_properties(keyring))
    assert table.column("account").to_pylist() == ["acme"] * 3
    assert sorted(table.column("n_workers").to_pylist()) == [0, 1, 2]
    with pytest.raises(OSError, match="[Ee]ncrypt|[Dd]ecrypt"):
        pq.read_table(pa.BufferReader(body))


def test_a_destroyed_data_key_makes_every_copy_unreadable(s3_archive_url, keyring) -> None:  # noqa: ANN001
    _write(s3_archive_url, keyring, [make_record(observed_at=T0)])
    [backup] = _objects(s3_archive_url).values()  # a copy made before the erasure
    keyring.destroy(keyring.subject_ref("acme"))
    with pytest.raises((KeyringError, OSError), match="destroyed"):
        pq.read_table(pa.BufferReader(backup), decryption_properties=decryption_properties(keyring))


def test_a_shredded_object_is_skipped_by_scans_and_replaced_by_new_data(s3_archive_url, keyring) -> None:  # noqa: ANN001
    store = _write(
        s3_archive_url, keyring, [make_record(observed_at=T0), make_record(account="globex", observed_at=T0)]
    )
    acme = keyring.subject_ref("acme")
    keyring.destroy(acme)  # e.g. a restored backup of an erased subject's object
    assert [s.subject_ref for s in store.scan()] == [keyring.subject_ref("globex")]
    assert store.delete(["no-such-id"]).segments == 0  # rewrites pass it by
    assert store.write(seal_records(keyring, [make_record(observed_at=T0, n_workers=7)])) == 1  # a new key
    assert [s.n_records for s in store.scan(subject_ref=acme)] == [1]


def test_erasing_one_person_shreds_only_their_objects_even_in_copies(s3_archive_url, keyring) -> None:  # noqa: ANN001
    records = [make_record(user=u, observed_at=T0, n_workers=i) for i, u in enumerate(("ann", "bob"))]
    store = _write(s3_archive_url, keyring, records)
    acme, ann = keyring.subject_ref("acme"), keyring.user_ref("acme", "ann")
    backup = {k: v for k, v in _objects(s3_archive_url).items() if f"~{ann}." in k}
    assert store.erase(acme, ann).records == 1
    keyring.destroy(acme, ann)
    assert [s.user_ref for s in store.scan()] == [keyring.user_ref("acme", "bob")]
    [copy] = backup.values()
    with pytest.raises(KeyringError, match="destroyed"):
        pq.read_table(pa.BufferReader(copy), decryption_properties=decryption_properties(keyring))


def test_erasing_a_subject_deletes_its_objects_and_names_them(s3_archive_url, keyring) -> None:  # noqa: ANN001
    records = [make_record(account=a, observed_at=T0 + timedelta(days=d)) for a in ("acme", "globex") for d in (0, 1)]
    store = _write(s3_archive_url, keyring, records)
    acme = keyring.subject_ref("acme")
    before = {k for k in _objects(s3_archive_url) if acme in k}
    removed = store.erase(acme)
    assert (removed.segments, removed.records) == (2, 2)
    bucket = urlparse(s3_archive_url).netloc
    assert set(removed.places) == {f"s3://{bucket}/{k}" for k in before}
    assert [k for k in _objects(s3_archive_url) if acme in k] == []
    assert len(_objects(s3_archive_url)) == 2


def test_an_object_whose_delete_answer_was_lost_is_named_by_the_erasure(s3_archive_url, keyring) -> None:  # noqa: ANN001
    """S3 deleted it, the answer never came back; the erasure resumed no longer listed it, so its receipt
    named every object but that one."""
    records = [make_record(account="acme", observed_at=T0 + timedelta(days=d)) for d in (0, 1)]
    _write(s3_archive_url, keyring, records)
    acme = keyring.subject_ref("acme")
    bucket, endpoint = urlparse(s3_archive_url).netloc, parse_qs(urlparse(s3_archive_url).query)["endpoint"][0]
    named = {f"s3://{bucket}/{k}" for k in _objects(s3_archive_url) if acme in k}
    proxy = FaultProxy(urlparse(endpoint).port or 80)
    try:
        proxy.fail("DELETE", times=20, forwarded=True)  # every attempt of botocore's retries
        store = open_store(s3_archive_url.replace(endpoint, f"http://127.0.0.1:{proxy.port}"), keyring=keyring)
        with pytest.raises(StoreUnavailable) as cut:
            store.erase(acme)
    finally:
        proxy.close()
    assert len([k for k in _objects(s3_archive_url) if acme in k]) == 1  # the first went all the same
    resumed = open_store(s3_archive_url, keyring=keyring).erase(acme)
    assert set(cut.value.deleted) | set(resumed.places) == named


def test_a_write_s3_answers_with_a_conflict_is_retried_not_taken_as_written(s3_archive_url, keyring) -> None:  # noqa: ANN001
    """S3 answers 409 ConditionalRequestConflict when another conditional write to the key is under way, and
    says to retry; it was taken for 412 (the object exists), and the segment never reached the archive."""
    segments = seal_records(keyring, [make_record(account="acme", observed_at=T0)])
    endpoint = parse_qs(urlparse(s3_archive_url).query)["endpoint"][0]
    proxy = FaultProxy(urlparse(endpoint).port or 80)
    try:
        proxy.fail("PUT", status=409, code="ConditionalRequestConflict")
        store = open_store(s3_archive_url.replace(endpoint, f"http://127.0.0.1:{proxy.port}"), keyring=keyring)
        with pytest.raises(StoreUnavailable, match="ConditionalRequestConflict"):
            store.write(segments)
        assert not _objects(s3_archive_url)
        assert store.write(segments) == 1  # the retry
    finally:
        proxy.close()
    assert len(_objects(s3_archive_url)) == 1


def test_a_parquet_file_of_another_layout_is_skipped_and_listed_never_a_reason_to_stop(s3_archive_url, keyring) -> None:  # noqa: ANN001
    """A summary a query engine wrote beside the partitions failed every scan, compaction and erasure of the
    archive ("is not under day=…/"): an erasure stayed failed, its subject's objects kept."""
    records = [make_record(account="acme", user="ann", observed_at=T0 + timedelta(minutes=m)) for m in (0, 1, 2)]
    store = _write(s3_archive_url, keyring, records[:1])
    store.write(seal_records(keyring, records[1:2]))
    store.write(seal_records(keyring, records[2:]))
    bucket = urlparse(s3_archive_url).netloc
    stray, body = ["metadata/summary.parquet", "metadata/data_type=cluster_jobs/day=2026-01-01/part-0.parquet"], b"PAR1"
    for key in stray:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)
    assert len(list(store.scan())) == 3
    store.compact(T0 + timedelta(days=2), lambda segments: None)
    assert len([k for k in _objects(s3_archive_url) if keyring.subject_ref("acme") in k]) == 1  # merged
    assert store.erase(keyring.subject_ref("acme")).records == 3
    assert store.foreign_files() == sorted(f"s3://{bucket}/{key}" for key in stray)
    assert _objects(s3_archive_url) == dict.fromkeys(stray, body)  # left in place


def test_an_object_the_first_release_named_by_its_subject_alone_is_read_and_erased(s3_archive_url, keyring) -> None:  # noqa: ANN001
    """``<subject_ref>.parquet``, with no user part: taken for a foreign file by the layout check, its records
    were left out of scans and reports, and an erasure of the account left the object in the bucket."""
    store = _write(
        s3_archive_url, keyring, [make_record(account="acme", observed_at=T0 + timedelta(minutes=m)) for m in (0, 1)]
    )
    s3, bucket, acme = boto3.client("s3"), urlparse(s3_archive_url).netloc, keyring.subject_ref("acme")
    [key] = _objects(s3_archive_url)
    legacy = f"{key.rsplit('/', 1)[0]}/{acme}.parquet"
    s3.copy_object(Bucket=bucket, Key=legacy, CopySource={"Bucket": bucket, "Key": key})
    s3.delete_object(Bucket=bucket, Key=key)
    store = open_store(s3_archive_url, keyring=keyring)
    assert sum(s.n_records for s in store.scan()) == 2 and store.foreign_files() == []
    assert store.erase(acme).records == 2
    assert not _objects(s3_archive_url)


def test_a_users_erasure_takes_her_rows_out_of_an_object_the_first_release_wrote(s3_archive_url, keyring) -> None:  # noqa: ANN001
    """That release kept a day's records of every user in one object under the account's key: named by the
    account alone, it matched no user's erasure, and her rows stayed readable once her key was destroyed."""
    from pipeline.stores.archive import _rows

    store = open_store(s3_archive_url, keyring=keyring)
    acme, ann = keyring.subject_ref("acme"), keyring.user_ref("acme", "ann")
    seal_records(keyring, [make_record(account="acme", observed_at=T0)])  # the account's key: that release's only
    segments = seal_records(keyring, [make_record(account="acme", user=u, observed_at=T0) for u in ("ann", "bob")])
    legacy = store._key(segments[0].data_type, f"{T0:%Y-%m-%d}", acme)  # <account ref>.parquet
    assert store._put(legacy, pa.concat_tables([_rows(keyring, s) for s in segments]))
    assert store.erase(acme, ann).records == 1
    left = [r["user"] for s in store.scan(subject_ref=acme) for r in rows_from_table(open_segment(keyring, s))]
    assert left == ["bob"]


def test_a_compaction_meeting_another_write_under_way_leaves_the_day_to_the_next_pass(
    s3_archive_url, keyring, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """S3's 409 on the day's merged object (another compactor's write under way) is a lost race, as before;
    only a segment's own object, which nothing writes later, is retried (503)."""
    endpoint = parse_qs(urlparse(s3_archive_url).query)["endpoint"][0]
    for m in (0, 1):
        _write(s3_archive_url, keyring, [make_record(account="acme", observed_at=T0 + timedelta(minutes=m))])
    before = sorted(_objects(s3_archive_url))
    proxy = FaultProxy(urlparse(endpoint).port or 80)
    try:
        proxy.fail("PUT", status=409, code="ConditionalRequestConflict")
        store = open_store(s3_archive_url.replace(endpoint, f"http://127.0.0.1:{proxy.port}"), keyring=keyring)
        store.compact(T0 + timedelta(days=2), lambda segments: None)  # no error: the next pass merges
    finally:
        proxy.close()
    assert sorted(_objects(s3_archive_url)) == before
    open_store(s3_archive_url, keyring=keyring).compact(T0 + timedelta(days=2), lambda segments: None)
    assert len(_objects(s3_archive_url)) == 1


def _versions(url: str) -> dict[str, list[bytes]]:
    """Every version of every object in the bucket (noncurrent ones too), by key."""
    s3 = boto3.client("s3")
    bucket = urlparse(url).netloc
    found: dict[str, list[bytes]] = {}
    for version in s3.list_object_versions(Bucket=bucket).get("Versions", []):
        body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
        found.setdefault(version["Key"], []).append(body)
    return found


def _readable_rows(keyring, versions: dict[str, list[bytes]], account: str) -> int:  # noqa: ANN001
    """Rows of ``account`` that any version still gives whoever holds the live keys."""
    rows = 0
    for key, bodies in versions.items():
        if keyring.subject_ref(account) in key:
            for body in bodies:
                rows += pq.read_table(
                    pa.BufferReader(body), decryption_properties=decryption_properties(keyring)
                ).num_rows
    return rows


def test_a_versioned_bucket_keeps_no_old_version_of_what_expiry_rewrites_or_erasure_deletes(
    s3_archive_url, keyring
) -> None:  # noqa: ANN001
    """S3 keeps a deleted or replaced object as a noncurrent version: rows expired or erased would stay
    readable with the live key."""
    boto3.client("s3").put_bucket_versioning(
        Bucket=urlparse(s3_archive_url).netloc, VersioningConfiguration={"Status": "Enabled"}
    )
    records = [
        make_record("cluster_snapshot", account=account, observed_at=T0 + timedelta(days=d, hours=h))
        for account in ("acme", "globex")
        for d in (0, 1, 2)
        for h in (0, 12)
    ]
    store = _write(s3_archive_url, keyring, records)
    store.compact(T0 + timedelta(days=5), lambda segments: None)  # one object a day and subject, rewritten
    assert _readable_rows(keyring, _versions(s3_archive_url), "acme") == 6  # compaction forgot the pieces

    store.expire("cluster_jobs", T0 + timedelta(days=1, hours=6))  # day 0 dropped, day 1 rewritten
    assert _readable_rows(keyring, _versions(s3_archive_url), "globex") == 3
    store.erase(keyring.subject_ref("acme"))
    assert _readable_rows(keyring, _versions(s3_archive_url), "acme") == 0
    assert (
        sorted(r["account"] for s in store.scan() for r in rows_from_table(open_segment(keyring, s))) == ["globex"] * 3
    )


@pytest.mark.parametrize("step", ["expire", "erase"])
def test_versions_a_failed_cleanup_left_are_found_by_the_next_expiry_or_erasure(
    s3_archive_url,
    keyring,
    step: str,  # noqa: ANN001
) -> None:
    """A delete whose sweep of old versions failed (S3 away in between) left the object as a delete marker
    over a noncurrent version: no listing of current objects showed it again, its rows stayed readable with
    the live key for good, and later passes reported PASS."""
    bucket = urlparse(s3_archive_url).netloc
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store = _write(s3_archive_url, keyring, [make_record(account="acme", observed_at=T0)])
    for key in _objects(s3_archive_url):
        s3.delete_object(Bucket=bucket, Key=key)  # the delete marker landed; the version sweep did not
    assert _readable_rows(keyring, _versions(s3_archive_url), "acme") == 1
    if step == "expire":  # a later pass, with nothing of its own to expire
        store.expire("cluster_jobs", T0 - timedelta(days=30))
    else:  # an erasure of someone else
        store.erase(keyring.subject_ref("globex"))
    assert _versions(s3_archive_url) == {}


@pytest.mark.parametrize(
    ("url", "module", "backend", "extra"),
    [
        ("s3://bucket/prefix", "boto3", "pipeline.stores.archive", "aws"),
        ("gcp-logging://proj-1", "google.cloud.logging_v2", "pipeline.stores.cloud_logging", "gcp"),
    ],
)
def test_a_missing_dependency_names_the_extra(monkeypatch, url, module, backend, extra) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, backend, raising=False)
    with pytest.raises(ConfigError, match=rf"pipeline.x.url: .*pip install 'dask-metadata-pipeline\[{extra}\]'"):
        open_store(url, setting="pipeline.x.url")


def test_without_a_keyring_or_with_an_unknown_option_is_one_clear_error(s3_archive_url, keyring) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="pipeline.archive.url: the 's3' backend .* needs the keyring"):
        open_store(s3_archive_url, setting="pipeline.archive.url")
    with pytest.raises(ConfigError, match="unknown option 'endpont'") as refused:
        open_store("s3://AKIAEXAMPLE:s3cr3t@bucket/p?endpont=http://x", keyring=keyring)
    assert "s3cr3t" not in str(refused.value) and "AKIAEXAMPLE:***@bucket" in str(refused.value)


def test_a_throttled_request_without_a_body_is_store_unavailable(aws, keyring) -> None:  # noqa: ANN001
    """S3 answers a throttled HEAD with 503 and no body, so botocore's code is "503", not "SlowDown":
    that was a refusal (StoreError), and an erasure touching it failed rather than waited."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Throttled(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Throttled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = open_store(f"s3://bucket/p?endpoint=http://127.0.0.1:{server.server_port}", keyring=keyring)
        with pytest.raises(StoreUnavailable, match="unavailable during"):
            store.write(seal_records(keyring, [make_record(observed_at=T0)]))
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_endpoint_is_store_unavailable(aws, keyring) -> None:  # noqa: ANN001
    store = open_store("s3://bucket/p?endpoint=http://127.0.0.1:9", keyring=keyring)
    with pytest.raises(StoreUnavailable, match="unreachable during"):
        store.write(seal_records(keyring, [make_record(observed_at=T0)]))


def test_a_scan_that_listed_objects_a_compaction_merged_since_reads_the_merged_one(
    s3_archive_url, keyring, monkeypatch
) -> None:  # noqa: ANN001
    """A report listing the archive while a retention pass compacted it read a merged-away object: NoSuchKey,
    and the report ended (exit 2)."""
    store = _write(s3_archive_url, keyring, [make_record(account="acme", observed_at=T0)])
    _write(s3_archive_url, keyring, [make_record(account="acme", observed_at=T0 + timedelta(minutes=5))])
    listed = list(store._keys())
    store.compact(T0 + timedelta(days=2), lambda segments: None)
    assert len(_objects(s3_archive_url)) == 1 < len(listed)
    monkeypatch.setattr(store, "_keys", lambda data_type=None: iter(listed))  # as listed before the compaction
    assert sorted(s.n_records for s in store.scan()) == [1, 1]  # each segment once
