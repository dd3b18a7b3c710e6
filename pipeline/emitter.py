"""Bounded hand-off from the scheduler's event loop to background delivery.

``submit`` only appends to a queue, so the event loop never waits on disk,
network or encryption. A background thread seals records into segments,
spools each batch durably, then delivers it to every store the policy routes
it to, retrying a store that is down with exponential back-off. A batch leaves
the spool when all its stores have acknowledged it; on start, batches left by
an earlier process are replayed. ``close`` flushes for a bounded time and
leaves whatever it could not deliver in the spool. Deliveries are counted per
store and data type and summarised in the audit trail once per hour (and on
close), never per record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.errors import StoreUnavailable
from pipeline.records import utcnow
from pipeline.runtime import Pipeline, seal_records
from pipeline.segments import Segment
from pipeline.spool import Batch, Spool

__all__ = ["Emitter", "EmitterStats"]

logger = logging.getLogger(__name__)

_MIN_BACKOFF = 0.1


@dataclass
class EmitterStats:
    """Counters a status page or test can read at any time."""

    records_submitted: int = 0
    records_sealed: int = 0
    batches_spooled: int = 0
    batches_replayed: int = 0
    batches_delivered: int = 0
    corrupt_spool_files: int = 0
    records_dropped: int = 0
    delivery_failures: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


class Emitter:
    """Seal, spool and deliver records on a background thread."""

    def __init__(
        self,
        open_pipeline: Callable[[], Pipeline],
        spool: Spool,
        *,
        retry_max: float = 30.0,
        max_queue: int = 100_000,
    ) -> None:
        self._open_pipeline = open_pipeline
        self.spool = spool
        self.retry_max = retry_max
        self.stats = EmitterStats()
        self._queue: queue.Queue[Sequence[Mapping[str, Any]]] = queue.Queue(maxsize=max_queue)
        self._pending: list[Batch] = []
        self._unsealed: list[Mapping[str, Any]] = []
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="metadata-emitter", daemon=True)
        self._ingested: dict[str, Counter[str]] = {}  # store -> data type -> records this hour
        self._ingest_hour: datetime | None = None
        self.pipeline: Pipeline | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Hand records over without blocking; thread-safe."""
        if not records:
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.stats.last_error = "emitter queue full: records dropped"
            logger.error("metadata emitter queue full; dropped %d records", len(records))
            return
        self.stats.records_submitted += len(records)
        self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not self._is_idle():
                self._wake.set()
                if not self._idle.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic()))) and (
                    time.monotonic() >= deadline
                ):
                    return False
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for at most ``timeout`` seconds, then stop; True when nothing is left undelivered."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout + 5)
        done = self._is_idle()
        if not done:
            logger.warning(
                "metadata emitter closed with %d batches in the spool and %d unsealed records",
                len(self._pending),
                len(self._unsealed) + self._queue.qsize(),
            )
        return done

    def _is_idle(self) -> bool:
        return self._queue.empty() and not self._pending and not self._unsealed and self.pipeline is not None

    # -- background thread -------------------------------------------------
    def _run(self) -> None:
        while not self._connect():
            if self._closing.is_set() and time.monotonic() >= self._deadline:
                return
        while True:
            self._drain()
            self._deliver()
            with self._idle:
                if self._is_idle():
                    self._idle.notify_all()
            self._summarise_ingest()
            if self._closing.is_set() and (self._is_idle() or time.monotonic() >= self._deadline):
                self._summarise_ingest(final=True)
                return
            self._wake.wait(timeout=self._next_wait())
            self._wake.clear()

    def _connect(self) -> bool:
        try:
            self.pipeline = self._open_pipeline()
        except Exception as exc:  # keep retrying: the store may come back
            self._note_error("open pipeline", exc)
            self._wake.wait(timeout=self._backoff_for("pipeline"))
            self._wake.clear()
            return False
        for batch in self.spool.replay():
            self._pending.append(batch)
            self.stats.batches_replayed += 1
        self.stats.corrupt_spool_files = len(self.spool.corrupt_files())
        return True

    def _drain(self) -> None:
        records = self._unsealed
        while True:
            try:
                records.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        if not records:
            return
        assert self.pipeline is not None
        try:
            segments = self._seal(records)
            routed = self.pipeline.route(segments)
            targets = frozenset(name for name, batch in routed.items() if batch)
            batch = self.spool.append(segments, targets)
        except (StoreUnavailable, OSError) as exc:  # keyring or spool disk unavailable: retry
            self._unsealed = records
            self._note_error("seal and spool", exc)
            return
        self._unsealed = []
        self._backoff.pop("pipeline", None)
        self._pending.append(batch)
        self.stats.records_sealed += len(records)
        self.stats.batches_spooled += 1

    def _seal(self, records: list[Mapping[str, Any]]) -> list[Segment]:
        """Seal records; a malformed one is dropped and counted, never retried (it would block the rest)."""
        assert self.pipeline is not None
        try:
            return seal_records(self.pipeline.keyring, records)
        except StoreUnavailable:
            raise
        except Exception:
            good = []
            for record in records:
                try:
                    seal_records(self.pipeline.keyring, [record])
                    good.append(record)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    self.stats.records_dropped += 1
                    self._note_error(f"seal a malformed {record.get('kind')} record (dropped)", exc)
            return seal_records(self.pipeline.keyring, good)

    def _deliver(self) -> None:
        assert self.pipeline is not None
        now = time.monotonic()
        for name, store in self.pipeline.stores.items():
            if self._retry_at.get(name, 0.0) > now:
                continue
            for batch in list(self._pending):
                if name not in batch.waiting_for:
                    continue
                segments = [s for s in batch.segments if name in self.pipeline.policy.stores_for(s.data_type)]
                try:
                    store.write(segments)
                except Exception as exc:
                    self.stats.delivery_failures[name] = self.stats.delivery_failures.get(name, 0) + 1
                    self._note_error(f"deliver to {name}", exc)
                    self._retry_at[name] = time.monotonic() + self._backoff_for(name)
                    break
                self._backoff.pop(name, None)
                self._count_ingested(name, segments)
                self.spool.ack(batch, name)
                if not batch.waiting_for:
                    self._pending.remove(batch)
                    self.stats.batches_delivered += 1

    def _count_ingested(self, store: str, segments: Sequence[Segment]) -> None:
        self._summarise_ingest()
        counts = self._ingested.setdefault(store, Counter())
        for segment in segments:
            counts[segment.data_type] += segment.n_records
        self._ingest_hour = self._ingest_hour or _hour(utcnow())

    def _summarise_ingest(self, *, final: bool = False) -> None:
        """Append ``ingest.summary`` once the hour of the counted deliveries is over (or on close)."""
        if self._ingest_hour is None or (not final and _hour(utcnow()) == self._ingest_hour):
            return
        assert self.pipeline is not None
        records = {store: dict(sorted(counts.items())) for store, counts in sorted(self._ingested.items())}
        try:
            details = {"hour": self._ingest_hour.isoformat(), "records": records}
            self.pipeline.audit.append("ingest.summary", details=details)
        except Exception as exc:  # the database may be down: keep counting, retry on the next loop
            self._note_error("write the ingest summary", exc)
            return
        self._ingested, self._ingest_hour = {}, None

    def _backoff_for(self, name: str) -> float:
        delay = min(self._backoff.get(name, _MIN_BACKOFF / 2) * 2, self.retry_max)
        self._backoff[name] = delay
        return delay

    def _next_wait(self) -> float:
        if self._unsealed:
            return self._backoff.get("pipeline", _MIN_BACKOFF)
        if not self._pending:
            return 1.0
        now = time.monotonic()
        waits = [t - now for t in self._retry_at.values() if t > now]
        return max(0.01, min([1.0, *waits]))

    def _note_error(self, action: str, exc: BaseException) -> None:
        message = f"{action}: {exc}".splitlines()[0]
        if message != self.stats.last_error:
            logger.warning("metadata emitter could not %s", message)
        self.stats.last_error = message


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)
