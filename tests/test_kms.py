"""Master key in AWS KMS, over real HTTP to moto's server on loopback."""

from __future__ import annotations

from pathlib import Path

import boto3
import dask.config
import pytest
from conftest import make_record

from pipeline.config import Settings
from pipeline.errors import KeyringError
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
