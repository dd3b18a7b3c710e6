"""The bounds read Arrow buffers directly: what a hostile cluster can shape beyond one plain value.

Arrow lets a sender choose chunking, nulls beside values and slice offsets; the
bounds read data and offsets buffers as numpy views, so each of these shapes is
checked here, next to the plain values the end-to-end tests send
(``test_hostile_batches.py``).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from conftest import make_record

from pipeline import bounds
from pipeline.records import tables_from_records

NOW = datetime(2026, 6, 1, tzinfo=UTC)
WINDOW = bounds.Window.of(NOW - timedelta(hours=1), NOW)


def table(kind: str = "cluster_snapshot", rows: int = 4, **fields: object) -> pa.Table:
    records = [make_record(kind, observed_at=NOW - timedelta(minutes=1), **fields) for _ in range(rows)]
    (built,) = tables_from_records(records)
    return built


def replaced(built: pa.Table, name: str, column: pa.ChunkedArray | pa.Array) -> pa.Table:
    index = built.schema.get_field_index(name)
    return built.set_column(index, built.schema.field(name), column)


def refused_field(built: pa.Table) -> str:
    with pytest.raises(bounds.OutOfBounds) as refused:
        bounds.check_batch([built], WINDOW)
    return refused.value.field


def test_checking_a_batch_does_not_import_pandas() -> None:
    """Arrow's own ``to_numpy`` imports pandas: 0.2 s and tens of MB on the first batch of a ``serve``."""
    script = (
        "import sys, uuid\n"
        "from datetime import UTC, datetime\n"
        "from pipeline import bounds\n"
        "from pipeline.records import KINDS, tables_from_records\n"
        "now = datetime.now(UTC)\n"
        "record = {field.name: None for field in KINDS['cluster_snapshot'].schema}\n"
        "record.update(record_id=uuid.uuid4().hex, data_type=KINDS['cluster_snapshot'].data_type,\n"
        "    kind='cluster_snapshot', account='acme', cluster_id='c', observed_at=now, n_workers=2)\n"
        "(built,) = tables_from_records([record])\n"
        "bounds.check_batch([built], bounds.Window.of(None, now))\n"
        "print('pandas' in sys.modules)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "False"


def test_a_negative_count_beside_nulls_is_found() -> None:
    built = table(n_workers=1)
    column = pa.array([None, 2, None, -1], pa.int64())
    assert refused_field(replaced(built, "n_workers", column)) == "cluster_snapshot.n_workers"


def test_a_bad_value_in_a_later_chunk_is_found() -> None:
    built = table(compute_seconds_total=1.0)
    column = pa.chunked_array([[1.0, 2.0], [float("inf"), None]], pa.float64())
    assert refused_field(replaced(built, "compute_seconds_total", column)) == "cluster_snapshot.compute_seconds_total"


def test_a_slice_is_read_at_its_offset() -> None:
    built = table(n_workers=1)
    hidden_bad = pa.array([-5, -5, 1, 2, 3, 4], pa.int64()).slice(2)  # the negatives lie before the slice
    bounds.check_batch([replaced(built, "n_workers", hidden_bad)], WINDOW)
    shown_bad = pa.array([1, 2, 3, -4, 9], pa.int64()).slice(0, 4)
    assert refused_field(replaced(built, "n_workers", shown_bad)) == "cluster_snapshot.n_workers"


def test_a_timestamp_beside_nulls_must_lie_in_the_window() -> None:
    built = table("job", job_id="j", started_at=NOW - timedelta(minutes=2))
    late = NOW + bounds.CLOCK_SKEW + timedelta(minutes=1)
    column = pa.array([None, NOW, None, late], built.schema.field("finished_at").type)
    assert refused_field(replaced(built, "finished_at", column)) == "job.finished_at"


def test_a_long_string_in_a_sliced_chunk_is_found() -> None:
    built = table("software_env", image="ok")
    strings = pa.array(["a", "b", "x" * (bounds.MAX_STRING_BYTES + 1), "c", "d"]).slice(1)
    assert refused_field(replaced(built, "image", strings)) == "software_env.image"


def test_a_maps_keys_and_values_and_a_lists_records_are_checked() -> None:
    long_key = {"x" * (bounds.MAX_STRING_BYTES + 1): 1}
    assert refused_field(table(tasks_by_state=long_key)) == "cluster_snapshot.tasks_by_state keys"
    assert refused_field(table(tasks_by_state={"memory": -1})) == "cluster_snapshot.tasks_by_state values"
    progress = {"job_id": "j", "started_at": NOW - timedelta(minutes=2), "tasks_total": -3}
    assert refused_field(table(jobs_running=[progress])) == "cluster_snapshot.jobs_running tasks_total"


def test_a_list_too_long_is_found_in_any_chunk() -> None:
    built = table("job", job_id="j", started_at=NOW - timedelta(minutes=2), task_prefixes=["p"])
    lists = pa.chunked_array(
        [[["p"]] * 4, [["p"] * (bounds.MAX_ITEMS + 1), None, [], ["q"]]], built.schema.field("task_prefixes").type
    )
    assert refused_field(replaced(built, "task_prefixes", lists[4:])) == "job.task_prefixes"


def test_a_key_twice_in_one_mapping_is_found_and_the_same_key_in_two_is_not() -> None:
    built = table(tasks_by_state={"memory": 1})
    kind = built.schema.field("tasks_by_state").type
    apart = pa.array([[("memory", 1), ("queued", 2)], None, [("memory", 3)], [("queued", 4), ("memory", 5)]], kind)
    bounds.check_batch([replaced(built, "tasks_by_state", apart)], WINDOW)
    twice = pa.array([[("a", 1), ("a", 1)], [("memory", 1)], [("memory", 2), ("b", 3), ("memory", 4)], [], []], kind)
    assert refused_field(replaced(built, "tasks_by_state", twice.slice(1))) == "cluster_snapshot.tasks_by_state"
    assert refused_field(replaced(built, "tasks_by_state", twice.slice(0, 4))) == "cluster_snapshot.tasks_by_state"
    hidden = pa.array([[("a", 1), ("a", 1)], *apart.to_pylist()], kind).slice(1)  # the repeat lies before the slice
    bounds.check_batch([replaced(built, "tasks_by_state", hidden)], WINDOW)


def test_a_column_holds_only_a_value_when_every_slot_is_that_value() -> None:
    """Admission's test of a cluster's own rows, read from the buffers: evenly cut slots of the value's bytes."""
    one = pa.array(["acme", "acme", "acme"])
    assert bounds.holds_only(pa.chunked_array([one, one.slice(1)]), "acme")
    assert bounds.holds_only(pa.chunked_array([], pa.string()), "acme")
    assert not bounds.holds_only(pa.chunked_array([pa.array(["ac", "meacme"])]), "acme")  # the same bytes
    assert not bounds.holds_only(pa.chunked_array([pa.array(["acme", None])]), "acme")
    assert not bounds.holds_only(pa.chunked_array([one, pa.array(["acme", "acmf"])]), "acme")
    assert not bounds.holds_only(pa.chunked_array([pa.array(["globex", "acme", "acme"]).slice(1), one]), "acm")
    assert bounds.holds_only(pa.chunked_array([pa.array(["globex", "acme", "acme"]).slice(1)]), "acme")
