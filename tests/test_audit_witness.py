"""The audit trail anchored outside the database: checkpoints in a witness, a signing key of its own.

Attack 7 of issue 8: cutting the tail, wiping the table, restoring an older
database file, or re-signing a rewritten chain with a key unwrapped from the
database all passed `audit verify`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import boto3
import dask.config
import pytest
from click.testing import CliRunner, Result
from conftest import make_record
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from freezegun import freeze_time
from sqlalchemy import delete, select, update
from test_audit_export import readme_script, verify

from pipeline.audit import HANDOVER, LEGACY_SIGNING_KEY_ID, AuditLog, canonical_entry
from pipeline.cli import main
from pipeline.db import audit_log, keyring_keys
from pipeline.errors import ConfigError, KeyringError
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline
from pipeline.signing import FileSigner

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def pipeline(home: Path) -> Pipeline:
    """57 entries, the last of them checkpointed by a retention pass at T0."""
    opened = Pipeline.open(create=True)
    opened.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(55))
    with freeze_time(T0):
        enforce(opened)
    assert opened.audit.newest_checkpoint().seq == 57
    return opened


def _verify_fails(message: str) -> None:
    result = run("audit", "verify")
    assert result.exit_code == 1, result.output
    assert message in result.stderr, result.stderr


def test_an_intact_trail_verifies_against_its_checkpoint(pipeline: Pipeline, home: Path) -> None:
    result = run("audit", "verify")
    assert result.exit_code == 0 and result.stdout.strip() == "audit trail intact: 57 entries"
    [written] = (home / "audit-witness").iterdir()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert json.loads(written.read_text())["head_hash"] == pipeline.audit.last("retention.pass").entry_hash


def test_cutting_the_tail_is_named(pipeline: Pipeline) -> None:
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq > 41))
    _verify_fails("audit trail ends at seq 41; checkpoint of 2026-12-01T10:00Z records seq 57")


def test_a_wiped_table_is_named(pipeline: Pipeline) -> None:
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log))
    _verify_fails("audit trail is empty; checkpoint of 2026-12-01T10:00Z records seq 57")


def test_a_database_restored_from_an_older_copy_is_named(home: Path) -> None:
    pipeline = Pipeline.open(create=True)
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(10))
    old = sqlite3.connect(home / "older.db")
    with sqlite3.connect(home / "metadata.db") as live:
        live.backup(old)
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(20))
    with freeze_time(T0):
        enforce(pipeline)
    with sqlite3.connect(home / "metadata.db") as live:  # restore the older copy
        old.backup(live)
    old.close()
    _verify_fails("checkpoint of 2026-12-01T10:00Z records seq")

    # and a rolled-back database that was extended past the checkpoint is not blessed by a new one
    Pipeline.open().audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(40))
    _verify_fails("entry differs from the checkpoint of 2026-12-01T10:00Z")
    result = run("enforce")  # the retention pass refuses to checkpoint over it
    assert result.exit_code == 1 and "entry differs from the checkpoint" in result.stderr


def test_a_chain_re_signed_with_another_key_fails(pipeline: Pipeline) -> None:
    """Mallory holds the master key and the database, rewrites entry 5 and re-signs the whole chain."""
    with pipeline.keyring.engine.begin() as conn:
        wrapped = conn.scalars(select(keyring_keys.c.key_id)).all()
    assert LEGACY_SIGNING_KEY_ID not in wrapped  # nothing in the database signs audit entries

    mallory = Ed25519PrivateKey.generate()
    engine = pipeline.keyring.engine
    entries = [e.as_dict() for e in pipeline.audit.entries()]
    entries[4]["details"] = {"n": "rewritten"}
    prev = "0" * 64
    with engine.begin() as conn:
        for entry in entries:
            entry["prev_hash"] = prev
            entry["entry_hash"] = prev = hashlib.sha256(canonical_entry(entry)).hexdigest()
            conn.execute(
                update(audit_log)
                .where(audit_log.c.seq == entry["seq"])
                .values(
                    details=json.dumps(entry["details"]),
                    prev_hash=entry["prev_hash"],
                    entry_hash=entry["entry_hash"],
                    signature=mallory.sign(bytes.fromhex(entry["entry_hash"])).hex(),
                )
            )
    _verify_fails("audit entry 1: signature does not verify (not signed by a trusted audit signing key)")


def test_the_signing_key_is_its_own_0600_file(home: Path) -> None:
    Pipeline.open(create=True)
    key = home / "audit-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)
    result = run("audit", "verify")
    assert result.exit_code == 2
    assert result.stderr == f"error: audit signing key {key} is readable by others (mode 0644); run chmod 600 {key}\n"


def test_a_lost_signing_key_file_is_one_clear_error(pipeline: Pipeline, home: Path) -> None:
    (home / "audit-signing.key").unlink()
    result = run("audit", "verify")
    assert result.exit_code == 2
    assert "audit signing key" in result.stderr and "is missing" in result.stderr


@pytest.mark.parametrize("host", ["same", "another"], ids=["with-high-water-mark", "witness-only"])
def test_a_wiped_table_and_a_deleted_key_file_are_named_not_a_new_trail(
    pipeline: Pipeline, home: Path, host: str
) -> None:
    """A new key made for the empty table would verify it as intact and checkpoint over the old trail."""
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log))
    (home / "audit-signing.key").unlink()
    if host == "another":  # the high-water mark is this host's: the witness alone must tell
        (home / "audit-high-water.json").unlink()
    result = run("audit", "verify")
    assert result.exit_code == 2, result.output
    assert "the trail was wiped" in result.stderr and "seq 57" in result.stderr
    assert not (home / "audit-signing.key").exists()


def test_a_keyring_wrapped_signing_key_is_handed_over_to_a_key_file(home: Path, tmp_path: Path) -> None:
    """A database from before the key file: the old key signs a hand-over, then it is destroyed."""
    pipeline = Pipeline.open(create=True)
    legacy = Ed25519PrivateKey.from_private_bytes(pipeline.keyring.named_key(LEGACY_SIGNING_KEY_ID, "audit"))
    old_trail = AuditLog(pipeline.keyring.engine, FileSigner(home / "x", legacy), pipeline.audit.witness)
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log))  # rewrite the trail as the first release signed it
    old_trail.append_many({"action": "test.entry", "details": {"n": n}} for n in range(5))
    (home / "audit-signing.key").unlink()

    migrated = Pipeline.open()
    handover = migrated.audit.last(HANDOVER)
    assert handover is not None and handover.seq == 6
    assert migrated.keyring.key_state(LEGACY_SIGNING_KEY_ID) == "destroyed"
    with pytest.raises(KeyringError):
        migrated.keyring.named_key(LEGACY_SIGNING_KEY_ID, "audit")
    migrated.audit.append("test.after")
    result = run("audit", "verify")
    assert result.exit_code == 0 and result.stdout.strip() == "audit trail intact: 8 entries"  # + policy.loaded
    assert migrated.audit.newest_checkpoint().seq == 6

    exported = tmp_path / "export"
    assert run("audit", "export", "--out", str(exported)).exit_code == 0
    checked = verify(readme_script(exported, tmp_path), exported)  # a third party follows the hand-over too
    assert checked.returncode == 0 and checked.stdout.startswith("intact: 8 entries"), checked.stdout


# -- S3 witness with Object Lock, over HTTP to moto's server ---------------------------------------


@pytest.fixture
def s3(aws: str):  # noqa: ANN201
    return boto3.client("s3")


def _bucket(s3, name: str, *, locked: bool = True, mode: str = "COMPLIANCE") -> str:  # noqa: ANN001
    s3.create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}, ObjectLockEnabledForBucket=locked
    )
    if locked:
        rule = {"DefaultRetention": {"Mode": mode, "Days": 400}}
        s3.put_object_lock_configuration(
            Bucket=name, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": rule}
        )
    return name


def test_checkpoints_in_an_object_locked_bucket_catch_a_cut_tail_and_cannot_be_deleted(home: Path, s3) -> None:  # noqa: ANN001
    bucket = _bucket(s3, "audit-witness-a")
    with dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}/prod/audit"}):
        pipeline = Pipeline.open(create=True)
        pipeline.write_records([make_record()])
        with freeze_time(T0):
            enforce(pipeline)
        [obj] = s3.list_objects_v2(Bucket=bucket, Prefix="prod/audit/")["Contents"]
        assert run("audit", "verify").exit_code == 0
        last = pipeline.audit.newest_checkpoint().seq
        with pipeline.keyring.engine.begin() as conn:
            conn.execute(delete(audit_log).where(audit_log.c.seq >= last - 1))
        _verify_fails(f"audit trail ends at seq {last - 2}; checkpoint of 2026-12-01T10:00Z records seq {last}")

    [version] = s3.list_object_versions(Bucket=bucket, Prefix=obj["Key"])["Versions"]
    with pytest.raises(s3.exceptions.ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=bucket, Key=obj["Key"], VersionId=version["VersionId"])


def test_a_witness_out_of_reach_fails_the_checkpoint_step_only(
    home: Path,
    s3,
    aws: str,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """S3 down when a command started: every command stopped with "bucket has no usable Object Lock" (exit 2),
    erasures and the 30-day rule included."""
    from urllib.parse import urlparse

    from tcpproxy import TCPProxy

    bucket = _bucket(s3, "audit-witness-away")
    target = urlparse(aws)
    proxy = TCPProxy(target.hostname or "127.0.0.1", target.port or 80)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.port}")
    try:
        with dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}/audit"}):
            Pipeline.open(create=True).write_records([make_record(account="acme"), make_record(account="globex")])
            proxy.cut()
            request_id = run("erase", "request", "--account", "acme").stdout.strip()
            result = run("enforce", "--json")
            assert result.exit_code == 1, result.output
            summary = json.loads(result.stdout)
            assert summary["requests"] == [{"request_id": request_id, "state": "completed", "error": None}]
            assert list(summary["failed_steps"]) == ["checkpoint"]
            assert "unreachable" in summary["failed_steps"]["checkpoint"]
            assert run("records", "--account", "globex").exit_code == 0
            proxy.restore()
            assert run("enforce").exit_code == 0
            assert run("audit", "verify").exit_code == 0
    finally:
        proxy.close()


def test_a_bucket_without_object_lock_is_refused(home: Path, s3) -> None:  # noqa: ANN001
    bucket = _bucket(s3, "audit-witness-unlocked", locked=False)
    with (
        dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}"}),
        pytest.raises(ConfigError, match="no usable Object Lock|needs Object Lock"),
    ):
        _ = Pipeline.open(create=True).audit


def test_an_unknown_witness_scheme_is_one_clear_error(home: Path) -> None:
    with dask.config.set({"pipeline.audit.witness-url": "ftp://somewhere"}):
        result = run("init")
    assert result.exit_code == 2
    assert (
        result.stderr
        == "error: pipeline.audit.witness-url: unknown scheme 'ftp' in 'ftp://somewhere' (known: file, s3)\n"
    )


def test_a_running_service_anchors_the_chain_at_least_hourly(home: Path) -> None:
    from datetime import timedelta

    from pipeline.retention.service import RetentionService

    pipeline = Pipeline.open(create=True)
    service = RetentionService(pipeline)
    witness = home / "audit-witness"
    for minutes, expected in ((0, 1), (5, 1), (30, 1), (61, 2)):
        with freeze_time(T0 + timedelta(minutes=minutes)):
            pipeline.audit.append("test.entry")
            service.run_job("requests", T0 + timedelta(minutes=minutes))
        assert len(list(witness.iterdir())) == expected, minutes


def test_an_aws_kms_audit_key_signs_and_never_leaves_kms(home: Path, tmp_path: Path, aws: str) -> None:
    kms = boto3.client("kms")
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    with dask.config.set({"pipeline.audit.signing-key-url": f"aws-kms://{key_id}"}):
        pipeline = Pipeline.open(create=True)
        pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(5))
        with freeze_time(T0):
            enforce(pipeline)
        assert not (home / "audit-signing.key").exists()
        assert run("audit", "verify").stdout.strip() == "audit trail intact: 7 entries"
        exported = tmp_path / "export"
        assert run("audit", "export", "--out", str(exported)).exit_code == 0
        checked = verify(readme_script(exported, tmp_path), exported)  # ECDSA, by the third party's script
        assert checked.returncode == 0 and checked.stdout.startswith("intact: 7 entries"), checked.stdout

        with pipeline.keyring.engine.begin() as conn:
            conn.execute(delete(audit_log).where(audit_log.c.seq >= 6))
        _verify_fails("audit trail ends at seq 5; checkpoint of 2026-12-01T10:00Z records seq 7")


def test_a_symmetric_kms_key_is_refused_as_the_audit_key(home: Path, aws: str) -> None:
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    with dask.config.set({"pipeline.audit.signing-key-url": f"aws-kms://{key_id}"}):
        result = run("init")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: pipeline.audit.signing-key-url: KMS key {key_id!r} must be ECC_NIST_P256 for SIGN_VERIFY\n"
    )


def test_a_bucket_whose_lock_can_be_bypassed_is_refused(home: Path, s3) -> None:  # noqa: ANN001
    """GOVERNANCE mode lets anyone with s3:BypassGovernanceRetention delete checkpoints: no witness."""
    bucket = _bucket(s3, "audit-witness-governance", mode="GOVERNANCE")
    with (
        dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}"}),
        pytest.raises(ConfigError, match="keeps objects in GOVERNANCE mode; a witness needs COMPLIANCE mode"),
    ):
        _ = Pipeline.open(create=True).audit
