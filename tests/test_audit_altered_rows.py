"""Audit rows altered into values the trail never writes: one line naming the entry, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text
from test_audit_export import readme_script, verify

from pipeline.cli import main
from pipeline.runtime import Pipeline


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def trail(pipeline: Pipeline) -> Pipeline:
    """A pipeline whose trail holds ten real entries, the fifth a retention pass, all verified."""
    entries = [{"action": "test.entry", "details": {"n": n}} for n in range(10)]
    entries[4] = {"action": "retention.pass", "details": {"failed_steps": {}, "backend_retention": {}}}
    pipeline.audit.append_many(entries[sum(pipeline.audit.action_counts().values()) :])
    assert pipeline.audit.last("retention.pass").seq == 5
    assert run("audit", "verify").exit_code == 0
    return pipeline


def execute(pipeline: Pipeline, sql: str) -> None:
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(text(sql))


def sqlite_only(pipeline: Pipeline) -> None:
    """Skip where the database's column types refuse the value (PostgreSQL's timestamptz, text)."""
    if pipeline.keyring.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses this value in the column")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("details = 'not json'", "details are not JSON"),
        ("details = '[1, 2]'", "details are not a JSON object"),
        ("recorded_at = 'garbage'", "recorded_at is not a time"),
        ("recorded_at = 12345", "recorded_at is not a time"),
        ("actor = x'00'", "actor is not text"),
        # a traceback (the escape decodes to a lone surrogate, which no UTF-8 encoder takes), on both databases
        ('details = \'{"n": "x\\ud800"}\'', "details hold text that is not Unicode (altered)"),
        # "metadata database unavailable", exit 2: as if to retry
        ("actor = cast(x'ff' as text)", "holds text that is not UTF-8 (altered in the database)"),
        # passed: the hash covers the last value, and a reader taking the first saw a failed step
        (
            'details = \'{"failed_steps": {"expire": "x"}, "failed_steps": {}, "backend_retention": {}}\'',
            "details name a key twice (altered)",
        ),
    ],
    ids=[
        "details-not-json",
        "details-not-object",
        "time-garbage",
        "time-number",
        "actor-blob",
        "surrogate",
        "not-utf8",
        "key-twice",
    ],
)
def test_verify_names_an_entry_whose_row_does_not_read(trail: Pipeline, change: str, reason: str) -> None:
    if "recorded_at" in change or "x'" in change:  # (an invalid UTF-8 text too)
        sqlite_only(trail)
    execute(trail, f"UPDATE audit_log SET {change} WHERE seq = 5")
    result = run("audit", "verify")
    assert (result.exit_code, result.stderr) == (1, f"check failed: audit entry 5: {reason}\n")
    as_json = run("audit", "verify", "--json")
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert (document["intact"], document["first_bad_seq"], document["entries"]) == (False, 5, 4)


def test_an_unreadable_policy_entry_does_not_stop_the_pipeline_opening(trail: Pipeline) -> None:
    execute(trail, "UPDATE audit_log SET details = 'not json' WHERE seq = 1")
    result = run("audit", "verify")
    assert (result.exit_code, result.stderr) == (1, "check failed: audit entry 1: details are not JSON\n")


def test_a_missing_audit_table_is_one_line_naming_it_and_a_failed_check(trail: Pipeline, tmp_path: Path) -> None:
    """Dropped: the trail is gone, which ``audit verify`` reports as the failed check it is (it said that
    the database was unavailable, exit 2, as if to retry); an export has nothing to export (exit 2)."""
    execute(trail, "DROP TABLE audit_log")
    gone = "audit entry 1: the table audit_log is gone from the database (dropped)\n"
    verified = run("audit", "verify")
    assert (verified.exit_code, verified.stderr) == (1, f"check failed: {gone}")
    exported = run("audit", "export", "--out", str(tmp_path / "export"))
    assert (exported.exit_code, exported.stderr) == (2, f"error: {gone}")


def test_export_refuses_an_entry_that_does_not_read_and_leaves_no_entries_file(trail: Pipeline, tmp_path: Path) -> None:
    execute(trail, "UPDATE audit_log SET details = 'not json' WHERE seq = 5")
    out = tmp_path / "export"
    result = run("audit", "export", "--out", str(out))
    assert (result.exit_code, result.stderr) == (2, "error: audit entry 5: details are not JSON\n")
    assert not [p.name for p in out.iterdir() if "entries" in p.name]


def test_report_names_the_last_retention_pass_when_it_does_not_read(trail: Pipeline, tmp_path: Path) -> None:
    execute(trail, "UPDATE audit_log SET details = 'not json' WHERE seq = 5")
    result = run("report", "--out", str(tmp_path / "report"), "--format", "json")
    assert (result.exit_code, result.stderr) == (2, "error: audit entry 5: details are not JSON\n")


def test_rows_numbered_below_1_are_named_and_counted_nowhere(trail: Pipeline, tmp_path: Path) -> None:
    """Inserted with seq 0 and -1 (database access alone): verify and export read from seq 1 and passed
    them by, intact, while the report counted them, a forged erasure among its actions (r30)."""
    columns = "seq, recorded_at, actor, action, subject_ref, details, prev_hash, entry_hash, signature"
    for seq, action in ((0, "erasure.completed"), (-1, "retention.pass")):
        row = f"{seq}, '2026-01-01 00:00:00', 'x@y', '{action}', NULL, '{{}}', 'x', 'x', 'x'"
        execute(trail, f"INSERT INTO audit_log ({columns}) VALUES ({row})")
    inserted = "audit entry -1: numbered below 1, outside the chain (inserted into the table)"
    result = run("audit", "verify")
    assert (result.exit_code, result.stderr) == (1, f"check failed: {inserted}\n")

    assert trail.audit.last("retention.pass").seq == 5 and trail.audit.first("erasure.completed") is None
    assert sum(trail.audit.action_counts().values()) == 10
    assert run("report", "--out", str(tmp_path / "report"), "--format", "json").exit_code == 0
    audit = json.loads((tmp_path / "report" / "report.json").read_text())["audit"]
    assert (audit["first_bad_seq"], audit["entries"], audit["by_action"]) == (-1, 0, [])  # none verified

    exported = tmp_path / "export"  # shipped, for the third party's script to name as well
    assert run("audit", "export", "--out", str(exported)).exit_code == 0
    checked = verify(readme_script(exported, tmp_path), exported)
    assert checked.returncode == 1 and checked.stdout.startswith("entry 1: "), checked.stdout
