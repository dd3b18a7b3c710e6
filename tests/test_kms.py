"""Master key in AWS KMS, over real HTTP to moto's server on loopback."""

from __future__ import annotations

from pathlib import Path

import boto3
import dask.config
import pytest
from conftest import make_record

from pipeline.config import Settings
from pipeline.errors import KeyringError, KeyServiceError
from pipeline.runtime import Pipeline


@pytest.fixture
def kms(aws: str):  # noqa: ANN201
    return boto3.client("kms")


def _settings(home: Path, key_id: str) -> Settings:
    with dask.config.set({"pipeline.keys.url": f"aws-kms://{key_id}"}):
        return Settings.from_config()


def test_kms_master_key_round_trip_and_rotation(home: Path, kms) -> None:  # noqa: ANN001
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    settings = _settings(home, key_id)
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record(n_workers=3)])
    assert not (home / "master.key").exists()  # the master key never leaves KMS

    version, rewrapped = pipeline.keyring.rotate_master()
    assert version == 2 and rewrapped >= 2  # index key + acme's data key
    reopened = Pipeline.open(settings)
    assert [r["n_workers"] for r in reopened.read_records(account="acme")] == [3]


def test_a_running_process_opens_keys_another_process_rotated_to_a_new_kms_key(home: Path, kms) -> None:  # noqa: ANN001
    """A version another process made (``keys rotate``, or an erasure's rotation by ``enforce``) was unknown to a
    running ``serve``: it asked the URL's key, and every read and ingest of a key it had not cached failed
    (503) until a restart."""
    settings = _settings(home, kms.create_key()["KeyMetadata"]["KeyId"])
    Pipeline.open(settings, create=True).write_records([make_record(account="acme", user="ann", n_workers=3)])
    serving = Pipeline.open(settings)
    other = Pipeline.open(settings)
    assert other.keyring.rotate_master()[0] == 2
    assert [r["n_workers"] for r in serving.read_records(account="acme")] == [3]
    serving.write_records([make_record(account="acme", user="ann", n_workers=4)])
    assert sorted(r["n_workers"] for r in other.read_records(account="acme")) == [3, 4]


def test_another_kms_key_does_not_open_the_keyring(home: Path, kms) -> None:  # noqa: ANN001
    right, wrong = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    Pipeline.open(_settings(home, right), create=True)
    with pytest.raises(KeyringError, match="does not open this keyring"):
        Pipeline.open(_settings(home, wrong))


def test_unknown_kms_key_is_one_clear_error(home: Path, kms) -> None:  # noqa: ANN001
    with pytest.raises(KeyringError, match="AWS KMS key 'no-such-key' is not usable"):
        Pipeline.open(_settings(home, "no-such-key"), create=True)


def test_each_master_version_is_its_own_kms_key_and_retiring_schedules_its_deletion(home: Path, kms) -> None:  # noqa: ANN001
    from datetime import timedelta

    from freezegun import freeze_time

    from pipeline.records import utcnow
    from pipeline.retention.retirement import retire_master_keys

    root = kms.create_key()["KeyMetadata"]["KeyId"]
    settings = _settings(home, root)
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record(n_workers=3)])
    version, _ = pipeline.keyring.rotate_master()
    [first, second] = pipeline.keyring.master_versions()
    assert (first.version, second.version) == (1, version) == (1, 2)
    second_key = pipeline.keyring.provider.key_ref(2)
    assert second_key and root not in second_key  # a new KMS key, not KMS's own rotation of the first
    assert kms.describe_key(KeyId=second_key)["KeyMetadata"]["KeyState"] == "Enabled"

    with freeze_time(utcnow() + timedelta(days=34)):
        assert retire_master_keys(pipeline) == []
    with freeze_time(utcnow() + timedelta(days=36)):
        assert retire_master_keys(pipeline) == [1]
    assert kms.describe_key(KeyId=root)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert [r["n_workers"] for r in Pipeline.open(settings).read_records(account="acme")] == [3]


