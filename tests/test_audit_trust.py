"""Audit trust comes from outside the database (issue 19).

Whoever can write the metadata database, and nothing else, re-signs every entry
with a key of their own, appends forged entries and a fake hand-over naming the
real key; or hides the newest witness checkpoint behind an S3 delete marker, or
plants an older checkpoint under a name that sorts last; or rolls the witness
folder back. Each is named by `audit verify`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import dask.config
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from freezegun import freeze_time
from sqlalchemy import delete, insert, select, update
from test_audit_export import readme_script, verify

from pipeline.audit import HANDOVER, LEGACY_SIGNING_KEY_ID, AuditLog, canonical_entry
from pipeline.cli import main
from pipeline.db import audit_log
from pipeline.errors import AuditIntegrityError
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline
from pipeline.signing import FileSigner, public_hex
from pipeline.witness import Checkpoint, HighWater

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
NOT_TRUSTED = "signature does not verify (not signed by a trusted audit signing key)"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _fails(message: str) -> str:
    result = run("audit", "verify")
    assert result.exit_code == 1, result.output
    assert message in result.stderr, result.stderr
    return result.stderr


def _pipeline_with_checkpoint(entries: int = 55) -> Pipeline:
    pipeline = Pipeline.open(create=True)
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(entries))
    with freeze_time(T0):
        enforce(pipeline)
    return pipeline


def _resign_and_forge(pipeline: Pipeline, mallory: Ed25519PrivateKey, forged: list[Mapping[str, Any]]) -> None:
    """With database write access only: re-sign every row with Mallory's key, then append ``forged``."""
    engine = pipeline.keyring.engine
    with engine.begin() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.seq)).all()
        for row in rows:
            sig = mallory.sign(bytes.fromhex(row.entry_hash)).hex()
            conn.execute(update(audit_log).where(audit_log.c.seq == row.seq).values(signature=sig))
        seq, prev = rows[-1].seq + 1, rows[-1].entry_hash
        for item in forged:
            body = {
                "seq": seq,
                "recorded_at": T0.isoformat(),
                "actor": "root@host",
                "action": item["action"],
                "subject_ref": None,
                "details": item["details"],
                "prev_hash": prev,
            }
            prev = hashlib.sha256(canonical_entry(body)).hexdigest()
            conn.execute(
                insert(audit_log).values(
                    **{**body, "recorded_at": T0, "details": json.dumps(item["details"], sort_keys=True)},
                    entry_hash=prev,
                    signature=mallory.sign(bytes.fromhex(prev)).hex(),
                )
            )
            seq += 1


def test_a_chain_re_signed_with_a_fake_hand_over_to_the_real_key_fails(home: Path, tmp_path: Path) -> None:
    pipeline = _pipeline_with_checkpoint()
    real = pipeline.audit.public_key
    mallory = Ed25519PrivateKey.generate()
    fake_endorsement = mallory.sign(b"anything").hex()
    _resign_and_forge(
        pipeline,
        mallory,
        [
            {"action": "erasure.completed", "details": {"request_id": "forged"}},
            {"action": "retention.pass", "details": {"forged": True}},
            {
                "action": HANDOVER,
                "details": {
                    "previous_public_key": public_hex(mallory.public_key()),
                    "public_key": public_hex(real),
                    "key_url": "file:///elsewhere",
                    "endorsement": fake_endorsement,
                },
            },
        ],
    )
    _fails(f"audit entry 1: {NOT_TRUSTED}")

    # the next retention pass refuses to checkpoint the forgery
    result = run("enforce")
    assert result.exit_code == 1 and NOT_TRUSTED in result.stderr, result.output
    assert Pipeline.open().audit.newest_checkpoint().seq == 57

    # the export ships the configured key, and a third party's script names entry 1 as well
    exported = tmp_path / "export"
    assert run("audit", "export", "--out", str(exported)).exit_code == 0
    assert (exported / "public_key.pem").read_bytes() == real.public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    checked = verify(readme_script(exported, tmp_path), exported)
    assert checked.returncode == 1 and checked.stdout.startswith("entry 1: signature does not verify"), checked.stdout


