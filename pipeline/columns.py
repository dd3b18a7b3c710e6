"""Arrow tables from Python rows, built from buffers rather than by ``pa.array``.

pyarrow's converter from Python objects (``pa.array``, ``Table.from_pylist``,
``pa.scalar``) first asks whether each input is a pandas object, and that
question imports pandas: 0.2 s of CPU in every scheduler process that seals a
batch, as much as importing the whole ingest path. The record schemas use six
types (string, int64, float64, UTC timestamps in microseconds, lists of
strings, maps from strings), so their columns are built here from
:mod:`array` and numpy buffers with ``pa.Array.from_buffers``. Python types
are checked strictly (no bool as a number, no text as a list), and
:func:`pipeline.records.check_table` validates the result in full.
"""

from __future__ import annotations

import numbers
from array import array
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain, repeat
from operator import attrgetter, is_not, itemgetter, sub
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["column", "observed_span", "table"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NONE = type(None)
_BINARY_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_MAX_OFFSET = 2**31 - 1


def table(schema: pa.Schema, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows as a table of ``schema``; a field a row lacks is null, a key the schema lacks is ignored.

    :raises TypeError: naming the field and the value's type
    :raises ValueError: a value that fits no column of its type (too large, not UTF-8)
    """
    columns = []
    for field, values in zip(schema, _transposed(schema.names, rows), strict=True):
        try:
            columns.append(column(field.type, values))
        except (TypeError, ValueError, OverflowError) as exc:
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"field {field.name!r}: {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)


def _transposed(names: list[str], rows: Sequence[Mapping[str, Any]]) -> list[Sequence[Any]]:
    """Each name's values over the rows, None where a row lacks the name (looked up in C when none does)."""
    transposed: list[Sequence[Any]] = []
    for name in names:
        try:
            transposed.append(list(map(itemgetter(name), rows)))
        except KeyError:
            transposed.append([row.get(name) for row in rows])
    return transposed


def column(type_: pa.DataType, values: Sequence[Any]) -> pa.Array:
    """One column of ``type_`` from Python values, None for null.

    Types are checked once per distinct Python type, and whole columns convert
    in C where the :mod:`array` module can (ints, floats, ASCII text).

    :raises TypeError: a value of the wrong Python type
    :raises ValueError, OverflowError: a value out of the type's range
    """
    if pa.types.is_string(type_):
        return _strings(type_, values)
    kinds, validity = _kinds(values)
    if pa.types.is_list(type_):
        _check(kinds, Sequence, "a list", refused=(str, bytes))
        items = _filled(values, validity, ())
        child = column(type_.value_type, [item for sequence in items for item in sequence])
        return pa.Array.from_buffers(
            type_, len(values), [validity, _offsets(map(len, items), len(values))], children=[child]
        )
    if pa.types.is_map(type_):
        _check(kinds, Mapping, "a mapping")
        maps = _filled(values, validity, {})
        keys = column(type_.key_type, list(chain.from_iterable(maps)))
        if keys.null_count:  # a null key would make an invalid map array
            raise TypeError("expected a text key, got NoneType")
        items = column(type_.item_type, [item for entries in maps for item in entries.values()])
        entries = pa.StructArray.from_arrays([keys, items], fields=[type_.key_field, type_.item_field])
        return pa.Array.from_buffers(
            type_, len(values), [validity, _offsets(map(len, maps), len(values))], children=[entries]
        )
    if pa.types.is_struct(type_):
        _check(kinds, Mapping, "a mapping")
        structs = _filled(values, validity, {})
        children = [column(field.type, [struct.get(field.name) for struct in structs]) for field in type_]
        return pa.Array.from_buffers(type_, len(values), [validity], children=children)
    if pa.types.is_int64(type_):
        _check(kinds, numbers.Integral, "an integer", refused=(bool,))
        fixed: array[Any] | np.ndarray = array("q", _filled(values, validity, 0))
    elif pa.types.is_float64(type_):
        _check(kinds, numbers.Real, "a number", refused=(bool,))
        fixed = array("d", _filled(values, validity, 0.0))
    elif _is_utc_microseconds(type_):
        _check(kinds, datetime, "a datetime")
        fixed = _microseconds(_filled(values, validity, _EPOCH))
    else:
        raise TypeError(f"no column builder for Arrow type {type_}")
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(fixed)])


