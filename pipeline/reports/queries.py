"""Every number of the compliance report, computed by DuckDB over Arrow.

Decrypted segments arrive as a stream of Arrow record batches, one stream per
store and record kind; each is scanned once by DuckDB and reduced to small
tables (records per store, type, subject and day; cluster activity per day).
Only jobs are kept row by row (a job reported running, then finished, counts
once), in a database file of its own with a memory limit, so DuckDB spills
them to disk: memory stays flat however many records a store holds. Subjects
are small integers here; the caller keeps the subject_ref (and, only when asked,
the name) for each. Times are naive UTC inside DuckDB (``TIMESTAMP``, not
``TIMESTAMPTZ``, whose per-row time-zone arithmetic costs 2-3x on day buckets);
results come back as aware UTC datetimes.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.records import KINDS
from pipeline.reports.residue import folder_prefix, remove_killed_reports
from pipeline.retention.policy import Policy

__all__ = ["MEMORY_LIMIT", "USAGE_COLUMNS", "UTC_NAIVE", "ReportDB", "slice_schema"]

#: DuckDB's memory for a report; past it, tables and joins spill to the report's folder
MEMORY_LIMIT = "256MB"

#: how slices carry times: UTC without a zone (cast from the records' ``timestamp[us, UTC]``)
UTC_NAIVE = pa.timestamp("us")


def _usage_fields(kind: str, names: list[str]) -> list[pa.Field]:
    """Fields of a record kind as slices carry them (timestamps as :data:`UTC_NAIVE`)."""
    schema = KINDS[kind].schema
    return [
        pa.field(name, UTC_NAIVE if pa.types.is_timestamp(schema.field(name).type) else schema.field(name).type)
        for name in names
    ]


#: payload columns each kind contributes to the usage section (besides the common ones)
USAGE_COLUMNS: dict[str, list[pa.Field]] = {
    "job": _usage_fields(
        "job",
        [
            "cluster_id",
            "job_id",
            "started_at",
            "finished_at",
            "tasks_completed",
            "tasks_erred",
            "compute_seconds",
            "peak_memory_bytes",
        ],
    ),
    "cluster_snapshot": _usage_fields("cluster_snapshot", ["cluster_id", "n_workers", "memory_process_bytes"]),
}


def slice_schema(kind: str, *, usage: bool) -> pa.Schema:
    """Columns a slice of ``kind`` hands to DuckDB: subject id, time (+ usage fields); the kind gives the type."""
    fields = [pa.field("subject", pa.int32()), pa.field("observed_at", UTC_NAIVE)]
    return pa.schema(fields + (USAGE_COLUMNS.get(kind, []) if usage else []))


_SCHEMA = """
CREATE TABLE limits (store VARCHAR, data_type VARCHAR, retention VARCHAR, limit_days DOUBLE);
CREATE TABLE headers (store VARCHAR, data_type VARCHAR, segments BIGINT, records BIGINT);
CREATE TABLE record_days (store VARCHAR, data_type VARCHAR, subject INTEGER, day DATE, records BIGINT,
                          oldest TIMESTAMP, newest TIMESTAMP, past_limit BIGINT);
CREATE TABLE jobs (slice INTEGER, subject INTEGER, cluster_id VARCHAR, job_id VARCHAR,
                   observed_at TIMESTAMP,
                   started_at TIMESTAMP, finished_at TIMESTAMP, tasks_completed BIGINT, tasks_erred BIGINT,
                   compute_seconds DOUBLE, peak_memory_bytes BIGINT);
CREATE TABLE cluster_days (subject INTEGER, cluster_id VARCHAR, day DATE, first_seen TIMESTAMP,
                           last_seen TIMESTAMP, peak_memory_bytes BIGINT, max_workers BIGINT);
CREATE TABLE requests (request_id VARCHAR, state VARCHAR, created_at TIMESTAMP, deadline TIMESTAMP,
                       completed_at TIMESTAMP);
