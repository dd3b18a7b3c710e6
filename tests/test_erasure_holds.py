"""Erasure that holds: backups, residue, cached keys, failures, concurrent rotations, names.

Each test is an attack a review reproduced on the first release (issue 8); each
fails there and passes here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner
from conftest import make_record
from freezegun import freeze_time
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.db import keyring_keys, segments
from pipeline.errors import KeyringError
from pipeline.records import utcnow
from pipeline.retention.enforcer import enforce
from pipeline.retention.requests import (
    file_request,
    get_request,
    list_requests,
    not_final,
    process_pending,
    retry_request,
)
from pipeline.runtime import Pipeline
from pipeline.segments import open_segment

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
EMAIL = "ann@example.org"


def _fill(pipeline: Pipeline, at: datetime = T0 - timedelta(days=1)) -> None:
    pipeline.write_records(
        [
            make_record("account", account="acme", user="ann", username="ann", email=EMAIL, observed_at=at),
            make_record("cluster_snapshot", account="acme", user="ann", n_workers=4, observed_at=at),
            make_record("cluster_snapshot", account="acme", n_workers=2, observed_at=at),
            make_record("cluster_snapshot", account="globex", user="gil", n_workers=8, observed_at=at),
        ]
    )


def _erase(pipeline: Pipeline, account: str, user: str | None = None, **kwargs) -> None:  # noqa: ANN003
    request = file_request(pipeline, account, user, **kwargs)
    [done] = process_pending(pipeline)
    assert (done.request_id, done.state) == (request.request_id, "completed"), done.error


# -- 1. backups ------------------------------------------------------------------------------------


def _sqlite_backup(settings: Settings, tmp_path: Path) -> str:
    source = sqlite3.connect(make_url(settings.long_term_url).database)
    copy = tmp_path / "backup.db"
    with sqlite3.connect(copy) as target:
        source.backup(target)
    source.close()
    return f"sqlite:///{copy}"


def _postgres_backup(settings: Settings, tmp_path: Path) -> str:
    """A copy of every table in a schema of its own (what a restored pg_dump would hold)."""
    from pipeline.db import engine_for

    url = make_url(settings.long_term_url)
    source = url.query["options"].removeprefix("-csearch_path=")
    backup = f"{source}_bak"
    with engine_for(settings.long_term_url).begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{backup}"'))
        for (table,) in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": source}):
            conn.execute(text(f'CREATE TABLE "{backup}"."{table}" AS TABLE "{source}"."{table}"'))
    return url.update_query_dict({"options": f"-csearch_path={backup}"}).render_as_string(hide_password=False)


def _emails_in(backup_url: str) -> list[str]:
    """What someone holding today's master key file reads from a restored backup."""
    with dask.config.set({"pipeline.long-term.url": backup_url}):
        pipeline = Pipeline.open(Settings.from_config())
    return [r["email"] for r in pipeline.read_records(account="acme", data_type="account")]


def test_a_backup_from_before_an_erasure_opens_until_the_retirement_date_and_nothing_after(
    database: str, tmp_path: Path
) -> None:
    settings = Settings.from_config()
    with freeze_time(T0 - timedelta(days=1)):
        pipeline = Pipeline.open(settings, create=True)
        _fill(pipeline)
        backup = (_sqlite_backup if database == "sqlite" else _postgres_backup)(settings, tmp_path)
    assert _emails_in(backup) == [EMAIL]

    with freeze_time(T0):
        _erase(pipeline, "acme")
        [done] = not_final(pipeline)
    assert done.final_at == T0 + timedelta(days=35)
    assert list(pipeline.read_records(account="globex"))  # the rotation re-wrapped the live keys

    with freeze_time(T0 + timedelta(days=34)):
        assert enforce(pipeline).retired_master_versions == []
    assert _emails_in(backup) == [EMAIL]  # within the backup window a restore still works

    with freeze_time(T0 + timedelta(days=35, minutes=1)):
        assert enforce(pipeline).retired_master_versions == [1]
        assert not_final(pipeline) == []
    with pytest.raises(KeyringError, match="no key version 1"):
        _emails_in(backup)
    assert [r["n_workers"] for r in pipeline.read_records(account="globex")] == [8]


