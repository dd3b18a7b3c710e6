"""Hourly ``ingest.summary`` audit entries: what was ingested per store and data type.

Ingestion is summarised once per hour (and when the pipeline closes), never per
record, so the audit trail stays small while still accounting for every batch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from pipeline.audit import AuditLog
from pipeline.records import utcnow
from pipeline.segments import Segment

__all__ = ["IngestTally"]

logger = logging.getLogger(__name__)


class IngestTally:
    """Counts ingested records per store and data type; appends one audit entry per hour."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}  # store -> data type -> records this hour
        self._hour: datetime | None = None

    def count(self, store: str, segments: Iterable[Segment]) -> None:
        """Add what ``store`` just took; first closes the previous hour if it is over."""
        self.summarise()
        with self._lock:
            counts = self._counts.setdefault(store, Counter())
            for segment in segments:
                counts[segment.data_type] += segment.n_records
            self._hour = self._hour or _hour(utcnow())

    def summarise(self, *, final: bool = False) -> None:
        """Append ``ingest.summary`` once the counted hour is over (or now, with ``final``)."""
        with self._lock:
            if self._hour is None or (not final and _hour(utcnow()) == self._hour):
                return
            records = {store: dict(sorted(counts.items())) for store, counts in sorted(self._counts.items())}
            try:
                self._audit.append("ingest.summary", details={"hour": self._hour.isoformat(), "records": records})
            except Exception as exc:  # the database may be down: keep counting, retry on the next call
                logger.warning("could not write the ingest summary: %s", str(exc).splitlines()[0])
                return
            self._counts, self._hour = {}, None


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)
