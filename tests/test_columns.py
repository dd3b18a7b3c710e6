"""Arrow columns built from buffers: the same tables pyarrow's converter makes, the same refusals, no pandas."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from array import array
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import make_record
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import columns
from pipeline.columns import observed_span
from pipeline.records import KINDS, table_from_rows

_TEXT = st.text(max_size=8)
_TIMES = st.datetimes(min_value=datetime.min, max_value=datetime.max, timezones=st.sampled_from([UTC, None]))


def _values(type_: pa.DataType) -> st.SearchStrategy[Any]:
    """Valid Python values of an Arrow type of the record schemas."""
    if pa.types.is_string(type_):
        return _TEXT
    if pa.types.is_int64(type_):
        return st.integers(-(2**63), 2**63 - 1)
    if pa.types.is_float64(type_):
        return st.floats(allow_nan=False) | st.integers(-(2**53), 2**53)
    if pa.types.is_timestamp(type_):
        return _TIMES
    if pa.types.is_list(type_):
        return st.lists(st.none() | _values(type_.value_type), max_size=4)
    if pa.types.is_map(type_):
        return st.dictionaries(_TEXT, st.none() | _values(type_.item_type), max_size=4)
    if pa.types.is_struct(type_):
        return st.fixed_dictionaries({field.name: st.none() | _values(field.type) for field in type_})
    raise AssertionError(f"no strategy for {type_}")


def _rows(kind_name: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    schema = KINDS[kind_name].schema
    fields = {f.name: _values(f.type) if not f.nullable else st.none() | _values(f.type) for f in schema}
    return st.lists(st.fixed_dictionaries(fields), min_size=1, max_size=12)


@pytest.mark.parametrize("kind_name", sorted(KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tables_equal_what_pyarrows_converter_makes(kind_name: str, data: st.DataObject) -> None:
    rows = data.draw(_rows(kind_name))
    built = table_from_rows(kind_name, rows)
    built.validate(full=True)
    assert built.equals(pa.Table.from_pylist(rows, schema=KINDS[kind_name].schema))


def test_a_missing_field_is_null_and_an_unknown_key_is_ignored() -> None:
    row = make_record(n_workers=2)
    del row["n_threads"]
    table = table_from_rows("cluster_snapshot", [{**row, "password": "hunter2"}])
    assert table.column("n_threads").to_pylist() == [None] and "password" not in table.column_names


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("n_workers", True, TypeError, "field 'n_workers': expected an integer, got bool"),
        ("n_workers", 1.5, TypeError, "field 'n_workers': expected an integer, got float"),
        ("n_workers", "3", TypeError, "field 'n_workers': expected an integer, got str"),
        ("n_workers", 2**63, ValueError, "field 'n_workers'"),
        ("compute_seconds_total", "1.5", TypeError, "field 'compute_seconds_total': expected a number, got str"),
        ("observed_at", "2026-01-01T00:00:00Z", TypeError, "field 'observed_at': expected a datetime, got str"),
        ("account", b"acme", TypeError, "field 'account': expected text, got bytes"),
        ("account", "\udc80", ValueError, "field 'account': 'utf-8' codec can't encode"),
        ("tasks_by_state", [("memory", 1)], TypeError, "field 'tasks_by_state': expected a mapping, got list"),
        ("tasks_by_state", {None: 1}, TypeError, "field 'tasks_by_state': expected a text key, got NoneType"),
        ("tasks_by_state", {5: 1}, TypeError, "field 'tasks_by_state': expected text, got int"),
        ("tasks_by_state", {"memory": "1"}, TypeError, "field 'tasks_by_state': expected an integer, got str"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(
    field: str, value: Any, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        table_from_rows("cluster_snapshot", [make_record(**{field: value})])


def test_a_column_past_32_bit_offsets_is_refused_not_wrapped() -> None:
    """Offsets are summed in 64 bits: 2 GiB of text in one column is an error, not a negative offset."""
    with pytest.raises(OverflowError, match="at most 2147483647"):
        columns._offsets(iter([2**31 - 1, 1]), 2)
    assert columns._offsets(iter([2**31 - 2, 1]), 2).to_pybytes() == array("i", [0, 2**31 - 2, 2**31 - 1]).tobytes()


def test_a_list_field_refuses_text() -> None:  # pyarrow's converter would split "inc" into letters
    with pytest.raises(TypeError, match="field 'task_prefixes': expected a list, got str"):
        table_from_rows("job", [make_record("job", task_prefixes="inc")])


def test_times_in_other_zones_are_stored_as_the_same_instant() -> None:
    moment = datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=UTC)
    shifted = moment.astimezone(timezone(timedelta(hours=-7)))
    table = table_from_rows("cluster_snapshot", [make_record(observed_at=shifted), make_record(observed_at=moment)])
    assert pc.unique(table.column("observed_at")).to_pylist() == [moment]


def test_observed_span_is_the_earliest_and_latest_instant() -> None:
    times = [datetime(2026, 1, d, 3, 4, 5, 6, tzinfo=UTC) for d in (9, 2, 30)]
    table = table_from_rows("cluster_snapshot", [make_record(observed_at=t) for t in times])
    assert observed_span(table.column("observed_at")) == (min(times), max(times))


@pytest.mark.slow
def test_a_scheduler_process_delivers_its_records_without_importing_pandas(tmp_path: Path) -> None:
    """pyarrow's converter imports pandas (0.2 s of CPU) in every scheduler process; ours must not."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from distributed import Client, Scheduler, Worker

        async def main():
            async with Scheduler(port=0, dashboard_address=":0", preload=["pipeline.preload"]) as s:
                async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
                    assert await c.submit(sum, [1, 2]) == 3

        asyncio.run(main())
        print("pandas" in sys.modules)
        """
    )
    env = {**os.environ, "DASK_PIPELINE__HOME": str(tmp_path / "home"), "DASK_PIPELINE__ACCOUNT": "acme"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    from pipeline.config import Settings
    from pipeline.runtime import Pipeline

    pipeline = Pipeline.open(Settings.from_config(home=tmp_path / "home"))
    try:
        kinds = {record["kind"] for record in pipeline.read_records(account="acme")}
    finally:
        pipeline.close()
    assert kinds == {"cluster_snapshot", "job", "software_env"}
