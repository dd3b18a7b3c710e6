"""The Cloud Logging store, with the real client, against the fakes on loopback.

The behaviour suite (test_stores.py) covers write/scan/expire/erase; these tests
cover what only this backend promises: what an entry reveals, chunking, the
explicit time range, logs deleted on erasure, a crash mid-rewrite, an outage,
and the bucket retention each pass reads, sets and audits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import dask.config
import pytest
from click.testing import CliRunner
from conftest import make_record
from google.auth.credentials import AnonymousCredentials
from google.cloud.logging_v2 import Client

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.errors import ConfigError, StoreUnavailable
from pipeline.records import rows_from_table, utcnow
from pipeline.reports.collect import build_report
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline, seal_records
from pipeline.segments import open_segment
from pipeline.stores import open_store
from pipeline.stores.cloud_logging import CloudLoggingStore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _project(url: str) -> str:
    return urlparse(url).netloc


def _mine(rest, url: str) -> list[dict]:  # noqa: ANN001
    project = _project(url)
    return [e for e in rest.entries if e["logName"].startswith(f"projects/{project}/")]


def test_entries_hold_only_refs_and_ciphertext(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    records = [make_record(account="Acme Corp", user="ann@example.com", image="registry.example/ann:1")]
    store.write(seal_records(keyring, records))
    entries = _mine(rest, gcp_logging_url)
    raw = json.dumps(entries)
    for clear in ("Acme Corp", "ann@example.com", "registry.example"):
        assert clear not in raw
    subject = keyring.subject_ref("Acme Corp")
    [entry] = entries
    assert entry["labels"] == {
        "subject_ref": subject,
        "user_ref": keyring.user_ref("Acme Corp", "ann@example.com"),
        "data_type": "cluster_jobs",
        "kind": "cluster_snapshot",
        "segment_id": entry["labels"]["segment_id"],
    }
    assert entry["resource"] == {"type": "global", "labels": {"project_id": _project(gcp_logging_url)}}
    assert entry["logName"].startswith(f"projects/{_project(gcp_logging_url)}/logs/metadata-pipeline.{subject}.")


def test_a_segment_larger_than_one_entry_is_split_and_joined(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    noise = [os.urandom(400).hex() for _ in range(800)]  # incompressible: ~650 KB sealed
    records = [make_record("software_env", observed_at=T0, packages={n: "1"}) for n in noise]
    [segment] = seal_records(keyring, records)
    assert store.write([segment]) == 1
    assert len(_mine(rest, gcp_logging_url)) >= 3  # each entry below the 256 KB limit the fake enforces
    [back] = store.scan()
    assert back.payload == segment.payload
    assert open_segment(keyring, back).num_rows == 800
    assert store.write([segment]) == 0


def test_every_list_call_sends_an_explicit_time_range(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    store.write(seal_records(keyring, [make_record(observed_at=T0)]))
    list(store.scan(kind="job"))
    store.expire("cluster_jobs", T0 + timedelta(days=1))
    project = _project(gcp_logging_url)
    filters = [
        body["filter"]
        for method, path, body in list(rest.requests)
        if path.startswith("/v2/entries:list") and body["resourceNames"] == [f"projects/{project}"]
    ]
    assert len(filters) >= 3
    assert all("timestamp>=" in f and "timestamp<=" in f for f in filters)
    # the client's own default is a 24 h window with no upper bound: the fake refuses it, as a guard
    client = Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": rest.endpoint},
        _use_grpc=False,
    )
    with pytest.raises(Exception, match="no explicit timestamp range"):
        list(client.list_entries(filter_='labels.kind="job"'))


def test_erasing_a_subject_deletes_its_logs(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    records = [make_record(account=a, observed_at=T0 + timedelta(days=d)) for a in ("acme", "globex") for d in (0, 1)]
    store.write(seal_records(keyring, records))
    acme, globex = keyring.subject_ref("acme"), keyring.subject_ref("globex")
    project = _project(gcp_logging_url)
    assert len([log for log in rest.logs(project) if acme in log]) == 2  # one log per subject and day
    assert store.erase(acme).segments == 2
    assert [log for log in rest.logs(project) if acme in log] == []
    assert len([log for log in rest.logs(project) if globex in log]) == 2
    deleted = [path for method, path, _ in rest.requests if method == "DELETE" and acme in path]
    assert len(deleted) == 2


def test_a_shared_log_of_an_earlier_release_loses_nothing_to_a_crash(
    gcp_fakes, gcp_logging_url, keyring, monkeypatch
) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    assert isinstance(store, CloudLoggingStore)
    acme = keyring.subject_ref("acme")
    records = [make_record(user=u, observed_at=T0, n_workers=i) for i, u in enumerate(("ann", "bob", "cy"))]
    shared = f"projects/{store.project}/logs/metadata-pipeline.{acme}.2026-01-01"
    with monkeypatch.context() as patch:  # an earlier release: one log per subject and day
        patch.setattr(store, "_log_name", lambda s: shared)
        store.write(seal_records(keyring, records))

    def crash(action: str, log_name: str) -> None:
        raise StoreUnavailable("injected crash before the old log is deleted")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_delete_log", crash)
        with pytest.raises(StoreUnavailable, match="injected crash"):
            store.erase(acme, keyring.user_ref("acme", "ann"))
    assert len(list(store.scan(subject_ref=acme))) == 3  # the shared log and the survivors' own: each once
    assert store.erase(acme, keyring.user_ref("acme", "ann")).segments == 1  # the rerun finishes the job
    assert _workers(store, keyring) == [1, 2]
    assert store.erase(acme).segments == 2
    assert [log for log in rest.logs(_project(gcp_logging_url)) if acme in log] == []


def test_an_unreachable_service_is_store_unavailable(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    segments = seal_records(keyring, [make_record()])
    rest.unavailable = True
    try:
        with pytest.raises(StoreUnavailable, match="unavailable during write"):
            store.write(segments)
    finally:
        rest.unavailable = False
    assert store.write(segments) == 1  # the same call, retried, writes it once
    closed = gcp_logging_url.replace(rest.endpoint, "http://127.0.0.1:9")
    with pytest.raises(StoreUnavailable, match="unreachable during scan") as unreachable:
        list(open_store(closed).scan())
    assert "\n" not in str(unreachable.value)  # one line, not the HTTP library's traceback text


def test_a_url_with_an_unknown_option_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"gcp-logging://PROJECT\?bucket=B.*unknown option 'bukket'"):
        CloudLoggingStore("gcp-logging://proj-1?bukket=x")
    with pytest.raises(ConfigError, match="unknown option") as refused:
        CloudLoggingStore("gcp-logging://proj-1?bukket=x&token=ya29.s3cr3t")
    assert "s3cr3t" not in str(refused.value)


def test_no_google_credentials_is_one_clear_error(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="Cloud Logging proj-1: no Google credentials: .*missing.json"):
        CloudLoggingStore("gcp-logging://proj-1")


# -- the bucket retention, through a pipeline ------------------------------------------------


def _bucket(url: str) -> str:
    query = parse_qs(urlparse(url).query)
    assert "bucket" not in query
    return f"projects/{_project(url)}/locations/global/buckets/_Default"


@pytest.fixture
def gcp_settings(home, gcp_logging_url) -> Iterator[Settings]:  # noqa: ANN001
    with dask.config.set({"pipeline.cloud-logging.url": gcp_logging_url}):
        yield Settings.from_config()


def test_a_pass_sets_a_400_day_bucket_to_30_and_audits_it(gcp_fakes, gcp_settings, gcp_logging_url) -> None:  # noqa: ANN001
    _, config = gcp_fakes
    name = _bucket(gcp_logging_url)
    config.add_bucket(name, 400)
    pipeline = Pipeline.open(gcp_settings, create=True)
    report = enforce(pipeline)
    assert config.buckets[name].retention_days == 30
    found = {"bucket": name, "found_days": 400, "wanted_days": 30, "locked": False, "updated": True, "status": "PASS"}
    assert report.backend == {"cloud_logging": found}
    assert pipeline.audit.last("retention.pass").details["backend_retention"] == {"cloud_logging": found}
    again = enforce(pipeline)  # now in line: read, not written
    assert again.backend["cloud_logging"]["updated"] is False
    assert len([u for u in config.updates if u.name == name]) == 1


def test_a_locked_bucket_with_another_retention_fails_the_pass_and_the_report(
    gcp_fakes, gcp_settings, gcp_logging_url
) -> None:  # noqa: ANN001
    _, config = gcp_fakes
    name = _bucket(gcp_logging_url)
    config.add_bucket(name, 400, locked=True)
    pipeline = Pipeline.open(gcp_settings, create=True)
    pipeline.write_records([make_record(observed_at=utcnow())])
    report = enforce(pipeline)
    assert report.failures == ["cloud_logging"]
    assert config.buckets[name].retention_days == 400
    assert "FAIL" in report.summary() and "(locked)" in report.summary()
    compliance = build_report(pipeline, plots=False)
    assert compliance.retention_status == "FAIL"
    [row] = [r for r in compliance.retention if r["data_type"].startswith("bucket")]
    assert row["status"] == "FAIL" and "policy 30d" in row["retention"]
    result = CliRunner().invoke(main, ["enforce"])
    assert result.exit_code == 1
    assert "retention of cloud_logging does not match the policy" in result.stderr


# -- the service's delete and listing rules (tests/fake_gcp.py) ------------------------------


@pytest.fixture
def listing_delay(gcp_fakes) -> Iterator[None]:  # noqa: ANN001
    """Entries written during the test show in listings only after settle(), as on the real service."""
    rest, _ = gcp_fakes
    rest.listing_delay = 3600.0
    try:
        yield
    finally:
        rest.listing_delay = 0.0
        rest.settle()


def _workers(store, keyring) -> list[int]:  # noqa: ANN001
    return sorted(r["n_workers"] for s in store.scan() for r in rows_from_table(open_segment(keyring, s)))


def test_a_replay_after_another_users_erasure_loses_nothing(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    acme = keyring.subject_ref("acme")
    store.write(seal_records(keyring, [make_record(user="ann", observed_at=T0)]))
    bob = seal_records(keyring, [make_record(user="bob", observed_at=T0 + timedelta(minutes=m)) for m in range(7)])
    assert store.erase(acme, keyring.user_ref("acme", "ann")).segments == 1
    assert store.write(bob) == 1  # the spool replays bob's records of the same day after ann's erasure
    assert [s.user_ref for s in store.scan(subject_ref=acme)] == [keyring.user_ref("acme", "bob")]
    assert sum(s.n_records for s in store.scan(subject_ref=acme)) == 7


def test_an_erasure_right_after_a_write_keeps_the_other_users_records(
    gcp_fakes, gcp_logging_url, keyring, listing_delay
) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    acme = keyring.subject_ref("acme")
    store.write(seal_records(keyring, [make_record(user="ann", observed_at=T0, n_workers=1)]))
    rest.settle()
    store.write(seal_records(keyring, [make_record(user="bob", observed_at=T0, n_workers=2)]))  # not listable yet
    store.erase(acme, keyring.user_ref("acme", "ann"))
    rest.settle()
    assert _workers(store, keyring) == [2]


def test_a_replay_not_yet_listable_is_written_once(gcp_fakes, gcp_logging_url, keyring, listing_delay) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    segments = seal_records(keyring, [make_record(observed_at=T0, n_workers=3)])
    store.write(segments)
    store.write(segments)  # the first write does not show yet: written again, same insertIds
    rest.settle()
    assert _workers(store, keyring) == [3]
    assert sum(s.n_records for s in store.scan()) == 1


def test_two_retention_passes_cut_a_segment_twice_and_keep_what_is_young(gcp_fakes, gcp_settings, keyring) -> None:  # noqa: ANN001
    pipeline = Pipeline.open(gcp_settings, create=True)
    store = pipeline.stores["cloud_logging"]
    hours = [T0 + timedelta(hours=h) for h in range(4)]  # 12:00 .. 15:00, one segment
    pipeline.write_records([make_record(observed_at=at, n_workers=i) for i, at in enumerate(hours)])
    first = enforce(pipeline, T0 + timedelta(days=30, minutes=30))  # cutoff 12:30: 12:00 goes
    assert first.removed["cloud_logging"]["cluster_jobs"].records == 1
    second = enforce(pipeline, T0 + timedelta(days=30, minutes=90))  # cutoff 13:30: 13:00 goes
    assert second.removed["cloud_logging"]["cluster_jobs"].records == 1
    kept = [r for s in store.scan() for r in rows_from_table(open_segment(pipeline.keyring, s))]
    assert sorted(r["n_workers"] for r in kept) == [2, 3]
