"""Compaction and the cloud backends: expiry after compaction, write throughput per backend.

**Expiry after compaction.** A local logging store with 30 closed days of
hourly deliveries of 10 accounts (24 x 10 x 30 = 7,200 segment files) holding
1,000,000 records, plus one live day. Timed: the store's ``expire`` of the 30
days (what a retention pass does for the logging store), on that store as
written and on the same store after compaction (one file per subject and day,
310 files). Compaction's own time is reported too (retention passes run it on
each day once it is closed, long before the day expires).

**Write throughput.** The same sealed segments (batches of 2,000
``cluster_snapshot`` records of 20 accounts, as the emitter delivers them)
written to the local file store, to Cloud Logging (the REST fake of the test
suite, on loopback, through the real client) and to the S3 Parquet archive
(moto's server, in a process of its own, over HTTP; the archive decrypts each
segment and puts it as an encrypted Parquet object of its own, created only if
absent: no read-modify-write). Records per second of ``write``, best of three
interleaved rounds; goal: the archive at least 25 % of the local files' rate in
the same run.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import dask.config

from benchmarks import row
from benchmarks.bench_retention import DAY0, EXPIRED_DAYS, GOAL_SECONDS, _table
from pipeline.retention.enforcer import _merge
from pipeline.runtime import Pipeline
from pipeline.segments import Segment, seal
from pipeline.stores import open_store

ACCOUNTS = 10
#: the archive's write rate as a share of the local files' rate, at least
ARCHIVE_SHARE = 0.25
#: write rounds per backend (fresh stores each), the best of each reported
ROUNDS = 3
DELIVERIES = 24


def _fill(pipeline: Pipeline, records: int) -> int:
    """30 expired days of hourly deliveries and one live day; returns the expired records."""
    store = pipeline.stores["cloud_logging"]
    per_day = records // (EXPIRED_DAYS * ACCOUNTS)
    per_delivery = per_day // DELIVERIES
    expired = 0
    for d in range(EXPIRED_DAYS + 1):
        for a in range(ACCOUNTS):
            account = f"bench-{a}"
            ref = pipeline.keyring.subject_ref(account)
            table = _table(per_delivery * DELIVERIES, DAY0 + timedelta(days=d), account)
            batch = [
                seal(pipeline.keyring, ref, None, table.slice(h * per_delivery, per_delivery))
                for h in range(DELIVERIES)
            ]
            store.write(batch)
            if d < EXPIRED_DAYS:
                expired += table.num_rows
    return expired


def _expiry(records: int, compacted: bool, where: str | None = None) -> tuple[float, int, int, float]:
    """Seconds of the expiry, records removed, files before it, seconds compaction took (store in ``where``)."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-cloud-", dir=where) as home,
        dask.config.set({"pipeline.home": home}),
    ):
        pipeline = Pipeline.open(create=True)
        expired = _fill(pipeline, records)
        store = pipeline.stores["cloud_logging"]
        compaction = 0.0
        if compacted:
            start = time.perf_counter()
            # every day, the live one too, so the timed pass below only expires
            store.compact(DAY0 + timedelta(days=EXPIRED_DAYS + 1), functools.partial(_merge, pipeline))
            compaction = time.perf_counter() - start
        files = sum(1 for _ in (Path(home) / "logs").rglob("*.seg"))
        os.sync()
        start = time.perf_counter()
        removed = store.expire("cluster_jobs", DAY0 + timedelta(days=EXPIRED_DAYS))
        seconds = time.perf_counter() - start
        assert removed.records == expired, (removed, expired)
        pipeline.close()
    return seconds, expired, files, compaction