def test_forged_entries_after_an_intact_prefix_are_named_at_the_first_forgery(home: Path) -> None:
    """Only appended: the prefix stays signed by the real key, the first forged entry is named."""
    pipeline = _pipeline_with_checkpoint()
    mallory = Ed25519PrivateKey.generate()
    engine = pipeline.keyring.engine
    with engine.begin() as conn:
        genuine = {r.seq: r.signature for r in conn.execute(select(audit_log.c.seq, audit_log.c.signature))}
    _resign_and_forge(pipeline, mallory, [{"action": "test.forged", "details": {}}])
    with engine.begin() as conn:  # put the genuine signatures back: only the appended entry is Mallory's
        for seq, signature in genuine.items():
            conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(signature=signature))
    _fails(f"audit entry 58: {NOT_TRUSTED}")


def test_a_pinned_verify_key_catches_a_replaced_signing_key_file(home: Path) -> None:
    pipeline = _pipeline_with_checkpoint(3)
    pem = pipeline.audit.public_key_pem().decode()
    with dask.config.set({"pipeline.audit.verify-key": pem}):
        assert run("audit", "verify").stdout.strip() == "audit trail intact: 5 entries"
        key_file = home / "audit-signing.key"
        key_file.unlink()  # someone with file access swaps in a key of their own and re-signs the chain
        mallory = FileSigner.create(key_file)
        with pipeline.keyring.engine.begin() as conn:
            for row in conn.execute(select(audit_log.c.seq, audit_log.c.entry_hash)).all():
                sig = mallory.sign(bytes.fromhex(row.entry_hash)).hex()
                conn.execute(update(audit_log).where(audit_log.c.seq == row.seq).values(signature=sig))
        _fails(f"audit entry 1: {NOT_TRUSTED}")
    # trusting the file's key alone, the witness's checkpoint, which the key before signed, names the swap
    _fails("holds the checkpoint of 2026-12-01T10:00Z recording seq 5, signed by a key other than the trusted one")


def _rewrite_with_a_key_of_their_own(pipeline: Pipeline, home: Path, keep: int) -> None:
    """With write access to the home and the database: a new signing key file, and the trail cut to its
    first ``keep`` entries (an erasure's, say), re-chained and re-signed with that key."""
    key_file = home / "audit-signing.key"
    key_file.unlink()
    mallory = FileSigner.create(key_file)
    entries = [e.as_dict() for e in pipeline.audit.entries()][:keep]
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log))
        prev = "0" * 64
        for entry in entries:
            entry["prev_hash"] = prev
            entry["entry_hash"] = prev = hashlib.sha256(canonical_entry(entry)).hexdigest()
            entry["signature"] = mallory.sign(bytes.fromhex(prev)).hex()
            details = json.dumps(entry["details"])
            stored = {"recorded_at": datetime.fromisoformat(entry["recorded_at"]), "details": details}
            conn.execute(insert(audit_log).values(**{**entry, **stored}))


@pytest.mark.parametrize("left", ["witness", "high-water-mark"])
def test_a_replaced_signing_key_file_and_a_rewritten_trail_are_named(home: Path, tmp_path: Path, left: str) -> None:
    """The checkpoints the key before signed were ignored, so the shorter trail verified as intact (r30)."""
    pipeline = _pipeline_with_checkpoint(10)
    _rewrite_with_a_key_of_their_own(pipeline, home, keep=6)
    if left == "witness":  # a host that never verified: the witness alone must tell
        (home / "audit-high-water.json").unlink()
        _fails(
            f"witness file://{home / 'audit-witness'} holds the checkpoint of 2026-12-01T10:00Z recording seq 12, "
            "signed by a key other than the trusted one (the signing key was replaced, or the trail rewritten)"
        )
    else:  # the witness moved away too: this host's mark tells
        shutil.move(home / "audit-witness", tmp_path / "witness-elsewhere")
        _fails(
            f"audit high-water mark {home / 'audit-high-water.json'} holds the checkpoint of 2026-12-01T10:00Z "
            "recording seq 12, whose signature does not verify with the trusted audit signing key"
        )
    result = run("enforce")  # and no checkpoint of the new key is written over it
    assert result.exit_code == 1 and "audit entry 0:" in result.stderr, result.output


