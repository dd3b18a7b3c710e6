"""The Cloud Logging store, with the real client, against the fakes on loopback.

The behaviour suite (test_stores.py) covers write/scan/expire/erase in the
``_Default`` bucket; these tests cover what only this backend promises: what an
entry reveals, chunking, the explicit time range, a log per segment deleted on
erasure, the service's rules (a deleted log name drops later entries, listings
lag behind writes), the bucket of the pipeline's own that ``init`` sets up, a
bucket that holds other logs left alone, erasure there by crypto-shredding plus
expiry, an outage, and the bucket retention each pass reads, sets and audits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, unquote, urlparse

import dask.config
import pytest
from click.testing import CliRunner
from conftest import make_record
from google.auth.credentials import AnonymousCredentials
from google.cloud.logging_v2 import Client
from google.cloud.logging_v2.types import LogSink

from pipeline.bounds import CLOCK_SKEW
from pipeline.cli import main
from pipeline.config import Settings, default_policy_path
from pipeline.errors import ConfigError, StoreError, StoreUnavailable
from pipeline.records import rows_from_table, utcnow
from pipeline.reports.collect import build_report
from pipeline.retention.enforcer import enforce
from pipeline.retention.requests import file_request, get_request, process_pending
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
    store.write([segment])
    assert [s.segment_id for s in store.scan()] == [segment.segment_id]


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
    assert len(filters) >= 2  # scan and expire (a write lists nothing)
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


def test_an_erasure_stopped_part_way_names_the_logs_it_had_deleted(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    """The service away after the first of two log deletes: the erasure's receipt lost that log."""
    from faultproxy import FaultProxy

    rest, _ = gcp_fakes
    proxy = FaultProxy(int(rest.endpoint.rsplit(":", 1)[1]))
    try:
        store = open_store(gcp_logging_url.replace(rest.endpoint, f"http://127.0.0.1:{proxy.port}"))
        store.write(seal_records(keyring, [make_record(observed_at=T0 + timedelta(days=d)) for d in (0, 1)]))
        proxy.fail("DELETE", after=1)
        with pytest.raises(StoreUnavailable) as stopped:
            store.erase(keyring.subject_ref("acme"))
    finally:
        proxy.close()
    project = _project(gcp_logging_url)
    deleted = [path for method, path, _ in rest.requests if method == "DELETE" and project in path]
    assert len(stopped.value.deleted) == len(deleted) == 1 and stopped.value.deleted[0] in unquote(deleted[0])


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


def test_ingest_writes_while_the_projects_read_quota_is_spent(gcp_fakes, gcp_logging_url, keyring) -> None:  # noqa: ANN001
    """Reads have a quota of their own (60 entries.list a minute per project): every write listed its
    subjects first, so a busy control plane, or an operator's log explorer, spent it and ingest failed (503)."""
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    rest.read_quota[_project(gcp_logging_url)] = 0
    try:
        for account in ("acme", "globex", "initech"):
            store.write(seal_records(keyring, [make_record(account=account, observed_at=T0)]))
        with pytest.raises(StoreUnavailable, match="unavailable during scan"):
            list(store.scan())  # the quota the fake enforces
    finally:
        del rest.read_quota[_project(gcp_logging_url)]
    assert len(list(store.scan())) == 3


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
    bucket = parse_qs(urlparse(url).query).get("bucket", ["metadata-pipeline"])[0]
    return f"projects/{_project(url)}/locations/global/buckets/{bucket}"


@pytest.fixture
def gcp_settings(home, gcp_logging_url) -> Iterator[Settings]:  # noqa: ANN001
    """The store in the project's _Default bucket (``bucket=_Default``)."""
    with dask.config.set({"pipeline.cloud-logging.url": gcp_logging_url}):
        yield Settings.from_config()


@pytest.fixture
def own_settings(home, gcp_own_bucket_url) -> Iterator[Settings]:  # noqa: ANN001
    """The store as configured by default: a bucket of its own, after ``metadata-pipeline init``."""
    with dask.config.set({"pipeline.cloud-logging.url": gcp_own_bucket_url}):
        result = CliRunner().invoke(main, ["init", "--json"])
        assert result.exit_code == 0, result.output
        yield Settings.from_config()


