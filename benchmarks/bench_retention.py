"""Retention at scale: the 30-day expiry pass (erasure: ``bench_erasure.py``).

**Expiry.** A local logging store (``file://``, day folders) holding 30 days
past the limit plus one live day: 100 subjects, one ``cluster_snapshot``
segment per subject and day. One ``enforce`` pass as of day 31 removes the 30
old days; its wall time is measured, audit entry included. The same store is
built with 1,000,000 and with 10,000,000 records in the expired days (the same
3,000 segment files, 10x the records each): expiry drops whole day folders and
counts records from file names, so it must not grow with the records.

What it does grow with is files: the pass is compared with the filesystem's own
floor, measured in the same run: ``rmtree`` of the same layout (30 day folders,
100 subject folders each, files of the same sizes) written with plain ``open``.
On a filesystem mounted with ``discard`` (online TRIM) each unlink costs a
fraction of a millisecond, which no layout of 3,000 files escapes.

Segments are built cheaply: one sealed segment per day, copied under new ids
and subject refs (the copies do not decrypt, which expiry never does), and
written by ``LocalFileStore.write`` itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask.config
import pyarrow as pa

from benchmarks import row
from pipeline.records import KINDS
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline
from pipeline.segments import Segment, seal

DAY0 = datetime(2026, 1, 1, tzinfo=UTC)
EXPIRED_DAYS = 30
SUBJECTS = 100
GOAL_SECONDS = 1.0
GOAL_FLAT = 2.0


def _table(n: int, day: datetime, account: str = "bench") -> pa.Table:
    """``n`` snapshots spread over one day (every field set, as the plugin writes them)."""
    step = 86_400_000_000 // n
    return pa.table(
        {
            "record_id": [uuid.uuid4().hex for _ in range(n)],
            "data_type": ["cluster_jobs"] * n,
            "kind": ["cluster_snapshot"] * n,
            "account": [account] * n,
            "user": [None] * n,
            "cluster_id": ["cluster-bench"] * n,
            "observed_at": pa.array(
                [int(day.timestamp() * 1e6) + i * step for i in range(n)], pa.timestamp("us", "UTC")
            ),
            "n_workers": [4] * n,
            "n_threads": [16] * n,
            "memory_limit_bytes": [2**34] * n,
            "memory_process_bytes": [2**31] * n,
            "memory_managed_bytes": [2**30] * n,
            "memory_unmanaged_bytes": [2**29] * n,
            "memory_spilled_bytes": [0] * n,
            "tasks_by_state": [[("memory", 10), ("processing", 4)]] * n,
            "tasks_completed_total": list(range(n)),
            "tasks_erred_total": [0] * n,
            "compute_seconds_total": [float(i) for i in range(n)],
            "jobs_running": [[]] * n,
        },
        schema=KINDS["cluster_snapshot"].schema,
    )


def _fill_logging_store(pipeline: Pipeline, records_per_segment: int) -> int:
    """30 expired days and one live day; returns the records in the expired days."""
    store = pipeline.stores["cloud_logging"]
    subject = pipeline.keyring.subject_ref("bench")
    refs = [pipeline.keyring.subject_ref(f"bench-{i}") for i in range(SUBJECTS)]
    expired = 0
    for d in range(EXPIRED_DAYS + 1):
        sealed = seal(pipeline.keyring, subject, None, _table(records_per_segment, DAY0 + timedelta(days=d)))
        batch: list[Segment] = [replace(sealed, segment_id=uuid.uuid4().hex, subject_ref=ref) for ref in refs]
        store.write(batch)
        if d < EXPIRED_DAYS:
            expired += sum(s.n_records for s in batch)
    return expired


def _expiry(records: int, where: str | None = None) -> tuple[float, int, int, float]:
    """Seconds for one pass over a fresh store in ``where``; records and segments removed; the floor."""
    per_segment = records // (EXPIRED_DAYS * SUBJECTS)
    with (
        tempfile.TemporaryDirectory(prefix="bench-retention-", dir=where) as home,
        dask.config.set({"pipeline.home": home}),
    ):
        pipeline = Pipeline.open(create=True)
        expired = _fill_logging_store(pipeline, per_segment)
        os.sync()
        start = time.perf_counter()
        report = enforce(pipeline, DAY0 + timedelta(days=EXPIRED_DAYS + 30))
        seconds = time.perf_counter() - start
        assert not report.failed_steps, report.failed_steps  # a step that failed would time nothing
        counts = report.removed["cloud_logging"]["cluster_jobs"]
        assert counts.records == expired, (counts, expired)
        pipeline.close()
        floor = _rmtree_floor(Path(home) / "floor", size=_segment_size(Path(home) / "logs"))
    return seconds, counts.records, counts.segments, floor


def _segment_size(root: Path) -> int:
    """Bytes of one segment file still in the store (the live day's)."""
    return next(root.rglob("*.seg")).stat().st_size


def _rmtree_floor(root: Path, size: int) -> float:
    """Seconds for ``rmtree`` of the expired layout written with plain files."""
    blob = os.urandom(size)
    days = [root / f"day-{d}" for d in range(EXPIRED_DAYS)]
    for day in days:
        for s in range(SUBJECTS):
            (day / f"subject-{s}").mkdir(parents=True)
            (day / f"subject-{s}" / "segment.seg").write_bytes(blob)
    os.sync()
    start = time.perf_counter()
    for day in days:
        shutil.rmtree(day)
    return time.perf_counter() - start


def _expiry_rows(base: int, where: str | None, label: str) -> list[dict[str, Any]]:
    small, small_records, files, small_floor = _expiry(base, where)
    large, large_records, _, large_floor = _expiry(base * 10, where)
    layout = f"{files:,} segment files in 30 day folders"
    return [
        row(
            f"expiry{label}: 30 days, {small_records:,} log records",
            small,
            "s",
            f"< {GOAL_SECONDS:g} s",
            small < GOAL_SECONDS,
            f"one enforce pass removing {layout}; rmtree of that layout alone: {small_floor:.2f} s",
        ),
        row(
            f"expiry{label}: 30 days, {large_records:,} log records",
            large,
            "s",
            f"< {GOAL_SECONDS:g} s",
            large < GOAL_SECONDS,
            f"the same {layout}, 10x the records in each; rmtree alone: {large_floor:.2f} s",
        ),
        row(
            f"expiry{label}: 10x records / 1x records",
            large / small,
            "ratio",
            f"≤ {GOAL_FLAT:g} (flat)",
            large / small <= GOAL_FLAT,
            f"rmtree alone: {large_floor / small_floor:.2f}x; records are never read, only file names",
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    base = 100_000 if quick else 1_000_000
    rows = _expiry_rows(base, None, "")
    if Path("/dev/shm").is_dir():  # the same without the disk: what the pass itself costs
        rows += _expiry_rows(base, "/dev/shm", " (tmpfs)")
    return rows