def _segments(pipeline: Pipeline, records: int) -> list[list[Segment]]:
    batches = []
    for b in range(records // 2_000):
        at = DAY0 + timedelta(minutes=b)
        batch = []
        for a in range(20):
            account = f"writer-{a}"
            table = _table(100, at, account)
            batch.append(seal(pipeline.keyring, pipeline.keyring.subject_ref(account), None, table))
        batches.append(batch)
    return batches


def _throughput(url: str, pipeline: Pipeline, batches: list[list[Segment]]) -> float:
    store = open_store(url, keyring=pipeline.keyring)
    start = time.perf_counter()
    for batch in batches:
        store.write(batch)
    seconds = time.perf_counter() - start
    store.close()
    return sum(s.n_records for b in batches for s in b) / seconds


def _set_up(url: str) -> None:
    store = open_store(url)
    store.set_up({"cluster_jobs": timedelta(days=30)})
    store.close()


def _wait_for(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_rows(records: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fake_gcp import FakeConfigGRPC, FakeLoggingREST  # the test doubles: benchmarks run from a source checkout

    config = FakeConfigGRPC().start()
    rest = FakeLoggingREST(config).start()
    port = _free_port()
    # moto in a process of its own, as S3 is never inside the writer's process (nor its GIL)
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_for(port)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="bench-cloud-") as home, dask.config.set({"pipeline.home": home}):
            pipeline = Pipeline.open(create=True)
            batches = _segments(pipeline, records)
            rates: dict[str, float] = {}
            for round_ in range(ROUNDS):  # interleaved, best of each: the machine's load varies
                project = f"bench-{uuid.uuid4().hex[:8]}"
                config.add_bucket(f"projects/{project}/locations/global/buckets/_Default", 30)
                gcp = f"gcp-logging://{project}?endpoint={rest.endpoint}&config-endpoint={config.endpoint}"
                _set_up(gcp)  # the bucket of the pipeline's own, as init makes it
                urls = {
                    "local files": f"file://{home}/logs-bench-{round_}",
                    "Cloud Logging (REST fake)": gcp,
                    "S3 Parquet archive (moto)": f"s3://bench/archive-{round_}?endpoint={endpoint}",
                }
                for name, url in urls.items():
                    rates[name] = max(rates.get(name, 0.0), _throughput(url, pipeline, batches))
            pipeline.close()
    finally:
        moto.terminate()
        moto.wait()
        rest.stop()
        config.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    n = len(batches) * 2_000
    note = f"{n:,} records in {len(batches)} batches of 20 segments, best of {ROUNDS} rounds"
    rows = [row(f"write: {name}", rate, "records/s", note=note) for name, rate in rates.items()]
    share = rates["S3 Parquet archive (moto)"] / rates["local files"]
    rows.append(
        row(
            "write: S3 archive / local files",
            100 * share,
            "%",
            f">= {100 * ARCHIVE_SHARE:g} %",
            share >= ARCHIVE_SHARE,
            "the two write rates above, same segments, same run",
        )
    )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    records = 100_000 if quick else 1_000_000
    plain, expired, plain_files, _ = _expiry(records, compacted=False)
    seconds, _, files, compaction = _expiry(records, compacted=True)
    rows = [
        row(
            f"expiry after compaction: 30 days, {expired:,} log records",
            seconds,
            "s",
            f"< {GOAL_SECONDS:g} s",
            seconds < GOAL_SECONDS,
            f"LocalFileStore.expire over {files:,} files; compacting them from {plain_files:,} took {compaction:.1f} s",
        ),
        row(
            f"expiry without compaction: 30 days, {expired:,} log records",
            plain,
            "s",
            note=f"the same records as delivered, {plain_files:,} segment files",
        ),
    ]
    if Path("/dev/shm").is_dir():  # the same without the disk: what expiry itself costs
        shm, _, shm_files, _ = _expiry(records, compacted=True, where="/dev/shm")
        rows.append(
            row(
                f"expiry after compaction (tmpfs): 30 days, {expired:,} log records",
                shm,
                "s",
                f"< {GOAL_SECONDS:g} s",
                shm < GOAL_SECONDS,
                f"the same {shm_files:,} files on /dev/shm: the disk's share of the figure above",
            )
        )
    return rows + _write_rows(20_000 if quick else 100_000)
