"""Bounded hand-off from the scheduler's event loop to background delivery.

``submit`` only appends to a queue, so the event loop never waits on disk,
network or encryption. A background thread seals records into batches with
HPKE to the intake public key (:mod:`pipeline.intake`), spools each batch
durably, then hands it to a :class:`~pipeline.delivery.Delivery` (in-process
or HTTP), retrying a target that is down with exponential back-off. A batch
leaves the spool once delivered; a batch the target refuses for good is set
aside and counted, never retried forever. On start, batches left by an earlier
process are replayed, once the first batch is due. With ``linger``, records
wait up to that long to share one batch: a short-lived cluster's environment,
job and last snapshot records then cost one seal, one spool write and one
ingest instead of one each.
``flush`` and ``close`` seal at once. ``close`` flushes for a bounded time and leaves whatever
it could not deliver in the spool; asked to ``retire``, it then tells the
delivery the cluster is done (revoking a remote cluster's token), but only
when the spool is empty, so a later ``spool replay`` can still deliver. The emitter never holds a key that opens
what it sealed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import BatchRefused, ConfigError, Throttled, TokenRefused
from pipeline.spool import Spool, SpooledBatch, new_batch_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from pipeline.delivery import Delivery

# pipeline.intake (pyarrow, cryptography: 0.1 s to import) is imported on the emitter's
# thread when it first needs it, so that it never delays a scheduler's start.

__all__ = ["Emitter", "EmitterStats"]

logger = logging.getLogger(__name__)

_MIN_BACKOFF = 0.1
#: records per sealed batch: one batch stays far below MAX_SEALED_BYTES for every kind the plugin emits
MAX_BATCH_RECORDS = 5_000


@dataclass
class EmitterStats:
    """Counters a status page or test can read at any time."""

    records_submitted: int = 0
    records_sealed: int = 0
    records_dropped: int = 0
    batches_spooled: int = 0
    batches_replayed: int = 0
    batches_delivered: int = 0
    batches_refused: int = 0
    corrupt_spool_files: int = 0
    delivery_failures: int = 0
    last_error: str | None = None


class Emitter:
    """Seal, spool and deliver records on a background thread."""

    def __init__(
        self,
        delivery: Delivery,
        spool: Spool,
        *,
        retry_max: float = 30.0,
        linger: float = 0.0,
        max_queue: int = 100_000,
    ) -> None:
        self.delivery = delivery
        self.spool = spool
        self.retry_max = retry_max
        self.linger = linger
        self.stats = EmitterStats()
        self._queue: queue.Queue[Sequence[Mapping[str, Any]]] = queue.Queue(maxsize=max_queue)
        self._public_key: X25519PublicKey | None = None
        self._pending: list[SpooledBatch] = []
        self._unsealed: list[Mapping[str, Any]] = []
        self._queued_since: float | None = None  # when the oldest record still in the queue came
        self._flushes = 0  # flush() calls waiting: seal now rather than linger
        self._in_hand = False  # records taken from the queue, not yet among the unsealed or pending
        self._retry_at = 0.0
        self._backoff: dict[str, float] = {}
        self._logged: str | None = None  # the failure last logged: not again while it repeats
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._token_refused = threading.Event()  # the cluster's credential is gone: nothing more is delivered
        self._deadline = float("inf")
        self._retire = False
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="metadata-emitter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Hand records over without blocking; thread-safe."""
        if not records:
            return
        if self._token_refused.is_set():
            self.stats.records_dropped += len(records)  # said once, when the token was refused
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.stats.last_error = "emitter queue full: records dropped"
            logger.error("metadata emitter queue full; dropped %d records", len(records))
            return
        self.stats.records_submitted += len(records)
        if self._queued_since is None:
            self._queued_since = time.monotonic()
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._flushes += 1
            try:
                while not self._is_idle():
                    if self._token_refused.is_set():
                        return False
                    self._wake.set()
                    if not self._idle.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic()))) and (
                        time.monotonic() >= deadline
                    ):
                        return False
            finally:
                self._flushes -= 1
        return True

    def close(self, timeout: float = 10.0, *, retire: bool = False) -> bool:
        """Flush for at most ``timeout`` seconds, then stop; True when nothing is left undelivered.

        ``retire``: once everything is delivered, call :meth:`Delivery.retire` (the cluster is closing).
        """
        self._retire = retire
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout + 5)
        done = self._is_idle()
        if not done and not self._token_refused.is_set():
            logger.warning(
                "metadata emitter closed with %d batches in the spool and %d unsealed records",
                len(self._pending),
                len(self._unsealed) + self._queue.qsize(),
            )
        return done

    def _is_idle(self) -> bool:
        """Nothing submitted is undelivered: asked from other threads (flush) while the emitter works,
        so each record stays in the queue, in hand, unsealed or pending until it is delivered."""
        return (
            self._queue.empty()
            and not self._in_hand
            and not self._pending
            and not self._unsealed
            and self._public_key is not None
        )

    # -- background thread -------------------------------------------------
    def _run(self) -> None:
        try:
            self._wait_until_due()
            while not self._connect():
                if self._closing.is_set() and time.monotonic() >= self._deadline:
                    return
            while True:
                if self._seal_due():
                    self._drain()
                self._deliver()
                if self._token_refused.is_set():
                    return
                with self._idle:
                    if self._is_idle():
                        self._idle.notify_all()
                if self._closing.is_set() and (self._is_idle() or time.monotonic() >= self._deadline):
                    return
                self._wake.wait(timeout=self._next_wait())
                self._wake.clear()
        finally:
            if self._retire and self._is_idle():
                self._retire_delivery()
            self.delivery.close()

    def _wait_until_due(self) -> None:
        """Do nothing until the first batch is due (or a flush or close asks).

        Learning the key, importing pyarrow and the database code and replaying an
        earlier spool cost a process 0.2 s of CPU; a scheduler killed within its
        first linger (a test's throwaway cluster, a failed start) loses those
        records either way, and now spends nothing on them.
        """
        while not (self._asked_to_seal() or self._lingered()):
            self._wake.wait(timeout=self._next_wait())
            self._wake.clear()

    def _retire_delivery(self) -> None:
        try:
            self.delivery.retire()
        except Exception as exc:  # the credential lapses at its expiry instead
            self._note_error("give up the cluster's credential", exc)

    def _connect(self) -> bool:
        """Learn the key to seal to, then pick up what an earlier process left in the spool.

        While the delivery cannot tell the key (the keyring's database is down), the
        one an earlier process remembered in the spool will do: records are then
        sealed and spooled rather than held in memory, where a close would lose them.
        """
        from pipeline.intake import public_key_text

        try:
            self._public_key = self.delivery.public_key()
        except Exception as exc:  # keep retrying: the keyring's database may come back
            self._note_error("get the intake public key", exc)
            if not self._remembered_public_key():
                self._wake.wait(timeout=self._backoff_for("connect"))
                self._wake.clear()
                return False
        else:
            try:
                self.spool.remember_public_key(public_key_text(self._public_key))
            except OSError as exc:  # only a later start during an outage needs it
                self._note_error("remember the intake public key", exc)
        for batch in self.spool.replay():
            self._pending.append(batch)
            self.stats.batches_replayed += 1
        self.stats.corrupt_spool_files = len(self.spool.corrupt_files())
        return True

    def _seal_due(self) -> bool:
        """Whether to seal what is queued now, or let it linger for more records to share the batch."""
        return self._queued_since is None or self._asked_to_seal() or self._lingered()

    def _asked_to_seal(self) -> bool:
        """A flush or close wants everything sealed now."""
        return self._closing.is_set() or self._flushes > 0

    def _lingered(self) -> bool:
        """Records are queued and have waited their linger, or are enough for a full batch."""
        since = self._queued_since
        return since is not None and (
            time.monotonic() >= since + self.linger
            or self._queue.qsize() >= MAX_BATCH_RECORDS  # submissions: at least as many records
        )

    def _remembered_public_key(self) -> bool:
        from pipeline.intake import load_public_key

        remembered = self.spool.remembered_public_key()
        if remembered is None:
            return False
        text, path = remembered
        try:
            self._public_key = load_public_key(text, setting=str(path))
        except ConfigError as exc:
            self._note_error("use the remembered intake public key", exc)
            return False
        return True

    def _drain(self) -> None:
        self._queued_since = None  # before taking: a record submitted meanwhile starts the next wait
        records = self._unsealed
        while True:
            self._in_hand = True
            try:
                records.extend(self._queue.get_nowait())
            except queue.Empty:
                break
            finally:
                self._in_hand = False
        while records:
            chunk = records[:MAX_BATCH_RECORDS]
            try:
                batches = self._spool_batches(chunk)
            except OSError as exc:  # spool disk full or gone: keep the records and retry
                self._unsealed = records
                self._note_error("spool a batch", exc)
                return
            self._pending.extend(batches)  # before they leave the unsealed records
            del records[: len(chunk)]
        self._unsealed = []

    def _spool_batches(self, records: list[Mapping[str, Any]]) -> list[SpooledBatch]:
        """Seal and spool records as one batch, or as several when one would exceed the size limit."""
        from pipeline.intake import MAX_SEALED_BYTES

        batch_id = new_batch_id()
        sealed = self._seal(batch_id, records)
        if sealed is None:
            return []
        if len(sealed) > MAX_SEALED_BYTES:
            if len(records) == 1:
                self._drop(records[0], ValueError(f"sealed record exceeds {MAX_SEALED_BYTES} bytes"))
                return []
            half = len(records) // 2
            return self._spool_batches(records[:half]) + self._spool_batches(records[half:])
        batch = self.spool.append(batch_id, sealed)
        self.stats.records_sealed += len(records)
        self.stats.batches_spooled += 1
        return [batch]

    def _seal(self, batch_id: str, records: list[Mapping[str, Any]]) -> bytes | None:
        """Seal records; a malformed one is dropped and counted, never retried (it would block the rest)."""
        from pipeline.intake import seal_batch

        assert self._public_key is not None
        try:
            return seal_batch(self._public_key, batch_id, records)
        except (ValueError, TypeError):
            good = [record for record in records if self._sealable(record)]
            return seal_batch(self._public_key, batch_id, good) if good else None

    def _sealable(self, record: Mapping[str, Any]) -> bool:
        from pipeline.intake import seal_batch

        assert self._public_key is not None
        try:
            seal_batch(self._public_key, "check", [record])
        except (ValueError, TypeError) as exc:
            self._drop(record, exc)
            return False
        return True

    def _drop(self, record: Mapping[str, Any], exc: BaseException) -> None:
        self.stats.records_dropped += 1
        self._note_error(f"seal a malformed {record.get('kind')} record (dropped)", exc)

    def _deliver(self) -> None:
        if self._retry_at > time.monotonic():
            return
        for batch in list(self._pending):
            try:
                self.delivery.deliver(batch)
            except TokenRefused as exc:
                self._refused_token(exc)
                return
            except BatchRefused as exc:
                self.spool.refuse(batch, str(exc))
                self.stats.batches_refused += 1
                self.stats.last_error = str(exc)
                self._pending.remove(batch)  # last: a flush sees the emitter idle once this is all done
                continue
            except Throttled as exc:  # the control plane asked this tenant to wait: no failure, no back-off
                logger.debug("metadata emitter waits %.0f s: %s", exc.retry_after, exc)
                self._retry_at = time.monotonic() + exc.retry_after
                return
            except Exception as exc:
                self.stats.delivery_failures += 1
                self._note_error("deliver a batch", exc)
                self._retry_at = time.monotonic() + self._backoff_for("deliver")
                return
            if self._backoff.pop("deliver", None) is not None:  # an outage ended: say so, and log the next one
                logger.info("metadata emitter delivers again")
                self._logged = None
            self.spool.remove(batch)
            self.stats.batches_delivered += 1
            self._pending.remove(batch)  # last, as above

    def _refused_token(self, exc: TokenRefused) -> None:
        """Stop for good, saying once why and what fixes it; the batches stay in the spool, not refused."""
        self._token_refused.set()
        self.stats.last_error = str(exc)
        logger.warning(
            "%s; metadata is no longer delivered. Register the cluster again (metadata-pipeline clusters create "
            "--out DIR) and restart its scheduler with the new scheduler.yaml",
            exc,
        )

    def _backoff_for(self, name: str) -> float:
        delay = min(self._backoff.get(name, _MIN_BACKOFF / 2) * 2, self.retry_max)
        self._backoff[name] = delay
        return delay

    def _next_wait(self) -> float | None:
        """Seconds until the thread has something to do; None while idle, until a submit, flush or close
        wakes it (an idle scheduler's emitter takes no GIL, not even once a second)."""
        if self._unsealed:
            return _MIN_BACKOFF
        if self._queued_since is None and not self._pending:
            return None
        wait = 1.0
        if self._queued_since is not None:
            wait = self._queued_since + self.linger - time.monotonic()
        if self._pending:
            wait = min(wait, self._retry_at - time.monotonic())
        return max(0.01, min(1.0, wait))

    def _note_error(self, action: str, exc: BaseException) -> None:
        """Log a failure once while it repeats (``_logged``); ``stats.last_error`` keeps it for status."""
        message = f"{action}: {exc}".splitlines()[0]
        if message != self._logged:
            logger.warning("metadata emitter could not %s", message)
        self._logged = self.stats.last_error = message
