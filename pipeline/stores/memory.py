"""In-memory store: the test double that ships with the package."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime

from pipeline.segments import Segment
from pipeline.stores.base import Removed, Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Segments in a dict; ``memory://name`` URLs in one process share one store."""

    _shared: dict[str, dict[str, Segment]] = {}

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._segments = self._shared.setdefault(url, {})

    def write(self, segments: Sequence[Segment]) -> int:
        with self._lock:
            new = [s for s in segments if s.segment_id not in self._segments]
            self._segments.update((s.segment_id, s) for s in new)
            return len(new)

    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        with self._lock:
            found = [
                s
                for s in self._segments.values()
                if (subject_ref is None or s.subject_ref == subject_ref)
                and (user_ref is None or s.user_ref == user_ref)
                and (data_type is None or s.data_type == data_type)
                and (kind is None or s.kind == kind)
            ]
        found.sort(key=lambda s: (s.min_observed_at, s.segment_id))
        for segment in found:
            yield segment if with_payload else replace(segment, payload=b"")

    def _remove(self, predicate) -> Removed:  # noqa: ANN001
        with self._lock:
            gone = [s for s in self._segments.values() if predicate(s)]
            for s in gone:
                del self._segments[s.segment_id]
        return Removed(len(gone), sum(s.n_records for s in gone))

    def delete(self, segment_ids: Sequence[str]) -> Removed:
        ids = set(segment_ids)
        return self._remove(lambda s: s.segment_id in ids)

    def expire(self, data_type: str, before: datetime) -> Removed:
        return self._remove(lambda s: s.data_type == data_type and s.max_observed_at < before)

    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        return self._remove(lambda s: s.subject_ref == subject_ref and (user_ref is None or s.user_ref == user_ref))
