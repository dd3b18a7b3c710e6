"""Long-term store in a SQL database (SQLite or PostgreSQL, same code)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, LargeBinary, and_, cast, delete, func, select
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from pipeline.db import (
    as_stored,
    create_schema,
    driver_reason,
    engine_for,
    insert_ignoring_duplicates,
    segments,
    stored_reader,
)
from pipeline.errors import StoreError, StoreUnavailable
from pipeline.redact import mask_url
from pipeline.segments import NEVER_OPENS, Segment
from pipeline.stores.base import Removed, Store

__all__ = ["SQLStore"]

#: header columns of a type other than text, read as stored and converted per row (see :func:`_segment`)
_CONVERTED = ("key_version", "min_observed_at", "max_observed_at", "n_records")
_HEADER_COLUMNS = [as_stored(c) if c.name in _CONVERTED else c for c in segments.c if c.name != "payload"]
#: the payload as bytes whatever a row holds: SQLite keeps any type in any column, and a payload altered
#: into text failed the whole scan in its driver (UTF-8 decoding) rather than its one segment (AES-GCM)
_COLUMNS = [*_HEADER_COLUMNS, cast(segments.c.payload, LargeBinary).label("payload")]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CHUNK = 500
#: rows a payload scan fetches at once: segments of many records are hundreds of KB each
_PAYLOAD_CHUNK = 32


class SQLStore(Store):
    """Segments as rows of the ``segments`` table of the metadata database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        self._insert = insert_ignoring_duplicates(self.engine, segments)
        with self._connection("create schema"):
            create_schema(self.engine)

    @contextmanager
    def _connection(self, action: str, *, begin: bool = False) -> Iterator[Connection]:
        where = mask_url(self.engine.url.render_as_string(hide_password=False))
        try:
            with self.engine.begin() if begin else self.engine.connect() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                reason = driver_reason(exc)
                raise StoreUnavailable(f"{where} unreachable during {action}: {reason}") from exc
            raise StoreError(f"{where} refused {action}: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"{where} failed during {action}: {exc}") from exc

    def write(self, batch: Sequence[Segment]) -> int:
        if not batch:
            return 0
        with self._connection("write", begin=True) as conn:
            return self.write_within(conn, batch)

    def write_within(self, conn: Connection, batch: Sequence[Segment]) -> int:
        """:meth:`write` within the caller's transaction; how many segments were new."""
        new = 0
        for start in range(0, len(batch), _CHUNK):
            chunk = batch[start : start + _CHUNK]
            ids = [s.segment_id for s in chunk]
            present = set(conn.scalars(select(segments.c.segment_id).where(segments.c.segment_id.in_(ids))))
            rows = [_row(s) for s in chunk if s.segment_id not in present]
            if rows:
                conn.execute(self._insert, rows)
                new += len(rows)
        return new

    def insert(self, conn: Connection, batch: Sequence[Segment]) -> None:
        """Add segments within the caller's transaction (a group commit); ids already present are skipped."""
        for start in range(0, len(batch), _CHUNK):
            conn.execute(self._insert, [_row(s) for s in batch[start : start + _CHUNK]])

    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        columns = _COLUMNS if with_payload else _HEADER_COLUMNS
        query = (
            select(*columns)
            .where(*_filters(subject_ref=subject_ref, user_ref=user_ref, data_type=data_type, kind=kind))
            .order_by(segments.c.min_observed_at, segments.c.segment_id)
        )
        with self._connection("scan") as conn:
            read_time = stored_reader(segments.c.min_observed_at, conn.dialect)
            for row in conn.execution_options(yield_per=_PAYLOAD_CHUNK if with_payload else _CHUNK).execute(query):
                yield _segment(row._mapping, read_time)

    def _remove(self, action: str, condition: ColumnElement[bool]) -> Removed:
        with self._connection(action, begin=True) as conn:
            count, records = conn.execute(
                select(func.count(), func.coalesce(func.sum(segments.c.n_records), 0)).where(condition)
            ).one()
            if count:
                conn.execute(delete(segments).where(condition))
        return Removed(int(count), int(records))

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        return self._remove("delete", segments.c.segment_id.in_(list(segment_ids)))

    def expire(self, data_type: str, before: datetime) -> Removed:
        return self._remove("expire", and_(segments.c.data_type == data_type, segments.c.max_observed_at < before))

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        return self._remove("erase", and_(*_filters(subject_ref=subject_ref, user_ref=user_ref)))

    def straddling(self, data_type: str, at: datetime) -> Iterator[Segment]:
        query = select(*_COLUMNS).where(
            segments.c.data_type == data_type, segments.c.max_observed_at >= at, segments.c.min_observed_at < at
        )
        with self._connection("scan") as conn:
            read_time = stored_reader(segments.c.min_observed_at, conn.dialect)
            for row in conn.execution_options(yield_per=_PAYLOAD_CHUNK).execute(query):
                yield _segment(row._mapping, read_time)

    def close(self) -> None:
        """The engine is shared per URL and process; connections return to its pool."""


def _filters(**values: Any) -> list[ColumnElement[bool]]:
    return [segments.c[name] == value for name, value in values.items() if value is not None]


def _row(s: Segment) -> dict[str, Any]:
    return {
        "segment_id": s.segment_id,
        "subject_ref": s.subject_ref,
        "user_ref": s.user_ref,
        "data_type": s.data_type,
        "kind": s.kind,
        "key_version": s.key_version,
        "min_observed_at": s.min_observed_at,
        "max_observed_at": s.max_observed_at,
        "n_records": s.n_records,
        "payload": s.payload,
    }


def _segment(row: Any, read_time: Callable[[Any], Any]) -> Segment:
    """The segment a row holds. A row whose key version, times or count were altered into values of
    another type (SQLite keeps them) gives a stand-in that no key opens: a reader names it, as a
    file store names a damaged file, and the scan goes on."""
    key_version, n_records = (_integer(row[name]) for name in ("key_version", "n_records"))
    first, last = (_time(row[name], read_time) for name in ("min_observed_at", "max_observed_at"))
    altered = None in (key_version, n_records, first, last)
    payload = bytes(row.get("payload") or b"")
    return Segment(
        segment_id=row["segment_id"],
        subject_ref=row["subject_ref"],
        user_ref=row["user_ref"],
        data_type=row["data_type"],
        kind=row["kind"],
        key_version=key_version or 0,
        min_observed_at=first or last or _EPOCH,
        max_observed_at=last or first or _EPOCH,
        n_records=n_records or 0,
        payload=NEVER_OPENS if altered and payload else payload,
    )


def _integer(value: Any) -> int | None:
    return value if type(value) is int else None


def _time(value: Any, read_time: Callable[[Any], Any]) -> datetime | None:
    try:
        value = read_time(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return value if isinstance(value, datetime) else None
