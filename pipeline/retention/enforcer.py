"""The retention pass: remove what the policy says is past its limit, exactly.

For every (store, data type, limit) with a finite limit, ``cutoff = now - limit``:
the store's own ``expire`` drops every segment whose newest record is older
than the cutoff (whole day folders in the local logging store), then each
segment that straddles the cutoff is decrypted, cut to its records at or after
the cutoff, sealed again and written before the old one is deleted. So nothing
younger than the limit is removed and nothing older survives. The rewritten
segment's id derives from the old id and the cutoff, so a pass interrupted
between write and delete and run again writes the same segment once.

Each store's backend retention, each (store, data type), each store's compaction,
the deletion requests, key retirement and the checkpoint are separate steps: one
that fails is named (report, audit entry, exit status of ``enforce``) and the
others still run, so a store that is down or a row nobody foresaw never stops the
rest of the pass, nor the anchoring of the audit chain.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bounds import CLOCK_SKEW
from pipeline.columns import column
from pipeline.errors import (
    KeyringError,
    KeyServiceError,
    PipelineError,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    UnknownAccountError,
)
from pipeline.records import DATA_TYPES, rows_from_table, utcnow
from pipeline.reports.residue import remove_killed_reports
from pipeline.retention.requests import DeletionRequest, process_pending
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
    #: deletion requests carried out in this pass (``enforce``; the service runs them on their own)
    requests: list[DeletionRequest] = field(default_factory=list)
    #: step name (``expire:STORE/TYPE``, ``compact:STORE``, ``key-retirement``, ...) -> what went wrong
    failed_steps: dict[str, str] = field(default_factory=dict)
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
                f"{_kept_longer(found)}"
                f"{', updated' if found['updated'] else ''}"
            )
        for store, n in self.foreign_files.items():
            lines.append(f"  {store:<14} {n} foreign files skipped (left in place)")
        if self.retired_master_versions:
            lines.append(f"  master key versions retired: {', '.join(map(str, self.retired_master_versions))}")
        for step, reason in self.failed_steps.items():
            lines.append(f"  FAILED {step}: {reason}")
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
            "failed_steps": self.failed_steps,
            "audit_seq": self.audit_seq,
        }


def enforce(
    pipeline: Pipeline, now: datetime | None = None, *, simulated: bool | None = None, requests: bool = False
) -> RetentionReport:
    """Run one retention pass as of ``now`` (default: the current time), audit it and anchor the audit chain.

    Every step (a store's backend retention, each data type of each store, a store's
    compaction, the deletion requests, key retirement, the checkpoint) runs on its own:
    one that fails is named in :attr:`RetentionReport.failed_steps` and the audit entry,
    and every other step still runs. The checkpoint is written after every pass.

    :param simulated: ``now`` is not the clock's (``--now``, a what-if run); the audit entry
        and the report say so. Default: whether ``now`` was given.
    :param requests: also carry out the pending deletion requests (``enforce``; the service
        runs them as a job of their own)
    """
    report = RetentionReport(now or utcnow(), simulated=now is not None if simulated is None else simulated)
    now = report.now
    run = functools.partial(_step, report)
    run("policy", pipeline.reload_policy)  # an edit since serve started; invalid: the one in force, and FAIL
    for name, backend in pipeline.stores.items():  # a retention the backend enforces itself
        limits = {t: limit for s, t, limit in pipeline.policy.limits() if s == name}
        if limits:
            run(f"backend-retention:{name}", _apply_backend_retention, report, name, backend, limits)
    for store_name, data_type, limit in pipeline.policy.limits():
        store = pipeline.stores.get(store_name)
        if store is not None:
            cutoff = now - limit
            run(f"expire:{store_name}/{data_type}", _expire, pipeline, report, store_name, store, data_type, cutoff)
    for store_name, store in pipeline.stores.items():  # what an edit took off a store's list: not allowed there
        for data_type in sorted(set(DATA_TYPES) - set(pipeline.policy.retention.get(store_name, {}))):
            run(
                f"expire:{store_name}/{data_type}",
                _expire_unlisted,
                pipeline,
                report,
                store_name,
                store,
                data_type,
                now,
            )
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for name, backend in pipeline.stores.items():
        run(f"compact:{name}", _compact, pipeline, report, name, backend, today)
    report.foreign_files = {name: len(found) for name, found in pipeline.foreign_files().items()}
    run("report-residue", remove_killed_reports, pipeline.settings.home)  # decrypted rows of a killed report
    if requests:
        run("deletion-requests", lambda: report.requests.extend(process_pending(pipeline, now=now)))
    run(
        "key-retirement",
        lambda: report.retired_master_versions.extend(retire_master_keys(pipeline, now, simulated=report.simulated)),
    )
    details = {"policy_sha256": pipeline.policy.sha256, **report.as_dict()}
    report.audit_seq = pipeline.audit.append("retention.pass", details=details).seq
    if not run("checkpoint", pipeline.audit.checkpoint):  # after the entry: its failure gets one of its own
        details = {"step": "checkpoint", "error": report.failed_steps["checkpoint"], "pass_seq": report.audit_seq}
        pipeline.audit.append("retention.step_failed", details=details)
    if report.failed_steps:
        logger.error("retention pass as of %s: failed steps: %s", now.isoformat(), ", ".join(report.failed_steps))
    logger.info("retention pass as of %s removed %d records", now.isoformat(), report.records)
    return report


def _step(report: RetentionReport, name: str, action: Callable[..., Any], *args: Any) -> bool:
    """Run one step; an error is named in the report (and logged) instead of ending the pass. True: it ran.

    Any exception: whatever one step meets (a store down, a row no code foresaw) must not
    stop the others. ``KeyboardInterrupt`` and ``SystemExit`` still end the pass.
    """
    try:
        action(*args)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        report.failed_steps[name] = reason
        logger.error("retention step %s failed: %s", name, reason, exc_info=not isinstance(exc, PipelineError))
        return False
    return True


def _kept_longer(found: dict[str, Any]) -> str:
    kept = found.get("kept_longer")
    return f" ({', '.join(kept)}: a shorter limit its entries cannot be held to)" if kept else ""


def _apply_backend_retention(report: RetentionReport, name: str, backend: Store, limits: dict[str, timedelta]) -> None:
    found = backend.apply_retention(limits)
    if found is not None:
        report.backend[name] = found


def _expire_unlisted(
    pipeline: Pipeline, report: RetentionReport, store_name: str, store: Store, data_type: str, now: datetime
) -> None:
    """Records of a type the policy does not list for the store, which held them before an edit: removed as
    past a limit of 0 (the report counts them overdue), or, with none (the usual case), nothing to say.
    Those observed up to the clock skew ingest allows ahead of ``now`` too: none is ever written again."""
    if next(iter(store.scan(data_type=data_type, with_payload=False)), None) is not None:
        _expire(pipeline, report, store_name, store, data_type, now + CLOCK_SKEW)


def _expire(
    pipeline: Pipeline, report: RetentionReport, store_name: str, store: Store, data_type: str, cutoff: datetime
) -> None:
    """The limit of one data type in one store: whole segments, then those straddling the cutoff.

    What was removed is counted even when the step fails. A segment whose data key could not be read, or
    that its store refused to delete, fails the step once every other segment was cut (one subject's key or
    file is no reason to keep the others'); a store that is down fails it at once.

    :raises StoreError: naming the files the store refused to remove, and the segments kept whole
    """
    problems: list[str] = []  # what fails the step once the rest is done: paths the store may not remove, ...
    try:
        removed = store.expire(data_type, cutoff)
    except StoreRefused as exc:
        if exc.removed is None:  # nothing went on past the refusal
            raise
        removed = exc.removed
        problems.append(str(exc))
    rewritten = 0
    kept: list[str] = []
    try:
        straddling = {segment.segment_id: segment for segment in store.straddling(data_type, cutoff)}
        # an original listed beside its cut (an earlier pass wrote the cut, then failed to delete the original)
        # goes first; while its delete fails, its cut stays as it is: cut in turn and deleted, it would free
        # its id, and the next pass would cut the original again (every younger record one copy more)
        held: set[str] = set()
        for segment in sorted(straddling.values(), key=lambda s: _cut_id(s) not in straddling):
            if segment.segment_id in held:
                continue
            earlier_cut = straddling.get(_cut_id(segment))
            try:
                removed += _cut(pipeline, store, segment, cutoff, earlier_cut)
            except (KeyringError, KeyServiceError) as exc:
                kept.append(str(exc))
                continue
            except StoreUnavailable:  # the store is down: every other segment would wait out the same
                raise
            except StoreError as exc:  # this one segment refused (a file made immutable): the others go on
                kept.append(f"segment {segment.segment_id}: {exc}")
                if earlier_cut is not None:
                    held.add(earlier_cut.segment_id)
                continue
            rewritten += 1
    finally:
        report.cutoffs.setdefault(store_name, {})[data_type] = cutoff
        report.removed.setdefault(store_name, {})[data_type] = Counts(removed.segments, removed.records, rewritten)
    if kept:
        problems.append(f"{len(kept)} straddling segment(s) kept whole; the first: {kept[0]}")  # ... and these
    if problems:
        raise StoreError("; ".join(problems))


def _compact(pipeline: Pipeline, report: RetentionReport, name: str, backend: Store, today: datetime) -> None:
    merged = backend.compact(today, functools.partial(_merge, pipeline))
    if merged.segments:
        report.compacted[name] = merged


def _merge(pipeline: Pipeline, segments: list[Segment]) -> Segment | None:
    """One segment with the records of ``segments`` (one subject, user and kind); its id derives from theirs."""
    ids = {s.segment_id for s in segments}
    if any(_cut_id(s) in ids for s in segments):
        return None  # an original beside its cut (its delete failed): left to the expiry that finishes the cut
    try:
        tables = [open_segment(pipeline.keyring, s) for s in segments]
    except KeyringError:  # crypto-shredded: nothing readable to merge, expiry or erasure removes it
        return None
    table = _once_each(pa.concat_tables(tables).sort_by("observed_at"), segments)
    merged_id = hashlib.sha256("|".join(sorted(s.segment_id for s in segments)).encode()).hexdigest()[:32]
    return _resealed(pipeline, segments, table, merged_id)


def _once_each(table: pa.Table, segments: list[Segment]) -> pa.Table:
    """``table`` with each record once: copies of one record in two segments of a day are a cut beside
    its original, left by an earlier release's pass killed between them (its cut ids named their cutoff,
    so this release's cut the original again); merged, they would stay twice for good. Only whole copies
    go: two records a cluster sent under one id in two batches differ, and both stay."""
    ids = table.column("record_id")
    if len(pc.unique(ids)) == len(ids):
        return table
    kept: list[int] = []
    seen: dict[str, list[dict[str, Any]]] = {}
    for n, row in enumerate(rows_from_table(table)):  # rare: a day of one subject's records, once
        same_id = seen.setdefault(row["record_id"], [])
        if row not in same_id:  # every field alike: a copy
            same_id.append(row)
            kept.append(n)
    if len(kept) < len(ids):
        logger.warning(
            "compaction kept one copy of %d records held twice in segments %s",
            len(ids) - len(kept),
            ", ".join(sorted(s.segment_id for s in segments)),
        )
    return table.take(column(pa.int64(), kept))


def _opened(pipeline: Pipeline, segment: Segment) -> pa.Table | None:
    """``segment``'s records, or None when nothing opens them: its key was destroyed (or its header names a
    key never issued), or it does not decrypt under its own key (damaged).

    :raises KeyringError: its data key stands but the key service did not give it (throttled, access
        denied, unreachable): that fails the same way, yet the segment is whole
    """
    if not pipeline.key_stands(segment):
        return None
    try:
        cipher = pipeline.keyring.cipher_for(segment.subject_ref, segment.user_ref, segment.key_version)
    except (KeyringError, KeyServiceError) as exc:
        raise KeyringError(f"segment {segment.segment_id} was kept whole: {exc}") from exc
    try:
        return open_segment(pipeline.keyring, segment, cipher=cipher)
    except KeyringError:
        return None


def _resealed(pipeline: Pipeline, segments: list[Segment], table: pa.Table, segment_id: str) -> Segment | None:
    """``table`` (read from ``segments``) sealed again under the key version that sealed them; ``None``
    once that version is gone. An erasure may finish between the read and this seal: a new key (of records
    that arrived since) must never hold records from before it."""
    first = segments[0]
    try:
        key = pipeline.keyring.cipher(first.subject_ref, first.user_ref, create=False)
    except (KeyringError, UnknownAccountError):
        return None
    if any(s.key_version != key[0] for s in segments):
        return None
    return seal(pipeline.keyring, first.subject_ref, first.user_ref, table, segment_id=segment_id, key=key)


def _cut_id(segment: Segment) -> str:
    """The id of the segment that replaces a straddling ``segment`` by its younger records: one id whatever
    the cutoff, so that a cut whose original outlived it (its delete failed) is not written again under
    another id by the next pass, every record in it twice."""
    return hashlib.sha256(f"{segment.segment_id}|cut".encode()).hexdigest()[:32]


def _cut(
    pipeline: Pipeline, store: Store, segment: Segment, cutoff: datetime, earlier_cut: Segment | None = None
) -> Removed:
    """Replace a straddling segment by its records at or after ``cutoff``; one that nothing opens (its
    key destroyed, or the segment damaged) is removed whole, nothing readable in it.

    :param earlier_cut: its cut, written by an earlier pass that then failed to delete it: only the
        delete is left to do (that cut straddles this cutoff too, and is cut in turn)
    :raises KeyringError: its data key stands but could not be read (the key service failing): the
        segment is kept whole and the step fails, where removing it would lose records younger than the limit
    """
    if earlier_cut is not None:
        store.delete([segment.segment_id])
        return Removed(0, segment.n_records - earlier_cut.n_records)
    table = _opened(pipeline, segment)
    if table is None:
        return store.delete([segment.segment_id])
    observed = table.column("observed_at")
    kept = table.filter(pc.greater_equal(observed, pa.scalar(cutoff, observed.type)))
    cut = _resealed(pipeline, [segment], kept, _cut_id(segment))
    if cut is None:
        if pipeline.key_stands(segment):
            raise KeyringError(f"segment {segment.segment_id} was kept whole: its data key could not be read")
        return store.delete([segment.segment_id])  # crypto-shredded since it was read
    store.write([cut])
    store.delete([segment.segment_id])
    return Removed(0, segment.n_records - kept.num_rows)
