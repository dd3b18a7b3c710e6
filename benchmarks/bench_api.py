"""Ingest through the control plane's API against ``Pipeline.ingest`` in-process, same records, same run.

``serve --no-retention`` runs as its own process on loopback (real uvicorn),
once with SQLite and, when a PostgreSQL server is given
(``PIPELINE_BENCH_POSTGRES_URL``, else ``PIPELINE_TEST_POSTGRES_URL``; each run
in fresh schemas, dropped after), once with PostgreSQL as the metadata
database; 200 simulated clusters, each with its own cluster token, post sealed
batches concurrently with httpx's async client. The in-process figure calls
``Pipeline.ingest`` on the same records (sealed to its own home's intake key)
one batch after another: the rate the API adds its HTTP, auth and threading to.
With PostgreSQL, two ``serve --no-retention`` processes on the one database
then share the clusters (throughput reported, no goal: two cores).

The fair-share limits are raised for the run (one process must take every
cluster's batches; 20 accounts of 10 clusters each would be over the default
per-account limits), so the figures measure ingest, not the limits.

Two API phases: *saturated* (every cluster posts its next batch as soon as the
last one is answered: the API's capacity, compared with in-process; latency
there is mostly queueing behind 200 requests in flight) and *paced* (the 200
clusters spread their posts evenly so that together they offer half the
measured capacity: the latency a cluster sees from a busy control plane that
is not overloaded; p99 goal < 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask.config
import httpx
import psutil

from benchmarks import row
from pipeline.config import Settings
from pipeline.intake import intake_private_key, load_public_key, public_key_text, seal_batch
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore

CLUSTERS = 200
ACCOUNTS = 20
RECORDS_PER_BATCH = 50
GOAL_RATIO = 0.8
GOAL_P99_MS = 100.0
GOAL_BATCHES = 1000.0  # batches a second one process takes: 10,000 clusters each sending every 5 s, halved
#: fair-share limits far above what the run sends, as ``pipeline.server.*`` environment variables
OPEN_LIMITS = {
    f"DASK_PIPELINE__SERVER__INGEST_{name}": "100000"
    for name in ("CONCURRENCY_PER_ACCOUNT", "CONCURRENCY_PER_TOKEN", "RATE_PER_ACCOUNT", "RATE_PER_TOKEN")
}
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


def _serve_env(home: Path, database: str | None) -> dict[str, str]:
    return {
        **os.environ,
        **OPEN_LIMITS,
        "DASK_PIPELINE__HOME": str(home),
        "DASK_PIPELINE__SERVER__HOST": "127.0.0.1",
        "DASK_PIPELINE__SERVER__PORT": "0",
        **({"DASK_PIPELINE__LONG_TERM__URL": database} if database else {}),
    }


def _start(module: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str, threading.Thread]:
    """``python -m <module...>`` until it logs the URL it listens on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *module], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"listening on (\S+)", line)
        if found:
            drain = threading.Thread(target=proc.stderr.read, daemon=True)  # keep the pipe from filling
            drain.start()
            return proc, found.group(1), drain
    raise RuntimeError(f"{module[0]} did not start")


async def _post_all(
    clients: dict[str, httpx.AsyncClient],
    urls: list[str],
    tokens: dict[str, str],
    sealed: dict[str, list[tuple[str, bytes]]],
    period: float | None,
) -> tuple[float, list[float]]:
    """Every cluster posts its batches (back to back, or one per ``period``); (seconds, latencies)."""
    latencies: list[float] = []

    async def cluster(cluster_id: str, offset: float, url: str) -> None:
        if period is not None:
            await asyncio.sleep(offset)
        for batch_id, data in sealed[cluster_id]:
            began = time.perf_counter()
            response = await clients[cluster_id].post(
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
    await asyncio.gather(*(cluster(c, spread * i / CLUSTERS, urls[i % len(urls)]) for i, c in enumerate(sealed)))
    return time.perf_counter() - started, latencies


@contextlib.asynccontextmanager
async def _clients(cluster_ids: Iterable[str]) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """One client per cluster, as each cluster has its own, so its one connection is kept.

    Not one client with a pool of 200 connections: httpcore scans its whole pool for each
    request, and that client then spent more CPU than the server it measured. Without
    sniffio installed, httpcore looks for it on disk several times a request: told it is absent.
    """
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]  # httpcore's probe: a failed import per call
    async with contextlib.AsyncExitStack() as stack:
        yield {c: await stack.enter_async_context(httpx.AsyncClient(timeout=120)) for c in cluster_ids}