@pytest.mark.parametrize(
    "named", ["as a checkpoint is", "claiming seq 1 (r34)", "after a note written before any checkpoint (r35)"]
)
def test_a_replaced_signing_key_whose_holder_checkpoints_past_the_old_keys_is_named(home: Path, named: str) -> None:
    """A checkpoint of the new key past the old key's made it the newest trusted one, and a verification reads no
    further down: the old key's checkpoint was never read, the rewrite verified as intact (r32). The first
    checkpoint ever written is read too, and counts whatever the names claim; an object written before it that
    is no checkpoint (a console's folder marker) hid it (r35)."""
    pipeline = _pipeline_with_checkpoint(10)
    if named.startswith("after a note"):
        note = home / "audit-witness" / "README.txt"
        note.write_text("checkpoints of the audit trail; do not delete\n")
        written = min(p.stat().st_mtime for p in note.parent.iterdir()) - 86_400
        os.utime(note, (written, written))
    _rewrite_with_a_key_of_their_own(pipeline, home, keep=6)
    (home / "audit-high-water.json").unlink()
    forger = Pipeline.open()
    forger.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(10))  # past seq 12
    head = list(forger.audit.entries())[-1]
    unsigned = Checkpoint(head.seq, head.entry_hash, head.seq, datetime.now(UTC))
    forged = dataclasses.replace(unsigned, signature=forger.audit.signer.sign(unsigned.body()).hex())
    name = forged.name if named == "as a checkpoint is" else "checkpoint-000000000000001-x.json"
    forger.audit.witness.put(name, forged.to_json())
    _fails(
        f"witness file://{home / 'audit-witness'} holds the checkpoint of 2026-12-01T10:00Z recording seq 12, "
        "signed by a key other than the trusted one (the signing key was replaced, or the trail rewritten)"
    )


def test_checkpoints_of_the_key_before_a_hand_over_are_not_named(home: Path) -> None:
    """The first release's key checkpointed the trail; its hand-over explains those checkpoints, here and
    in this host's mark."""
    pipeline = Pipeline.open(create=True)
    legacy = Ed25519PrivateKey.from_private_bytes(pipeline.keyring.named_key(LEGACY_SIGNING_KEY_ID, "audit"))
    old_trail = AuditLog(
        pipeline.keyring.engine, FileSigner(home / "x", legacy), pipeline.audit.witness, high_water=_mark(home)
    )
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log))
    old_trail.append_many({"action": "test.entry", "details": {"n": n}} for n in range(5))
    with freeze_time(T0):
        old_trail.checkpoint()
    (home / "audit-signing.key").unlink()

    migrated = Pipeline.open()  # hands over at seq 6, checkpointed by the new key
    migrated.audit.append("test.after")
    verified = run("audit", "verify")
    assert verified.exit_code == 0 and verified.stdout.strip() == "audit trail intact: 8 entries", verified.output
    assert json.loads((home / "audit-high-water.json").read_text())["seq"] == 6


