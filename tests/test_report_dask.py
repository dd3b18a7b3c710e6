"""``report --engine dask``: the S3 archive reduced on a real Dask cluster, section by section as the local report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask.config
import pytest
from conftest import make_record, moto_environment
from distributed import LocalCluster
from test_reports import T0, run, write_demo_records

from pipeline.reports import build_report
from pipeline.reports.dask_engine import ARCHIVE, build_archive_report
from pipeline.runtime import Pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def archived(home: Path, s3_archive_url: str) -> Iterator[Pipeline]:
    """A pipeline whose long-term records are copied to an S3 archive on moto, holding the demo records."""
    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        pipeline = Pipeline.open(create=True)
        write_demo_records(pipeline)
        yield pipeline
        pipeline.close()


@pytest.fixture(scope="module")
def scheduler(moto_endpoint: str) -> Iterator[str]:
    """Two worker processes with S3 credentials (moto's) and no pipeline home: only the data keys they are sent."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in moto_environment(moto_endpoint).items():
            env.setenv(name, value)
        env.setenv("DASK_PIPELINE__HOME", "/nonexistent")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    with cluster:
        yield cluster.scheduler_address


def _archive_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["store"] == ARCHIVE]


def test_dask_over_the_archive_gives_the_local_reports_numbers(archived: Pipeline, scheduler: str) -> None:
    local = build_report(archived, now=T0, plots=False)
    remote = build_archive_report(archived, scheduler, now=T0, plots=False)
    assert remote.inventory == _archive_rows(local.inventory)
    assert remote.inventory[0]["records"] > 0 and remote.inventory[0]["segments"] > 0
    assert remote.retention == _archive_rows(local.retention)
    assert remote.records_by_day == _archive_rows(local.records_by_day)
    # usage: the local report counts it in the long-term store, which holds the same records
    assert remote.usage == local.usage and len(remote.usage) == 2
    assert remote.usage_daily == local.usage_daily
    assert remote.deletion_requests == local.deletion_requests
    assert remote.audit["by_action"] == local.audit["by_action"]
    assert remote.unreadable_segments == remote.out_of_range_records == []


def test_a_shredded_subject_is_left_out_as_locally(archived: Pipeline, scheduler: str) -> None:
    archived.keyring.destroy(archived.subject_ref("acme"))
    local = build_report(archived, now=T0, plots=False)
    remote = build_archive_report(archived, scheduler, now=T0, plots=False, show_names=True)
    assert remote.inventory == _archive_rows(local.inventory)
    assert [row["account"] for row in remote.usage] == ["globex"]


@pytest.mark.parametrize("damage", ["_key_altered", "_version_never_issued", "_another_subjects"])
def test_an_altered_object_is_named_not_taken_for_shredded_or_for_the_subjects(
    archived: Pipeline, scheduler: str, s3_archive_url: str, damage: str
) -> None:
    """The workers took a key that did not unwrap, or a version never issued, for a destroyed one, and read
    another subject's object copied under this one's name as this one's: records left out unnamed (r29, r31)."""
    import test_archive_damage

    key = test_archive_damage._damage(
        s3_archive_url, archived.subject_ref("globex"), getattr(test_archive_damage, damage)
    )
    remote = build_archive_report(archived, scheduler, now=T0, plots=False)
    assert [u["segment_id"] for u in remote.unreadable_segments] == [key]


def test_a_key_the_store_never_writes_is_a_foreign_file_as_locally(
    archived: Pipeline, scheduler: str, s3_archive_url: str
) -> None:
    """A copy of an object under ``day=2026-19-40``, listed as foreign by the local report, was counted by the
    workers: its records twice (r33)."""
    import boto3
    from test_archive_damage import _objects

    key, body = min(_objects(s3_archive_url).items())
    odd = key.replace(key.split("/day=")[1].split("/")[0], "2026-19-40")
    bucket = s3_archive_url.split("/")[2]
    boto3.client("s3").put_object(Bucket=bucket, Key=odd, Body=body)
    local = build_report(archived, now=T0, plots=False)
    remote = build_archive_report(archived, scheduler, now=T0, plots=False)
    assert remote.inventory == _archive_rows(local.inventory)
    assert remote.foreign_files == [{"store": ARCHIVE, "path": f"s3://{bucket}/{odd}"}]


def test_the_command_writes_the_archive_report(archived: Pipeline, scheduler: str, tmp_path: Path) -> None:
    now = T0.isoformat()
    result = run("report", "--engine", "dask", "--scheduler", scheduler, "--out", str(tmp_path), "--now", now)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "report.json").read_text())
    assert {row["store"] for row in document["inventory"]} == {ARCHIVE}
    assert len(document["usage"]["accounts"]) == 2 and (tmp_path / "report.html").exists()
    alone = run("report", "--engine", "dask", "--out", str(tmp_path))
    assert alone.exit_code == 2 and "--scheduler" in alone.output


def test_an_unreachable_scheduler_is_one_line_and_exit_2(archived: Pipeline, tmp_path: Path) -> None:
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = run("report", "--engine", "dask", "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "Dask scheduler tcp://127.0.0.1:1 cannot be reached" in result.output


def test_objects_a_compaction_merged_after_the_listing_are_read_from_the_merged_one(
    archived: Pipeline, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers read objects a retention pass had merged away since the client listed them: NoSuchKey."""
    from pipeline.reports import dask_engine

    archived.write_records([make_record("job", account="acme", job_id="late", observed_at=T0 - timedelta(days=3))])
    listing = dask_engine._groups

    def listed_then_compacted(pipeline: Pipeline, found: dask_engine.Found) -> Iterator[dask_engine.Group]:
        groups = list(listing(pipeline, found))
        archived.stores[ARCHIVE].compact(T0, lambda segments: None)
        return iter(groups)

    monkeypatch.setattr(dask_engine, "_groups", listed_then_compacted)
    remote = build_archive_report(archived, scheduler, now=T0, plots=False)
    assert remote.inventory == _archive_rows(build_report(archived, now=T0, plots=False).inventory)


def test_a_worker_failing_for_another_reason_is_one_line_and_exit_2(
    archived: Pipeline, scheduler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker raising what S3 does not (a worker of another release: an unknown argument) was a traceback."""
    from pipeline.reports import dask_engine

    listing = dask_engine._groups

    def broken(pipeline: Pipeline, found: dask_engine.Found) -> Iterator[dask_engine.Group]:
        [first, *_] = listing(pipeline, found)
        return iter([dataclasses.replace(first, data_key=(1, b"not a key"))])  # AES-GCM refuses it on the worker

    monkeypatch.setattr(dask_engine, "_groups", broken)
    result = run("report", "--engine", "dask", "--scheduler", scheduler, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "a Dask worker failed on" in result.output and "Traceback" not in result.output
