"""Moving a deployment into a cloud account changes URLs in the dask config and nothing else.

PostgreSQL (long-term), Cloud Logging (its fakes), the S3 Parquet archive and the
KMS master key (moto) against the embedded default: same records, same counts,
and an erasure that reaches every place, with a receipt listing each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import dask.config
import pytest

from pipeline.config import Settings
from pipeline.demo import run_demo
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline


@pytest.fixture
def cloud_urls(postgres_url, gcp_logging_url, s3_archive_url) -> dict[str, str]:  # noqa: ANN001
    """The four settings a cloud deployment changes: PostgreSQL, Cloud Logging, S3, KMS."""
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    return {
        "pipeline.long-term.url": postgres_url,
        "pipeline.cloud-logging.url": gcp_logging_url,
        "pipeline.archive.url": s3_archive_url,
        "pipeline.keys.url": f"aws-kms://{key_id}",
    }


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What the demo stored, without what differs between any two runs (ids, clocks)."""
    varying = ("record_id", "cluster_id", "observed_at", "job_id", "started_at", "finished_at")
    varying += ("compute_seconds", "peak_memory_bytes")
    jobs = [{k: v for k, v in job.items() if k not in varying} for job in result["job_records"]]
    stored = {
        store: {t: n for t, n in counts.items() if t != "cluster_jobs"} for store, counts in result["stored"].items()
    }
    return {"tasks": result["tasks"], "erred": result["erred"], "jobs": result["jobs"], "stored": stored, "job": jobs}


def test_a_demo_moves_to_the_cloud_by_changing_urls_only(home: Path, tmp_path: Path, cloud_urls) -> None:  # noqa: ANN001
    embedded = run_demo(tasks=200, account="acme")
    with dask.config.set({"pipeline.home": str(tmp_path / "cloud"), **cloud_urls}):
        cloud = run_demo(tasks=200, account="acme")
    assert set(cloud["stored"]) == {"long_term", "cloud_logging", "archive"}
    assert set(embedded["stored"]) == {"long_term", "cloud_logging"}
    assert cloud["stored"]["archive"] == cloud["stored"]["long_term"]  # the archive copies the long-term store
    assert cloud["stored"]["cloud_logging"]["cluster_jobs"] == cloud["stored"]["long_term"]["cluster_jobs"]
    del cloud["stored"]["archive"]
    assert _comparable(cloud) == _comparable(embedded)
    left_at_home = {p.name for p in (tmp_path / "cloud").iterdir()}
    assert "spool" in left_at_home and not {"metadata.db", "logs", "master.key"} & left_at_home  # no embedded store


def test_an_erasure_reaches_every_place_and_its_receipt_lists_each(home: Path, cloud_urls, gcp_fakes) -> None:  # noqa: ANN001
    from conftest import make_record

    with dask.config.set(cloud_urls):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
    pipeline.write_records(
        make_record(kind, account=account) for account in ("acme", "globex") for kind in ("cluster_snapshot", "account")
    )
    acme = pipeline.subject_ref("acme")
    request = file_request(pipeline, "acme", reason="GDPR art. 17")
    [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    stores = done.receipt["stores"]
    assert {name: stores[name]["records"] for name in stores} == {"long_term": 2, "cloud_logging": 1, "archive": 2}
    rest, _ = gcp_fakes
    project = cloud_urls["pipeline.cloud-logging.url"].split("//")[1].split("?")[0]
    assert stores["cloud_logging"]["deleted"] and all(acme in log for log in stores["cloud_logging"]["deleted"])
    assert not [log for log in rest.logs(project) if acme in log]
    bucket = cloud_urls["pipeline.archive.url"].split("//")[1].split("/")[0]
    assert len(stores["archive"]["deleted"]) == 2 and all(
        k.startswith(f"s3://{bucket}/") for k in stores["archive"]["deleted"]
    )
    left = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert left and not [k for k in left if acme in k]
    assert done.receipt["key"]["state"] == "destroyed"
    for store in pipeline.stores.values():
        assert list(store.scan(subject_ref=acme)) == []
    assert request.request_id == done.request_id