def test_a_rotation_whose_re_wrap_fails_leaves_no_kms_key_behind(home: Path, kms) -> None:  # noqa: ANN001
    """Each failed try (here: a data key KMS will not unwrap) made a KMS key nobody retired, billed monthly."""
    from sqlalchemy import update

    from pipeline.db import keyring_keys
    from pipeline.errors import KeyringError

    root = kms.create_key()["KeyMetadata"]["KeyId"]
    pipeline = Pipeline.open(_settings(home, root), create=True)
    pipeline.write_records([make_record(n_workers=3)])
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(update(keyring_keys).where(keyring_keys.c.wrapped.is_not(None)).values(wrapped=b"x" * 60))
    before = {k["KeyId"] for k in kms.list_keys()["Keys"]}
    for _ in range(2):
        with pytest.raises(KeyringError):
            pipeline.keyring.rotate_master()
    staged = [k["KeyId"] for k in kms.list_keys()["Keys"] if k["KeyId"] not in before]
    states = [kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] for key in staged]
    assert states == ["PendingDeletion", "PendingDeletion"]  # one a try, each unstaged
    assert [v.version for v in pipeline.keyring.master_versions()] == [1]


def _waiting_period_ends(key_id: str) -> None:
    """KMS deletes a key scheduled for deletion once its waiting period ends (and its aliases with it);
    moto's server never does, so its backend is told to, as the service would."""
    from moto.backends import get_backend

    kms = boto3.client("kms")
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    region = meta["Arn"].split(":")[3]
    get_backend("kms")[meta["AWSAccountId"]][region].delete_key(meta["KeyId"])


@pytest.mark.parametrize("named_by", ["key id", "alias"])
def test_the_control_plane_opens_after_kms_deleted_the_retired_first_version(
    home: Path,
    kms,
    named_by: str,  # noqa: ANN001
) -> None:
    """Version 1 is the URL's key: retiring it (35 days after the first erasure's rotation) schedules
    its deletion, and 7 days later KMS deleted it. Every open then failed: "is not usable"."""
    from datetime import timedelta

    from freezegun import freeze_time

    from pipeline.records import utcnow
    from pipeline.retention.retirement import retire_master_keys

    root = kms.create_key()["KeyMetadata"]["KeyId"]
    url = root
    if named_by == "alias":
        url = f"alias/pipeline-master-{root[:8]}"
        kms.create_alias(AliasName=url, TargetKeyId=root)
    settings = _settings(home, url)
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record(n_workers=3)])
    pipeline.keyring.rotate_master()
    with freeze_time(utcnow() + timedelta(days=36)):
        assert retire_master_keys(pipeline) == [1]
    _waiting_period_ends(root)
    assert [r["n_workers"] for r in Pipeline.open(settings).read_records(account="acme")] == [3]
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(KeyringError, match="does not open this keyring"):
        Pipeline.open(_settings(home, other))


def test_a_retirement_stopped_after_kms_deleted_the_key_completes_on_the_next_pass(home: Path, kms) -> None:  # noqa: ANN001
    """A pass scheduled version 2's deletion, then stopped before recording it (a crash, a throttled call
    for the next version); the next passes asked KMS again, which refuses a deleted key, and every later
    retirement failed for good."""
    from datetime import timedelta

    from freezegun import freeze_time

    from pipeline.records import utcnow
    from pipeline.retention.retirement import retire_master_keys

    pipeline = Pipeline.open(_settings(home, kms.create_key()["KeyMetadata"]["KeyId"]), create=True)
    pipeline.write_records([make_record(n_workers=3)])
    pipeline.keyring.rotate_master()
    pipeline.keyring.rotate_master()
    second = pipeline.keyring.provider.key_ref(2)
    assert second is not None
    kms.schedule_key_deletion(KeyId=second.rsplit("/", 1)[-1], PendingWindowInDays=7)  # the stopped pass
    _waiting_period_ends(second.rsplit("/", 1)[-1])
    with freeze_time(utcnow() + timedelta(days=36)):
        assert retire_master_keys(pipeline) == [1, 2]


