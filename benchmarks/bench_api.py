"""Ingest through the control plane's API against ``Pipeline.ingest`` in-process, same records, same run.

``serve --no-retention`` runs as its own process on loopback (real uvicorn,
SQLite metadata database); 200 simulated clusters, each with its own cluster
token, post sealed batches concurrently with httpx's async client. The
in-process figure calls ``Pipeline.ingest`` on the same records (sealed to its
own home's intake key) one batch after another: the rate the API adds its
HTTP, auth and threading to.

Two API phases: *saturated* (every cluster posts its next batch as soon as the
last one is answered: the API's capacity, compared with in-process; latency
there is mostly queueing behind 200 requests in flight) and *paced* (the 200
clusters spread their posts evenly so that together they offer half the
measured capacity: the latency a cluster sees from a busy control plane that
is not overloaded; p99 goal < 250 ms).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask.config
import httpx

from benchmarks import row
from pipeline.config import Settings
from pipeline.intake import intake_private_key, load_public_key, public_key_text, seal_batch
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore

CLUSTERS = 200
ACCOUNTS = 20
RECORDS_PER_BATCH = 50
GOAL_RATIO = 0.5
GOAL_P99_MS = 250.0
PACED_LOAD = 0.5  # the paced phase offers this fraction of the measured capacity


def _records(account: str, cluster_id: str, batch: int) -> list[dict[str, Any]]:
    # observed in the last minutes: within the life of the clusters registered for the run (pipeline.bounds)
    start = datetime.now(UTC) - timedelta(minutes=10) + timedelta(seconds=batch)
    return [
        {
            "record_id": uuid.uuid4().hex,
            "data_type": "cluster_jobs",
            "kind": "cluster_snapshot",
            "account": account,
            "user": None,
            "cluster_id": cluster_id,
            "observed_at": start + timedelta(seconds=i),
            "n_workers": 8,
            "n_threads": 32,
            "memory_limit_bytes": 2**37,
            "memory_process_bytes": 3_500_000_000 + i,
            "memory_managed_bytes": 2_000_000_000 + i,
            "memory_unmanaged_bytes": 1_500_000_000,
            "memory_spilled_bytes": 0,
            "tasks_by_state": {"memory": 120 + i, "processing": 32},
            "tasks_completed_total": 10_000 + i,
            "tasks_erred_total": 0,
            "compute_seconds_total": 1234.5 + i,
        }
        for i in range(RECORDS_PER_BATCH)
    ]


def _clusters() -> list[tuple[str, str]]:
    return [(f"account-{c % ACCOUNTS:03d}", f"cluster-{c:04d}") for c in range(CLUSTERS)]


def _sealed(pipeline: Pipeline, batches: dict[str, list[list[dict[str, Any]]]]) -> dict[str, list[tuple[str, bytes]]]:
    """cluster id → its batches as (batch id, sealed bytes) for this pipeline's intake key."""
    public_key = load_public_key(public_key_text(intake_private_key(pipeline.keyring)))
    sealed: dict[str, list[tuple[str, bytes]]] = {}
    for cluster_id, records in batches.items():
        ids = [uuid.uuid4().hex for _ in records]
        sealed[cluster_id] = [(i, seal_batch(public_key, i, r)) for i, r in zip(ids, records, strict=True)]
    return sealed


def _in_process(pipeline: Pipeline, sealed: dict[str, list[tuple[str, bytes]]]) -> float:
    """Records per second through ``Pipeline.ingest``, one batch after another."""
    accounts = dict((c, a) for a, c in _clusters())
    started = time.perf_counter()
    n = 0
    for cluster_id, batches in sealed.items():
        principal = Principal("cluster", account=accounts[cluster_id], cluster_id=cluster_id)
        for batch_id, data in batches:
            n += pipeline.ingest(data, principal, idempotency_key=batch_id).records
    return n / (time.perf_counter() - started)


def _serve(home: Path) -> tuple[subprocess.Popen[str], str, threading.Thread]:
    env = {
        **os.environ,
        "DASK_PIPELINE__HOME": str(home),
        "DASK_PIPELINE__SERVER__HOST": "127.0.0.1",
        "DASK_PIPELINE__SERVER__PORT": "0",
        # capacity, not fair share: ten clusters of an account post at once, as fast as they are answered
        "DASK_PIPELINE__SERVER__INGEST_CONCURRENCY_PER_ACCOUNT": str(CLUSTERS),
        "DASK_PIPELINE__SERVER__INGEST_RATE_PER_ACCOUNT": "100000",
        "DASK_PIPELINE__SERVER__INGEST_RATE_PER_TOKEN": "100000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--no-retention"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"listening on (\S+)", line)
        if found:
            drain = threading.Thread(target=proc.stderr.read, daemon=True)  # keep the pipe from filling
            drain.start()
            return proc, found.group(1), drain
    raise RuntimeError("serve did not start")