def test_init_makes_a_bucket_that_takes_the_pipelines_logs_and_only_them(
    gcp_fakes, own_settings, gcp_own_bucket_url
) -> None:  # noqa: ANN001
    rest, config = gcp_fakes
    project, name = _project(gcp_own_bucket_url), _bucket(gcp_own_bucket_url)
    assert config.buckets[name].retention_days == 30  # the policy's cloud_logging retention
    [sink] = [k for k in config.sinks.values() if k.destination == f"logging.googleapis.com/{name}"]
    assert sink.filter == f'logName:"projects/{project}/logs/metadata-pipeline."'
    assert [e.filter for k, e in config.exclusions.items() if k.startswith(f"projects/{project}/")] == [sink.filter]
    again = CliRunner().invoke(main, ["init", "--json"])  # idempotent: finds, creates nothing
    assert again.exit_code == 0 and json.loads(again.stdout)["cloud_logging_set_up"]["created"] == []

    pipeline = Pipeline.open(own_settings)
    pipeline.write_records([make_record(observed_at=utcnow())])
    client = Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": rest.endpoint},
        _use_grpc=False,
    )
    client.logger("another-app").log_text("not the pipeline's")
    assert [log.rsplit("/", 1)[1] for log in rest.logs(project)] == ["another-app"]  # _Default
    [ours] = rest.logs(project, "metadata-pipeline")
    assert ours.startswith(f"projects/{project}/logs/metadata-pipeline.")
    assert sum(s.n_records for s in pipeline.stores["cloud_logging"].scan()) == 1  # read from the bucket's view


def test_before_init_the_store_refuses_to_write_and_names_init(gcp_fakes, gcp_own_bucket_url, keyring) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    store = open_store(gcp_own_bucket_url)
    with pytest.raises(
        StoreError, match=r"log bucket .*/buckets/metadata-pipeline does not exist: run `metadata-pipeline init`"
    ):
        store.write(seal_records(keyring, [make_record(observed_at=T0)]))
    assert not rest.logs(_project(gcp_own_bucket_url))  # nothing went to _Default meanwhile


@pytest.mark.parametrize("lost", ["sink", "exclusion on _Default"])
def test_after_an_init_that_stopped_part_way_the_store_refuses_to_write(
    gcp_fakes, own_settings, gcp_own_bucket_url, keyring, lost
) -> None:  # noqa: ANN001
    """Without the sink entries would land in _Default only, where reads never look; without the exclusion a
    copy of each would, which expiry and erasure never reach."""
    rest, config = gcp_fakes
    project, name = _project(gcp_own_bucket_url), _bucket(gcp_own_bucket_url).rsplit("/", 1)[1]
    kept = config.sinks if lost == "sink" else config.exclusions
    del kept[f"projects/{project}/{'sinks' if lost == 'sink' else 'exclusions'}/{name}"]
    store = open_store(gcp_own_bucket_url)
    with pytest.raises(StoreError, match=f"has no {lost} for the pipeline's logs .* run `metadata-pipeline init`"):
        store.write(seal_records(keyring, [make_record(observed_at=T0)]))
    assert not rest.logs(project)  # nothing went to _Default meanwhile
    assert CliRunner().invoke(main, ["init"]).exit_code == 0  # init makes what is missing
    open_store(gcp_own_bucket_url).write(seal_records(keyring, [make_record(observed_at=utcnow())]))
    assert not rest.logs(project) and len(rest.logs(project, "metadata-pipeline")) == 1  # routed, not copied