def test_a_copy_of_the_key_file_a_killed_write_left_retires_with_it(settings: Settings, tmp_path: Path) -> None:
    """A rotation killed while writing the key file left ``.master.key.tmp-…``, a whole copy that no
    retirement touched: restored beside a backup, it opened an erased person's data after ``final_at``."""
    key_file = settings.home / "master.key"
    with freeze_time(T0 - timedelta(days=1)):
        pipeline = Pipeline.open(settings, create=True)
        _fill(pipeline)
        backup = _sqlite_backup(settings, tmp_path)
        killed_write = key_file.with_name(f".{key_file.name}.tmp-{uuid.uuid4().hex}")
        killed_write.write_bytes(key_file.read_bytes())  # written and fsync'd, the process gone before the rename
        killed_write.chmod(0o600)
    with freeze_time(T0):
        _erase(pipeline, "acme")
    with freeze_time(T0 + timedelta(days=35, minutes=1)):
        assert enforce(pipeline).retired_master_versions == [1]
    assert sorted(p.name for p in key_file.parent.glob(".master.key*")) == []
    with pytest.raises(KeyringError, match="no key version 1"):
        _emails_in(backup)


def test_a_receipt_and_the_report_say_when_an_erasure_becomes_final(settings: Settings, tmp_path: Path) -> None:
    with freeze_time(T0):
        pipeline = Pipeline.open(settings, create=True)
        _fill(pipeline)
        _erase(pipeline, "acme", "ann")
    runner = CliRunner()
    with freeze_time(T0 + timedelta(days=1)):
        report = runner.invoke(main, ["report", "--out", str(tmp_path / "r"), "--format", "json"])
    assert report.exit_code == 0, report.stderr
    section = json.loads((tmp_path / "r" / "report.json").read_text())["deletion_requests"]
    assert [row["final_at"] for row in section["not_final"]] == [(T0 + timedelta(days=35)).isoformat()]


# -- 2. residue ------------------------------------------------------------------------------------


def _files_at_rest(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.glob("metadata.db*")) if p.is_file())


@pytest.mark.parametrize("scope", ["account", "user"])
def test_no_erased_key_or_segment_bytes_stay_in_the_sqlite_files(settings: Settings, home: Path, scope: str) -> None:
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline)
    ann = pipeline.keyring.user_ref("acme", "ann")
    with pipeline.keyring.engine.connect() as conn:
        wrapped = conn.scalars(select(keyring_keys.c.wrapped).where(keyring_keys.c.key_id == ann)).one()
        payloads = conn.scalars(select(segments.c.payload).where(segments.c.user_ref == ann)).all()
    idle = sqlite3.connect(home / "metadata.db")  # e.g. `serve` running meanwhile
    idle.execute("SELECT count(*) FROM segments").fetchall()
    _erase(pipeline, "acme", "ann" if scope == "user" else None)
    data = _files_at_rest(home)
    idle.close()
    assert wrapped not in data
    for payload in payloads:
        assert payload[:64] not in data


# -- 4. a running scheduler's cached key -----------------------------------------------------------


def test_a_process_that_cached_a_key_never_seals_under_it_after_another_destroyed_it(settings: Settings) -> None:
    scheduler = Pipeline.open(settings, create=True)
    scheduler.write_records([make_record(account="acme", user="ann", observed_at=T0 - timedelta(hours=1))])
    _erase(Pipeline.open(settings), "acme")

    after = utcnow()  # observed after the erasure: its tombstone lets it in
    scheduler.write_records([make_record(account="acme", user="ann", n_workers=7, observed_at=after)])
    fresh = Pipeline.open(settings)
    assert [r["n_workers"] for r in fresh.read_records(account="acme")] == [7]
    stored = list(fresh.stores["long_term"].scan(subject_ref=fresh.keyring.subject_ref("acme")))
    assert [s.key_version for s in stored] == [2]  # a new key version, not the shredded one


