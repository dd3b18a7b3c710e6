"""Build a :class:`Report` from an open pipeline: scan, decrypt, hand Arrow to DuckDB.

Each store is scanned once per record kind, by a thread of its own; each decrypted
segment (only the columns the report counts are decompressed) becomes Arrow
batches with the subject as a small integer, streamed into :class:`ReportDB`.
Names are decrypted into memory only when ``show_names`` asks for them;
otherwise the report shows subject refs. :func:`assemble` makes the report from a
filled ReportDB, whichever engine filled it (see :mod:`.dask_engine`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import select

from pipeline.bounds import MAX_NUMBER
from pipeline.columns import column
from pipeline.db import deletion_requests
from pipeline.records import KINDS, TIMESTAMP, utcnow
from pipeline.reports.model import Report
from pipeline.reports.plots import render_plots
from pipeline.reports.queries import ReportDB, slice_schema
from pipeline.retention.requests import not_final
from pipeline.retention.schedule import since_last_pass
from pipeline.runtime import Pipeline, Unreadable
from pipeline.segments import Segment

__all__ = ["Bounds", "Found", "assemble", "bounds_at", "build_report", "to_slice"]

_REQUESTS_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("state", pa.string()),
        pa.field("created_at", TIMESTAMP),
        pa.field("deadline", TIMESTAMP),
        pa.field("completed_at", TIMESTAMP),
    ]
)


def build_report(
    pipeline: Pipeline,
    *,
    now: datetime | None = None,
    show_names: bool = False,
    progress: bool = False,
    plots: bool = True,
) -> Report:
    """Scan every store and compute every section.

    :param now: the instant retention ages and request deadlines are measured against
    :param show_names: label accounts by their decrypted names instead of subject refs
    :param progress: show a progress bar on stderr (for long scans on a terminal)
    """
    now = now or utcnow()
    grace = since_last_pass(pipeline.settings.retention_cron, now)
    with ReportDB(pipeline.policy, now, folder=pipeline.settings.home, grace=grace) as db:
        found = Found(names={} if show_names else None)
        _scan(pipeline, db, found, bounds_at(now), progress)
        found.foreign_files = [(s, p) for s, paths in pipeline.foreign_files().items() for p in paths]
        return assemble(pipeline, db, now, found, plots=plots)


@dataclasses.dataclass
class Found:
    """What a scan found besides the numbers it added to :class:`ReportDB`."""

    #: subject_ref -> the small integer DuckDB knows the subject by
    refs: dict[str, int] = dataclasses.field(default_factory=dict)
    #: subject_ref -> account name, only when the report shows names
    names: dict[str, str] | None = None
    #: segments that do not open and records out of range (``record_id`` set), each skipped
    unreadable: list[Unreadable] = dataclasses.field(default_factory=list)
    #: (store, path) of files a store skipped as not its own
    foreign_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (store, data type) -> segments, and records their headers count, of the segments the record scan
    #: read (counted in that scan: segments written or removed meanwhile are on both sides or on neither)
    header_segments: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    header_records: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)

    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def subject(self, subject_ref: str) -> int:
        with self._lock:  # stores are scanned by threads of their own
            return self.refs.setdefault(subject_ref, len(self.refs))

    def read(self, store: str, segment: Segment) -> None:
        """Count a segment the record scan read, by its header."""
        with self._lock:
            self.header_segments[(store, segment.data_type)] += 1
            self.header_records[(store, segment.data_type)] += segment.n_records


#: why a segment whose header names no record kind is skipped
_NO_KIND = "its header names no record kind ({0.data_type}/{0.kind}): altered"


def _scan(pipeline: Pipeline, db: ReportDB, found: Found, bounds: Bounds, progress: bool) -> None:
    total = 0
    for name, store in pipeline.stores.items():
        for segment in store.scan(with_payload=False):
            spec = KINDS.get(segment.kind)
            if spec is None or spec.data_type != segment.data_type:
                # read by no slice (each reads one kind): named here, or it was left out unseen
                found.unreadable.append(Unreadable(name, segment.segment_id, _NO_KIND.format(segment)))
                continue
            total += 1

    def scan(store_name: str) -> None:
        for kind in KINDS:
            schema = slice_schema(kind, usage=store_name == db.usage_store)
            batches = _slices(pipeline, store_name, kind, schema, found, advance, bounds)
            _add_slice(db, store_name, kind, schema, batches)

    # a thread per store: decompression and DuckDB release the GIL, so stores are read side by side
    with _progress(progress, total) as advance, ThreadPoolExecutor(len(pipeline.stores)) as pool:
        for done in [pool.submit(scan, store_name) for store_name in pipeline.stores]:
            done.result()
    db.add_headers(
        (store, data_type, n, found.header_records[(store, data_type)])
        for (store, data_type), n in found.header_segments.items()
    )


def assemble(
    pipeline: Pipeline, db: ReportDB, now: datetime, found: Found, *, plots: bool, stores: set[str] | None = None
) -> Report:
    """The report from a filled :class:`ReportDB` and the control plane's database (requests, audit).

    :param stores: the stores the report covers (default all): rows the last retention pass
        wrote about other stores are left out
    """
    db.add_requests(_requests_table(pipeline))
    subject_refs = {i: ref for ref, i in found.refs.items()}
    names = found.names

    def label(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            ref = subject_refs[row.pop("subject")]
            named = {"account": names.get(ref)} if names is not None else {}
            out.append({"subject_ref": ref, **named, **row})
        return out

    passes = [r for r in _last_pass(pipeline) if stores is None or r["store"] in stores]
    skipped = sorted(found.unreadable, key=lambda u: (u.store, u.segment_id, u.record_id or ""))  # threads interleave
    report = Report(
        generated_at=utcnow(),
        now=now,
        policy={"path": pipeline.policy.path, "sha256": pipeline.policy.sha256},
        names_shown=names is not None,
        inventory=db.inventory(),
        retention=db.retention() + passes,
        deletion_requests={
            **db.requests(pipeline.policy.erasure_deadline.total_seconds() / 86400),
            "not_final": _not_final(pipeline),
        },
        audit=_audit_section(pipeline),
        usage=label(db.usage()),
        usage_daily=sorted(label(db.usage_daily()), key=lambda row: (row["day"], row["subject_ref"])),
        records_by_day=db.records_by_day(),
        unreadable_segments=[dataclasses.asdict(u) for u in skipped if u.record_id is None],
        out_of_range_records=[dataclasses.asdict(u) for u in skipped if u.record_id is not None],
        foreign_files=[{"store": s, "path": p} for s, p in found.foreign_files],
    )
    if plots:
        report.plots = render_plots(report)
    return report


def _slices(
    pipeline: Pipeline,
    store: str,
    kind: str,
    schema: pa.Schema,
    found: Found,
    advance: Callable[[], None],
    bounds: Bounds,
) -> Iterator[pa.RecordBatch]:
    data_type = KINDS[kind].data_type
    times = [f.name for f in KINDS[kind].schema if pa.types.is_timestamp(f.type)]  # each checked, even if unused
    columns = ["record_id", *schema.names[1:], *times, *(["account"] if found.names is not None else [])]
    scan = pipeline.read_segments(
        store,
        data_type=data_type,
        kind=kind,
        unreadable=found.unreadable,
        columns=columns,
        visited=functools.partial(found.read, store),
    )
    for segment, table in scan:
        advance()
        rows, bad = to_slice(table, schema, found.subject(segment.subject_ref), bounds)
        record_ids = table.column("record_id")
        found.unreadable.extend(
            Unreadable(store, segment.segment_id, why, record_ids[row].as_py()) for row, why in bad.items()
        )
        if rows.num_rows and found.names is not None:
            found.names.setdefault(segment.subject_ref, table.column("account")[0].as_py())
        yield from rows.to_batches()


def to_slice(table: pa.Table, schema: pa.Schema, subject: int, bounds: Bounds) -> tuple[pa.Table, dict[int, str]]:
    """Decrypted records of one subject as the columns of ``schema``, with the rows out of bounds left out.

    :returns: the slice, and row number -> why, for each row left out
    """
    bad = bounds.outside(table, schema)
    if bad:
        table = table.filter([row not in bad for row in range(table.num_rows)])
    columns = [pa.repeat(pa.scalar(subject, pa.int32()), table.num_rows)]
    for field in list(schema)[1:]:
        column = table.column(field.name)
        columns.append(column if column.type == field.type else column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema), bad


def bounds_at(now: datetime) -> Bounds:
    """The bounds a report as of ``now`` counts records within."""
    return Bounds(EARLIEST, max(now, utcnow()) + AHEAD)


#: rows per batch handed to DuckDB (a few MB in the slice schema)
BATCH_ROWS = 131_072
#: segments whose decrypted payloads a store's reader holds at most, before copying out what it reads
SEGMENTS_HELD = 32
#: no record of a Dask cluster is older than this: an earlier time was stored before ingest checked times
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
#: how far past the report's time (or the clock's, if later) a record may be observed: clock skew
AHEAD = timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a record must satisfy to be counted: times from ``earliest`` to ``latest``, numbers from 0 to
    :data:`pipeline.bounds.MAX_NUMBER` (finite).

    Ingest enforces bounds (DESIGN Part 3); records stored before it did are named in the
    report and left out of its numbers, so one row dated 9999 (or a job started in year
    -1199, which no Python datetime holds) does not stretch or break every section and
    plot. Times are compared as integers (microseconds), never as Python datetimes.
    """

    earliest: datetime
    latest: datetime

    def outside(self, table: pa.Table, schema: pa.Schema) -> dict[int, str]:
        """Row number -> the first reason it is out of range, over the columns the report reads and every
        time the table holds: a record's times decide its day and age in every store, so it is counted or not
        alike in each (its numbers are checked where the report sums them: the usage store's slice)."""
        bad: dict[int, str] = {}
        first, last = self._micros()
        names = [name for name in schema.names if name != "subject"]
        names += [f.name for f in table.schema if pa.types.is_timestamp(f.type) and f.name not in names]
        for name in names:
            values = table.column(name)
            if self._within(values, values.type):
                continue
            if pa.types.is_timestamp(values.type):
                ints = values.cast(pa.int64())
                outside = pc.or_(pc.less(ints, first), pc.greater(ints, last))
                reason = f"{name} is outside {self.earliest:%Y-%m-%d} to {self.latest:%Y-%m-%d}"
            else:  # NaN compares false: out too
                within = pc.and_(pc.greater_equal(values, 0), pc.less_equal(values, _largest(values.type)))
                outside = pc.invert(within)
                reason = f"{name} is negative, over 2**53 or not a finite number"
            for row in pc.indices_nonzero(pc.fill_null(outside, False)).to_pylist():
                bad.setdefault(row, reason)
        if "job_id" in schema.names and table.column("job_id").null_count:  # stored before ingest refused it
            for row in pc.indices_nonzero(pc.is_null(table.column("job_id"))).to_pylist():
                bad.setdefault(row, "job_id is missing (jobs are counted by it: all such would be one)")
        return bad

    def _micros(self) -> tuple[int, int]:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return (self.earliest - epoch) // timedelta(microseconds=1), (self.latest - epoch) // timedelta(microseconds=1)

    def _within(self, values: pa.ChunkedArray, kind: pa.DataType) -> bool:
        """Whether every value is in range, from a few calls per column (a segment is looked at row by row
        only when not). Integers throughout: ``pa.scalar`` of a time imports pandas."""
        if pa.types.is_timestamp(kind):
            span = pc.min_max(values.cast(pa.int64())).as_py()
            first, last = self._micros()
            return span["min"] is None or (first <= span["min"] and span["max"] <= last)
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            span = pc.min_max(values).as_py()
            if span["min"] is None:
                return True
            finite = not pa.types.is_floating(kind) or pc.all(pc.is_finite(values)).as_py()
            return bool(finite and span["min"] >= 0 and span["max"] <= MAX_NUMBER)
        return True