async def _phases(
    served: tuple[str, int],
    tokens: dict[str, str],
    saturated: dict[str, list[tuple[str, bytes]]],
    paced: dict[str, Any],
) -> tuple[_Saturated, float, list[float]]:
    """Saturated, then paced at :data:`PACED_LOAD` of the capacity measured; one connection per cluster, kept."""
    async with _clients(saturated) as clients:
        measured = await _saturated_phase(clients, served, tokens, saturated)
        capacity = len(measured.latencies) / measured.seconds  # batches per second
        period = CLUSTERS / (PACED_LOAD * capacity)  # each cluster's interval between posts
        _seconds, paced_latencies = await _post_all(clients, [served[0]], tokens, paced, period)
    return measured, period, paced_latencies


@dataclass(frozen=True)
class _Saturated:
    seconds: float
    server_cpu: float  # CPU seconds of the server process over the phase
    client_cpu: float  # CPU seconds of this process (the load generator) over the phase
    latencies: list[float]


async def _saturated_phase(
    clients: dict[str, httpx.AsyncClient],
    served: tuple[str, int],
    tokens: dict[str, str],
    sealed: dict[str, list[tuple[str, bytes]]],
) -> _Saturated:
    """Every cluster posts its batches back to back to the server ``served`` (URL, pid)."""
    url, pid = served
    server, client = _cpu_seconds(pid), _cpu_seconds(os.getpid())
    seconds, latencies = await _post_all(clients, [url], tokens, sealed, None)
    return _Saturated(seconds, _cpu_seconds(pid) - server, _cpu_seconds(os.getpid()) - client, latencies)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far: what a batch costs whatever else the machine runs."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _saturate(urls: list[str], tokens: dict[str, str], sealed: dict[str, list[tuple[str, bytes]]]) -> float:
    """Seconds for every cluster to post its batches back to back, the clusters spread over ``urls``."""
    async with _clients(sealed) as clients:
        seconds, _latencies = await _post_all(clients, urls, tokens, sealed, None)
    return seconds


def _ms(latencies: list[float], q: int) -> float:
    return statistics.quantiles(latencies, n=100)[q - 1] * 1000


@contextlib.contextmanager
def _serving(home: Path, database: str | None, processes: int = 1) -> Iterator[list[tuple[str, int]]]:
    """``processes`` ``serve --no-retention`` on one home and database; their (URL, pid) until the block ends."""
    with _running(["pipeline", "serve", "--no-retention"], _serve_env(home, database), processes) as served:
        yield served


@contextlib.contextmanager
def _running(module: list[str], env: dict[str, str], processes: int = 1) -> Iterator[list[tuple[str, int]]]:
    """``processes`` of ``python -m <module...>``; their (URL, pid) until the block ends (then SIGTERM)."""
    started = []
    try:
        for _ in range(processes):
            started.append(_start(module, env))
        yield [(url, proc.pid) for proc, url, _drain in started]
    finally:
        for proc, _url, drain in started:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            drain.join(30)


@contextlib.contextmanager
def _fresh_schemas(base: str | None, count: int) -> Iterator[list[str]]:
    """``count`` URLs of new schemas on the PostgreSQL server ``base`` (dropped afterwards); none without one."""
    if base is None:
        yield []
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schemas = [f"bench_{uuid.uuid4().hex[:12]}" for _ in range(count)]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield [
            url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
            for schema in schemas
        ]
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _prepared(
    folder: Path, database: str | None, batches: dict[str, list[list[dict[str, Any]]]]
) -> tuple[Pipeline, dict[str, list[tuple[str, bytes]]]]:
    overrides = {"pipeline.home": str(folder), **({"pipeline.long-term.url": database} if database else {})}
    with dask.config.set(overrides):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
    return pipeline, _sealed(pipeline, batches)


