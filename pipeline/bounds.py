"""What one sealed batch may hold: every bound a batch is checked against before anything is stored.

A cluster runs user code and holds the intake public key, so whatever it seals is
hostile input. The Arrow content is read under the byte budget of the sealed batch
(compressed IPC buffers are refused, see :mod:`pipeline.intake`); then every
timestamp, number, string, list, map, row count and subject count is checked here,
on the Arrow columns (no row is turned into Python objects). The README lists
each bound; change them here and there together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import column
from pipeline.emitter import MAX_BATCH_RECORDS
from pipeline.limits import MAX_ITEMS, MAX_NUMBER, MAX_STRING_BYTES

__all__ = [
    "CLOCK_SKEW",
    "EARLIEST",
    "MAX_BATCH_ROWS",
    "MAX_BATCH_SUBJECTS",
    "MAX_ITEMS",
    "MAX_NUMBER",
    "MAX_STRING_BYTES",
    "OutOfBounds",
    "Window",
    "check_batch",
    "holds_only",
]

#: how far a cluster's clock may be off the server's, both ways
CLOCK_SKEW = timedelta(minutes=15)
#: earliest timestamp of a batch from no registered cluster (an embedded plugin, an operator's replay)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
#: records per batch: as many as the emitter seals at most
MAX_BATCH_ROWS = MAX_BATCH_RECORDS
#: distinct (account, user) pairs per batch: each one costs a data key, audit entries and segments
MAX_BATCH_SUBJECTS = 16


class OutOfBounds(ValueError):
    """A batch holds a value outside its bounds; ``field`` names it (``kind.field``)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Window:
    """The times a batch's timestamps may lie in: the cluster's life, widened by the clock skew."""

    earliest: datetime
    latest: datetime

    @classmethod
    def of(cls, registered_at: datetime | None, now: datetime) -> Window:
        start = EARLIEST if registered_at is None else registered_at - CLOCK_SKEW
        return cls(start, now + CLOCK_SKEW)

    def micros(self) -> tuple[int, int]:
        """``(earliest, latest)`` as microseconds since the epoch, the unit of the record timestamps."""
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return (self.earliest - epoch) // timedelta(microseconds=1), (self.latest - epoch) // timedelta(microseconds=1)


def check_batch(tables: Sequence[pa.Table], window: Window) -> None:
    """Check every table of one batch against the bounds.

    :raises OutOfBounds: naming the first field out of bounds and why
    """
    rows = sum(table.num_rows for table in tables)
    if rows > MAX_BATCH_ROWS:
        raise OutOfBounds("records", f"{rows} records in one batch; at most {MAX_BATCH_ROWS}")
    subjects: set[tuple[str, str | None]] = set()
    for table in tables:
        accounts, users = table.column("account"), table.column("user")
        if holds_only(accounts, accounts[0].as_py()):  # the usual case: one account, whose users are the subjects
            subjects.update((accounts[0].as_py(), user) for user in pc.unique(users).to_pylist())
        else:
            subjects.update(zip(accounts.to_pylist(), users.to_pylist(), strict=True))
        if len(subjects) > MAX_BATCH_SUBJECTS:
            raise OutOfBounds("user", f"more than {MAX_BATCH_SUBJECTS} distinct accounts and users in one batch")
    for table in tables:
        kind_name = table.column("kind")[0].as_py()
        for field in table.schema:
            _check_column(f"{kind_name}.{field.name}", table.column(field.name), window)
        if len(ids := table.column("record_id")) and pc.min(pc.binary_length(ids)).as_py() == 0:
            raise OutOfBounds(f"{kind_name}.record_id", "empty")
        if kind_name == "job":
            _check_job(table)
        elif kind_name == "cluster_snapshot":
            running = pc.list_flatten(table.column("jobs_running"))
            _check_counts("cluster_snapshot.jobs_running tasks_completed", running)
    _check_record_ids(tables)


def _check_record_ids(tables: Sequence[pa.Table]) -> None:
    """A record id names one record of the batch, whatever its kind (the plugin's are random UUIDs; a
    report or a skipped record's line naming two would name neither)."""
    ids = pa.chunked_array([chunk for table in tables for chunk in table.column("record_id").chunks], pa.string())
    if len(pc.unique(ids)) == len(ids):
        return
    for table in tables:  # which kind holds one twice (the error path only: a hash of each table again)
        if len(pc.unique(table.column("record_id"))) < table.num_rows:
            raise OutOfBounds(f"{table.column('kind')[0].as_py()}.record_id", "the same record id twice in one batch")
    raise OutOfBounds("record_id", "the same record id in records of two kinds in one batch")


