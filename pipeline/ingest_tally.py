"""Hourly ``ingest.summary`` audit entries: what was ingested per store and data type.

Ingestion is summarised once per hour (and when the pipeline closes), never per
record, so the audit trail stays small while still accounting for every batch.
Refused batches are audited one by one (``ingest.rejected``), up to
:data:`REFUSALS_AUDITED_PER_HOUR` of one actor an hour; the hour's summary counts
the rest, so a cluster sending garbage at its rate limit cannot grow the trail that
every ``audit verify`` and report walks. So are a cluster's batches whose records
admission dropped (``ingest.dropped``: the end of a job recorded lost, sent again, or records
an erasure's tombstone forbids).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime

from pipeline.audit import AuditLog
from pipeline.records import utcnow
from pipeline.segments import Segment

__all__ = ["AUDITED_PER_ACCOUNT_HOUR", "REFUSALS_AUDITED_PER_HOUR", "IngestTally"]

logger = logging.getLogger(__name__)

#: refused batches of one actor (a cluster token, an operator) audited one by one in an hour; so are a
#: cluster's batches with records dropped
REFUSALS_AUDITED_PER_HOUR = 100
#: ... and of one account's actors together: a member registers as many clusters, each a token, as it likes
AUDITED_PER_ACCOUNT_HOUR = 1_000


class IngestTally:
    """Counts ingested records per store and data type; appends one audit entry per hour.

    Counting never writes: a batch's drop is counted inside the transaction that writes it, which holds
    the audit chain's lock. An hour that is over is set aside, and appended by the next :meth:`count`,
    :meth:`refusal` or :meth:`summarise` (each called outside any transaction).
    """

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._lock = threading.Lock()
        self._appending = threading.Lock()  # never taken under ``_lock``: an append waits for the chain's lock
        self._pending: list[dict[str, object]] = []  # summaries of hours that are over, oldest first
        self._start()

    def _start(self) -> None:
        """Count from nothing, in no hour yet."""
        self._hour: datetime | None = None
        self._counts: dict[str, Counter[str]] = {}  # store -> data type -> records this hour
        #: the hour's batches: refused ones by actor, ones with records dropped by cluster id, each named for
        #: the summary's field; those seen, those audited per account, those past a share (the summary's)
        self._seen, self._audited, self._batches = _no_batches(), _no_batches(), _no_batches()
        #: records of the batches past a share: by cluster, and by the erasure request whose tombstone dropped them
        self._dropped: dict[str, Counter[str]] = {
            "records_dropped_not_audited": Counter(),
            "by_request_not_audited": Counter(),
        }

    def count(self, store: str, segments: Iterable[Segment]) -> None:
        """Add what ``store`` just took; first appends the previous hour's summary if it is over."""
        self.summarise()
        with self._lock:
            self._counting()
            counts = self._counts.setdefault(store, Counter())
            for segment in segments:
                counts[segment.data_type] += segment.n_records

    def refusal(self, actor: str, subject_ref: str | None) -> bool:
        """Count a batch of ``actor`` (of the account ``subject_ref``, if any) refused; whether to audit it on
        its own (else the summary counts it)."""
        audited = self._noted("refused_not_audited", actor, subject_ref)
        self.summarise()
        return audited

    def drop(
        self, cluster_id: str, subject_ref: str | None, records: int, by_request: Mapping[str, int] | None = None
    ) -> bool:
        """Count a batch of cluster ``cluster_id`` whose ``records`` admission dropped (``by_request``: those an
        erasure's tombstone did); whether to audit it on its own. Appends nothing: callable within a
        transaction holding the audit chain's lock."""
        audited = self._noted("dropped_not_audited", cluster_id, subject_ref)
        if not audited:
            with self._lock:
                self._dropped["records_dropped_not_audited"][cluster_id] += records
                self._dropped["by_request_not_audited"].update(by_request or {})
        return audited

    def _noted(self, field: str, key: str, subject_ref: str | None) -> bool:
        with self._lock:
            self._counting()
            self._seen[field][key] += 1
            audited = self._seen[field][key] <= REFUSALS_AUDITED_PER_HOUR
            if audited and subject_ref is not None:
                self._audited[field][subject_ref] += 1
                audited = self._audited[field][subject_ref] <= AUDITED_PER_ACCOUNT_HOUR
            if not audited:
                self._batches[field][key] += 1
            return audited

    def _counting(self) -> None:
        """Under ``_lock``: count in the hour of now, the one counted before set aside if it is over."""
        self._roll()
        self._hour = self._hour or _hour(utcnow())

    def _roll(self, *, final: bool = False) -> None:
        """Under ``_lock``: set the counted hour's summary aside once it is over (or now, with ``final``)."""
        if self._hour is not None and (final or _hour(utcnow()) != self._hour):
            records = {store: dict(sorted(counts.items())) for store, counts in sorted(self._counts.items()) if counts}
            details: dict[str, object] = {"hour": self._hour.isoformat(), "records": records}
            for counters in (self._batches, self._dropped):
                details.update((name, dict(sorted(counted.items()))) for name, counted in counters.items() if counted)
            if len(details) > 2 or records:  # an hour of batches all audited already says nothing more
                self._pending.append(details)
            self._start()

    def summarise(self, *, final: bool = False) -> None:
        """Append ``ingest.summary`` of every hour that is over (and of this one, with ``final``)."""
        with self._lock:
            self._roll(final=final)
        with self._appending:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    details = self._pending[0]
                try:
                    self._audit.append("ingest.summary", details=details)
                except Exception as exc:  # the database may be down: keep counting, retry on the next call
                    logger.warning("could not write the ingest summary: %s", str(exc).splitlines()[0])
                    return
                with self._lock:
                    self._pending.pop(0)


def _no_batches() -> dict[str, Counter[str]]:
    return {"refused_not_audited": Counter(), "dropped_not_audited": Counter()}


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)
