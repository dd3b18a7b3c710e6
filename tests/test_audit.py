"""The audit trail: what is recorded, `audit verify`, tampering in four ways, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner, Result
from conftest import embedded_emitter, make_record
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, delete, insert, select, update

from pipeline.audit import AuditLog, canonical_entry
from pipeline.cli import main
from pipeline.config import default_policy_path
from pipeline.db import audit_log
from pipeline.retention.policy import load_policy
from pipeline.runtime import Pipeline


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def fill(audit: AuditLog, total: int) -> None:
    """Append entries until the trail holds ``total``."""
    missing = total - sum(audit.action_counts().values())
    for start in range(0, missing, 2000):
        audit.append_many(
            {"action": "test.entry", "details": {"n": start + i}} for i in range(min(2000, missing - start))
        )


def test_verify_reports_an_intact_trail_with_thousands_separators(pipeline: Pipeline) -> None:
    fill(pipeline.audit, 10_000)
    result = run("audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "audit trail intact: 10,000 entries"
    as_json = json.loads(run("audit", "verify", "--json").output)
    assert as_json == {"intact": True, "entries": 10_000, "first_bad_seq": None, "reason": None}


def _shift(engine: Engine, from_seq: int) -> None:
    """Renumber entries from ``from_seq`` on one up, highest first (seq is the primary key)."""
    with engine.begin() as conn:
        for seq in conn.scalars(
            select(audit_log.c.seq).where(audit_log.c.seq >= from_seq).order_by(audit_log.c.seq.desc())
        ):
            conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(seq=seq + 1))


def alter(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 5).values(details=json.dumps({"n": 999})))


def remove(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == 5))


def forge(engine: Engine) -> None:
    """Insert a well-formed entry chained onto entry 4, signed with a key that is not the pipeline's."""
    _shift(engine, 5)
    with engine.begin() as conn:
        prev = conn.execute(select(audit_log.c.entry_hash).where(audit_log.c.seq == 4)).scalar_one()
        body = {
            "seq": 5,
            "recorded_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            "actor": "mallory@host",
            "action": "erasure.completed",
            "subject_ref": None,
            "details": {},
            "prev_hash": prev,
        }
        entry_hash = hashlib.sha256(canonical_entry(body)).hexdigest()
        conn.execute(
            insert(audit_log).values(
                **{**body, "recorded_at": datetime(2026, 1, 1, tzinfo=UTC), "details": "{}"},
                entry_hash=entry_hash,
                signature=Ed25519PrivateKey.generate().sign(bytes.fromhex(entry_hash)).hex(),
            )
        )


