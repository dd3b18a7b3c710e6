"""Record kinds, their Arrow schemas, and conversions between rows and Arrow.

A record is a plain ``dict`` while it travels from the plugin to the emitter
(cheap to build on the event loop) and an Arrow table inside a segment. Field
names are a contract: see DESIGN.md "Record schemas".
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

__all__ = [
    "DATA_TYPES",
    "KINDS",
    "Kind",
    "kind",
    "rows_from_table",
    "table_from_rows",
    "utcnow",
    "validate_records",
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
            ],
        ),
        _kind(
            "job",
            "cluster_jobs",
            [
                pa.field("job_id", pa.string()),
                pa.field("started_at", TIMESTAMP),
                pa.field("finished_at", TIMESTAMP),
                pa.field("tasks_total", pa.int64()),
                pa.field("tasks_completed", pa.int64()),
                pa.field("tasks_erred", pa.int64()),
                pa.field("compute_seconds", pa.float64()),
                pa.field("peak_memory_bytes", pa.int64()),
                pa.field("task_prefixes", pa.list_(pa.string())),
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


def utcnow() -> datetime:
    """Timezone-aware now in UTC (freezegun-controllable)."""
    return datetime.now(UTC)


def table_from_rows(kind_name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows of one kind → an Arrow table with that kind's schema."""
    return pa.Table.from_pylist(list(rows), schema=KINDS[kind_name].schema)


def rows_from_table(table: pa.Table) -> Iterator[dict[str, Any]]:
    """Arrow rows back to plain dicts, maps as dicts, timestamps as aware datetimes."""
    kind_name = table.column("kind")[0].as_py() if table.num_rows else None
    maps = KINDS[kind_name].map_fields if kind_name in KINDS else ()
    for row in table.to_pylist():
        for name in maps:
            if row.get(name) is not None:
                row[name] = dict(row[name])
        yield row


def validate_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records checked against their kind's schema, ISO 8601 timestamps parsed to aware datetimes.

    Runs where records cross a trust boundary (a sealed batch arriving) and where
    the emitter must drop a malformed record before it blocks a whole batch.

    :raises ValueError: naming the first bad record (by position) and what is wrong with it
    """
    checked: list[dict[str, Any]] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for position, record in enumerate(records):
        try:
            row = _validate_record(record)
        except ValueError as exc:
            raise ValueError(f"record {position}: {exc}") from None
        checked.append(row)
        by_kind.setdefault(row["kind"], []).append(row)
    for kind_name, rows in by_kind.items():
        try:
            table_from_rows(kind_name, rows)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"{kind_name} record has a field of the wrong type: {exc}") from None
    return checked


@functools.cache
def _fields(kind_name: str) -> tuple[frozenset[str], tuple[tuple[str, bool, bool], ...]]:
    """A kind's field names, and per field (name, nullable, is a timestamp): Arrow objects are slow per record."""
    schema = KINDS[kind_name].schema
    return frozenset(schema.names), tuple((f.name, f.nullable, f.type == TIMESTAMP) for f in schema)


def _validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    name = record.get("kind")
    if name not in KINDS:
        raise ValueError(f"unknown record kind {name!r}")
    names, fields = _fields(name)
    if not names.issuperset(record):
        unknown = set(record) - names
        raise ValueError(f"{name} record has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    row: dict[str, Any] = {}
    for field, nullable, is_timestamp in fields:
        value = record.get(field)
        if value is None:
            if not nullable:
                raise ValueError(f"{name} record lacks {field}")
        elif is_timestamp:
            value = _timestamp(field, value)
        row[field] = value
    expected = KINDS[name].data_type
    if row["data_type"] != expected:
        raise ValueError(f"{name} record has data_type {row['data_type']!r}, expected {expected!r}")
    return row


def _timestamp(name: str, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an ISO 8601 timestamp") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be a timestamp with a time zone, got {value!r}")
    return value
