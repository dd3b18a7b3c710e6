"""Segments: a big one is stored zstd-compressed, a short cluster's small one is not, and both open,
as do big ones sealed before (Arrow's own per-buffer zstd inside the IPC stream)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from unittest import mock

import pyarrow as pa
from conftest import make_record

from pipeline.records import table_from_rows
from pipeline.runtime import seal_records
from pipeline.segments import COMPRESS_FROM_BYTES, open_segment

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _raw_ipc_bytes(table: pa.Table, options: pa.ipc.IpcWriteOptions | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _snapshots(n: int) -> list[dict]:
    return [
        make_record(observed_at=T0 + timedelta(seconds=i), n_workers=8, tasks_by_state={"memory": i}) for i in range(n)
    ]


def test_only_segments_big_enough_to_gain_are_compressed_and_every_one_opens(keyring) -> None:  # noqa: ANN001
    for n, compressed in ((3, False), (2_000, True)):
        records = _snapshots(n)
        table = table_from_rows("cluster_snapshot", records)
        assert (len(_raw_ipc_bytes(table)) >= COMPRESS_FROM_BYTES) is compressed
        [segment] = seal_records(keyring, records)
        assert open_segment(keyring, segment).equals(table)
        assert open_segment(keyring, segment, ["n_workers"]).equals(table.select(["n_workers"]))
        stored = len(segment.payload) - 12 - 16  # less the AES-GCM nonce and tag
        if compressed:
            assert stored < len(_raw_ipc_bytes(table)) / 2
        else:
            assert stored == len(_raw_ipc_bytes(table))


def test_a_segment_sealed_with_arrows_own_zstd_compression_still_opens(keyring) -> None:  # noqa: ANN001
    """How segments of 32 KiB and more were sealed before: ``IpcWriteOptions(compression="zstd")``."""
    records = _snapshots(2_000)
    table = table_from_rows("cluster_snapshot", records)
    old = pa.ipc.IpcWriteOptions(compression="zstd", use_threads=False)
    with mock.patch("pipeline.segments.ipc_bytes", lambda table: _raw_ipc_bytes(table, old)):
        [segment] = seal_records(keyring, records)
    stored = len(segment.payload) - 12 - 16
    assert stored < len(_raw_ipc_bytes(table)) / 2  # compressed inside the stream, as before
    assert open_segment(keyring, segment).equals(table)
    assert open_segment(keyring, segment, ["n_workers", "observed_at"]).equals(
        table.select(["observed_at", "n_workers"])
    )