def test_a_high_water_mark_edited_higher_is_named_and_never_compared_with(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its seq raised, its signature left: verify passed it by, and raise_to compared every later checkpoint
    with the edited seq, so the mark never rose again and a rollback of the witness went unnoticed (r30)."""
    pipeline = _pipeline_with_checkpoint(3)
    mark = home / "audit-high-water.json"
    genuine = mark.read_text()
    edited = json.dumps({**json.loads(genuine), "seq": 10**9})
    mark.write_text(edited)
    unverified = (
        f"audit entry 0: audit high-water mark {mark} holds the checkpoint of 2026-12-01T10:00Z recording "
        "seq 1000000000, whose signature does not verify with the trusted audit signing key"
    )
    _fails(unverified)
    assert run("enforce").exit_code == 1  # no checkpoint is written past it either

    mark.write_text(genuine)  # edited while a checkpoint is written: raising the mark checks it again
    write = pipeline.audit.witness.write

    def write_then_edit(checkpoint: Checkpoint) -> None:
        write(checkpoint)
        mark.write_text(edited)

    monkeypatch.setattr(pipeline.audit.witness, "write", write_then_edit)
    with pytest.raises(AuditIntegrityError, match=re.escape(unverified)):
        pipeline.audit.checkpoint()
    assert mark.read_text() == edited  # left as found, for verify to name


def _mark(home: Path) -> HighWater:
    return HighWater(home / "audit-high-water.json", f"file://{home / 'audit-witness'}")


def test_a_malformed_verify_key_is_one_clear_error(home: Path) -> None:
    Pipeline.open(create=True)
    with dask.config.set({"pipeline.audit.verify-key": "not a key"}):
        result = run("audit", "verify")
    assert result.exit_code == 2
    assert "pipeline.audit.verify-key is not an audit public key" in result.stderr


# -- the witness: highest signed seq across every version; a local high-water mark -------------------


def test_a_rolled_back_witness_folder_is_named_by_the_high_water_mark(home: Path, tmp_path: Path) -> None:
    pipeline = _pipeline_with_checkpoint(10)
    witness = home / "audit-witness"
    saved = tmp_path / "witness-copy"
    shutil.copytree(witness, saved)
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(20))
    with freeze_time(T0.replace(hour=11)):
        enforce(pipeline)
    assert run("audit", "verify").exit_code == 0  # this host has now seen seq 34
    last = pipeline.audit.newest_checkpoint().seq
    high_water = home / "audit-high-water.json"
    assert high_water.stat().st_mode & 0o777 == 0o600

    shutil.rmtree(witness)  # roll the witness back, then cut the trail to the older checkpoint
    shutil.copytree(saved, witness)
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq > 12))
    _fails(f"this host saw the checkpoint of 2026-12-01T11:00Z recording seq {last} (witness rolled back")


def test_a_wiped_witness_is_a_failed_check_when_the_policy_changed_too(home: Path, tmp_path: Path) -> None:
    """A changed policy is recorded as the pipeline opens, after a look at the witness: its rollback escaped
    there, so `audit verify` exited 2 (no JSON) and report and enforce would not run."""
    from pipeline.config import default_policy_path

    _pipeline_with_checkpoint(3)
    assert run("audit", "verify").exit_code == 0  # this host now holds a high-water mark
    shutil.rmtree(home / "audit-witness")
    policy = tmp_path / "policy.yaml"
    policy.write_text(default_policy_path().read_text() + "\n# edited\n")
    with dask.config.set({"pipeline.policy": str(policy)}):
        _fails("holds no checkpoint, but this host saw")
        verified = run("audit", "verify", "--json")
        assert verified.exit_code == 1 and json.loads(verified.stdout)["intact"] is False
        assert run("report", "--out", str(tmp_path / "report")).exit_code == 0


@pytest.fixture
def s3(aws: str):  # noqa: ANN201
    return boto3.client("s3")


def _locked_bucket(s3, name: str) -> str:  # noqa: ANN001
    s3.create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}, ObjectLockEnabledForBucket=True
    )
    rule = {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 400}}
    s3.put_object_lock_configuration(
        Bucket=name, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": rule}
    )
    return name


def _two_checkpoints(home: Path) -> tuple[Pipeline, int, int]:
    pipeline = _pipeline_with_checkpoint(5)
    first = pipeline.audit.newest_checkpoint().seq
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": n}} for n in range(10))
    with freeze_time(T0.replace(hour=11)):
        enforce(pipeline)
    return pipeline, first, pipeline.audit.newest_checkpoint().seq


def _cut_and_forget(pipeline: Pipeline, home: Path, seq: int) -> None:
    """Cut the trail back to ``seq``; a verifier on a fresh host has no high-water mark."""
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq > seq))
    (home / "audit-high-water.json").unlink()


def test_a_delete_marker_hides_no_checkpoint(home: Path, s3) -> None:  # noqa: ANN001
    bucket = _locked_bucket(s3, "witness-delete-marker")
    with dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}/audit"}):
        pipeline, first, last = _two_checkpoints(home)
        newest = max(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="audit/")["Contents"])
        s3.delete_object(Bucket=bucket, Key=newest)  # no VersionId: Object Lock allows a delete marker
        assert newest not in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="audit/")["Contents"]}
        _cut_and_forget(pipeline, home, first + 1)
        _fails(f"audit trail ends at seq {first + 1}; checkpoint of 2026-12-01T11:00Z records seq {last}")


def test_an_older_checkpoint_named_to_sort_last_is_not_the_newest(home: Path, s3) -> None:  # noqa: ANN001
    bucket = _locked_bucket(s3, "witness-sorts-last")
    with dask.config.set({"pipeline.audit.witness-url": f"s3://{bucket}/audit"}):
        pipeline, first, last = _two_checkpoints(home)
        oldest = min(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="audit/")["Contents"])
        body = s3.get_object(Bucket=bucket, Key=oldest)["Body"].read()
        s3.put_object(Bucket=bucket, Key="audit/checkpoint-999999999999999-zzz.json", Body=body)
        _cut_and_forget(pipeline, home, first + 1)
        _fails(f"audit trail ends at seq {first + 1}; checkpoint of 2026-12-01T11:00Z records seq {last}")


def test_the_export_carries_the_newest_checkpoint_and_its_script_names_a_cut_tail(home: Path, tmp_path: Path) -> None:
    _pipeline_with_checkpoint()
    exported = tmp_path / "export"
    assert run("audit", "export", "--out", str(exported)).exit_code == 0
    assert json.loads((exported / "checkpoint.json").read_text())["seq"] == 57
    script = readme_script(exported, tmp_path)
    assert verify(script, exported).stdout.startswith("intact: 57 entries")

    lines = (exported / "entries.jsonl").read_text().splitlines(keepends=True)
    (exported / "entries.jsonl").write_text("".join(lines[:41]))
    cut = verify(script, exported)
    assert (cut.returncode, cut.stdout.strip()) == (
        1,
        f"entry 42: export ends at seq 41; checkpoint of {T0.isoformat()} records seq 57",
    )

    (exported / "entries.jsonl").write_text("".join(lines))
    forged = json.loads((exported / "checkpoint.json").read_text())
    forged["seq"] = 41
    (exported / "checkpoint.json").write_text(json.dumps(forged))
    assert verify(script, exported).stdout.strip() == "checkpoint.json is not signed by public_key.pem"


def test_a_verification_reads_the_newest_checkpoints_not_every_one_ever_written(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = _pipeline_with_checkpoint(3)
    for hour in range(11, 21):
        pipeline.audit.append("test.entry")
        with freeze_time(T0.replace(hour=hour)):
            pipeline.audit.checkpoint()
    witness = home / "audit-witness"
    files = sorted(witness.iterdir())
    for older in files[:-1]:  # were any of these read, each would be named as malformed
        older.chmod(0o600)
        older.write_text("not json")
    (witness / "notes.json").write_text("also not json")  # a name that claims nothing is always read

    with caplog.at_level("WARNING", logger="pipeline.witness"):
        assert run("audit", "verify").stdout.strip() == "audit trail intact: 15 entries"
    [read_junk] = [r.getMessage() for r in caplog.records if r.name == "pipeline.witness"]
    assert f"witness checkpoint {witness / 'notes.json'} is malformed" in read_junk


#: a checkpoint's fields, unsigned
JUNK = '{"seq": 1, "head_hash": "x", "entries": 1, "time": "2026-01-01T00:00:00+00:00", "signature": "z"}'


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("junk.json", JUNK.replace('"seq": 1', '"seq": 1e999')),
        ("junk.json", JUNK.replace('"entries": 1', '"entries": Infinity')),
        ("checkpoint-\u00b2-x.json", ""),
        ("checkpoint-999999999999999-x.json", "[" * 200_000 + "]" * 200_000),
    ],
    ids=["seq-infinite", "entries-infinite", "superscript-seq", "nested-deep"],
)
def test_junk_planted_in_the_witness_is_skipped(home: Path, name: str, content: str) -> None:
    """The pipeline's credentials may add objects to a locked bucket, where they stay: one holding an infinite
    number or named with a superscript digit made verify, report and every checkpoint a traceback, for good."""
    _pipeline_with_checkpoint(3)
    (home / "audit-witness" / name).write_text(content)
    verified = run("audit", "verify")
    assert verified.exit_code == 0 and verified.stdout.startswith("audit trail intact"), verified.output
    assert run("enforce").exit_code == 0


def test_moving_the_witness_starts_a_new_high_water_mark(home: Path, tmp_path: Path) -> None:
    _pipeline_with_checkpoint(3)
    assert run("audit", "verify").exit_code == 0
    with dask.config.set({"pipeline.audit.witness-url": f"file://{tmp_path / 'new-witness'}"}):
        assert run("audit", "verify").exit_code == 0  # an empty new witness is not a rolled-back old one
        assert run("enforce").exit_code == 0
        assert len(list((tmp_path / "new-witness").iterdir())) == 1
    assert run("audit", "verify").exit_code == 0