def _largest(kind: pa.DataType) -> pa.Scalar:
    """:data:`MAX_NUMBER` as an Arrow scalar of ``kind``, built without pyarrow's converter (see
    :mod:`pipeline.columns`)."""
    return column(kind, [MAX_NUMBER if pa.types.is_integer(kind) else float(MAX_NUMBER)])[0]


def _add_slice(db: ReportDB, store: str, kind: str, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> None:
    """Stream a slice into DuckDB; an error raised while decrypting surfaces as itself, not wrapped by DuckDB."""
    failures: list[Exception] = []

    def kept() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except Exception as exc:
            failures.append(exc)
            raise

    try:
        db.add_slice(store, kind, pa.RecordBatchReader.from_batches(schema, _coalesced(schema, kept())))
    except duckdb.Error:
        if failures:
            raise failures[0] from None
        raise


def _coalesced(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Segments' batches joined into batches of about :data:`BATCH_ROWS`: DuckDB pays per batch it pulls.

    A segment's batch is a view into its whole decrypted payload (every column, not only the few the
    report reads), so the batches held are copied out every :data:`SEGMENTS_HELD`: memory then stays
    flat however wide the records (a batch of environments with thousands of packages each held
    gigabytes of payloads).
    """
    copied: list[pa.RecordBatch] = []
    views: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        views.append(batch)
        rows += batch.num_rows
        if rows >= BATCH_ROWS:
            yield from _joined(schema, copied + views)
            copied, views, rows = [], [], 0
        elif len(views) >= SEGMENTS_HELD:
            copied += _joined(schema, views)
            views = []
    if copied or views:
        yield from _joined(schema, copied + views)


def _joined(schema: pa.Schema, batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    """``batches`` as one, in memory of its own."""
    return pa.Table.from_batches(batches, schema).combine_chunks().to_batches()


def _requests_table(pipeline: Pipeline) -> pa.Table:
    columns = [deletion_requests.c[f.name] for f in _REQUESTS_SCHEMA]
    with pipeline.keyring.engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(select(*columns))]
    return pa.Table.from_pylist(rows, schema=_REQUESTS_SCHEMA)


def _last_pass(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The rows the last retention pass's audit entry gives; one FAIL row if its details are not a pass's
    (altered in the database: the audit section names the entry)."""
    last_pass = pipeline.audit.last("retention.pass")
    if last_pass is None:
        return []
    try:
        return _backend_retention(last_pass.details) + _failed_steps(last_pass.details)
    except (KeyError, TypeError, AttributeError, ValueError):
        return [
            {
                "store": "-",
                "data_type": f"- (last pass: audit entry {last_pass.seq} does not read as a retention pass)",
                "retention": "altered?",
                "limit_days": None,
                "oldest_age_days": None,
                "overdue": 0,
                "status": "FAIL",
            }
        ]


def _backend_retention(details: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for retentions a backend enforces itself (a Cloud Logging bucket), as the last pass found them."""
    found = details.get("backend_retention", {})
    return [
        {
            "store": store,
            "data_type": f"bucket {b['bucket']}"
            + (" (locked)" if b["locked"] else "")
            + (" (holds other logs)" if b.get("holds_other_logs") else "")
            + (f" ({', '.join(b['kept_longer'])} kept longer than their limit)" if b.get("kept_longer") else ""),
            "retention": f"{b['wanted_days']}d (was {b['found_days']}d)"
            if b["updated"]
            else f"{b['found_days']}d" + ("" if b["status"] == "PASS" else f", policy {b['wanted_days']}d"),
            "limit_days": b["wanted_days"],
            "oldest_age_days": None,
            "overdue": 0,
            "status": b["status"],
        }
        for store, b in sorted(found.items())
    ]


def _failed_steps(details: dict[str, Any]) -> list[dict[str, Any]]:
    """A FAIL row for each step the last retention pass could not carry out (a store down, say)."""
    failed = details.get("failed_steps", {})
    rows = []
    for step, reason in sorted(failed.items()):
        target = step.partition(":")[2]  # expire:STORE/TYPE, compact:STORE, or none (key-retirement)
        store, _, data_type = target.partition("/")
        rows.append(
            {
                "store": store or "-",
                "data_type": f"{data_type or '-'} (last pass: step {step} failed)",
                "retention": reason,
                "limit_days": None,
                "oldest_age_days": None,
                "overdue": 0,
                "status": "FAIL",
            }
        )
    return rows


def _not_final(pipeline: Pipeline) -> list[dict[str, Any]]:
    """Completed erasures a restored backup could still undo, with the date that ends."""
    return [
        {"request_id": r.request_id, "completed_at": r.completed_at, "final_at": r.final_at}
        for r in not_final(pipeline)
    ]


def _audit_section(pipeline: Pipeline) -> dict[str, Any]:
    audit = pipeline.audit
    result = audit.check()
    last_pass = audit.last("retention.pass")
    by_action = audit.action_counts(through=result.entries)  # verified entries only: a forged one never counts
    return {
        "status": str(result),
        "intact": result.intact,
        "entries": sum(by_action.values()),
        "verified_entries": result.entries,
        "first_bad_seq": result.first_bad_seq,
        "reason": result.reason,
        "last_retention_pass": None
        if last_pass is None
        else {"seq": last_pass.seq, "recorded_at": last_pass.recorded_at, "details": last_pass.details},
        "by_action": [{"action": action, "entries": n} for action, n in sorted(by_action.items())],
    }


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    if not enabled or not total:
        yield lambda: None
        return
    columns = (TextColumn("decrypting segments"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scan", total=total)
        yield lambda: bar.advance(task)