def test_a_process_that_cached_a_key_opens_nothing_with_it_after_another_destroyed_it(settings: Settings) -> None:
    """A long-running ``serve`` read the request's sealed reason and the subject's segments (caching the key);
    ``enforce`` in another process carries the erasure out: the cached key opens neither any more."""
    serve = Pipeline.open(settings, create=True)
    _fill(serve)
    request = file_request(serve, "acme", "ann", reason="ticket 7")
    assert get_request(serve, request.request_id).reason == "ticket 7"
    [segment] = serve.stores["cloud_logging"].scan(user_ref=serve.keyring.user_ref("acme", "ann"))
    open_segment(serve.keyring, segment)  # cached here
    process_pending(Pipeline.open(settings))  # another process: the key is destroyed there

    done = get_request(serve, request.request_id)
    assert (done.state, done.reason) == ("completed", None)
    with pytest.raises(KeyringError, match="destroyed"):
        open_segment(serve.keyring, segment)  # a copy a store kept (a log bucket that cannot delete, a backup)


def test_a_read_begun_before_an_erasure_opens_nothing_of_it_once_the_receipt_says_completed(
    database: str, home: Path
) -> None:
    """``records --json | less``, a slow API stream or a report read through one cursor: its snapshot held
    the segments the erasure deleted, and the key state it read once opened them, 198 of ann's records
    after the receipt said completed (on both databases). On SQLite its snapshot keeps the WAL, and the
    copies it holds, until it ends: the next retention pass drops them (waiting for it let any reader,
    another tenant's stream, hold every erasure back)."""
    pipeline = Pipeline.open(create=True)
    days = [T0 - timedelta(days=n) for n in range(20, 0, -1)]
    pipeline.write_records([make_record(account="acme", user=u, observed_at=d) for d in days for u in ("ann", "bob")])
    ann = pipeline.keyring.user_ref("acme", "ann")
    with pipeline.keyring.engine.connect() as conn:
        wrapped = conn.scalars(select(keyring_keys.c.wrapped).where(keyring_keys.c.key_id == ann)).one()
    reading = pipeline.read_records(account="acme")
    first = [next(reading)["user"] for _ in range(2)]
    _erase(Pipeline.open(), "acme", "ann")  # another process, while the read is paused
    rest = [r["user"] for r in reading]
    assert sorted(first) == ["ann", "bob"] and rest == ["bob"] * 19
    if database == "sqlite":
        enforce(pipeline)
        assert wrapped not in _files_at_rest(home)


# -- 5. failures are retried -----------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_a_failed_request_is_retried_with_back_off_and_enforce_fails_until_it_completes(
    settings: Settings, home: Path
) -> None:
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline, at=T0)
    request = file_request(pipeline, "acme", "ann")
    _legal_hold(pipeline, on=True)

    with freeze_time(T0):
        code, out, err = _cli("enforce", "--json")
        assert code == 1, err
        assert json.loads(out)["failed_requests"] == [request.request_id]
        assert "1 deletion requests failed" in err
    with freeze_time(T0 + timedelta(minutes=1)):  # not due yet, still owed: still a failed check
        code, out, _ = _cli("enforce", "--json")
        assert code == 1 and json.loads(out)["requests"] == []
    acme, ann = pipeline.keyring.subject_ref("acme"), pipeline.keyring.user_ref("acme", "ann")
    assert pipeline.keyring.key_state(acme, ann) == "active"  # ann's logs are still readable: not done

    _legal_hold(pipeline, on=False)
    assert _request_status(home) == "FAIL"  # failed, not yet retried
    with freeze_time(T0 + timedelta(minutes=6)):  # the first back-off (5 min) has passed
        code, out, err = _cli("enforce", "--json")
    assert code == 0, err
    assert json.loads(out)["requests"] == [{"request_id": request.request_id, "state": "completed", "error": None}]
    done = get_request(pipeline, request.request_id)
    assert done.receipt["attempts"] == 1 and "next_attempt_at" not in done.receipt
    assert _cli("erase", "status", request.request_id)[0] == 0  # the receipt of a retried erasure agrees
    assert [r["user"] for r in pipeline.read_records("cloud_logging", account="acme")] == [None]
    assert _request_status(home) == "PASS"


