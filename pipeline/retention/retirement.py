"""Retiring master key versions: when an erasure becomes final against backups.

A database backup (or WAL, free pages, PostgreSQL dead tuples) taken before an
erasure still holds the shredded data key wrapped under the master key version
of that time. Every erasure rotates the master key; the superseded version is
destroyed once it wraps no live key and ``pipeline.keys.retire-after`` (the
backup window, default 35 days) has passed since it was superseded. From then
on no copy of the database opens what was erased; until then a restored backup
would. Runs with every retention pass and with ``keys retire``.

Data keys are created under the key lock and wrapped under the current
version, so a rotation leaves nothing behind; whatever an older release left
under a superseded version is re-wrapped (and audited) before retirement, so
it never holds a version back past the receipt's ``final_at``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pipeline.records import utcnow

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = ["retire_master_keys"]


def retire_master_keys(pipeline: Pipeline, now: datetime | None = None, *, simulated: bool | None = None) -> list[int]:
    """Destroy the master key versions that are due as of ``now``; audited in the same transaction.
    Returns the versions retired.

    :param simulated: ``now`` is not the clock's (``--now``); the entry says so. Default: whether it was given.
    """
    simulated = now is not None if simulated is None else simulated
    now = now or utcnow()
    rewrapped = pipeline.keyring.rewrap_leftovers()
    if rewrapped:
        pipeline.audit.append("key.rewrapped", details={"keys_rewrapped": rewrapped, "reason": "superseded master"})
    audit = pipeline.audit  # opened before the retirement's transaction: SQLite has one writer
    details = {
        "retire_after_s": pipeline.settings.retire_after.total_seconds(),
        "as_of": now.isoformat(),
        "simulated_clock": simulated,
    }
    retired = pipeline.keyring.retire_masters(
        pipeline.settings.retire_after,
        now,
        lambda conn, retired: audit.append_within(
            conn, "key.retired", details={"master_key_versions": retired, **details}
        ),
    )
    pipeline.keyring.compact()  # copies an erasure's compaction could not drop while a read was in progress
    return retired