"""

_STORE_TYPES = """
    SELECT store, data_type FROM limits
    UNION SELECT store, data_type FROM headers
    UNION SELECT DISTINCT store, data_type FROM record_days
"""

#: one row per cluster and day, however many parts it was added in
_CLUSTER_DAYS = """
    SELECT subject, cluster_id, day, min(first_seen) first_seen, max(last_seen) last_seen,
           max(peak_memory_bytes) peak_memory_bytes, max(max_workers) max_workers
    FROM cluster_days GROUP BY ALL
"""

_LATEST_JOBS = """
    SELECT * FROM jobs
    QUALIFY row_number() OVER (PARTITION BY subject, cluster_id, job_id
                               ORDER BY observed_at DESC, finished_at DESC NULLS LAST) = 1
"""


class ReportDB:
    """A DuckDB database that slices are added to and sections read from; close it (or use ``with``).

    The database is a file in a private temporary folder (0700) under ``folder``
    (the system's temporary folder by default), deleted on close: it holds
    decrypted job rows, with subjects as small integers. With ``in_memory`` it
    never touches a disk (and fails past ``memory_limit``): a Dask worker's share.
    """

    def __init__(
        self,
        policy: Policy,
        now: datetime,
        *,
        folder: Path | None = None,
        in_memory: bool = False,
        memory_limit: str = MEMORY_LIMIT,
        usage_store: str | None = None,
        grace: timedelta = timedelta(0),
    ) -> None:
        """:param usage_store: where usage is counted; default the first store holding cluster jobs
        :param grace: how long past its limit a record is not yet overdue: since the last pass that should
            have removed it (:func:`pipeline.retention.schedule.since_last_pass`)
        """
        self.now = _naive(now)
        #: usage is counted in one store (the first holding cluster jobs: long-term as shipped),
        #: so records kept in two stores are not counted twice
        self.usage_store = usage_store or next(iter(policy.stores_for("cluster_jobs")), None)
        if folder is not None and not in_memory:
            remove_killed_reports(folder)
        self._folder = None if in_memory else Path(tempfile.mkdtemp(prefix=folder_prefix(), dir=folder))
        self.con = duckdb.connect() if self._folder is None else duckdb.connect(str(self._folder / "report.duckdb"))
        spill = "" if self._folder is None else self._folder / "spill"  # '': no spilling
        self.con.execute(
            f"SET memory_limit = '{memory_limit}'; SET temp_directory = '{spill}'; SET preserve_insertion_order = false"
        )
        self._jobs_deduplicated = False
        self._job_slices = itertools.count(1)
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute(_SCHEMA)
        self._cutoffs = {(store, data_type): self.now - limit - grace for store, data_type, limit in policy.limits()}
        self.con.executemany(
            "INSERT INTO limits VALUES (?, ?, ?, ?)",
            [
                (
                    store,
                    data_type,
                    "until_deleted" if limit is None else _duration(limit.total_seconds()),
                    None if limit is None else limit.total_seconds() / 86400,
                )
                for store, types in policy.retention.items()
                for data_type, limit in types.items()
            ],
        )

    def close(self) -> None:
        """Close the database and delete its folder."""
        self.con.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> ReportDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loading ------------------------------------------------------------
    def add_headers(self, rows: Iterable[tuple[str, str, int, int]]) -> None:
        """(store, data type, segments, records) counted from clear segment headers."""
        rows = list(rows)
        if rows:
            self.con.executemany("INSERT INTO headers VALUES (?, ?, ?, ?)", rows)

    def add_slice(self, store: str, kind: str, reader: pa.RecordBatchReader) -> None:
        """Reduce one store's records of one kind (batches of :func:`slice_schema`), reading them once.

        Slices of different stores may be added from threads of their own at once.
        """
        self._jobs_deduplicated = False
        data_type = KINDS[kind].data_type
        cutoff = self._cutoffs.get((store, data_type))  # None: kept until deleted (nothing is past a limit)
        usage = store == self.usage_store and kind in USAGE_COLUMNS
        con = self.con.cursor()  # a connection of this call's own: its temp table and registered stream
        con.register("slice_in", reader)
        try:
            if usage and kind == "job":  # jobs are kept whole (deduplicated later); count days from them
                number = next(self._job_slices)
                con.execute(
                    "INSERT INTO jobs SELECT ?, subject, cluster_id, job_id, observed_at, started_at, finished_at, "
                    "tasks_completed, tasks_erred, compute_seconds, peak_memory_bytes FROM slice_in",
                    [number],
                )
                _add_record_days(con, store, data_type, cutoff, f"jobs WHERE slice = {number}")
            elif usage:  # snapshots: one pass to (subject, cluster, day), both tables from that
                con.execute(
                    """
                    CREATE TEMP TABLE snapshot_days AS
                    SELECT subject, cluster_id, observed_at::DATE AS day, count(*) records,
                           min(observed_at) first_seen, max(observed_at) last_seen,
                           count(*) FILTER (WHERE observed_at < ?::TIMESTAMP) past_limit,
                           max(memory_process_bytes) peak_memory_bytes, max(n_workers) max_workers
                    FROM slice_in GROUP BY ALL
                    """,
                    [cutoff],
                )
                con.execute(
                    """
                    INSERT INTO record_days
                    SELECT ?, ?, subject, day, sum(records), min(first_seen), max(last_seen), sum(past_limit)
                    FROM snapshot_days GROUP BY subject, day
                    """,
                    [store, data_type],
                )
                con.execute(
                    """
                    INSERT INTO cluster_days
                    SELECT subject, cluster_id, day, first_seen, last_seen, peak_memory_bytes, max_workers
                    FROM snapshot_days
                    """
                )
            else:
                _add_record_days(con, store, data_type, cutoff, "slice_in")
        finally:
            con.close()

    #: what a slice is reduced to: tables a Dask worker hands back (see :meth:`partials`)
    PARTIALS = ("headers", "record_days", "cluster_days", "jobs")

    def partials(self) -> dict[str, pa.Table]:
        """The reduced tables, for another ReportDB to :meth:`add_partials` (a worker's share of a report)."""
        return {name: self.con.execute(f"SELECT * FROM {name}").to_arrow_table() for name in self.PARTIALS}

    def add_partials(self, tables: dict[str, pa.Table]) -> None:
        """Add tables from :meth:`partials` of another ReportDB (with the same subject numbers)."""
        self._jobs_deduplicated = False
        for name in self.PARTIALS:
            self.con.register("partial_in", tables[name])
            try:
                self.con.execute(f"INSERT INTO {name} SELECT * FROM partial_in")
            finally:
                self.con.unregister("partial_in")

    def add_requests(self, table: pa.Table) -> None:
        """Deletion requests: request_id, state, created_at, deadline, completed_at."""
        self.con.register("requests_in", table)
        try:
            self.con.execute(  # few rows: the zone conversion costs nothing here
                "INSERT INTO requests SELECT request_id, state, created_at::TIMESTAMP, deadline::TIMESTAMP, "
                "completed_at::TIMESTAMP FROM requests_in"
            )
        finally:
            self.con.unregister("requests_in")

    # -- sections -----------------------------------------------------------
    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql, params or [])
        names = [d[0] for d in cursor.description]
        return [
            {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) else v for k, v in zip(names, row, strict=True)}
            for row in cursor.fetchall()
        ]

    def _latest_jobs(self) -> str:
        """A table of each job's newest record (a running job is reported again once finished)."""
        if not self._jobs_deduplicated:
            self.con.execute(f"CREATE OR REPLACE TABLE latest_jobs AS {_LATEST_JOBS}")
            self._jobs_deduplicated = True
        return "latest_jobs"

    def inventory(self) -> list[dict[str, Any]]:
        """Records and segments per store × data type, accounts, oldest and newest record."""
        return self._rows(
            f"""
            WITH pairs AS ({_STORE_TYPES}),
                 h AS (SELECT store, data_type, sum(segments) segments, sum(records) records
                       FROM headers GROUP BY ALL),
                 r AS (SELECT store, data_type, sum(records) records, count(DISTINCT subject) accounts,
                              min(oldest) oldest, max(newest) newest
                       FROM record_days GROUP BY ALL)
            SELECT p.store, p.data_type, coalesce(h.segments, 0)::BIGINT segments,
                   coalesce(r.records, 0)::BIGINT records,
                   (coalesce(h.records, 0) - coalesce(r.records, 0))::BIGINT unreadable_records,
                   coalesce(r.accounts, 0)::BIGINT accounts, r.oldest, r.newest
            FROM pairs p LEFT JOIN h USING (store, data_type) LEFT JOIN r USING (store, data_type)
            ORDER BY p.store, p.data_type
            """
        )

    def retention(self) -> list[dict[str, Any]]:
        """Per store × data type: the limit, the oldest record's age, records past it, PASS/FAIL."""
        return self._rows(
            f"""
            WITH pairs AS ({_STORE_TYPES}),
                 r AS (SELECT store, data_type, min(oldest) oldest, sum(past_limit) past_limit, sum(records) n
                       FROM record_days GROUP BY ALL)
            SELECT p.store, p.data_type,
                   coalesce(l.retention, 'not allowed') retention, l.limit_days,
                   round(epoch(?::TIMESTAMP - r.oldest) / 86400, 2) oldest_age_days,
                   (CASE WHEN l.store IS NULL THEN coalesce(r.n, 0)
                         ELSE coalesce(r.past_limit, 0) END)::BIGINT overdue,
                   CASE WHEN (CASE WHEN l.store IS NULL THEN coalesce(r.n, 0)
                                   ELSE coalesce(r.past_limit, 0) END) = 0
                        THEN 'PASS' ELSE 'FAIL' END status
            FROM pairs p LEFT JOIN limits l USING (store, data_type) LEFT JOIN r USING (store, data_type)
            ORDER BY p.store, p.data_type
            """,
            [self.now],
        )

    def records_by_day(self) -> list[dict[str, Any]]:
        """Records per store and day (for the inventory plot)."""
        return self._rows(
            "SELECT store, day, sum(records)::BIGINT records FROM record_days GROUP BY ALL ORDER BY day, store"
        )

    def usage(self) -> list[dict[str, Any]]:
        """Per subject: clusters, cluster hours, jobs, tasks, compute hours, peak memory.

        Cluster hours add up each cluster's first-to-last snapshot span per day, so the
        total equals the sum of :meth:`usage_daily` and idle gaps between days do not count.
        """
        return self._rows(
            f"""
            WITH j AS (SELECT * FROM {self._latest_jobs()}),
                 per_job AS (SELECT subject, count(*) jobs, sum(tasks_completed) tasks_completed,
                                    sum(tasks_erred) tasks_erred, sum(compute_seconds) / 3600 compute_hours,
                                    max(peak_memory_bytes) peak_job_memory
                             FROM j GROUP BY subject),
                 per_cluster AS (SELECT subject, count(DISTINCT cluster_id) clusters,
                                        sum(epoch(last_seen - first_seen)) / 3600 cluster_hours,
                                        max(peak_memory_bytes) peak_cluster_memory
                                 FROM ({_CLUSTER_DAYS}) GROUP BY subject)
            SELECT subject, coalesce(c.clusters, 0)::BIGINT clusters,
                   round(coalesce(c.cluster_hours, 0), 4) cluster_hours,
                   coalesce(j.jobs, 0)::BIGINT jobs, coalesce(j.tasks_completed, 0) tasks_completed,
                   coalesce(j.tasks_erred, 0) tasks_erred, round(coalesce(j.compute_hours, 0), 6) compute_hours,
                   greatest(j.peak_job_memory, c.peak_cluster_memory) peak_memory_bytes
            FROM per_job j FULL OUTER JOIN per_cluster c USING (subject)
            ORDER BY compute_hours DESC, cluster_hours DESC, subject
            """
        )

    def usage_daily(self) -> list[dict[str, Any]]:
        """Per subject and day: cluster hours, jobs, tasks completed and erred, compute hours."""
        return self._rows(
            f"""
            WITH j AS (SELECT subject, coalesce(finished_at, observed_at)::DATE AS day, count(*) jobs,
                              sum(tasks_completed) tasks_completed, sum(tasks_erred) tasks_erred,
                              sum(compute_seconds) / 3600 compute_hours
                       FROM {self._latest_jobs()} GROUP BY ALL),
                 c AS (SELECT subject, day, sum(epoch(last_seen - first_seen)) / 3600 cluster_hours
                       FROM ({_CLUSTER_DAYS}) GROUP BY ALL)
            SELECT subject, day, round(coalesce(c.cluster_hours, 0), 4) cluster_hours,
                   coalesce(j.jobs, 0)::BIGINT jobs, coalesce(j.tasks_completed, 0) tasks_completed,
                   coalesce(j.tasks_erred, 0) tasks_erred, round(coalesce(j.compute_hours, 0), 6) compute_hours
            FROM j FULL OUTER JOIN c USING (subject, day)
            ORDER BY day, subject
            """
        )

    def requests(self, deadline_days: float) -> dict[str, Any]:
        """Deletion requests by state, time to completion, overdue against the deadline."""
        hours = "epoch(completed_at - created_at) / 3600"
        overdue = "(completed_at IS NULL AND deadline < ?::TIMESTAMP)"  # a failed request is still owed
        late = "(completed_at > deadline)"
        summary = self._rows(
            f"""
            SELECT count(*)::BIGINT total, count(*) FILTER (WHERE state = 'completed')::BIGINT completed,
                   count(*) FILTER (WHERE completed_at IS NULL AND state <> 'failed')::BIGINT open,
                   count(*) FILTER (WHERE state = 'failed')::BIGINT failed,
                   count(*) FILTER (WHERE {overdue})::BIGINT overdue,
                   count(*) FILTER (WHERE {late})::BIGINT completed_late,
                   round(median({hours}), 3) median_hours_to_complete, round(max({hours}), 3) max_hours_to_complete
            FROM requests
            """,
            [self.now],
        )[0]
        by_state = self._rows(
            f"""
            SELECT state, count(*)::BIGINT requests, count(*) FILTER (WHERE {overdue})::BIGINT overdue,
                   round(median({hours}), 3) median_hours_to_complete, round(max({hours}), 3) max_hours_to_complete
            FROM requests GROUP BY state ORDER BY state
            """,
            [self.now],
        )
        listing = self._rows(
            f"""
            SELECT request_id, state, created_at, deadline, completed_at, round({hours}, 3) hours_to_complete,
                   {overdue} overdue, coalesce({late}, false) completed_late
            FROM requests ORDER BY created_at
            """,
            [self.now],
        )
        status = "FAIL" if summary["failed"] or summary["overdue"] else "PASS"
        return {"deadline_days": deadline_days, "status": status, **summary, "by_state": by_state, "requests": listing}


def _add_record_days(
    con: duckdb.DuckDBPyConnection, store: str, data_type: str, cutoff: datetime | None, source: str
) -> None:
    con.execute(
        f"""
        INSERT INTO record_days
        SELECT ?, ?, subject, observed_at::DATE AS day, count(*), min(observed_at), max(observed_at),
               count(*) FILTER (WHERE observed_at < ?::TIMESTAMP)
        FROM {source} GROUP BY subject, day
        """,
        [store, data_type, cutoff],
    )


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d" if not rest else f"{int(seconds // 3600)}h"