async def _post_all(
    client: httpx.AsyncClient,
    url: str,
    tokens: dict[str, str],
    sealed: dict[str, list[tuple[str, bytes]]],
    period: float | None,
) -> tuple[float, list[float]]:
    """Every cluster posts its batches (back to back, or one per ``period``); (seconds, latencies)."""
    latencies: list[float] = []

    async def cluster(cluster_id: str, offset: float) -> None:
        if period is not None:
            await asyncio.sleep(offset)
        for batch_id, data in sealed[cluster_id]:
            began = time.perf_counter()
            response = await client.post(
                f"{url}/v1/ingest",
                content=data,
                headers={"Authorization": f"Bearer {tokens[cluster_id]}", "Idempotency-Key": batch_id},
            )
            latencies.append(time.perf_counter() - began)
            if response.status_code != 202:
                raise RuntimeError(f"ingest answered {response.status_code}: {response.text[:200]}")
            if period is not None:
                await asyncio.sleep(max(0.0, period - (time.perf_counter() - began)))

    started = time.perf_counter()
    spread = period or 0.0
    await asyncio.gather(*(cluster(c, spread * i / CLUSTERS) for i, c in enumerate(sealed)))
    return time.perf_counter() - started, latencies


async def _phases(
    url: str, tokens: dict[str, str], saturated: dict[str, list[tuple[str, bytes]]], paced: dict[str, Any]
) -> tuple[float, list[float], float, list[float]]:
    """Saturated, then paced at :data:`PACED_LOAD` of the capacity measured; one connection per cluster, kept."""
    limits = httpx.Limits(max_connections=CLUSTERS + 10, max_keepalive_connections=CLUSTERS + 10)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        seconds, saturated_latencies = await _post_all(client, url, tokens, saturated, None)
        capacity = len(saturated_latencies) / seconds  # batches per second
        period = CLUSTERS / (PACED_LOAD * capacity)  # each cluster's interval between posts
        _seconds, paced_latencies = await _post_all(client, url, tokens, paced, period)
    return seconds, saturated_latencies, period, paced_latencies


def _ms(latencies: list[float], q: int) -> float:
    return statistics.quantiles(latencies, n=100)[q - 1] * 1000


def run(quick: bool) -> list[dict[str, Any]]:
    per_cluster = 2 if quick else 5
    paced_batches = 1 if quick else 2
    clusters = _clusters()
    saturated = {c: [_records(a, c, b) for b in range(per_cluster)] for a, c in clusters}
    paced = {c: [_records(a, c, 100 + b) for b in range(paced_batches)] for a, c in clusters}
    n_saturated = CLUSTERS * per_cluster * RECORDS_PER_BATCH
    n_paced = CLUSTERS * paced_batches * RECORDS_PER_BATCH
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        with dask.config.set({"pipeline.home": f"{tmp}/in-process"}):
            local = Pipeline.open(Settings.from_config(), create=True)
            local_rate = _in_process(local, _sealed(local, saturated))
            local.close()
        with dask.config.set({"pipeline.home": f"{tmp}/api"}):
            remote = Pipeline.open(Settings.from_config(), create=True)
            store = TokenStore(remote)
            tokens = {c: store.create("cluster", a, cluster_id=c, ttl=timedelta(days=1)).token for a, c in clusters}
            sealed_saturated, sealed_paced = _sealed(remote, saturated), _sealed(remote, paced)
            remote.close()
        proc, url, drain = _serve(Path(tmp) / "api")
        try:
            seconds, saturated_latencies, period, paced_latencies = asyncio.run(
                _phases(url, tokens, sealed_saturated, sealed_paced)
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            drain.join(30)
    api_rate = n_saturated / seconds
    ratio = api_rate / local_rate
    p99 = _ms(paced_latencies, 99)
    shape = f"{CLUSTERS} clusters × {per_cluster} batches × {RECORDS_PER_BATCH} cluster_snapshot records"
    return [
        row("api ingest: in-process Pipeline.ingest", local_rate, "records/s", note=f"same records; {shape}"),
        row(
            "api ingest: POST /v1/ingest, saturated",
            api_rate,
            "records/s",
            note=f"{CLUSTERS} concurrent httpx clients over loopback → serve --no-retention (SQLite); {shape}",
        ),
        row(
            "api ingest: API ÷ in-process rate",
            ratio,
            "×",
            f"≥ {GOAL_RATIO}",
            ratio >= GOAL_RATIO,
            "same records, same run",
        ),
        row(
            "api ingest: latency p50, saturated",
            _ms(saturated_latencies, 50),
            "ms",
            note=f"p99 {_ms(saturated_latencies, 99):.0f} ms with {CLUSTERS} requests always in flight",
        ),
        row(
            "api ingest: latency p50, paced",
            _ms(paced_latencies, 50),
            "ms",
            note=f"{CLUSTERS} clusters, each posting every {period:.1f} s: {PACED_LOAD:.0%} of capacity "
            f"({CLUSTERS / period * RECORDS_PER_BATCH:,.0f} records/s offered), {n_paced:,} records",
        ),
        row("api ingest: latency p99, paced", p99, "ms", f"< {GOAL_P99_MS:.0f}", p99 < GOAL_P99_MS),
    ]
