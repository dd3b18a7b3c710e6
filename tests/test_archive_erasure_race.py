"""An erasure finishing while a retention pass compacts the same subject's archive objects (two processes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import boto3
import dask.config
import pytest
from conftest import make_record

from pipeline.retention.requests import file_request, get_request, process_pending
from pipeline.runtime import Pipeline


@pytest.mark.parametrize("lands", ["before the key is shredded", "after", "after her next record made a new key"])
def test_a_compaction_racing_an_erasure_leaves_nothing_of_the_subject(
    home: Path, s3_archive_url: str, monkeypatch: pytest.MonkeyPatch, lands: str
) -> None:
    """The compaction read ann's two objects of a closed day; then her erasure deleted them. A merged object
    put before her key was shredded stayed, ciphertext in no receipt, for good; one put after failed the pass;
    one put after a record of hers since had made her a new key was put under it: her old rows readable."""
    with dask.config.set({"pipeline.archive.url": s3_archive_url}):
        pipeline = Pipeline.open(create=True)
    day = datetime.now(UTC) - timedelta(days=3)
    for minute in (0, 1):  # each write puts an object of its own
        pipeline.write_records([make_record(account="acme", user="ann", observed_at=day + timedelta(minutes=minute))])
    request = file_request(pipeline, "acme", "ann")
    archive, keyring = pipeline.stores["archive"], pipeline.keyring
    put, destroy, erased = archive._put, keyring.destroy, []

    def erase_around_put(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        monkeypatch.setattr(archive, "_put", put)  # once: her next record's own object is put as ever
        if lands.startswith("after"):
            erased.extend(process_pending(pipeline))
            if lands != "after":
                pipeline.write_records([make_record(account="acme", user="ann")])
            return put(*args, **kwargs)

        def put_then_destroy(*destroying, **options):  # noqa: ANN002, ANN003, ANN202
            put(*args, **kwargs)  # after the erasure listed and deleted her objects
            return destroy(*destroying, **options)

        monkeypatch.setattr(keyring, "destroy", put_then_destroy)
        erased.extend(process_pending(pipeline))
        return True

    monkeypatch.setattr(archive, "_put", erase_around_put)
    archive.compact(datetime.now(UTC) - timedelta(days=1), lambda segments: None)

    assert [r.state for r in erased] == ["completed"]
    bucket = urlparse(s3_archive_url).netloc
    ann = keyring.user_ref("acme", "ann")
    listed = boto3.client("s3").list_object_versions(Bucket=bucket)
    versions = listed.get("Versions", []) + listed.get("DeleteMarkers", [])
    assert [v["Key"] for v in versions if ann in v["Key"] and f"{day:%Y-%m-%d}" in v["Key"]] == []
    deleted = get_request(pipeline, request.request_id).receipt["stores"]["archive"]["deleted"]
    assert len(deleted) == (3 if lands.startswith("before") else 2)  # and the merged object, when it landed
