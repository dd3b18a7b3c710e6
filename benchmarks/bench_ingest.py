"""Encrypted ingest into the SQLite long-term store, against the same write in clear.

Both paths run the pipeline's own code on the same batches: grouping into
segments, Arrow IPC, ``Segment`` construction and ``SQLStore.write``. The
unencrypted baseline swaps AES-256-GCM for an identity cipher, so the ratio is
the cost of encryption and nothing else. Each path writes its own database
file (so WAL checkpoints fall on the same batches for each); paths alternate
batch by batch and the ratio is the median of per-batch ratios, which keeps a
neighbour's load burst from landing on one path only. Rates are total records
over total time, checkpoints included.

Beside it, the one ingest path end to end: ``Pipeline.ingest`` of one
cluster's HPKE-sealed batch (open, validate, check bounds, scope and stamp, seal
per subject, write to both stores, record the batch id), and the HPKE seal +
open cost per batch. The same run times the old check path too (Arrow read
whole, no bounds, no stamping: swapped in here only), batch by batch in
alternation, so the cost of treating every field as hostile is a ratio.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import dask.config
import pyarrow as pa

from benchmarks import row
from pipeline.bounds import MAX_BATCH_ROWS
from pipeline.config import Settings
from pipeline.intake import open_batch, seal_batch
from pipeline.keys import Keyring
from pipeline.principals import Principal
from pipeline.records import KINDS
from pipeline.runtime import Pipeline, seal_records
from pipeline.segments import Segment, ipc_table, seal
from pipeline.spool import new_batch_id
from pipeline.stores import Store, open_store

RECORDS_PER_BATCH = 10_000
ACCOUNTS = 20
USERS = (None, "user-1")  # 40 subjects: 40 segments of 250 records per batch
GOAL_RATE = 300_000
GOAL_RATIO = 1.3
GOAL_CHECKS_RATIO = 1.10
PAIRS = 3  # ingests with today's checks and with the old ones, per batch
_NONCE = 12


class _Identity:
    """AES-GCM's ``encrypt`` without the encryption."""

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return data


class _ClearKeyring:
    """The real keyring's subject references, with an identity cipher."""

    def __init__(self, keyring: Keyring) -> None:
        self.subject_ref = keyring.subject_ref
        self.user_ref = keyring.user_ref

    def cipher(self, subject_ref: str, user_ref: str | None = None) -> tuple[int, _Identity]:
        return 1, _Identity()

    def ciphers(self, refs: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str | None], tuple[int, _Identity]]:
        return {ref: (1, _Identity()) for ref in refs}


def snapshot_records(batch: int) -> list[dict[str, Any]]:
    """One emitter batch of cluster snapshots: ACCOUNTS × USERS subjects, one day."""
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=batch)
    per_subject = RECORDS_PER_BATCH // (ACCOUNTS * len(USERS))
    records = []
    for a in range(ACCOUNTS):
        for user in USERS:
            for i in range(per_subject):
                records.append(
                    {
                        "record_id": uuid.uuid4().hex,
                        "data_type": "cluster_jobs",
                        "kind": "cluster_snapshot",
                        "account": f"account-{a:03d}",
                        "user": user,
                        "cluster_id": f"cluster-{a:03d}-{i // 100}",
                        "observed_at": start + timedelta(seconds=5 * i),
                        "n_workers": 8,
                        "n_threads": 32,
                        "memory_limit_bytes": 8 * 16 * 2**30,
                        "memory_process_bytes": 3_500_000_000 + i,
                        "memory_managed_bytes": 2_000_000_000 + i,
                        "memory_unmanaged_bytes": 1_500_000_000,
                        "memory_spilled_bytes": 0,
                        "tasks_by_state": {"memory": 120 + i, "processing": 32, "queued": 400, "released": 3},
                        "tasks_completed_total": 10_000 + 50 * i,
                        "tasks_erred_total": i // 50,
                        "compute_seconds_total": 1234.5 + i,
                        "jobs_running": [],
                    }
                )
    assert len(records) == RECORDS_PER_BATCH and set(records[0]) == set(KINDS["cluster_snapshot"].schema.names)
    return records


def _tables(clear: _ClearKeyring, records: list[dict[str, Any]]) -> list[tuple[str, str | None, pa.Table]]:
    """The batch as the Arrow tables ``seal_records`` builds, with their refs."""
    return [
        (s.subject_ref, s.user_ref, ipc_table(s.payload[_NONCE:]))
        for s in seal_records(clear, records)  # type: ignore[arg-type]
    ]