def reorder(engine: Engine) -> None:
    with engine.begin() as conn:
        for old, new in ((5, -5), (6, 5), (-5, 6)):
            conn.execute(update(audit_log).where(audit_log.c.seq == old).values(seq=new))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (alter, "content does not match its hash (altered)"),
        (remove, "missing or out of order (found seq 6 instead)"),
        (forge, "signature does not verify"),
        (reorder, "does not chain to the previous entry"),
    ],
    ids=["alter", "delete", "insert", "reorder"],
)
def test_tampering_is_detected_at_the_first_bad_entry(
    pipeline: Pipeline, tamper: Callable[[Engine], None], reason: str
) -> None:
    fill(pipeline.audit, 10)
    assert run("audit", "verify").exit_code == 0
    tamper(pipeline.keyring.engine)
    result = run("audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"check failed: audit entry 5: {reason}")
    as_json = run("audit", "verify", "--json")
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert document["intact"] is False and document["first_bad_seq"] == 5 and document["entries"] == 4


_APPEND_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.runtime import Pipeline
audit = Pipeline.open().audit
Path(sys.argv[3] + "." + sys.argv[1]).touch()  # ready
while not Path(sys.argv[3]).exists():  # start together, however long each took to import
    time.sleep(0.001)
for i in range(int(sys.argv[2])):
    audit.append("test.concurrent", actor=sys.argv[1], details={"i": i})
    time.sleep(0.005)  # paced like real writers: SQLite's write lock is not fair to a writer in back-off
"""


def test_two_processes_appending_at_once_produce_one_valid_chain(pipeline: Pipeline, tmp_path: Path) -> None:
    before = sum(pipeline.audit.action_counts().values())
    env = {
        **os.environ,
        "DASK_PIPELINE__HOME": str(pipeline.settings.home),
        "DASK_PIPELINE__LONG_TERM__URL": pipeline.settings.long_term_url,
    }
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPEND_SCRIPT, name, "150", str(go)], env=env, stderr=subprocess.PIPE)
        for name in ("writer-a", "writer-b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"go.{name}").exists() for name in ("writer-a", "writer-b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers did not start"
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert pipeline.audit.verify() == before + 300
    actors = [e.actor for e in pipeline.audit.entries() if e.action == "test.concurrent"]
    assert actors.count("writer-a") == actors.count("writer-b") == 150
    assert len(set(actors[:150])) == 2, "the two writers did not actually interleave"


def test_init_key_creation_and_rotation_are_recorded_by_subject_ref_only(home: Path) -> None:
    assert run("init").exit_code == 0
    pipeline = Pipeline.open()
    pipeline.write_records([make_record(account="acme"), make_record(account="acme")])
    assert run("keys", "rotate").exit_code == 0
    entries = list(pipeline.audit.entries())
    actions = [e.action for e in entries]
    assert actions == ["policy.loaded", "init", "key.created", "key.rotated"]
    created = entries[2]
    assert created.subject_ref == pipeline.subject_ref("acme")
    assert created.details == {"key_version": 1}
    rotated = dict(entries[3].details)
    retire_at = datetime.fromisoformat(rotated.pop("old_versions_retire_at"))
    assert rotated == {"master_key_version": 2, "keys_rewrapped": 3}  # index, intake, acme: no signing key
    assert abs(retire_at - (entries[3].recorded_at + pipeline.settings.retire_after)) < timedelta(seconds=1)
    assert "acme" not in json.dumps([e.as_dict() for e in entries])
    assert pipeline.audit.verify() == 4


def test_a_rotation_commits_with_its_audit_entry_or_not_at_all(home: Path) -> None:
    """A process dying between a rotation and its entry left a master key version no entry named;
    the entry is now written in the rotation's transaction. Here it cannot be written."""
    assert run("init").exit_code == 0
    pipeline = Pipeline.open()
    pipeline.write_records([make_record(account="acme")])
    refuse = (
        "CREATE TRIGGER refuse_rotated BEFORE INSERT ON audit_log WHEN NEW.action = 'key.rotated' "
        "BEGIN SELECT RAISE(ABORT, 'audit entry refused'); END"
    )
    with pipeline.keyring.engine.begin() as conn:
        conn.exec_driver_sql(refuse)
    failed = run("keys", "rotate")
    assert failed.exit_code != 0 and len(failed.output.splitlines()) == 1, failed.output
    assert "audit entry refused" in failed.output
    assert [v.version for v in pipeline.keyring.master_versions()] == [1]
    assert pipeline.audit.last("key.rotated") is None
    with pipeline.keyring.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_rotated")
    assert run("keys", "rotate").exit_code == 0
    assert [v.version for v in pipeline.keyring.master_versions()] == [1, 2]
    assert [e.details["master_key_version"] for e in pipeline.audit.entries(actions=["key.rotated"])] == [2]
    assert len(list(Pipeline.open().read_records())) == 1  # every key still opens


def test_policy_loaded_is_recorded_once_per_distinct_policy(home: Path, tmp_path: Path) -> None:
    for _ in range(3):
        Pipeline.open(create=True)
    first = Pipeline.open().audit.last("policy.loaded")
    assert first is not None and first.seq == 1
    changed = tmp_path / "retention.yaml"
    changed.write_text(default_policy_path().read_text().replace("deadline: 30d", "deadline: 20d"))
    with dask.config.set({"pipeline.policy": str(changed)}):
        Pipeline.open()
        Pipeline.open()
    pipeline = Pipeline.open()  # back to the shipped policy: recorded again, it differs from the last
    loaded = [e for e in pipeline.audit.entries() if e.action == "policy.loaded"]
    assert [e.details["path"] for e in loaded] == [str(default_policy_path()), str(changed), str(default_policy_path())]
    assert [e.details["sha256"] for e in loaded] == [
        pipeline.policy.sha256,
        load_policy(changed).sha256,
        pipeline.policy.sha256,
    ]


class Clock:
    """A settable UTC clock for the emitter's hour buckets (the emitter's thread keeps real timers)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def test_emitter_records_ingestion_per_hour_not_per_record(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(datetime(2026, 3, 1, 9, 15, tzinfo=UTC))
    monkeypatch.setattr("pipeline.ingest_tally.utcnow", clock)
    monkeypatch.setattr("pipeline.runtime.utcnow", clock)  # ingest's now: no record is past the log store's limit
    pipeline = Pipeline.open(create=True)
    emitter = embedded_emitter(pipeline, spool_dir=tmp_path / "spool")
    observed = clock.now - timedelta(minutes=5)
    emitter.submit([make_record(observed_at=observed) for _ in range(3)])
    assert emitter.flush()
    emitter.submit([make_record("job", observed_at=observed, job_id="j1") for _ in range(2)])
    assert emitter.flush()
    clock.now += timedelta(hours=1)
    emitter.submit([make_record(observed_at=clock.now)])
    assert emitter.flush()
    assert emitter.close()
    summaries = [e.details for e in pipeline.audit.entries() if e.action == "ingest.summary"]
    assert summaries == [
        {
            "hour": "2026-03-01T09:00:00+00:00",
            "records": {"cloud_logging": {"cluster_jobs": 5}, "long_term": {"cluster_jobs": 5}},
        },
        {
            "hour": "2026-03-01T10:00:00+00:00",
            "records": {"cloud_logging": {"cluster_jobs": 1}, "long_term": {"cluster_jobs": 1}},
        },
    ]
    assert pipeline.audit.verify() > 2
