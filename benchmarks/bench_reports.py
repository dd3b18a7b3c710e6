"""The report's aggregation over 10,000,000 records: DuckDB (what `report` runs) against pandas.

Both sides start from the same Arrow tables, shaped as the report hands decrypted
segments to DuckDB (:func:`pipeline.reports.queries.slice_schema`): job and
cluster-snapshot records of 2,000 accounts over 60 days in both stores. The
DuckDB side is :class:`ReportDB` itself — every slice scanned, then every
section computed (inventory, retention, usage per account and per day). The
pandas side computes the same sections with vectorised groupbys from
``Table.to_pandas()``; the two must agree on the totals or the run fails.
Decryption is left out of both (it is the same work for either engine).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks import row
from pipeline.config import default_policy_path
from pipeline.reports.queries import ReportDB, slice_schema
from pipeline.retention.policy import Policy, load_policy

NOW = datetime(2026, 6, 1, tzinfo=UTC)
ACCOUNTS = 2_000
DAYS = 60
CLUSTERS = 3  # per account: snapshots of a cluster-day number in the dozens, as with a 5 s interval
SHARES = {
    ("long_term", "job"): 0.15,
    ("long_term", "cluster_snapshot"): 0.35,
    ("cloud_logging", "job"): 0.15,
    ("cloud_logging", "cluster_snapshot"): 0.35,
}
BATCH = 1_000_000
GOAL_SECONDS = 10.0
GOAL_RATIO = 5.0
RUNS = 3

Slices = dict[tuple[str, str], pa.Table]


def make_slices(total: int, seed: int = 0) -> Slices:
    """A few large Arrow tables, built with numpy and Arrow compute (no Python objects per record)."""
    rng = np.random.default_rng(seed)
    now_us = int(NOW.timestamp() * 1_000_000)
    slices: Slices = {}
    for (store, kind), share in SHARES.items():
        n = int(total * share)
        subject = rng.integers(0, ACCOUNTS, n, dtype=np.int32)
        observed = now_us - rng.integers(60_000_000, DAYS * 86_400_000_000, n)
        cluster = subject.astype(np.int64) * 100 + rng.integers(0, CLUSTERS, n)
        running = np.zeros(n, dtype=bool)
        if kind == "job":  # 5 % are reported twice: running (at a scheduler's close), then finished
            again = np.flatnonzero(rng.random(n) < 0.05)[1:]
            subject[again], cluster[again] = subject[again - 1], cluster[again - 1]
            observed[again] = observed[again - 1] + 30_000_000
            running[again - 1] = True
        columns: dict[str, Any] = {
            "subject": subject,
            "observed_at": observed,
            "cluster_id": pc.cast(pa.array(cluster), pa.string()),
        }
        if kind == "job":
            job = np.arange(n)
            job[again] = job[again - 1]
            columns |= {
                "job_id": pc.cast(pa.array(job), pa.string()),
                "started_at": observed - rng.integers(1_000_000, 3_600_000_000, n),
                "finished_at": pa.array(observed, mask=running),
                "tasks_completed": rng.integers(0, 10_000, n),
                "tasks_erred": rng.integers(0, 10, n),
                "compute_seconds": rng.random(n) * 3600,
                "peak_memory_bytes": rng.integers(2**20, 2**34, n),
            }
        else:
            columns |= {"n_workers": rng.integers(1, 64, n), "memory_process_bytes": rng.integers(2**20, 2**36, n)}
        schema = slice_schema(kind, usage=True)
        arrays = [pa.array(columns[f.name]).cast(f.type) for f in schema]
        slices[(store, kind)] = pa.Table.from_arrays(arrays, schema=schema).combine_chunks()
    return slices


def duckdb_report(slices: Slices, policy: Policy) -> dict[str, Any]:
    db = ReportDB(policy, NOW)
    for (store, kind), table in slices.items():
        db.add_slice(store, kind, pa.RecordBatchReader.from_batches(table.schema, table.to_batches(BATCH)))
    return _totals(db.inventory(), db.retention(), db.usage(), db.usage_daily(), db.records_by_day())


def _totals(*sections: list[dict[str, Any]]) -> dict[str, Any]:
    """What both engines must agree on, from the rows each hands to the renderers."""
    inventory, retention, usage, daily, by_day = sections
    return {
        "records": sum(r["records"] for r in inventory),
        "overdue": sum(r["overdue"] for r in retention),
        "jobs": sum(r["jobs"] for r in usage),
        "tasks_completed": sum(r["tasks_completed"] for r in usage),
        "compute_hours": round(sum(r["compute_hours"] for r in usage), 1),
        "cluster_hours": round(sum(r["cluster_hours"] for r in usage), 1),
        "accounts": len(usage),
        "daily_rows": len(daily),
        "day_rows": len(by_day),
    }


def pandas_report(slices: Slices, policy: Policy) -> dict[str, Any]:
    """The same sections in pandas, as a competent pandas user would write them."""
    import pandas as pd

    usage_store = policy.stores_for("cluster_jobs")[0]
    now = NOW.replace(tzinfo=None)  # slices carry naive UTC times
    record_days, jobs, clusters = [], [], []
    for (store, kind), table in slices.items():
        df = table.to_pandas()
        df["day"] = df["observed_at"].dt.floor("D")
        limit = policy.retention[store].get("cluster_jobs")
        df["past"] = df["observed_at"] < (now - limit) if limit is not None else False
        days = df.groupby(["subject", "day"]).agg(
            records=("observed_at", "size"),
            oldest=("observed_at", "min"),
            newest=("observed_at", "max"),
            past_limit=("past", "sum"),
        )
        record_days.append(days.reset_index().assign(store=store, data_type="cluster_jobs"))
        if store == usage_store and kind == "job":
            jobs.append(df)
        elif store == usage_store:
            clusters.append(
                df.groupby(["subject", "cluster_id", "day"])
                .agg(
                    first=("observed_at", "min"),
                    last=("observed_at", "max"),
                    peak=("memory_process_bytes", "max"),
                    workers=("n_workers", "max"),
                )
                .reset_index()
            )
    rd = pd.concat(record_days)
    inventory = rd.groupby(["store", "data_type"]).agg(
        records=("records", "sum"), accounts=("subject", "nunique"), oldest=("oldest", "min"), newest=("newest", "max")
    )
    retention = rd.groupby(["store", "data_type"]).agg(oldest=("oldest", "min"), overdue=("past_limit", "sum"))
    retention["age_days"] = (now - retention["oldest"]).dt.total_seconds() / 86400
    by_day = rd.groupby(["store", "day"])[["records"]].sum()

    job = pd.concat(jobs).sort_values(["observed_at", "finished_at"], na_position="first")
    job = job.drop_duplicates(["subject", "job_id"], keep="last")
    per_job = job.groupby("subject").agg(
        jobs=("job_id", "size"),
        tasks_completed=("tasks_completed", "sum"),
        tasks_erred=("tasks_erred", "sum"),
        compute_seconds=("compute_seconds", "sum"),
        peak=("peak_memory_bytes", "max"),
    )
    cd = pd.concat(clusters)
    cd["hours"] = (cd["last"] - cd["first"]).dt.total_seconds() / 3600
    per_cluster = cd.groupby("subject").agg(
        clusters=("cluster_id", "nunique"), cluster_hours=("hours", "sum"), peak=("peak", "max")
    )
    usage = per_job.join(per_cluster, how="outer", rsuffix="_cluster").fillna(0)
    usage["compute_hours"] = usage["compute_seconds"] / 3600
    job["day"] = job["finished_at"].fillna(job["observed_at"]).dt.floor("D")
    daily = (
        job.groupby(["subject", "day"])
        .agg(
            jobs=("job_id", "size"),
            tasks_completed=("tasks_completed", "sum"),
            tasks_erred=("tasks_erred", "sum"),
            compute_seconds=("compute_seconds", "sum"),
        )
        .join(cd.groupby(["subject", "day"])["hours"].sum(), how="outer")
    )
    daily["compute_hours"] = daily["compute_seconds"] / 3600
    return _totals(*(frame.reset_index().to_dict("records") for frame in (inventory, retention, usage, daily, by_day)))


def _timed(fn: Any, *args: Any) -> tuple[float, float, dict[str, Any]]:
    """Wall-clock and process CPU seconds of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run(quick: bool) -> list[dict[str, Any]]:
    total = 200_000 if quick else 10_000_000
    policy = load_policy(default_policy_path())
    slices = make_slices(total)
    n = sum(t.num_rows for t in slices.values())
    duck, pandas = [], []
    for _ in range(RUNS):  # alternate, so a neighbour's load burst does not land on one engine only
        duck.append(_timed(duckdb_report, slices, policy))
        pandas.append(_timed(pandas_report, slices, policy))
    if duck[0][2] != pandas[0][2]:
        raise AssertionError(f"DuckDB and pandas disagree: {duck[0][2]} vs {pandas[0][2]}")
    duck_wall, duck_cpu = (statistics.median(r[i] for r in duck) for i in (0, 1))
    pandas_wall, pandas_cpu = (statistics.median(r[i] for r in pandas) for i in (0, 1))
    ratio = pandas_wall / duck_wall
    size = f"{n:,} records, {ACCOUNTS:,} accounts, {DAYS} days, 2 stores"
    return [
        row(
            f"report aggregation, DuckDB ({n / 1e6:g} M records)",
            duck_wall,
            "s",
            f"< {GOAL_SECONDS:g} s",
            None if quick else duck_wall < GOAL_SECONDS,
            f"{size}; scan Arrow slices + every section; median wall of {RUNS}, CPU {duck_cpu:.2f} s",
        ),
        row(
            f"report aggregation, pandas ({n / 1e6:g} M records)",
            pandas_wall,
            "s",
            note=f"same sections from Table.to_pandas(), vectorised groupbys, same totals; CPU {pandas_cpu:.2f} s",
        ),
        row(
            "report aggregation, pandas / DuckDB",
            ratio,
            "x",
            f">= {GOAL_RATIO:g}x",
            None if quick else ratio >= GOAL_RATIO,
            f"median wall-clock ratio, runs alternating; CPU-time ratio {pandas_cpu / duck_cpu:.2f}x",
        ),
    ]