def test_an_erasure_under_kms_is_final_only_after_the_keys_waiting_period(home: Path, kms) -> None:  # noqa: ANN001
    """Retirement schedules the old version's deletion; CancelKeyDeletion restores it for 7 more days, and
    with it a backup's copy of the erased key: the receipt's final_at said the retirement date."""
    from datetime import UTC, datetime, timedelta

    from freezegun import freeze_time

    from pipeline.retention.requests import file_request, process_pending

    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    pipeline = Pipeline.open(_settings(home, kms.create_key()["KeyMetadata"]["KeyId"]), create=True)
    pipeline.write_records([make_record(user="ann", n_workers=3)])
    with freeze_time(t0):
        file_request(pipeline, "acme", "ann")
        [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    assert done.final_at == t0 + timedelta(days=35 + 7)


def test_a_straddling_segment_whose_data_key_kms_does_not_give_is_kept_and_its_step_fails(
    home: Path, kms, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A failed Decrypt (throttled, denied, unreachable) was taken for crypto-shredding: the retention pass
    deleted the whole straddling segment, records younger than the limit with it, and said it succeeded.
    Another subject's segment is still cut, and what the step removed is still counted."""
    from datetime import UTC, datetime, timedelta
    from urllib.parse import urlparse

    from faultproxy import FaultProxy

    from pipeline.retention.enforcer import enforce

    day = datetime(2026, 11, 8, tzinfo=UTC)
    settings = _settings(home, kms.create_key()["KeyMetadata"]["KeyId"])
    Pipeline.open(settings, create=True).write_records(
        [
            make_record(account=a, observed_at=day + timedelta(hours=hour))
            for a in ("acme", "globex")
            for hour in (10, 14)
        ]
    )
    proxy = FaultProxy(urlparse(moto_endpoint).port or 80)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        pipeline = Pipeline.open(settings)  # a process of its own (enforce, serve): no data key unwrapped yet
        assert len(list(pipeline.read_records("cloud_logging", account="globex"))) == 2  # globex's key: unwrapped
        proxy.fail("POST", times=1_000)  # every KMS call from here on: acme's key is not given
        report = enforce(pipeline, day + timedelta(days=30, hours=12))
    finally:
        proxy.close()
    failed = report.failed_steps["expire:cloud_logging/cluster_jobs"]
    assert failed.startswith("1 straddling segment(s) kept whole; the first: segment ")
    assert "AWS KMS key" in failed and "did not decrypt" in failed
    assert report.removed["cloud_logging"]["cluster_jobs"].records == 1  # globex's 10:00

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    pipeline = Pipeline.open(settings)

    def hours() -> list[tuple[str, int]]:
        return sorted((r["account"], r["observed_at"].hour) for r in pipeline.read_records("cloud_logging"))

    assert hours() == [("acme", 10), ("acme", 14), ("globex", 14)]
    report = enforce(pipeline, day + timedelta(days=30, hours=12))  # KMS answers again
    assert not report.failed_steps
    assert hours() == [("acme", 14), ("globex", 14)]


def test_an_archive_object_whose_data_key_kms_does_not_give_is_an_error_not_left_out(
    home: Path, kms, moto_endpoint: str, s3_archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A failed Decrypt was taken for crypto-shredding: the archive's scan left the object out, unnamed,
    and its records were missing from what read it (a report counted fewer, and said nothing)."""
    from urllib.parse import urlparse

    from faultproxy import FaultProxy

    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        settings = _settings(home, kms.create_key()["KeyMetadata"]["KeyId"])
    Pipeline.open(settings, create=True).write_records([make_record(n_workers=n) for n in (1, 2)])
    proxy = FaultProxy(urlparse(moto_endpoint).port or 80)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")  # KMS; S3 is named by the URL
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        pipeline = Pipeline.open(settings)  # no data key unwrapped yet
        proxy.fail("POST", times=1_000)  # every KMS call from here on
        with pytest.raises(KeyServiceError, match="did not decrypt"):
            list(pipeline.read_records("archive"))
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert sorted(r["n_workers"] for r in Pipeline.open(settings).read_records("archive")) == [1, 2]


def test_a_dask_report_over_an_archive_whose_keys_kms_does_not_give_is_an_error_not_empty(
    home: Path, kms, moto_endpoint: str, s3_archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """The Dask engine took a failed Decrypt for crypto-shredding: a report of 0 records, naming nothing."""
    from datetime import UTC, datetime, timedelta
    from urllib.parse import urlparse

    from distributed import LocalCluster
    from faultproxy import FaultProxy

    from pipeline.reports.dask_engine import build_archive_report

    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        settings = _settings(home, kms.create_key()["KeyMetadata"]["KeyId"])
    now = datetime.now(UTC)
    Pipeline.open(settings, create=True).write_records(
        [make_record(account=a, observed_at=now - timedelta(hours=2)) for a in ("acme", "globex")]
    )
    proxy = FaultProxy(urlparse(moto_endpoint).port or 80)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")  # KMS; S3 is named by the URL
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
            pipeline = Pipeline.open(settings)
            proxy.fail("POST", times=1_000)  # every KMS call from here on
            with pytest.raises(KeyServiceError, match="did not decrypt"):
                build_archive_report(pipeline, cluster.scheduler_address, now=now, plots=False)
    finally:
        proxy.close()
