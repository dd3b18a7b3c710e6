"""`report` end to end over stored, encrypted records, with pandas on the same data as the reference.

A pipeline home is filled with job and cluster-snapshot records of 100 accounts
over 30 days, the same sealed segments in both stores (SQLite long-term, local
log files), one segment per account, kind and day (as after compaction). Then
``metadata-pipeline report`` runs as a process of its own, so its wall time and
peak RSS (``os.wait4``) are its own. The pandas reference decrypts the same
stores into one table per store and kind and computes the same sections with
vectorised groupbys, in a process capped at :data:`PANDAS_CAP` bytes of RSS
(killed there, and reported as out of memory with the RSS it reached). Both
must agree on the totals. ``--large`` adds 100 M records (generated once into
``bench-out/``, kept for the next run).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks import row

NOW = datetime(2026, 6, 1, tzinfo=UTC)
ACCOUNTS = 100
DAYS = 30
CLUSTERS = 3  # per account
SHARES = {"job": 0.3, "cluster_snapshot": 0.7}
DATA = Path("bench-out/reports-data")
GOAL_SECONDS = 120.0  # at 100 M records
GOAL_RSS = 2 * 2**30
GOAL_GROWTH = 1.5
GOAL_HTML = 5 * 2**20
PANDAS_CAP = 6 * 2**30
POLL = 0.1


def _day_table(kind: str, n: int, day: int, rng: np.random.Generator, names: pa.Array) -> tuple[pa.Table, np.ndarray]:
    """``n`` records of one kind and day for every account, sorted by account (numpy and Arrow compute only)."""
    from pipeline.records import KINDS

    start = int(NOW.timestamp() * 1_000_000) - (day + 1) * 86_400_000_000
    subject = np.sort(rng.integers(0, ACCOUNTS, n, dtype=np.int32))
    observed = start + rng.integers(0, 86_400_000_000, n)
    cluster = subject.astype(np.int64) * 100 + rng.integers(0, CLUSTERS, n)
    columns: dict[str, Any] = {
        "record_id": pc.binary_join_element_wise(f"{kind[0]}{day}-", pc.cast(pa.array(np.arange(n)), pa.string()), ""),
        "data_type": pa.repeat(pa.scalar("cluster_jobs"), n),
        "kind": pa.repeat(pa.scalar(kind), n),
        "account": names.take(pa.array(subject)),
    }
    if kind == "job":  # 5 % are reported twice: running (at a scheduler's close), then finished
        again = np.flatnonzero(rng.random(n) < 0.05)[1:]
        again = again[subject[again] == subject[again - 1]]
        running = np.zeros(n, dtype=bool)
        running[again - 1] = True
        cluster[again], observed[again] = cluster[again - 1], observed[again - 1] + 1_000_000
        job = np.arange(n)
        job[again] = job[again - 1]
        columns |= {
            "job_id": pc.binary_join_element_wise(f"j{day}-", pc.cast(pa.array(job), pa.string()), ""),
            "started_at": observed - rng.integers(1_000_000, 3_600_000_000, n),
            "finished_at": pa.array(observed, mask=running),
            "tasks_completed": rng.integers(0, 10_000, n),
            "tasks_erred": rng.integers(0, 10, n),
            "compute_seconds": rng.random(n) * 3600,
            "peak_memory_bytes": rng.integers(2**20, 2**34, n),
        }
    else:
        columns |= {"n_workers": rng.integers(1, 64, n), "memory_process_bytes": rng.integers(2**20, 2**36, n)}
    columns |= {"cluster_id": pc.cast(pa.array(cluster), pa.string()), "observed_at": observed}
    schema = KINDS[kind].schema
    arrays = [pa.array(columns[f.name]).cast(f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema), subject


def make_home(total: int) -> Path:
    """A pipeline home holding ``total`` records (half in each store); made once, reused while complete."""
    import dask.config

    from pipeline.runtime import Pipeline
    from pipeline.segments import seal

    home = (DATA / f"{total}").resolve()
    if (home / "complete").exists():
        return home
    if home.exists():
        subprocess.run(["rm", "-rf", str(home)], check=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    with dask.config.set({"pipeline.home": str(home)}):
        pipeline = Pipeline.open(create=True)
    try:
        names = pa.array([f"account-{i:04d}" for i in range(ACCOUNTS)])
        refs = [pipeline.keyring.subject_ref(name) for name in names.to_pylist()]
        keys = [pipeline.keyring.cipher(ref) for ref in refs]
        rng = np.random.default_rng(0)
        for day in range(DAYS):
            segments = []
            for kind, share in SHARES.items():
                table, subject = _day_table(kind, int(total / 2 * share / DAYS), day, rng, names)
                bounds = np.searchsorted(subject, np.arange(ACCOUNTS + 1))
                for account, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                    if hi > lo:  # take copies: IPC of a slice would carry the whole day's buffers
                        rows = table.take(pa.array(np.arange(lo, hi)))
                        segments.append(seal(pipeline.keyring, refs[account], None, rows, key=keys[account]))
            for store in pipeline.stores.values():
                store.write(segments)
    finally:
        pipeline.close()
    (home / "complete").touch()
    return home


@dataclass
class Run:
    """One measured process: wall seconds, peak RSS in bytes, whether it was killed at the cap, its stdout."""

    wall: float
    rss: int
    capped: bool
    stdout: str


def measure(argv: list[str], home: Path, cap: int | None = None) -> Run:
    """Run ``argv`` against ``home``; peak RSS from ``os.wait4`` (this child alone), killed past ``cap``."""
    import psutil

    env = {**os.environ, "DASK_PIPELINE__HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL)
        capped, seen = False, 0
        watched = psutil.Process(child.pid)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage once it ended
            if pid:
                break
            if cap is not None and not capped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    seen = max(seen, watched.memory_info().rss)
                if seen > cap:
                    child.kill()
                    capped = True
            time.sleep(POLL)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        stdout = out.read().decode()
    if not capped and child.returncode not in (0, 1):  # 1: the report found something failing (a result)
        raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}")
    return Run(wall, max(usage.ru_maxrss * 1024, seen), capped, stdout)


def report_totals(report: dict[str, Any]) -> dict[str, Any]:
    """What both engines must agree on, from the JSON report."""
    usage = report["usage"]
    return _totals(report["inventory"], report["retention"]["rows"], usage["accounts"], usage["daily"])


def _totals(inventory: list[Any], retention: list[Any], usage: list[Any], daily: list[Any]) -> dict[str, Any]:
    return {
        "records": sum(r["records"] for r in inventory),
        "overdue": sum(r["overdue"] for r in retention),
        "jobs": sum(r["jobs"] for r in usage),
        "tasks_completed": sum(r["tasks_completed"] for r in usage),
        "compute_hours": round(sum(r["compute_hours"] for r in usage), 1),
        "cluster_hours": round(sum(r["cluster_hours"] for r in usage), 1),
        "accounts": len(usage),
        "daily_rows": len(daily),
    }


def pandas_report() -> dict[str, Any]:
    """The same sections in pandas, over every store decrypted into memory (run as ``… pandas``)."""
    import pandas as pd

    from pipeline.records import KINDS
    from pipeline.reports.queries import slice_schema
    from pipeline.runtime import Pipeline

    pipeline = Pipeline.open()
    policy = pipeline.policy
    usage_store = policy.stores_for("cluster_jobs")[0]
    now = NOW.replace(tzinfo=None)
    inventory_rows, retention_rows = [], []
    jobs: pd.DataFrame | None = None
    clusters: pd.DataFrame | None = None
    for store in pipeline.stores:
        for kind in SHARES:
            schema = slice_schema(kind, usage=True)
            names = [f.name for f in schema][1:]
            columns = ["account", *names]  # read as the report reads: only these are decompressed
            scan = pipeline.read_segments(store, data_type=KINDS[kind].data_type, kind=kind, columns=columns)
            tables = [t.select(columns) for _s, t in scan]
            df = pa.concat_tables(tables).to_pandas()
            df["observed_at"] = df["observed_at"].dt.tz_localize(None)
            df["day"] = df["observed_at"].dt.floor("D")
            limit = policy.retention[store].get("cluster_jobs")
            df["past"] = df["observed_at"] < (now - limit) if limit is not None else False
            retention_rows.append(int(df["past"].sum()))
            inventory_rows.append(len(df))
            if store == usage_store and kind == "job":
                jobs = df
            elif store == usage_store:
                clusters = (
                    df.groupby(["account", "cluster_id", "day"])
                    .agg(first=("observed_at", "min"), last=("observed_at", "max"))
                    .reset_index()
                )
    assert jobs is not None and clusters is not None
    jobs["finished_at"] = jobs["finished_at"].dt.tz_localize(None)
    job = jobs.sort_values(["observed_at", "finished_at"], na_position="first")
    job = job.drop_duplicates(["account", "job_id"], keep="last")
    per_job = job.groupby("account").agg(
        jobs=("job_id", "size"), tasks_completed=("tasks_completed", "sum"), compute_seconds=("compute_seconds", "sum")
    )
    clusters["hours"] = (clusters["last"] - clusters["first"]).dt.total_seconds() / 3600
    per_cluster = clusters.groupby("account").agg(cluster_hours=("hours", "sum"))
    usage = per_job.join(per_cluster, how="outer").fillna(0)
    usage["compute_hours"] = usage["compute_seconds"] / 3600
    job["day"] = job["finished_at"].fillna(job["observed_at"]).dt.floor("D")
    daily = job.groupby(["account", "day"]).size().to_frame("jobs")
    daily = daily.join(clusters.groupby(["account", "day"])["hours"].sum(), how="outer")
    return _totals(
        [{"records": n} for n in inventory_rows],
        [{"overdue": n} for n in retention_rows],
        usage.reset_index().to_dict("records"),
        daily.reset_index().to_dict("records"),
    )


def _size(total: int) -> str:
    return f"{total / 1e6:g} M records"


def run(quick: bool, large: bool = False) -> list[dict[str, Any]]:
    sizes = [200_000] if quick else [10_000_000, 100_000_000] if large else [10_000_000]
    python = [sys.executable]
    rows: list[dict[str, Any]] = []
    peaks: list[int] = []
    for total in sizes:
        started = time.perf_counter()
        home = make_home(total)
        made = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as out:
            command = [*python, "-m", "pipeline", "report", "--out", out, "--now", NOW.isoformat()]
            report = measure(command, home)
            html = Path(out, "report.html").stat().st_size
            totals = report_totals(json.loads(Path(out, "report.json").read_text()))
        reference = measure([*python, "-m", "benchmarks.bench_reports", "pandas"], home, cap=PANDAS_CAP)
        if not reference.capped and json.loads(reference.stdout) != totals:
            raise AssertionError(f"report and pandas disagree: {totals} vs {reference.stdout}")
        peaks.append(report.rss)
        timed = total >= 100_000_000
        data = f"{ACCOUNTS} accounts, {DAYS} days, both stores; data made in {made:.0f} s (0 when reused)"
        rows += [
            row(
                f"report, {_size(total)}: wall time",
                report.wall,
                "s",
                f"< {GOAL_SECONDS:g} s" if timed else "",
                report.wall < GOAL_SECONDS if timed else None,
                f"`metadata-pipeline report` (html, json, csv) as its own process; {data}",
            ),
            row(
                f"report, {_size(total)}: peak RSS",
                report.rss / 2**20,
                "MiB",
                f"< {GOAL_RSS / 2**30:g} GiB",
                None if quick else report.rss < GOAL_RSS,
                "os.wait4 ru_maxrss of the report process",
            ),
            row(
                f"report, {_size(total)}: HTML size",
                html / 2**20,
                "MiB",
                f"< {GOAL_HTML / 2**20:g} MiB",
                None if quick else html < GOAL_HTML,
                "report.html with its plots embedded; long tables summarised (full rows in the CSV files)",
            ),
            row(
                f"pandas reference, {_size(total)}: " + ("out of memory" if reference.capped else "wall time"),
                reference.wall,
                "s",
                note=(
                    f"killed at {reference.rss / 2**30:.1f} GiB RSS (cap {PANDAS_CAP / 2**30:g} GiB): "
                    "every decrypted record in memory does not fit"
                    if reference.capped
                    else f"same stores and columns decrypted into pandas, same totals (no plots, no files); "
                    f"peak RSS {reference.rss / 2**20:,.0f} MiB"
                ),
            ),
        ]
    if len(peaks) == 2:
        growth = peaks[1] / peaks[0]
        rows.append(
            row(
                "report peak RSS, 100 M / 10 M records",
                growth,
                "x",
                f"< {GOAL_GROWTH:g}x",
                growth < GOAL_GROWTH,
                "memory bounded: records stream through DuckDB, spilling past its memory limit",
            )
        )
    return rows


if __name__ == "__main__" and sys.argv[1:] == ["pandas"]:
    print(json.dumps(pandas_report()))