def _timed(store: Store, make: Callable[[], Sequence[Segment]]) -> tuple[float, float]:
    """Seconds to build the segments, and to write them."""
    started = time.perf_counter()
    segments = make()
    built = time.perf_counter()
    store.write(segments)
    return built - started, time.perf_counter() - built


def _seal_checked(keyring: Keyring, tables: list[tuple[str, str | None, pa.Table]]) -> list[Segment]:
    """Seal each table, the batch's keys checked against the keyring once (as ``seal_tables`` does)."""
    keys = keyring.ciphers((subject_ref, user_ref) for subject_ref, user_ref, _table in tables)
    return [seal(keyring, s, u, t, key=keys[(s, u)]) for s, u, t in tables]


def run(quick: bool) -> list[dict[str, Any]]:
    n_batches = 4 if quick else 30
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as home, dask.config.set({"pipeline.home": home}):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
        keyring = pipeline.keyring
        clear = _ClearKeyring(keyring)
        paths: dict[str, Callable[[list[dict[str, Any]], list[Any]], Sequence[Segment]]] = {
            "encrypted, from dicts": lambda records, tables: seal_records(keyring, records),
            "unencrypted, from dicts": lambda records, tables: seal_records(clear, records),  # type: ignore[arg-type]
            "encrypted, from Arrow tables": lambda records, tables: _seal_checked(keyring, tables),
            "unencrypted, from Arrow tables": lambda records, tables: _seal_checked(clear, tables),  # type: ignore[arg-type]
        }
        # one database per path, so each sees the same WAL checkpoints at the same batches
        stores = {name: open_store(f"sqlite:///{home}/{i}.db") for i, name in enumerate(paths)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for batch in range(n_batches + 1):  # batch 0 warms the key cache, Arrow's time zones and the databases
            records = snapshot_records(batch)
            tables = _tables(clear, records)
            names = list(paths)
            for name in names[batch % len(names) :] + names[: batch % len(names)]:
                elapsed = _timed(stores[name], functools.partial(paths[name], records, tables))
                if batch:
                    times[name].append(elapsed)
        n_segments = len(tables)
        payload = sum(len(s.payload) for s in seal_records(clear, records)) / RECORDS_PER_BATCH  # type: ignore[arg-type]
        for store in stores.values():
            store.close()
        rows_ingest = _ingest_path(pipeline, n_batches)
        pipeline.close()

    shape = (
        f"{n_batches} batches of {RECORDS_PER_BATCH:,} cluster_snapshot records in {n_segments} segments, "
        f"~{payload:.0f} B/record"
    )
    rows = []
    for source in ("dicts", "Arrow tables"):
        enc, plain = times[f"encrypted, from {source}"], times[f"unencrypted, from {source}"]
        how = "seal_records" if source == "dicts" else "segments.seal per table"
        rows += _rates(source, how, enc, plain, shape)
    return rows + rows_ingest


@contextlib.contextmanager
def _old_checks() -> Iterator[None]:
    """``Pipeline.ingest`` with the checks it had before every field was treated as hostile:
    Arrow streams read whole (compressed or not), no bounds, no owner stamped, env ids as sent."""

    def read_whole(stream: pa.Buffer) -> pa.Table:
        return pa.ipc.open_stream(stream).read_all()

    with (
        mock.patch("pipeline.intake._read_uncompressed", read_whole),
        mock.patch("pipeline.bounds.check_batch", lambda tables, window: None),
        mock.patch("pipeline.runtime._stamped", lambda table, principal, subject_ref: table),
    ):
        yield


def _ingest_path(pipeline: Pipeline, n_batches: int) -> list[dict[str, Any]]:
    """``Pipeline.ingest`` of sealed one-cluster batches (with today's checks and the old ones), and HPKE
    seal and open alone."""
    cluster = Principal("cluster", account="account-000", user="user-1", cluster_id="cluster-000")
    public = pipeline.intake_key.public_key()
    times: dict[str, list[float]] = {"seal": [], "open": [], "ingest": [], "old checks": []}
    size = 0
    for batch in range(n_batches + 1):
        emitted = snapshot_records(batch)[:MAX_BATCH_ROWS]  # the emitter's batch: as many as the bounds allow
        # observed in the last hour, as a live cluster's are: ingest writes no store a day already past its
        # limit, and records dated in January went to the long-term store only, a cheaper path to compare
        shift = datetime.now(UTC) - timedelta(hours=1) - emitted[0]["observed_at"]
        records = [
            {
                **r,
                "account": "account-000",
                "user": "user-1",
                "cluster_id": "cluster-000",
                "observed_at": r["observed_at"] + shift,
            }
            for r in emitted
        ]
        started = time.perf_counter()
        sealed = seal_batch(public, new_batch_id(), records)
        sealed_at = time.perf_counter()
        open_batch(pipeline.intake_key, sealed)
        opened_at = time.perf_counter()
        if batch:  # batch 0 warms caches
            times["seal"].append(sealed_at - started)
            times["open"].append(opened_at - sealed_at)
            size = len(sealed)
        for pair in range(PAIRS):  # a neighbour's load burst lands on either path: alternate which goes first
            for old in ((batch + pair) % 2 == 0, (batch + pair) % 2 == 1):
                again = seal_batch(public, new_batch_id(), records)  # a batch id of its own: ingested, not a duplicate
                with _old_checks() if old else contextlib.nullcontext():
                    began = time.perf_counter()
                    pipeline.ingest(again, cluster)
                    took = time.perf_counter() - began
                if batch:
                    times["old checks" if old else "ingest"].append(took)
    shape = f"{len(records):,} records/batch, {size / 1e6:.1f} MB sealed"
    ratio = statistics.median(new / old for new, old in zip(times["ingest"], times["old checks"], strict=True))
    return [
        row(
            "ingest: Pipeline.ingest of a sealed batch",
            len(records) * len(times["ingest"]) / sum(times["ingest"]),
            "records/s",
            note=f"HPKE open + schema checks, bounds, scope and stamp, seal per subject, write long-term (SQLite) "
            f"and logging files, record the batch id; {shape}",
        ),
        row(
            "ingest: with the hostile-input checks ÷ with the old checks",
            ratio,
            "×",
            f"≤ {GOAL_CHECKS_RATIO}",
            ratio <= GOAL_CHECKS_RATIO,
            f"median of {len(times['ingest'])} paired ratios (paths alternate); old: Arrow read whole, "
            f"no bounds, no stamping ({len(records) * len(times['old checks']) / sum(times['old checks']):,.0f} "
            "records/s)",
        ),
        row(
            "intake: HPKE seal per batch (cluster side)",
            statistics.fmean(times["seal"]) * 1000,
            "ms",
            note=f"record checks, Arrow IPC, X25519/HKDF-SHA256/AES-256-GCM; {shape}",
        ),
        row(
            "intake: HPKE open per batch",
            statistics.fmean(times["open"]) * 1000,
            "ms",
            note=f"decrypt, Arrow IPC read without decompression, schema checks; {shape}",
        ),
    ]


def _rates(
    source: str, how: str, enc: list[tuple[float, float]], plain: list[tuple[float, float]], shape: str
) -> list[dict[str, Any]]:
    def rate(samples: list[tuple[float, float]]) -> float:
        return RECORDS_PER_BATCH * len(samples) / sum(b + w for b, w in samples)

    def split(samples: list[tuple[float, float]]) -> str:
        build = statistics.fmean(b for b, _ in samples)
        write = statistics.fmean(w for _, w in samples)
        return f"per batch: build {build * 1000:.0f} ms + write {write * 1000:.0f} ms"

    enc_rate, plain_rate = rate(enc), rate(plain)
    ratio = statistics.median((eb + ew) / (pb + pw) for (eb, ew), (pb, pw) in zip(enc, plain, strict=True))
    return [
        row(
            f"ingest: encrypted, from {source}",
            enc_rate,
            "records/s",
            f"≥ {GOAL_RATE:,}",
            enc_rate >= GOAL_RATE,
            f"{how} + SQLStore.write (SQLite); {split(enc)}; {shape}",
        ),
        row(
            f"ingest: unencrypted, from {source}",
            plain_rate,
            "records/s",
            note=f"same code with an identity cipher; {split(plain)}",
        ),
        row(
            f"ingest: encrypted ÷ unencrypted time, from {source}",
            ratio,
            "×",
            f"≤ {GOAL_RATIO}",
            ratio <= GOAL_RATIO,
            "median of per-batch ratios (paths alternate batch by batch)",
        ),
    ]