def _legal_hold(pipeline: Pipeline, *, on: bool) -> None:
    """A metadata database that refuses to delete segments (a legal hold): erasures fail until it is lifted."""
    hold = "CREATE TRIGGER legal_hold BEFORE DELETE ON segments BEGIN SELECT RAISE(ABORT, 'legal hold'); END"
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(text(hold if on else "DROP TRIGGER legal_hold"))


def _request_status(home: Path) -> str:
    """The deletion-request status of the compliance report."""
    code, _, err = _cli("report", "--out", str(home / "report"), "--format", "json")
    assert code == 0, err
    return json.loads((home / "report" / "report.json").read_text())["deletion_requests"]["status"]


def test_erase_retry_forces_a_retry_now(settings: Settings, home: Path) -> None:
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline, at=T0)
    request = file_request(pipeline, "acme")
    _legal_hold(pipeline, on=True)
    [failed] = process_pending(pipeline)
    assert failed.state == "failed"
    code, _, err = _cli("erase", "retry", request.request_id)
    assert code == 1 and f"deletion request {request.request_id} is failed" in err
    _legal_hold(pipeline, on=False)
    code, out, err = _cli("erase", "retry", request.request_id, "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "completed"
    assert retry_request(pipeline, request.request_id).state == "completed"  # a rerun changes nothing


@contextlib.contextmanager
def _immutable(paths: list[Path]) -> Iterator[None]:
    """Files nobody may delete, root included (``chattr +i``: a hold set outside the pipeline)."""
    try:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"chattr +i is not available here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def test_a_log_file_the_system_will_not_delete_fails_the_erasure_not_pauses_it(settings: Settings, home: Path) -> None:
    """EPERM is no outage: the erasure was paused for ever, enforce exited 0 and the report said PASS."""
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline, at=T0)
    request = file_request(pipeline, "acme", "ann")
    with _immutable(sorted((home / "logs").rglob("*.seg"))):
        with freeze_time(T0):
            code, out, err = _cli("enforce", "--json")
        assert code == 1, err
        assert json.loads(out)["failed_requests"] == [request.request_id]
        failed = get_request(pipeline, request.request_id)
        assert failed.state == "failed" and "Operation not permitted" in (failed.error or "")
        assert _request_status(home) == "FAIL"
    with freeze_time(T0 + timedelta(minutes=6)):  # the hold lifted and the back-off passed
        assert _cli("enforce")[0] == 0
    assert get_request(pipeline, request.request_id).state == "completed"


# -- 6. concurrent rotations -----------------------------------------------------------------------


