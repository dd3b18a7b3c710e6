"""Record kinds, their Arrow schemas, and conversions between rows and Arrow.

A record is a plain ``dict`` while it travels from the plugin to the emitter
(cheap to build on the event loop) and an Arrow table inside a segment. Field
names are a contract: see DESIGN.md "Record schemas".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import columns
from pipeline.clock import utcnow  # here too: its callers import it with the record schemas
from pipeline.redact import first_line

__all__ = [
    "DATA_TYPES",
    "KINDS",
    "Kind",
    "kind",
    "records_by_kind",
    "rows_from_table",
    "table_from_rows",
    "check_table",
    "with_later_fields",
    "tables_from_records",
    "unreadable_rows",
    "utcnow",
]

DATA_TYPES = ("account", "cluster_jobs", "software_env")
TIMESTAMP = pa.timestamp("us", tz="UTC")

COMMON_FIELDS = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("data_type", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("account", pa.string(), nullable=False),
    pa.field("user", pa.string()),
    pa.field("cluster_id", pa.string(), nullable=False),
    pa.field("observed_at", TIMESTAMP, nullable=False),
]

_STR_INT_MAP = pa.map_(pa.string(), pa.int64())
_SHOWN_CHARS = 40  # of a kind an error quotes: the text is the sender's
#: the microseconds since 1970 a Python datetime can hold: the years 1 to 9999
_PYTHON_TIMES = (-62135596800 * 10**6, 253402300799 * 10**6 + 999999)

#: a job's progress so far (the fields of a ``job`` record that count)
JOB_PROGRESS = [
    pa.field("job_id", pa.string()),
    pa.field("started_at", TIMESTAMP),
    pa.field("tasks_total", pa.int64()),
    pa.field("tasks_completed", pa.int64()),
    pa.field("tasks_erred", pa.int64()),
    pa.field("compute_seconds", pa.float64()),
    pa.field("peak_memory_bytes", pa.int64()),
    pa.field("task_prefixes", pa.list_(pa.string())),
]


@dataclass(frozen=True)
class Kind:
    """One record kind: its data type, Arrow schema and which columns are maps."""

    name: str
    data_type: str
    schema: pa.Schema
    map_fields: tuple[str, ...]


def _kind(name: str, data_type: str, fields: list[pa.Field]) -> Kind:
    schema = pa.schema(COMMON_FIELDS + fields)
    maps = tuple(f.name for f in fields if pa.types.is_map(f.type))
    return Kind(name, data_type, schema, maps)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        _kind(
            "cluster_snapshot",
            "cluster_jobs",
            [
                pa.field("n_workers", pa.int64()),
                pa.field("n_threads", pa.int64()),
                pa.field("memory_limit_bytes", pa.int64()),
                pa.field("memory_process_bytes", pa.int64()),
                pa.field("memory_managed_bytes", pa.int64()),
                pa.field("memory_unmanaged_bytes", pa.int64()),
                pa.field("memory_spilled_bytes", pa.int64()),
                pa.field("tasks_by_state", _STR_INT_MAP),
                pa.field("tasks_completed_total", pa.int64()),
                pa.field("tasks_erred_total", pa.int64()),
                pa.field("compute_seconds_total", pa.float64()),
                pa.field("jobs_running", pa.list_(pa.struct(JOB_PROGRESS))),  # unfinished jobs' progress
            ],
        ),
        _kind(
            "job",
            "cluster_jobs",
            [
                *JOB_PROGRESS[:2],  # job_id, started_at
                pa.field("finished_at", TIMESTAMP),
                *JOB_PROGRESS[2:],  # the counts
                pa.field("status", pa.string()),  # running, finished, or lost (its cluster ended first)
            ],
        ),
        _kind(
            "software_env",
            "software_env",
            [
                pa.field("env_id", pa.string()),
                pa.field("image", pa.string()),
                pa.field("python_version", pa.string()),
                pa.field("packages", pa.map_(pa.string(), pa.string())),
            ],
        ),
        _kind(
            "account",
            "account",
            [
                pa.field("username", pa.string()),
                pa.field("email", pa.string()),
                pa.field("team", pa.string()),
                pa.field("quotas", pa.map_(pa.string(), pa.float64())),
            ],
        ),
    )
}


def kind(name: str) -> Kind:
    """The :class:`Kind` called ``name``; ``KeyError`` names the unknown kind."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown record kind {name!r}") from None


