"""Erasure that holds, at scale: erasing one user among many, and the rotation that follows.

A SQLite long-term store holds 10,000 accounts with 10,000,000 records (10
synthetic segment rows of 100 records per account, inserted in bulk) and
100,000 live data keys (10 users per account, wrapped under the master key as
the keyring wraps them, inserted in bulk), plus one real account whose user
``ann`` has 30 days of records in both stores. Timed: ``process_pending``
carrying out the deletion request of that one user — count, erase in both
stores, key destruction, audit entries, receipt saves, then the master key
rotation that re-wraps every live data key and the witness checkpoint. The
rotation is timed on its own as well; the erasure figure is the rest.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dask.config
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert

from benchmarks import row
from pipeline.db import keyring_keys
from pipeline.db import segments as segments_table
from pipeline.keys import _aad
from pipeline.records import rows_from_table
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline

DAY0 = datetime(2026, 1, 1, tzinfo=UTC)
GOAL_ERASURE, GOAL_ROTATION = 1.0, 10.0
USERS_PER_ACCOUNT = 10


def _bulk(pipeline: Pipeline, accounts: int, records: int) -> None:
    """Synthetic segment rows and wrapped data keys for ``accounts`` accounts."""
    per_segment = records // accounts // 10
    payload, now = os.urandom(512), datetime.now(UTC)
    key = AESGCM.generate_key(256)
    provider = pipeline.keyring.provider
    segments: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    with pipeline.keyring.engine.begin() as conn:
        for a in range(accounts):
            ref = uuid.uuid5(uuid.NAMESPACE_OID, f"account-{a}").hex * 2
            for s in range(10):
                at = DAY0 + timedelta(days=s)
                segments.append(
                    {
                        "segment_id": uuid.uuid4().hex,
                        "subject_ref": ref,
                        "user_ref": None,
                        "data_type": "cluster_jobs",
                        "kind": "cluster_snapshot",
                        "key_version": 1,
                        "min_observed_at": at,
                        "max_observed_at": at + timedelta(hours=23),
                        "n_records": per_segment,
                        "payload": payload,
                    }
                )
            for u in range(USERS_PER_ACCOUNT):
                key_id = uuid.uuid5(uuid.NAMESPACE_OID, f"account-{a}/user-{u}").hex * 2
                master, wrapped = provider.wrap(key, _aad(key_id, 1))
                keys.append(
                    {
                        "key_id": key_id,
                        "purpose": "subject",
                        "account_ref": ref,
                        "key_version": 1,
                        "master_version": master,
                        "wrapped": wrapped,
                        "created_at": now,
                    }
                )
            if len(segments) >= 20_000:
                conn.execute(insert(segments_table), segments)
                conn.execute(insert(keyring_keys), keys)
                segments.clear()
                keys.clear()
        if segments:
            conn.execute(insert(segments_table), segments)
            conn.execute(insert(keyring_keys), keys)


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return wrapper


def _erase_one_user(accounts: int, records: int) -> tuple[float, float, int, int]:
    """Seconds for the erasure and for its rotation; records removed; keys re-wrapped."""
    with tempfile.TemporaryDirectory(prefix="bench-erasure-") as home, dask.config.set({"pipeline.home": home}):
        pipeline = Pipeline.open(create=True)
        _bulk(pipeline, accounts, records)
        from benchmarks.bench_retention import _table

        target = [
            {**r, "user": user}
            for d in range(30)
            for user in ("ann", "bob")
            for r in rows_from_table(_table(48, DAY0 + timedelta(days=d), "target"))
        ]
        pipeline.write_records(target)
        file_request(pipeline, "target", "ann", reason="benchmark")
        rotation: list[float] = []
        pipeline.keyring.rotate_master = _timed(pipeline.keyring.rotate_master, rotation)  # type: ignore[method-assign]
        start = time.perf_counter()
        [done] = process_pending(pipeline)
        total = time.perf_counter() - start
        assert done.state == "completed", done.error
        removed = sum(s["records"] for s in done.receipt["stores"].values())
        rewrapped = next(e for e in pipeline.audit.entries() if e.action == "key.rotated").details["keys_rewrapped"]
        pipeline.close()
    return total - rotation[0], rotation[0], removed, rewrapped


def run(quick: bool) -> list[dict[str, Any]]:
    accounts, held = (1_000, 1_000_000) if quick else (10_000, 10_000_000)
    erasure, rotation, removed, rewrapped = _erase_one_user(accounts, held)
    return [
        row(
            f"erasure: 1 user among {accounts:,} accounts holding {held:,} records",
            erasure,
            "s",
            f"< {GOAL_ERASURE:g} s",
            erasure < GOAL_ERASURE,
            f"SQLite long-term + local logs; {removed:,} records removed, the user's key destroyed, audited",
        ),
        row(
            f"rotation after it: {rewrapped:,} live data keys re-wrapped",
            rotation,
            "s",
            f"< {GOAL_ROTATION:g} s",
            rotation < GOAL_ROTATION,
            "new master version staged, every live key unwrapped and wrapped again, one transaction",
        ),
    ]