def test_a_pass_sets_the_pipelines_400_day_bucket_to_30_and_audits_it(
    gcp_fakes, own_settings, gcp_own_bucket_url
) -> None:  # noqa: ANN001
    _, config = gcp_fakes
    name = _bucket(gcp_own_bucket_url)
    config.buckets[name].retention_days = 400  # changed by hand since init
    pipeline = Pipeline.open(own_settings)
    report = enforce(pipeline)
    assert config.buckets[name].retention_days == 30
    found = {"bucket": name, "found_days": 400, "wanted_days": 30, "locked": False, "updated": True, "status": "PASS"}
    assert report.backend == {"cloud_logging": found}
    assert pipeline.audit.last("retention.pass").details["backend_retention"] == {"cloud_logging": found}
    again = enforce(pipeline)  # now in line: read, not written
    assert again.backend["cloud_logging"]["updated"] is False
    assert len([u for u in config.updates if u.name == name]) == 1


@pytest.mark.parametrize("holder", ["_Default", "another sink"])
def test_a_bucket_that_holds_other_logs_is_never_changed(
    gcp_fakes, home, gcp_logging_url, gcp_own_bucket_url, holder
) -> None:  # noqa: ANN001
    _, config = gcp_fakes
    url = gcp_logging_url if holder == "_Default" else gcp_own_bucket_url
    with dask.config.set({"pipeline.cloud-logging.url": url}):
        assert CliRunner().invoke(main, ["init"]).exit_code == 0
        name = _bucket(url)
        if holder == "another sink":
            project = _project(url)
            sink = LogSink(name="audit-app", destination=f"logging.googleapis.com/{name}", filter='logName:"audit"')
            config.sinks[f"projects/{project}/sinks/audit-app"] = sink
        config.buckets[name].retention_days = 400
        again = CliRunner().invoke(main, ["init"])  # idempotent, and as honest as enforce about this bucket
        assert again.exit_code == 1 and "retention of cloud_logging does not match the policy" in again.stderr
        report = enforce(Pipeline.open(Settings.from_config()))
        assert config.buckets[name].retention_days == 400
        assert report.failures == ["cloud_logging"]
        found = report.backend["cloud_logging"]
        assert found["status"] == "FAIL" and found["updated"] is False
        assert found["holds_other_logs"] == [holder.replace("another sink", "audit-app")]
        assert f"FAIL: {name} retention 400d, policy 30d (holds other logs: never changed)" in report.summary()
        assert not [u for u in config.updates if u.name == name]
        result = CliRunner().invoke(main, ["enforce"])
        assert result.exit_code == 1
        assert "retention of cloud_logging does not match the policy" in result.stderr


def test_a_locked_bucket_with_another_retention_fails_the_pass_and_the_report(
    gcp_fakes, own_settings, gcp_own_bucket_url
) -> None:  # noqa: ANN001
    _, config = gcp_fakes
    name = _bucket(gcp_own_bucket_url)
    config.add_bucket(name, 400, locked=True)
    pipeline = Pipeline.open(own_settings)
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


