"""Nothing lost, nothing doubled: store outages mid-workload and a scheduler killed with SIGKILL."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dask.config
import pytest
from distributed import Client, LocalCluster, wait
from sqlalchemy.engine import make_url
from tcpproxy import TCPProxy

from pipeline.config import Settings
from pipeline.runtime import Pipeline


def inc(x: int) -> int:
    return x + 1


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def record_ids(settings: Settings, store: str) -> Counter[str]:
    pipeline = Pipeline.open(settings)
    return Counter(r["record_id"] for r in pipeline.read_records(store, account="acme"))


@pytest.mark.postgres
def test_postgres_outage_mid_workload_loses_and_doubles_nothing(home: Path, postgres_url: str) -> None:
    url = make_url(postgres_url)
    proxy = TCPProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    config = {
        "pipeline.account": "acme",
        "pipeline.long-term.url": proxied,
        "pipeline.plugin.interval": "100ms",
        "pipeline.emitter.retry-max": "500ms",
    }
    try:
        with dask.config.set(config):
            settings = Settings.from_config()
            Pipeline.open(settings, create=True)
            with (
                LocalCluster(
                    n_workers=1,
                    threads_per_worker=2,
                    processes=False,
                    dashboard_address=":0",
                    scheduler_kwargs={"preload": ["pipeline.preload"]},
                ) as cluster,
                Client(cluster) as client,
            ):
                emitter = cluster.scheduler.plugins["metadata-pipeline"].emitter
                wait(client.map(inc, range(100)))
                assert emitter.flush(30)
                proxy.cut()
                wait(client.map(inc, range(100, 300)))  # the second job finishes while PostgreSQL is away
                wait_for(lambda: emitter.stats.delivery_failures >= 2, what="failed deliveries")
                assert list(settings.spool_dir.glob("*.batch")), "undelivered batches must wait in the spool"
                proxy.restore()
                assert emitter.flush(60), emitter.stats
            assert not list(settings.spool_dir.glob("*.batch"))
            long_term, logging_store = record_ids(settings, "long_term"), record_ids(settings, "cloud_logging")
            records = list(Pipeline.open(settings).read_records(account="acme", data_type="cluster_jobs"))
    finally:
        proxy.close()
    assert max(long_term.values()) == 1 and max(logging_store.values()) == 1  # exactly once
    assert set(long_term) == set(logging_store)  # the logging store kept going during the outage
    assert sorted(r["tasks_total"] for r in records if r["kind"] == "job") == [100, 200]


def _start_scheduler(env: dict[str, str], scheduler_file: Path) -> subprocess.Popen[bytes]:
    scheduler_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--preload",
            "pipeline.preload",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(scheduler_file.exists, what="scheduler file")
    return proc


@pytest.mark.slow
def test_spool_is_replayed_after_the_scheduler_is_killed(home: Path, tmp_path: Path) -> None:
    broken_logs = tmp_path / "logs-blocked"
    broken_logs.write_text("a file where the logging store's folder should be: every write fails")
    env = {
        **os.environ,
        "DASK_PIPELINE__HOME": str(home),
        "DASK_PIPELINE__ACCOUNT": "acme",
        "DASK_PIPELINE__PLUGIN__INTERVAL": "100ms",
        "DASK_PIPELINE__EMITTER__LINGER": "0s",  # seal each snapshot at once: the test counts batches
        "DASK_PIPELINE__CLOUD_LOGGING__URL": f"file://{broken_logs}/store",
    }
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = _start_scheduler(env, scheduler_file)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            "--scheduler-file",
            str(scheduler_file),
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = Settings.from_config(cloud_logging_url=f"file://{broken_logs}/store")
        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(1, timeout=60)
            wait(client.map(operator.neg, range(50)))  # importable in the scheduler's process
        # the job record was queued when its tasks finished; two batches spooled later hold it
        before = len(list(settings.spool_dir.glob("*.batch")))
        wanted = max(before + 2, 3)  # none may be spooled yet when the client is done
        wait_for(lambda: len(list(settings.spool_dir.glob("*.batch"))) >= wanted, what="spooled batches")
        scheduler.send_signal(signal.SIGKILL)
    finally:
        scheduler.kill()
        scheduler.wait(10)
        worker.terminate()
        worker.wait(30)
    spooled = sorted(p.name for p in settings.spool_dir.glob("*.batch"))
    # the logging store is down: every batch waits in the spool, sealed
    assert len(spooled) >= 3
    assert not any(b"acme" in (settings.spool_dir / name).read_bytes() for name in spooled)

    broken_logs.unlink()  # the logging store is reachable again
    restarted = _start_scheduler(env, scheduler_file)
    try:
        wait_for(lambda: not set(spooled) & {p.name for p in settings.spool_dir.glob("*.batch")}, what="replay")
    finally:
        restarted.terminate()
        restarted.wait(30)
    long_term, logging_store = record_ids(settings, "long_term"), record_ids(settings, "cloud_logging")
    assert max(long_term.values()) == 1 and max(logging_store.values()) == 1  # replay doubled nothing
    assert set(long_term) == set(logging_store)  # every record of the killed run reached both stores
    jobs = [r for r in Pipeline.open(settings).read_records(account="acme") if r["kind"] == "job"]
    assert [j["tasks_total"] for j in jobs] == [50]
