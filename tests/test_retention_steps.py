"""One retention step failing for real: every other step still runs, and the failure is named everywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import dask.config
import pytest
import yaml
from click.testing import CliRunner
from conftest import make_record
from tcpproxy import TCPProxy

from pipeline.cli import main
from pipeline.config import default_policy_path
from pipeline.reports import build_report
from pipeline.retention.requests import file_request, get_request
from pipeline.retention.service import RetentionService
from pipeline.runtime import Pipeline


@pytest.fixture
def proxied_archive(home: Path, tmp_path: Path, s3_archive_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """A pipeline whose S3 archive is reached through a proxy that can be cut; cluster jobs kept 30 days."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # an outage fails at once instead of after boto's retries
    endpoint = urlparse(s3_archive_url.split("endpoint=")[1])
    proxy = TCPProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80)
    doc = yaml.safe_load(default_policy_path().read_text())
    doc["stores"]["long_term"]["cluster_jobs"] = "30d"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    url = s3_archive_url.split("endpoint=")[0] + f"endpoint=http://127.0.0.1:{proxy.port}"
    with dask.config.set({"pipeline.policy": str(policy), "pipeline.archive.url": url}):
        yield Pipeline.open(create=True), proxy
    proxy.close()


def test_an_unreachable_store_fails_its_step_only_and_the_pass_is_audited_reported_and_anchored(
    proxied_archive,  # noqa: ANN001
) -> None:
    pipeline, proxy = proxied_archive
    pipeline.write_records(
        make_record(kind, account=account, **({"env_id": "e1"} if kind == "software_env" else {}))
        for account in ("acme", "globex")
        for kind in ("cluster_snapshot", "job", "software_env")
    )
    erased = file_request(pipeline, "globex")
    first = CliRunner().invoke(main, ["enforce", "--json"])  # everything up: globex erased, master key rotated
    assert first.exit_code == 0, first.output + first.stderr
    assert get_request(pipeline, erased.request_id).state == "completed"

    proxy.cut()
    paused = file_request(pipeline, "acme")
    later = datetime.now(UTC) + timedelta(days=36)  # past every limit, and past the backup window of the rotation
    result = CliRunner().invoke(main, ["enforce", "--now", later.isoformat(), "--json"])

    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert sorted(summary["failed_steps"]) == ["compact:archive", "expire:archive/cluster_jobs"]  # the archive's own
    assert "unreachable" in summary["failed_steps"]["expire:archive/cluster_jobs"]
    assert summary["retention"]["failed_steps"] == summary["failed_steps"]
    assert "step expire:archive/cluster_jobs failed" in result.stderr
    removed = summary["retention"]["removed"]  # every other store and data type was expired
    assert removed["long_term"]["cluster_jobs"]["records"] == 2
    assert (
        removed["cloud_logging"]["cluster_jobs"]["records"],
        removed["cloud_logging"]["software_env"]["records"],
    ) == (
        2,
        1,
    )
    assert "archive" not in removed
    [request] = summary["requests"]  # the erasures ran: this one waits for the archive
    assert (request["request_id"], request["state"]) == (paused.request_id, "in_progress")
    assert "archive" in request["error"]
    assert summary["retention"]["retired_master_versions"]  # key retirement ran

    entry = pipeline.audit.last("retention.pass")
    assert entry is not None and entry.seq == summary["retention"]["audit_seq"]
    assert sorted(entry.details["failed_steps"]) == ["compact:archive", "expire:archive/cluster_jobs"]
    newest = pipeline.audit.newest_checkpoint()
    assert newest is not None and newest.seq >= entry.seq  # anchored after the failed step

    proxy.restore()  # the report, made once the archive is back, shows the step the last pass could not do
    report = build_report(pipeline, now=later, plots=False)
    [failed_row] = [row for row in report.retention if "expire:archive/cluster_jobs" in row["data_type"]]
    assert (failed_row["store"], failed_row["status"]) == ("archive", "FAIL")
    assert report.retention_status == "FAIL"


def test_the_services_pass_runs_every_other_step_and_anchors_the_chain_with_a_store_down(proxied_archive) -> None:  # noqa: ANN001
    pipeline, proxy = proxied_archive
    old = datetime.now(UTC) - timedelta(days=31)
    pipeline.write_records(make_record(kind, account="acme", observed_at=old) for kind in ("cluster_snapshot", "job"))
    service = RetentionService(pipeline, holder="test-service")
    proxy.cut()

    slot = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    service.run_job("retention", slot)  # no exception: APScheduler sees a run that completed

    assert [run.outcome for run in service.history] == ["ran"]
    entry = pipeline.audit.last("retention.pass")
    assert entry is not None
    assert sorted(entry.details["failed_steps"]) == ["compact:archive", "expire:archive/cluster_jobs"]
    assert entry.details["removed"]["long_term"]["cluster_jobs"]["records"] == 2
    assert entry.details["removed"]["cloud_logging"]["cluster_jobs"]["records"] == 2
    newest = pipeline.audit.newest_checkpoint()
    assert newest is not None and newest.seq >= entry.seq


def test_a_checkpoint_that_cannot_be_written_is_its_own_failed_step_and_audited(settings) -> None:  # noqa: ANN001
    pipeline = Pipeline.open(settings, create=True)
    old = datetime.now(UTC) - timedelta(days=31)
    pipeline.write_records(make_record(kind, account="acme", observed_at=old) for kind in ("cluster_snapshot", "job"))
    witness = Path(urlparse(settings.witness_url).path)
    shutil.rmtree(witness, ignore_errors=True)
    witness.write_text("a file where the witness folder should be")

    result = CliRunner().invoke(main, ["enforce", "--json"])

    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert list(summary["failed_steps"]) == ["checkpoint"]
    assert "step checkpoint failed: audit witness" in result.stderr
    assert summary["retention"]["removed"]["cloud_logging"]["cluster_jobs"]["records"] == 2
    entry = pipeline.audit.last("retention.step_failed")
    assert entry is not None and entry.details["step"] == "checkpoint"
    assert entry.details["pass_seq"] == summary["retention"]["audit_seq"]


def test_an_erasure_stopped_part_way_names_in_its_receipt_what_it_had_deleted(
    home: Path, s3_archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 away after the first of two deletes: the object deleted then was missing from the completed
    receipt, as no listing shows it again."""
    from faultproxy import FaultProxy

    from pipeline.retention.requests import process_pending

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = urlparse(s3_archive_url.split("endpoint=")[1])
    proxy = FaultProxy(endpoint.port or 80)
    url = s3_archive_url.split("endpoint=")[0] + f"endpoint=http://127.0.0.1:{proxy.port}"
    try:
        with dask.config.set({"pipeline.archive.url": url}):
            pipeline = Pipeline.open(create=True)
            now = datetime.now(UTC)
            pipeline.write_records([make_record(account="acme", observed_at=now - timedelta(days=d)) for d in (1, 2)])
            request = file_request(pipeline, "acme")
            proxy.fail("DELETE", after=1)
            [paused] = process_pending(pipeline)
            assert paused.state == "in_progress" and "unavailable" in (paused.error or "")
            # the first, and the second: a DELETE that fails may have been done (its answer lost), and is done again
            named = paused.receipt["stores"]["archive"]["deleted"]
            [done] = process_pending(pipeline)
    finally:
        proxy.close()
    assert done.state == "completed", done.error
    deleted = get_request(pipeline, request.request_id).receipt["stores"]["archive"]["deleted"]
    assert set(named) == set(deleted) and len(deleted) == 2