def test_a_shorter_limit_in_the_pipelines_bucket_fails_the_pass_naming_the_type(
    gcp_fakes, own_settings, gcp_own_bucket_url, tmp_path
) -> None:  # noqa: ANN001
    """Its entries cannot be deleted and the bucket keeps every entry 30 days: 7 days cannot be kept."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(default_policy_path().read_text().replace("    software_env: 30d", "    software_env: 7d"))
    with dask.config.set({"pipeline.policy": str(policy)}):
        report = enforce(Pipeline.open(Settings.from_config()))
        assert report.failures == ["cloud_logging"]
        found = report.backend["cloud_logging"]
        assert (found["status"], found["wanted_days"], found["kept_longer"]) == ("FAIL", 30, ["software_env"])
        assert "software_env: a shorter limit its entries cannot be held to" in report.summary()
        assert CliRunner().invoke(main, ["enforce"]).exit_code == 1


def test_an_erasure_in_the_pipelines_bucket_is_crypto_shredding_until_expiry(
    gcp_fakes, own_settings, gcp_own_bucket_url
) -> None:  # noqa: ANN001
    rest, _ = gcp_fakes
    pipeline = Pipeline.open(own_settings)
    newest = utcnow() - timedelta(days=2)
    pipeline.write_records(
        [make_record(user=u, observed_at=newest - timedelta(hours=h)) for u in ("ann", "bob") for h in (0, 5)]
    )
    file_request(pipeline, "acme", user="ann")
    before = utcnow()
    [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    got = done.receipt["stores"]["cloud_logging"]
    assert got["method"] == "crypto-shredding plus expiry"  # logs.delete does not reach this bucket
    # the bucket's 30 days from now: an entry written just before may not be listed yet, none is newer than now
    latest = utcnow() + timedelta(days=30) + CLOCK_SKEW  # none is newer than ingest lets in
    assert before + timedelta(days=30) <= datetime.fromisoformat(got["expires_at"]) <= latest
    assert (got["records"], "deleted" in got) == (2, False)
    project = _project(gcp_own_bucket_url)
    assert not [path for method, path, _ in rest.requests if method == "DELETE" and project in path]
    users = {r["user"] for r in pipeline.read_records("cloud_logging")}  # ann's entries stay, unreadable
    assert users == {"bob"}
    shown = CliRunner().invoke(main, ["erase", "status", done.request_id])
    assert "crypto-shredding plus expiry" in shown.stdout and got["expires_at"][:10] in shown.stdout


@pytest.mark.parametrize("bucket", ["own", "_Default"])
def test_an_erasure_whose_listing_outruns_the_read_quota_waits_for_it_and_completes(
    gcp_fakes, own_settings, gcp_logging_url, monkeypatch, bucket
) -> None:  # noqa: ANN001
    """60 entries.list a minute, 1,000 entries a page: a subject past 60,000 entries spent the quota in each
    attempt, which paused and started over (three listings each, one for a count), so it never completed."""
    from pipeline.stores import cloud_logging

    rest, _ = gcp_fakes
    url = own_settings.cloud_logging_url if bucket == "own" else gcp_logging_url
    monkeypatch.setattr(cloud_logging, "PAGE_SIZE", 2)  # pages of 2 entries: 7 entries of hers take 4 pages
    with dask.config.set({"pipeline.cloud-logging.url": url}):
        pipeline = Pipeline.open(Settings.from_config())
    day = utcnow() - timedelta(days=1)
    for minutes in range(7):  # a segment (an entry) each
        pipeline.write_records([make_record(user="ann", observed_at=day + timedelta(minutes=minutes))])
    request = file_request(pipeline, "acme", user="ann")
    project = _project(url)
    rest.read_quota_refill[project] = (2, 0.5)  # two listing calls each half second
    try:
        [done] = process_pending(pipeline)
    finally:
        del rest.read_quota_refill[project]
        rest.read_quota.pop(project, None)
        rest._quota_window.pop(project, None)
    assert done.state == "completed", done.error
    assert done.receipt["stores"]["cloud_logging"]["records"] == 7
    assert get_request(pipeline, request.request_id).state == "completed"


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


def test_an_erasure_in_default_bounds_what_the_listing_did_not_show_yet(
    gcp_fakes, gcp_logging_url, keyring, listing_delay
) -> None:  # noqa: ANN001
    """An entry written shortly before the erasure is not listed yet, so its log is not deleted: the
    receipt said the subject was deleted from _Default, exactly, while the entry stayed there."""
    rest, _ = gcp_fakes
    store = open_store(gcp_logging_url)
    acme = keyring.subject_ref("acme")
    rest.settle()
    store.write(seal_records(keyring, [make_record(user="ann", observed_at=T0)]))
    rest.settle()
    late = utcnow() + timedelta(minutes=14)  # ingest lets a cluster's clock run 15 minutes ahead
    store.write(seal_records(keyring, [make_record(user="ann", observed_at=late)]))
    removed = store.erase(acme, keyring.user_ref("acme", "ann"))
    assert (removed.segments, len(removed.places)) == (1, 1)  # the listed one's log is deleted
    assert removed.expires_at is not None and removed.expires_at >= late + timedelta(days=30)
    rest.settle()
    assert len(list(store.scan(subject_ref=acme))) == 1  # what stays, until removed.expires_at at the latest


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
