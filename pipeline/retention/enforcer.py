"""The retention pass: remove what the policy says is past its limit, exactly.

For every (store, data type, limit) with a finite limit, ``cutoff = now - limit``:
the store's own ``expire`` drops every segment whose newest record is older
than the cutoff (whole day folders in the local logging store), then each
segment that straddles the cutoff is decrypted, cut to its records at or after
the cutoff, sealed again and written before the old one is deleted. So nothing
younger than the limit is removed and nothing older survives. The rewritten
segment's id derives from the old id and the cutoff, so a pass interrupted
between write and delete and run again writes the same segment once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import KeyringError
from pipeline.records import utcnow
from pipeline.retention.retirement import retire_master_keys
from pipeline.segments import Segment, open_segment, seal
from pipeline.stores import Removed, Store

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = ["RetentionReport", "enforce"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counts:
    """What one pass removed from one store for one data type."""

    segments: int = 0
    records: int = 0
    rewritten: int = 0  # segments cut at the limit and sealed again

    def as_dict(self) -> dict[str, int]:
        return {"segments": self.segments, "records": self.records, "rewritten": self.rewritten}


@dataclass
class RetentionReport:
    """The outcome of one retention pass."""

    now: datetime
    simulated: bool = False  # ``now`` was given (``--now``, a what-if run), not read from the clock
    cutoffs: dict[str, dict[str, datetime]] = field(default_factory=dict)
    removed: dict[str, dict[str, Counts]] = field(default_factory=dict)
    #: store -> segments merged by compaction of closed days
    compacted: dict[str, Removed] = field(default_factory=dict)
    #: store -> what its backend's own retention was found at and set to (Cloud Logging bucket)
    backend: dict[str, dict[str, Any]] = field(default_factory=dict)
    foreign_files: dict[str, int] = field(default_factory=dict)  # store -> files skipped as not its segments
    retired_master_versions: list[int] = field(default_factory=list)
    audit_seq: int | None = None

    @property
    def failures(self) -> list[str]:
        """Stores whose backend retention could not be brought in line with the policy."""
        return [store for store, found in self.backend.items() if found["status"] != "PASS"]

    @property
    def records(self) -> int:
        return sum(c.records for types in self.removed.values() for c in types.values())

    def summary(self) -> str:
        """One line per store and data type, for people."""
        clock = " (simulated clock: --now)" if self.simulated else ""
        lines = [f"retention pass as of {self.now.isoformat()}{clock}: {self.records} records removed"]
        for store, types in self.removed.items():
            for data_type, c in types.items():
                cut = f", {c.rewritten} segments cut at the limit" if c.rewritten else ""
                lines.append(f"  {store:<14} {data_type:<13} {c.records} records, {c.segments} segments{cut}")
        for store, merged in self.compacted.items():
            lines.append(f"  {store:<14} compacted {merged.segments} segments of closed days")
        for store, found in self.backend.items():
            lines.append(
                f"  {store:<14} {found['status']}: {found['bucket']} retention {found['found_days']}d"
                f"{' (locked)' if found['locked'] else ''}, policy {found['wanted_days']}d"
                f"{' (holds other logs: never changed)' if found.get('holds_other_logs') else ''}"
                f"{', updated' if found['updated'] else ''}"
            )
        for store, n in self.foreign_files.items():
            lines.append(f"  {store:<14} {n} foreign files skipped (left in place)")
        if self.retired_master_versions:
            lines.append(f"  master key versions retired: {', '.join(map(str, self.retired_master_versions))}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "simulated_clock": self.simulated,
            "removed": {
                store: {t: {**c.as_dict(), "cutoff": self.cutoffs[store][t].isoformat()} for t, c in types.items()}
                for store, types in self.removed.items()
            },
            "records_removed": self.records,
            "backend_retention": self.backend,
            "compacted": {s: {"segments": r.segments, "records": r.records} for s, r in self.compacted.items()},
            "foreign_files": self.foreign_files,
            "retired_master_versions": self.retired_master_versions,
            "audit_seq": self.audit_seq,
        }


def enforce(pipeline: Pipeline, now: datetime | None = None, *, simulated: bool | None = None) -> RetentionReport:
    """Run one retention pass as of ``now`` (default: the current time) and audit it.

    :param simulated: ``now`` is not the clock's (``--now``, a what-if run); the audit entry
        and the report say so. Default: whether ``now`` was given.
    """
    report = RetentionReport(now or utcnow(), simulated=now is not None if simulated is None else simulated)
    now = report.now
    for name, backend in pipeline.stores.items():  # a retention the backend enforces itself
        limits = {t: limit for s, t, limit in pipeline.policy.limits() if s == name}
        found = backend.apply_retention(limits) if limits else None
        if found is not None:
            report.backend[name] = found
    for store_name, data_type, limit in pipeline.policy.limits():
        store = pipeline.stores.get(store_name)
        if store is None:
            continue
        cutoff = now - limit
        removed = store.expire(data_type, cutoff)
        rewritten = 0
        for segment in list(store.straddling(data_type, cutoff)):
            removed += _cut(pipeline, store, segment, cutoff)
            rewritten += 1
        report.cutoffs.setdefault(store_name, {})[data_type] = cutoff
        report.removed.setdefault(store_name, {})[data_type] = Counts(removed.segments, removed.records, rewritten)
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for name, backend in pipeline.stores.items():
        merged = backend.compact(today, functools.partial(_merge, pipeline))
        if merged.segments:
            report.compacted[name] = merged
    report.foreign_files = {name: len(found) for name, found in pipeline.foreign_files().items()}
    report.retired_master_versions = retire_master_keys(pipeline, now)
    details = {"policy_sha256": pipeline.policy.sha256, **report.as_dict()}
    report.audit_seq = pipeline.audit.append("retention.pass", details=details).seq
    pipeline.audit.checkpoint()
    logger.info("retention pass as of %s removed %d records", now.isoformat(), report.records)
    return report


def _merge(pipeline: Pipeline, segments: list[Segment]) -> Segment | None:
    """One segment with the records of ``segments`` (one subject, user and kind); its id derives from theirs."""
    try:
        tables = [open_segment(pipeline.keyring, s) for s in segments]
    except KeyringError:  # crypto-shredded: nothing readable to merge, expiry or erasure removes it
        return None
    table = pa.concat_tables(tables).sort_by("observed_at")
    merged_id = hashlib.sha256("|".join(sorted(s.segment_id for s in segments)).encode()).hexdigest()[:32]
    first = segments[0]
    return seal(pipeline.keyring, first.subject_ref, first.user_ref, table, segment_id=merged_id)


def _cut(pipeline: Pipeline, store: Store, segment: Segment, cutoff: datetime) -> Removed:
    """Replace a straddling segment by its records at or after ``cutoff``."""
    try:
        table = open_segment(pipeline.keyring, segment)
    except KeyringError:  # its subject was crypto-shredded: nothing readable is lost
        return store.delete([segment.segment_id])
    observed = table.column("observed_at")
    kept = table.filter(pc.greater_equal(observed, pa.scalar(cutoff, observed.type)))
    new_id = hashlib.sha256(f"{segment.segment_id}|{cutoff.isoformat()}".encode()).hexdigest()[:32]
    store.write([seal(pipeline.keyring, segment.subject_ref, segment.user_ref, kept, segment_id=new_id)])
    store.delete([segment.segment_id])
    return Removed(0, segment.n_records - kept.num_rows)