@pytest.mark.slow
def test_four_concurrent_rotations_leave_every_key_openable(settings: Settings, home: Path) -> None:
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "keys", "rotate", "--json"],
            env={**__import__("os").environ, "DASK_PIPELINE__HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err.decode() for _out, err in outcomes]
    versions = sorted(json.loads(out)["master_key_version"] for out, _err in outcomes)
    assert versions == [2, 3, 4, 5]
    reopened = Pipeline.open(settings)
    assert sorted(r["n_workers"] for r in reopened.read_records(data_type="cluster_jobs")) == [2, 4, 8]
    assert reopened.audit.verify() > 4
    assert stat_mode(home / "master.key") == 0o600
    assert [p.name for p in home.iterdir() if p.name.startswith(".master.key")] == []  # no temp file left


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- 8. names and reasons --------------------------------------------------------------------------


def test_erasing_a_name_typed_in_nfc_erases_data_stored_in_nfd(settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    nfd = unicodedata.normalize("NFD", "café-gmbh")
    nfc = unicodedata.normalize("NFC", "café-gmbh")
    assert nfd != nfc
    pipeline.write_records([make_record(account=nfd, user=unicodedata.normalize("NFD", "zoë"))])
    _erase(pipeline, nfc)
    assert list(pipeline.stores["long_term"].scan(subject_ref=pipeline.keyring.subject_ref(nfd))) == []
    assert pipeline.keyring.subject_ref(nfd, "zoë") == pipeline.keyring.subject_ref(nfc, "zoe\u0308")


def test_the_reason_is_shredded_with_the_subject_and_the_receipt_keeps_its_hash(settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    _fill(pipeline)
    reason = "ticket for alice.smith@example.org"
    request = file_request(pipeline, "acme", "ann", reason=reason)
    assert get_request(pipeline, request.request_id).reason == reason
    process_pending(pipeline)
    done = get_request(pipeline, request.request_id)
    assert done.reason is None
    assert done.receipt["reason_sha256"] == hashlib.sha256(reason.encode()).hexdigest()
    with pipeline.keyring.engine.connect() as conn:
        sealed = conn.execute(text("SELECT reason FROM deletion_requests")).scalar_one()
    assert "alice" not in sealed
    assert uuid.UUID(done.request_id)


def test_keys_retire_runs_retirement_by_hand_and_lists_the_versions(settings: Settings) -> None:
    with freeze_time(T0):
        pipeline = Pipeline.open(settings, create=True)
        _fill(pipeline)
        _erase(pipeline, "acme", "ann")
    code, out, err = _cli("keys", "retire", "--now", (T0 + timedelta(days=1)).isoformat(), "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert listing["retired"] == []
    assert [v["retires_at"] for v in listing["versions"]] == [(T0 + timedelta(days=35)).isoformat(), None]
    code, out, err = _cli("keys", "retire", "--now", (T0 + timedelta(days=36)).isoformat())
    assert (code, out.strip()) == (0, "master key versions retired: 1"), err
    [retired] = pipeline.audit.entries(actions=["key.retired"])
    assert retired.details["master_key_versions"] == [1]
    # a simulated clock says so, and the version is marked retired when it was destroyed, not in the future
    assert retired.details["as_of"] == (T0 + timedelta(days=36)).isoformat() and retired.details["simulated_clock"]
    [version] = [v for v in pipeline.keyring.master_versions() if v.retired_at is not None]
    assert version.retired_at <= retired.recorded_at and datetime.now(UTC) - version.retired_at < timedelta(minutes=1)


def test_an_early_retirement_makes_the_erasure_final_when_it_happened(settings: Settings) -> None:
    """`keys retire --now` a day past the window, run the day after the erasure: the versions were gone
    while `erase status` still said the erasure would be final 35 days on (r13, r18)."""
    with freeze_time(T0):
        pipeline = Pipeline.open(settings, create=True)
        _fill(pipeline)
        _erase(pipeline, "acme", "ann")
        [request] = list_requests(pipeline)
    assert request.final_at == T0 + timedelta(days=35)
    with freeze_time(T0 + timedelta(days=1)):
        assert _cli("keys", "retire", "--now", (T0 + timedelta(days=36)).isoformat())[0] == 0
        code, out, err = _cli("erase", "status", request.request_id, "--json")
        text = _cli("erase", "status", request.request_id)[1]
    assert code == 0, err
    status = json.loads(out)
    assert datetime.fromisoformat(status["final_at"]) == T0 + timedelta(days=1)
    assert status["receipt"]["rotation"]["final_at"] == (T0 + timedelta(days=35)).isoformat()  # as planned, audited
    assert f"final on {T0 + timedelta(days=1):%Y-%m-%d %H:%M} UTC" in text