def table_from_rows(kind_name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows of one kind → an Arrow table with that kind's schema (see :mod:`pipeline.columns`: no pandas).

    :raises TypeError, ValueError: naming the field whose value does not fit
    """
    return columns.table(KINDS[kind_name].schema, list(rows))


def rows_from_table(table: pa.Table) -> Iterator[dict[str, Any]]:
    """Arrow rows back to plain dicts, maps as dicts, timestamps as aware datetimes."""
    kind_name = table.column("kind")[0].as_py() if table.num_rows else None
    maps = KINDS[kind_name].map_fields if kind_name in KINDS else ()
    for row in table.to_pylist():
        for name in maps:
            if row.get(name) is not None:
                row[name] = dict(row[name])
        yield row


def unreadable_rows(table: pa.Table) -> dict[int, str]:
    """Row number → why it cannot be read: a time Python cannot hold (before year 1 or after 9999).

    Ingest bounds every time now; such rows were stored before it did (a job started in
    year -1199), and converting one to Python raises ``OverflowError`` part way through a
    read. Callers name and skip them. Integers throughout: ``pa.scalar`` imports pandas.
    """
    import pyarrow.compute as pc  # here, not at the top: a scheduler's plugin starts without it (0.25 s)

    bad: dict[int, str] = {}
    first, last = _PYTHON_TIMES
    for field in table.schema:
        if not pa.types.is_timestamp(field.type):
            continue
        values = table.column(field.name).cast(pa.int64())
        span = pc.min_max(values).as_py()
        if span["min"] is None or (first <= span["min"] and span["max"] <= last):
            continue
        for row, value in enumerate(values.to_pylist()):
            if value is not None and not first <= value <= last:
                bad.setdefault(row, f"{field.name} is outside the years 1 to 9999")
    return bad


def records_by_kind(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records by kind, kinds in order of first appearance, records in order.

    Checked once per distinct Python type and kind, not per record: an emitter groups every batch it
    seals, and an ``isinstance`` against ``Mapping`` per record was a sixth of sealing 5,000 of them.

    :raises ValueError: naming the first record that is no mapping or names no known kind
    """
    records = list(records)
    if all(issubclass(type_, Mapping) for type_ in set(map(type, records))):
        names = [record.get("kind") for record in records]
    else:
        names = [record.get("kind") if isinstance(record, Mapping) else None for record in records]
    try:
        distinct = dict.fromkeys(names)
    except TypeError:  # a kind that cannot be a key (a list): named below
        distinct = {}
    if len(distinct) == 1 and isinstance(names[0], str) and names[0] in KINDS:  # the usual batch: one kind
        return {names[0]: records}
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for position, (name, record) in enumerate(zip(names, records, strict=True)):
        if not isinstance(name, str) or name not in KINDS:
            raise ValueError(f"record {position}: unknown record kind {name!r}")
        by_kind.setdefault(name, []).append(record)
    return by_kind


def tables_from_records(records: Iterable[Mapping[str, Any]]) -> list[pa.Table]:
    """Records as one Arrow table per kind, each checked by :func:`check_table`.

    The emitter runs this before sealing a batch, so a malformed record is caught
    (and dropped) on the cluster rather than refusing a whole batch later.

    :raises ValueError: naming what is wrong (the kind, field or type)
    """
    tables = []
    for kind_name, rows in records_by_kind(records).items():
        try:
            table = table_from_rows(kind_name, rows)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"{kind_name} record has a field of the wrong type: {exc}") from None
        check_table(table)
        tables.append(table)
    return tables


def with_later_fields(table: pa.Table) -> pa.Table:
    """A table of an earlier release's schema of its kind, with the fields added since as nulls.

    A plugin not yet upgraded (or the spool it left) sends tables without them; fields are only
    ever added, nullable and after the others, so such a table's schema is the first fields of
    its kind's. Judged by the schema alone: nothing of the (hostile, not yet validated) data is
    read. Any other table is returned as it is, for :func:`check_table` to judge.
    """
    schema = table.schema
    for spec in KINDS.values():
        fields = list(spec.schema)
        earlier, added = fields[: len(schema)], fields[len(schema) :]
        if not added or not all(field.nullable for field in added):
            continue
        if all(f.equals(field, check_metadata=True) for f, field in zip(earlier, schema, strict=True)):
            for field in added:
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
            return table
    return table


def check_table(table: pa.Table) -> str:
    """The kind of a table that arrived from elsewhere, once it matches that kind's schema exactly.

    Validated in full before any kernel reads it: a forged offset would have Arrow read past the
    table's own buffers (the server's memory, quoted back in the error, or a crash).

    :raises ValueError: naming what does not match
    """
    import pyarrow.compute as pc  # see unreadable_rows

    if table.num_rows == 0 or table.schema.get_field_index("kind") < 0:
        raise ValueError("a table of records must be non-empty and have one kind column")
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"a record table is malformed: {first_line(exc)}") from None
    if table.schema.field("kind").type != pa.string():
        raise ValueError(f"a table's kind column must hold text, not {table.schema.field('kind').type}")
    kinds = pc.unique(table.column("kind")).to_pylist()
    if len(kinds) != 1 or kinds[0] not in KINDS:
        shown = [kind if kind is None else kind[:_SHOWN_CHARS] for kind in kinds[:5]]
        raise ValueError(f"a table must hold one known record kind, got {shown}")
    spec = KINDS[kinds[0]]
    if not table.schema.equals(spec.schema):
        raise ValueError(f"{spec.name} table does not match the {spec.name} record schema")
    if not table.schema.equals(spec.schema, check_metadata=True):  # stored with every segment, and unbounded
        raise ValueError(f"{spec.name} table carries Arrow metadata; a record table has none")
    for field in spec.schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"{spec.name} record lacks {field.name}")
    if pc.unique(table.column("data_type")).to_pylist() != [spec.data_type]:
        raise ValueError(f"{spec.name} record has a data_type other than {spec.data_type!r}")
    if spec.name == "cluster_snapshot":  # the control plane keeps each running job by its id
        running = pc.list_flatten(table.column("jobs_running"))
        if running.null_count or pc.struct_field(running, "job_id").null_count:
            raise ValueError("cluster_snapshot record has a running job that is null or has no job_id")
    return spec.name