def _strings(type_: pa.DataType, values: Sequence[Any]) -> pa.Array:
    """A text column: joining the values checks their types too (a column without nulls needs no other pass)."""
    try:
        joined, validity, text = "".join(values), None, values
    except TypeError:  # a null, or a value that is not text: told apart by their types
        kinds, validity = _kinds(values)
        _check(kinds, str, "text")
        text = _filled(values, validity, "")
        joined = "".join(text)
    if joined.isascii():  # then a string's length is its UTF-8 length
        data, lengths = joined.encode("ascii"), map(len, text)
    else:
        encoded = [v.encode() for v in text]
        data, lengths = b"".join(encoded), map(len, encoded)
    return pa.Array.from_buffers(type_, len(values), [validity, _offsets(lengths, len(values)), pa.py_buffer(data)])


def _kinds(values: Sequence[Any]) -> tuple[set[type], pa.Buffer | None]:
    """The Python types of the values other than None, and the validity bitmap when one is None."""
    kinds = set(map(type, values))
    validity = _validity(values) if _NONE in kinds else None
    kinds.discard(_NONE)
    return kinds, validity


def observed_span(values: pa.ChunkedArray) -> tuple[datetime, datetime]:
    """The earliest and latest of a non-empty UTC microsecond timestamp column.

    Read as integers: ``as_py`` of a zoned timestamp imports pandas.
    """
    import pyarrow.compute as pc  # here, not at the top: a scheduler's plugin starts without it (0.1-0.25 s)

    if not _is_utc_microseconds(values.type):
        raise TypeError(f"expected UTC timestamps in microseconds, got {values.type}")
    span = pc.min_max(values.cast(pa.int64())).as_py()
    return _EPOCH + span["min"] * _MICROSECOND, _EPOCH + span["max"] * _MICROSECOND


def _is_utc_microseconds(type_: pa.DataType) -> bool:
    """The one timestamp type of the record schemas."""
    return pa.types.is_timestamp(type_) and type_.unit == "us" and type_.tz in ("UTC", "+00:00")


def _filled(values: Sequence[Any], validity: pa.Buffer | None, empty: Any) -> Sequence[Any]:
    """``values`` with ``empty`` in place of each null: the placeholder a null slot holds in the buffers."""
    if validity is None:
        return values
    try:  # in C, where the values can be dict keys (text, numbers, times)
        return list(map({None: empty}.get, values, values))
    except TypeError:  # lists and maps
        return [empty if v is None else v for v in values]


def _validity(values: Sequence[Any]) -> pa.Buffer:
    """The validity bitmap of a column with nulls: bit i is set when value i is not null.

    Made in C: one byte 0 or 1 per value, reversed and read as a binary number, whose bit i is value i's.
    """
    flags = bytes(map(is_not, values, repeat(None)))
    bits = int(flags[::-1].translate(_BINARY_DIGITS), 2)
    return pa.py_buffer(bits.to_bytes((len(values) + 7) // 8, "little"))


def _offsets(lengths: Iterable[int], count: int) -> pa.Buffer:
    """Offsets from ``count`` lengths, summed by numpy: half the time of ``accumulate`` into an ``array``.

    :raises OverflowError: the lengths add up past what 32-bit offsets hold
    """
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.fromiter(lengths, dtype=np.int64, count=count), out=offsets[1:])
    if offsets[-1] > _MAX_OFFSET:
        raise OverflowError(f"{offsets[-1]} bytes or items in one column; at most {_MAX_OFFSET}")
    return pa.py_buffer(offsets.astype(np.int32))


def _check(kinds: set[type], allowed: type, what: str, *, refused: tuple[type, ...] = ()) -> None:
    """:raises TypeError: naming the first Python type (by name) that is not ``allowed``."""
    for kind in sorted(kinds, key=lambda k: k.__name__):
        if not issubclass(kind, allowed) or issubclass(kind, refused):
            raise TypeError(f"expected {what}, got {kind.__name__}")


def _microseconds(times: Sequence[datetime]) -> np.ndarray:
    """Microseconds since the epoch of each time, a naive one read as UTC (as pyarrow reads it).

    The differences' days, seconds and microseconds are read in C and combined by numpy: a third less
    CPU than dividing each difference by a microsecond, which makes a Python integer of each.
    """
    try:
        deltas = list(map(sub, times, repeat(_EPOCH)))
    except TypeError:  # a naive time
        deltas = [(t if t.tzinfo is not None else t.replace(tzinfo=UTC)) - _EPOCH for t in times]
    days, seconds, microseconds = (
        np.fromiter(map(attrgetter(part), deltas), dtype=np.int64, count=len(deltas))
        for part in ("days", "seconds", "microseconds")
    )
    return (days * 86_400 + seconds) * 1_000_000 + microseconds
