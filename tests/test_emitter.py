"""Emitter and spool: bounded close, per-store acknowledgement, replay, corrupt files."""

from __future__ import annotations

import time
from pathlib import Path

import dask.config
from conftest import make_record

from pipeline.config import Settings
from pipeline.emitter import Emitter
from pipeline.runtime import Pipeline
from pipeline.spool import Spool


def _emitter(settings: Settings) -> Emitter:
    pipeline = Pipeline.open(settings, create=True)
    emitter = Emitter(lambda: pipeline, Spool(settings.spool_dir), retry_max=0.2)
    emitter.start()
    return emitter


def test_close_is_bounded_and_leaves_undelivered_batches_in_the_spool(home: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with dask.config.set({"pipeline.cloud-logging.url": f"file://{blocked}/logs"}):
        settings = Settings.from_config()
    emitter = _emitter(settings)
    emitter.submit([make_record() for _ in range(5)])
    emitter.submit([make_record("software_env", env_id="e1", packages={"dask": "1"})])
    started = time.monotonic()
    assert emitter.close(timeout=1.0) is False
    assert time.monotonic() - started < 5
    left = sorted(settings.spool_dir.glob("*.batch"))
    assert left and all(p.with_suffix(".ack-long_term").exists() for p in left)
    assert emitter.stats.delivery_failures["cloud_logging"] >= 1

    blocked.unlink()  # the logging store is back: a new emitter replays to it only
    again = _emitter(settings)
    assert again.close(timeout=10.0) is True
    assert again.stats.batches_replayed == len(left) == again.stats.batches_delivered
    assert list(settings.spool_dir.glob("*.batch")) == []
    pipeline = Pipeline.open(settings)
    for store in ("long_term", "cloud_logging"):
        assert len(list(pipeline.read_records(store, account="acme"))) == 6


def test_account_records_never_reach_the_logging_store(home: Path, settings: Settings) -> None:
    emitter = _emitter(settings)
    emitter.submit([make_record("account", username="ann", email="ann@acme.test"), make_record()])
    assert emitter.close(timeout=10.0)
    pipeline = Pipeline.open(settings)
    assert sorted(r["kind"] for r in pipeline.read_records("long_term")) == ["account", "cluster_snapshot"]
    assert [r["kind"] for r in pipeline.read_records("cloud_logging")] == ["cluster_snapshot"]


def test_corrupt_spool_file_is_set_aside_and_the_rest_delivered(home: Path, settings: Settings) -> None:
    spool = Spool(settings.spool_dir)
    (settings.spool_dir / "00000000000000000001-deadbeef.batch").write_bytes(b"PLSPOOL1 garbage")
    pipeline = Pipeline.open(settings, create=True)
    from pipeline.runtime import seal_records

    spool.append(seal_records(pipeline.keyring, [make_record()]), frozenset({"long_term", "cloud_logging"}))
    emitter = _emitter(settings)
    assert emitter.close(timeout=10.0)
    assert emitter.stats.corrupt_spool_files == 1
    assert [p.name for p in spool.corrupt_files()] == ["00000000000000000001-deadbeef.batch"]
    assert len(list(pipeline.read_records("cloud_logging"))) == 1


def test_a_malformed_record_is_dropped_and_counted_without_blocking_the_rest(home: Path, settings: Settings) -> None:
    emitter = _emitter(settings)
    emitter.submit([make_record(n_workers="not a number"), make_record(n_workers=1)])
    assert emitter.flush(10)
    emitter.submit([make_record(n_workers=2)])
    assert emitter.close(timeout=10.0)
    assert emitter.stats.records_dropped == 1
    assert sorted(r["n_workers"] for r in Pipeline.open(settings).read_records("long_term")) == [1, 2]