def _tokens(folder: Path, database: str | None) -> dict[str, str]:
    overrides = {"pipeline.home": str(folder), **({"pipeline.long-term.url": database} if database else {})}
    with dask.config.set(overrides):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
    store = TokenStore(pipeline)
    tokens = {c: store.create("cluster", a, cluster_id=c, ttl=timedelta(days=1)).token for a, c in _clusters()}
    pipeline.close()
    return tokens


def _one_database(
    tmp: Path, name: str, databases: list[str | None], per_cluster: int, paced_batches: int
) -> list[dict[str, Any]]:
    """The rows of one metadata database: in-process, then one ``serve`` saturated and paced."""
    clusters = _clusters()
    saturated = {c: [_records(a, c, b) for b in range(per_cluster)] for a, c in clusters}
    paced = {c: [_records(a, c, 100 + b) for b in range(paced_batches)] for a, c in clusters}
    n_saturated = CLUSTERS * per_cluster * RECORDS_PER_BATCH
    n_paced = CLUSTERS * paced_batches * RECORDS_PER_BATCH
    local, sealed_local = _prepared(tmp / f"{name}-in-process", databases[0], saturated)
    local_rate = _in_process(local, sealed_local)
    local.close()
    home = tmp / f"{name}-api"
    tokens = _tokens(home, databases[1])
    remote, sealed_saturated = _prepared(home, databases[1], saturated)
    sealed_paced = _sealed(remote, paced)
    remote.close()
    with _serving(home, databases[1]) as served:
        measured, period, paced_latencies = asyncio.run(_phases(served[0], tokens, sealed_saturated, sealed_paced))
    saturated_latencies = measured.latencies
    cpu_ms = measured.server_cpu / (CLUSTERS * per_cluster) * 1000
    client_ms = measured.client_cpu / (CLUSTERS * per_cluster) * 1000
    api_rate = n_saturated / measured.seconds
    batches = api_rate / RECORDS_PER_BATCH
    ratio = api_rate / local_rate
    p99 = _ms(paced_latencies, 99)
    shape = f"{CLUSTERS} clusters × {per_cluster} batches × {RECORDS_PER_BATCH} cluster_snapshot records"
    label = f"api ingest ({name})"
    return [
        row(f"{label}: in-process Pipeline.ingest", local_rate, "records/s", note=f"same records; {shape}"),
        row(
            f"{label}: POST /v1/ingest, saturated",
            api_rate,
            "records/s",
            note=f"{CLUSTERS} concurrent httpx clients over loopback → serve --no-retention; {shape}",
        ),
        row(
            f"{label}: POST /v1/ingest, saturated",
            batches,
            "batches/s",
            f"≥ {GOAL_BATCHES:,.0f}",
            batches >= GOAL_BATCHES,
            f"one process; load average {_load()}",
        ),
        row(
            f"{label}: serve CPU per batch, saturated",
            cpu_ms,
            "ms",
            note=f"user + system CPU of the serve process over the saturated phase: at most {1000 / cpu_ms:,.0f} "
            "batches/s on one free core",
        ),
        row(
            f"{label}: load generator CPU per batch, saturated",
            client_ms,
            "ms",
            note="user + system CPU of the benchmark's own process (the 200 clients) over the saturated phase; "
            "it shares the machine's cores with serve",
        ),
        row(
            f"{label}: API ÷ in-process rate",
            ratio,
            "×",
            f"≥ {GOAL_RATIO}",
            ratio >= GOAL_RATIO,
            "same records, same run",
        ),
        row(
            f"{label}: latency p50, saturated",
            _ms(saturated_latencies, 50),
            "ms",
            note=f"p99 {_ms(saturated_latencies, 99):.0f} ms with {CLUSTERS} requests always in flight",
        ),
        row(
            f"{label}: latency p50, paced",
            _ms(paced_latencies, 50),
            "ms",
            note=f"{CLUSTERS} clusters, each posting every {period:.2f} s: {PACED_LOAD:.0%} of capacity "
            f"({CLUSTERS / period * RECORDS_PER_BATCH:,.0f} records/s offered), {n_paced:,} records",
        ),
        row(
            f"{label}: latency p99, paced",
            p99,
            "ms",
            f"< {GOAL_P99_MS:.0f}",
            p99 < GOAL_P99_MS,
            f"of {len(paced_latencies):,} requests",
        ),
    ]


