"""Segments: a big one is stored zstd-compressed, a short cluster's small one is not, and both open."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
from conftest import make_record

from pipeline.records import table_from_rows
from pipeline.runtime import seal_records
from pipeline.segments import COMPRESS_FROM_BYTES, open_segment

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _raw_ipc_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().size


def test_only_segments_big_enough_to_gain_are_compressed_and_every_one_opens(keyring) -> None:  # noqa: ANN001
    for n, compressed in ((3, False), (2_000, True)):
        records = [
            make_record(observed_at=T0 + timedelta(seconds=i), n_workers=8, tasks_by_state={"memory": i})
            for i in range(n)
        ]
        table = table_from_rows("cluster_snapshot", records)
        assert (table.nbytes >= COMPRESS_FROM_BYTES) is compressed
        [segment] = seal_records(keyring, records)
        assert open_segment(keyring, segment).equals(table)
        stored = len(segment.payload) - 12 - 16  # less the AES-GCM nonce and tag
        if compressed:
            assert stored < _raw_ipc_bytes(table) / 2
        else:
            assert stored == _raw_ipc_bytes(table)