#: a job record's status: still running (never sent as such), ended, or its cluster ended first
JOB_STATUSES = ("running", "finished", "lost")


def _check_job(table: pa.Table) -> None:
    """A job's own fields together: an id, a known status (or none), no more tasks ended than it had.

    An end before its start is taken: an earlier release's plugin sends one when its scheduler's clock
    steps back during the job, and refusing it would lose the whole batch (this release's never does).
    """
    if table.column("job_id").null_count:  # reports count a job by its id: jobs without one would be one job
        raise OutOfBounds("job.job_id", "null; a job record names its job")
    statuses = pc.drop_null(table.column("status"))
    # built by pipeline.columns: a Python value given to a kernel imports pandas in the scheduler
    if len(statuses) and not pc.all(pc.is_in(statuses, column(pa.string(), JOB_STATUSES))).as_py():
        raise OutOfBounds("job.status", f"not one of {', '.join(JOB_STATUSES)}")
    _check_counts("job.tasks_completed", table)


def _check_counts(name: str, jobs: pa.Table | pa.ChunkedArray | pa.Array) -> None:
    """Completed and erred tasks add up to at most the job's total (a task ends once), where it has one."""
    if not len(jobs):
        return

    def field(field_name: str) -> Any:
        return jobs.column(field_name) if isinstance(jobs, pa.Table) else pc.struct_field(jobs, field_name)

    # completed + erred > total, a missing count as none, without a sum that could overflow (each is
    # non-negative, checked before) and without a Python 0 to fill nulls with (see above): kernels skip nulls
    total, completed, erred = field("tasks_total"), field("tasks_completed"), field("tasks_erred")
    for over in (
        pc.greater(completed, total),
        pc.greater(erred, total),
        pc.greater(completed, pc.subtract(total, erred)),
    ):
        if pc.any(over).as_py():
            raise OutOfBounds(name, "more tasks completed and erred than tasks_total")


