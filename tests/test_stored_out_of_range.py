"""Records stored out of range before ingest bounded them: named and skipped by reads, reports and retention.

The rows are written straight through the segment and store layer, as ingest wrote them
before it checked bounds: a job observed on 9999-12-31, a job started in year -1199 (a
time Python cannot hold), a negative task count.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner, Result
from conftest import make_record
from controlplane import ndjson, serving
from sqlalchemy import update

from pipeline.apiclient import Credentials
from pipeline.cli import main
from pipeline.db import segments
from pipeline.records import TIMESTAMP, table_from_rows
from pipeline.retention.requests import file_request
from pipeline.retention.service import RetentionService
from pipeline.runtime import Pipeline, seal_tables

DAY0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
#: 1 January of year -1199 in microseconds since 1970 (proleptic Gregorian): no Python datetime holds it
YEAR_MINUS_1199_US = -(3169 * 365 + 769) * 86400 * 10**6


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_raw(pipeline: Pipeline, table: pa.Table) -> None:
    """Seal and store a table as ingest did before it checked bounds (no validation)."""
    for name, sealed in pipeline.route(seal_tables(pipeline.keyring, [table])).items():
        if sealed:
            pipeline.stores[name].write(sealed)


def job_started_in_year_minus_1199(account: str, job_id: str, observed_at: datetime) -> pa.Table:
    table = table_from_rows("job", [make_record("job", account=account, job_id=job_id, observed_at=observed_at)])
    started = pa.array([YEAR_MINUS_1199_US], pa.int64()).cast(TIMESTAMP)
    return table.set_column(table.schema.get_field_index("started_at"), table.schema.field("started_at"), started)


def _day0_records(account: str) -> list[dict]:
    return [
        make_record("cluster_snapshot", account=account, observed_at=DAY0, n_workers=2),
        make_record("job", account=account, observed_at=DAY0, job_id="j1", tasks_completed=5),
        make_record("software_env", account=account, observed_at=DAY0, env_id="e1", packages={"dask": "2026.8.0"}),
    ]


@pytest.fixture
def pipeline(home: Path) -> Pipeline:
    return Pipeline.open(create=True)


def test_a_record_dated_9999_does_not_stop_the_30_day_rule_erasures_or_the_checkpoint(pipeline: Pipeline) -> None:
    pipeline.write_records(_day0_records("acme") + _day0_records("globex"))
    write_raw(  # sorts last in every day-partitioned listing, and its day has no next day
        pipeline,
        table_from_rows(
            "job", [make_record("job", account="acme", observed_at=datetime(9999, 12, 31, 23, 59, tzinfo=UTC))]
        ),
    )
    request = file_request(pipeline, "globex", now=DAY0 + timedelta(days=31))
    before = pipeline.audit.newest_checkpoint()

    result = run("enforce", "--now", (DAY0 + timedelta(days=31)).isoformat(), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    removed = summary["retention"]["removed"]["cloud_logging"]
    # day 0 of both accounts expired in every data type; the 9999 job is not past any limit
    assert (removed["cluster_jobs"]["records"], removed["software_env"]["records"]) == (4, 2)
    assert summary["failed_steps"] == {} and summary["retention"]["failed_steps"] == {}
    assert summary["requests"] == [{"request_id": request.request_id, "state": "completed", "error": None}]
    assert [r["observed_at"].year for r in pipeline.read_records("cloud_logging")] == [9999]
    newest = pipeline.audit.newest_checkpoint()
    assert newest is not None and (before is None or newest.seq > before.seq)
    assert newest.seq >= summary["retention"]["audit_seq"]  # the pass's own entry is anchored

    again = run("enforce", "--now", (DAY0 + timedelta(days=32)).isoformat())  # and the next pass, too
    assert again.exit_code == 0, again.output + again.stderr


def test_a_job_started_in_year_minus_1199_is_named_and_skipped_by_every_read(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.write_records(
        [make_record("job", account="acme", user="ann", job_id=f"good-{n}") for n in range(3)]
        + [make_record("cluster_snapshot", account="globex", user="bob")]
    )
    bad = job_started_in_year_minus_1199("acme", "bad", datetime.now(UTC))
    write_raw(pipeline, bad)
    bad_id = bad.column("record_id")[0].as_py()

    with serving(pipeline) as plane:
        with plane.admin() as admin:
            everything = ndjson(admin.get("/v1/records"))
        with plane.member("acme", "ann") as ann:
            own = ndjson(ann.get("/v1/records"))
        monkeypatch.setenv("HOME", str(tmp_path / "person"))  # ann's login, as `login` saves it
        Credentials(plane.url, plane.tokens.create("member", "acme", "ann").token).save()
        remote = run("records", "--json")
        monkeypatch.setenv("HOME", str(tmp_path / "operator"))  # on the control plane: no login
    for lines, accounts in ((everything, {"acme", "globex"}), (own, {"acme"})):
        records = [line for line in lines if "skipped" not in line]
        [skipped] = [line["skipped"] for line in lines if "skipped" in line]
        assert sorted(r.get("job_id") or r["kind"] for r in records) == sorted(
            ["good-0", "good-1", "good-2"] + (["cluster_snapshot"] if "globex" in accounts else [])
        )
        assert {r["account"] for r in records} == accounts
        assert lines[-1] == {"skipped": skipped}  # the stream ran to its end
        assert (skipped["record_id"], skipped["reason"]) == (bad_id, "started_at is outside the years 1 to 9999")

    for result in (remote, run("records", "--account", "acme", "--json")):  # through the API, and locally
        assert result.exit_code == 0, result.output + result.stderr
        assert sorted(json.loads(line)["job_id"] for line in result.stdout.splitlines()) == [
            "good-0",
            "good-1",
            "good-2",
        ]
        [line] = result.stderr.splitlines()
        assert line.startswith(f"skipped record {bad_id} in segment ")
        assert line.endswith(" in long_term: started_at is outside the years 1 to 9999")


def test_report_over_out_of_range_records_names_them_and_counts_the_rest(pipeline: Pipeline, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    pipeline.write_records([make_record("job", account="acme", job_id="ok", observed_at=now, tasks_completed=5)])
    future = make_record("job", account="acme", job_id="future", observed_at=datetime(9999, 12, 31, tzinfo=UTC))
    negative = make_record("job", account="acme", job_id="negative", observed_at=now, tasks_completed=-(10**9))
    huge = make_record("job", account="acme", job_id="huge", observed_at=now, tasks_completed=2**62)
    endless = make_record("job", account="acme", job_id="endless", observed_at=now, compute_seconds=float("inf"))
    for record in (future, negative, huge, endless):
        write_raw(pipeline, table_from_rows("job", [record]))
    ancient_job = job_started_in_year_minus_1199("acme", "ancient", now)
    write_raw(pipeline, ancient_job)
    ancient = ancient_job.column("record_id")[0].as_py()

    result = run("report", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["out_of_range_records"] == 7
    document = json.loads((tmp_path / "report.json").read_text())
    named = {(r["store"], r["record_id"]): r["reason"] for r in document["out_of_range_records"]}
    bounds = "outside 2000-01-01 to " + (now + timedelta(days=1)).strftime("%Y-%m-%d")
    assert sorted(named.items()) == sorted(
        [
            *(((store, future["record_id"]), f"observed_at is {bounds}") for store in ("cloud_logging", "long_term")),
            # every time is read and checked in every store: the same record is counted or named in each
            *(((store, ancient), f"started_at is {bounds}") for store in ("cloud_logging", "long_term")),
            # usage is counted from the long-term store: only there are these columns read
            *(
                (("long_term", record["record_id"]), f"{field} is negative, over 2**53 or not a finite number")
                for record, field in (
                    (negative, "tasks_completed"),
                    (huge, "tasks_completed"),
                    (endless, "compute_seconds"),
                )
            ),
        ]
    )
    assert document["unreadable_segments"] == []
    [acme] = document["usage"]["accounts"]
    assert (acme["jobs"], acme["tasks_completed"]) == (1, 5)  # only the record in range
    assert all(row["day"] < "9999" for row in document["records_by_day"])
    html = (tmp_path / "report.html").read_text()
    assert "Out of range: 7 records" in html
    assert all(record_id in html for _store, record_id in named)
    assert len(result.stderr.splitlines()) == 7  # one line naming each


def test_jobs_stored_without_an_id_are_named_and_left_out_of_usage(pipeline: Pipeline, tmp_path: Path) -> None:
    """An earlier release took them: usage counted them all as one job, with one of their counts."""
    now = datetime.now(UTC)
    pipeline.write_records([make_record("job", account="acme", job_id="ok", observed_at=now, tasks_completed=7)])
    nameless = [make_record("job", account="acme", job_id=None, observed_at=now, tasks_completed=n) for n in (3, 5)]
    write_raw(pipeline, table_from_rows("job", nameless))
    result = run("report", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output + result.stderr
    document = json.loads((tmp_path / "report.json").read_text())
    [acme] = document["usage"]["accounts"]
    assert (acme["jobs"], acme["tasks_completed"]) == (1, 7)
    assert sorted((r["store"], r["record_id"], r["reason"]) for r in document["out_of_range_records"]) == sorted(
        ("long_term", r["record_id"], "job_id is missing (jobs are counted by it: all such would be one)")
        for r in nameless
    )


def test_an_altered_segment_is_named_at_the_end_of_the_stream_and_hides_no_environment(pipeline: Pipeline) -> None:
    pipeline.write_records(
        [make_record("job", account="acme", job_id="kept")]
        + [make_record("software_env", account=a, env_id=f"env-{a}", packages={}) for a in ("acme", "globex")]
    )
    [altered] = [s for s in pipeline.stores["long_term"].scan() if s.subject_ref == pipeline.subject_ref("globex")]
    with pipeline.keyring.engine.begin() as conn:
        flipped = altered.payload[:-1] + bytes([altered.payload[-1] ^ 1])
        conn.execute(update(segments).where(segments.c.segment_id == altered.segment_id).values(payload=flipped))

    with serving(pipeline) as plane, plane.admin() as admin:
        lines = ndjson(admin.get("/v1/records"))
        envs = admin.get("/v1/software-envs")
    assert sorted(line.get("job_id") or line.get("env_id") or "-" for line in lines) == ["-", "env-acme", "kept"]
    assert lines[-1]["skipped"]["segment_id"] == altered.segment_id
    assert lines[-1]["skipped"]["record_id"] is None
    assert envs.status_code == 200, envs.text
    assert [env["env_id"] for env in envs.json()] == ["env-acme"]


def test_the_services_pass_is_not_stopped_by_a_record_dated_9999(pipeline: Pipeline) -> None:
    old = datetime.now(UTC) - timedelta(days=31)
    pipeline.write_records(_day0_records("acme"))
    pipeline.write_records([make_record("job", account="acme", job_id="old", observed_at=old)])
    write_raw(pipeline, table_from_rows("job", [make_record("job", observed_at=datetime(9999, 12, 31, tzinfo=UTC))]))
    service = RetentionService(pipeline, holder="test-service")

    service.run_job("retention", datetime.now(UTC).replace(minute=0, second=0, microsecond=0))

    entry = pipeline.audit.last("retention.pass")
    assert entry is not None and entry.details["failed_steps"] == {}
    assert entry.details["removed"]["cloud_logging"]["cluster_jobs"]["records"] == 3  # day 0 and 31 days ago
    assert [r["observed_at"].year for r in pipeline.read_records("cloud_logging", data_type="cluster_jobs")] == [9999]