def _floor(tmp: Path, per_cluster: int) -> list[dict[str, Any]]:
    """The same clients posting the same sealed batches to :mod:`benchmarks.asgi_floor`: serve's HTTP server
    with none of the pipeline's work behind it."""
    clusters = _clusters()
    pipeline, sealed = _prepared(
        tmp / "floor", None, {c: [_records(a, c, b) for b in range(per_cluster)] for a, c in clusters}
    )
    pipeline.close()

    async def saturate(served: tuple[str, int]) -> _Saturated:
        async with _clients(sealed) as clients:
            return await _saturated_phase(clients, served, dict.fromkeys(sealed, "unchecked"), sealed)

    with _running(["benchmarks.asgi_floor"], dict(os.environ)) as served:
        measured = asyncio.run(saturate(served[0]))
    n = CLUSTERS * per_cluster
    return [
        row(
            "api floor: a 202-only ASGI app on serve's uvicorn, saturated",
            n / measured.seconds,
            "batches/s",
            note="reads the body, answers 202; same clients and bodies as the api rows; "
            f"{measured.server_cpu / n * 1000:.2f} ms of server CPU and {measured.client_cpu / n * 1000:.2f} ms of "
            "load generator CPU a request: "
            "the most any ingest behind this server takes on this machine",
        )
    ]


def _two_processes(tmp: Path, database: str, per_cluster: int) -> dict[str, Any]:
    """Two ``serve --no-retention`` on one PostgreSQL, the clusters alternating between them: records/s."""
    clusters = _clusters()
    saturated = {c: [_records(a, c, b) for b in range(per_cluster)] for a, c in clusters}
    home = tmp / "postgresql-two"
    tokens = _tokens(home, database)
    remote, sealed = _prepared(home, database, saturated)
    remote.close()
    with _serving(home, database, processes=2) as served:
        seconds = asyncio.run(_saturate([url for url, _pid in served], tokens, sealed))
    rate = CLUSTERS * per_cluster * RECORDS_PER_BATCH / seconds
    return row(
        "api ingest (postgresql): two serve processes, saturated",
        rate,
        "records/s",
        note=f"{rate / RECORDS_PER_BATCH:,.0f} batches/s; both on the same 2 shared cores; load average {_load()}",
    )


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(quick: bool) -> list[dict[str, Any]]:
    per_cluster = 2 if quick else 5
    paced_batches = 1 if quick else 5  # 1,000 latencies: a p99 of 400 was its 4th-worst, and swung 3× between runs
    postgres = os.environ.get("PIPELINE_BENCH_POSTGRES_URL") or os.environ.get("PIPELINE_TEST_POSTGRES_URL")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        rows += _floor(Path(tmp), per_cluster)
        rows += _one_database(Path(tmp), "sqlite", [None, None], per_cluster, paced_batches)
        with _fresh_schemas(postgres, 3) as schemas:
            if schemas:
                rows += _one_database(Path(tmp), "postgresql", schemas[:2], per_cluster, paced_batches)
                rows.append(_two_processes(Path(tmp), schemas[2], per_cluster))
            else:
                rows.append(
                    row("api ingest (postgresql): skipped", math.nan, "", note="no PIPELINE_BENCH_POSTGRES_URL")
                )
    return rows