def _check_column(name: str, column: pa.ChunkedArray | pa.Array, window: Window) -> None:
    """One column (or the flattened values of a list or map) against the bound of its type.

    Chunk by chunk, through numpy views of the Arrow buffers where that is exact (no copy, and
    no Arrow kernel call, each of which costs more than the check on a small batch).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if chunk.null_count < len(chunk):  # no values (an empty list's fields, a field no record sets): nothing
            _check_chunk(name, chunk, window)


def _check_chunk(name: str, chunk: pa.Array, window: Window) -> None:
    kind = chunk.type
    if pa.types.is_timestamp(kind):
        low, high = _min_max(chunk)  # as integers: no year is out of range
        earliest, latest = window.micros()
        if low < earliest or high > latest:
            # the value named: a scheduler's clock ahead of the server's shows as a time in the future
            when = _time(low if low < earliest else high)
            raise OutOfBounds(
                name,
                f"{when} is outside the cluster's life ({window.earliest.isoformat()} to {window.latest.isoformat()})",
            )
    elif pa.types.is_integer(kind):
        _check_number(name, *_min_max(chunk))
    elif pa.types.is_floating(kind):
        values = _numbers(chunk)
        if not np.isfinite(values).all():
            raise OutOfBounds(name, "not a finite number")
        _check_number(name, values.min(), values.max())
    elif pa.types.is_string(kind):
        longest = _longest(chunk)
        if longest > MAX_STRING_BYTES:
            raise OutOfBounds(name, f"a string of {longest} bytes; at most {MAX_STRING_BYTES}")
    elif pa.types.is_map(kind):
        _check_items(name, chunk, [("keys", chunk.keys), ("values", chunk.items)], window)
        _check_distinct_keys(name, chunk)
    elif pa.types.is_list(kind):
        values = chunk.flatten()
        if pa.types.is_struct(values.type):  # records (every field)
            fields = [(field.name, values.field(i)) for i, field in enumerate(values.type)]
            _check_items(name, chunk, fields, window)
        else:
            _check_items(name, chunk, [("", values)], window)


def _time(micros: int) -> str:
    """Microseconds since the epoch as an ISO time, or as the number where no datetime holds it."""
    try:
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)).isoformat()
    except OverflowError:
        return f"{micros} µs since 1970"


def _check_number(name: str, low: float, high: float) -> None:
    """:raises OutOfBounds: a value of the column (its least ``low``, its greatest ``high``) is out of bounds"""
    if low < 0:
        raise OutOfBounds(name, "negative")
    if high > MAX_NUMBER:
        raise OutOfBounds(name, f"{high:.4g} is more than a cluster measures; at most 2**53 ({MAX_NUMBER:.4g})")


def _check_items(name: str, chunk: pa.Array, values: list[tuple[str, pa.Array]], window: Window) -> None:
    """A list or map chunk: its lengths, then its flattened values (a map's keys and values, or a record's
    fields), each against its own bound."""
    longest = _longest(chunk)
    if longest > MAX_ITEMS:
        raise OutOfBounds(name, f"{longest} entries; at most {MAX_ITEMS}")
    for field_name, field_values in values:
        _check_column(f"{name} {field_name}".rstrip(), field_values, window)


#: a table of counts up to this many times the number of map entries is cheaper than hashing them
_COUNTED_BELOW = 16


def _check_distinct_keys(name: str, chunk: pa.MapArray) -> None:
    """Each map names a key once: a mapping holds one value per key, so a second one is dropped on the way
    to a record (and 5,000 copies of one key were an environment costing every listing 5,000 entries)."""
    offsets = _offsets(chunk)
    lengths = np.diff(offsets)
    if len(lengths) == 0 or lengths.max() < 2:
        return
    keys = chunk.keys.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    codes = _numbers(pc.dictionary_encode(keys).indices).astype(np.int64)
    slots = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    pairs = slots * (int(codes.max()) + 1) + codes  # one number per (mapping, key)
    if pairs[-1] < _COUNTED_BELOW * len(pairs):  # few keys: counted in a table of every number (0.03 ms)
        twice = bool((np.bincount(pairs) > 1).any())
    else:  # many: by hashing (0.5 ms for 20,000), where numpy's unique sorts them (3 ms)
        counted = pc.count_distinct(pa.Array.from_buffers(pa.int64(), len(pairs), [None, pa.py_buffer(pairs)]))
        twice = counted.as_py() < len(pairs)
    if twice:
        raise OutOfBounds(name, "a key twice in one mapping")


def _numbers(chunk: pa.Array) -> np.ndarray:
    """A numeric or timestamp chunk's valid values as numpy: a view of its data buffer (Arrow's own
    ``to_numpy`` imports pandas)."""
    if chunk.null_count:
        chunk = chunk.drop_null()
    kind = chunk.type
    code = "f" if pa.types.is_floating(kind) else "u" if pa.types.is_unsigned_integer(kind) else "i"
    dtype = np.dtype(f"{code}{kind.bit_width // 8}")
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)


def _min_max(chunk: pa.Array) -> tuple[int, int]:
    values = _numbers(chunk)
    return int(values.min()), int(values.max())


def _longest(chunk: pa.Array) -> int:
    """The longest slot of a string, list or map chunk, from its offsets as numpy (a view, no copy).

    Null slots count too: a value is no longer than its slot.
    """
    return int(np.diff(_offsets(chunk)).max())


def holds_only(values: pa.ChunkedArray, value: str) -> bool:
    """Whether every slot of a string column holds ``value`` (a null does not).

    Read from the buffers, as the bounds are: evenly spaced offsets over bytes that are ``value`` repeated.
    No Python string per row (admission asks this of a whole batch's account, user and cluster columns).
    """
    expected = value.encode()
    for chunk in values.chunks:
        if chunk.null_count:
            return False
        offsets = _offsets(chunk)
        start = int(offsets[0])
        if not np.array_equal(offsets, start + len(expected) * np.arange(len(chunk) + 1)):
            return False
        data = chunk.buffers()[2]
        if data is None or data[start : start + len(expected) * len(chunk)] != expected * len(chunk):
            return False
    return True


def _offsets(chunk: pa.Array) -> np.ndarray:
    """A string, list or map chunk's offsets as numpy (a view, no copy)."""
    width = np.int64 if pa.types.is_large_string(chunk.type) or pa.types.is_large_list(chunk.type) else np.int32
    start = chunk.offset * width().itemsize
    return np.frombuffer(chunk.buffers()[1], dtype=width, count=len(chunk) + 1, offset=start)
