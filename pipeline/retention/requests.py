"""Privacy deletion requests: file them, carry them out, prove it.

States: ``pending → in_progress → completed`` (or ``failed`` with the reason;
a failed request is retried with back-off until it completes). Erasing an
account removes its segments from every store the policy's erasure covers, then
destroys all of its data keys (crypto-shredding), so a copy left anywhere no
longer decrypts. Erasing one user removes that user's segments and destroys that
user's key; the account's key stays. Every completed erasure is followed by a
master key rotation: once the superseded master versions are retired (after the
backup window, ``pipeline.keys.retire-after``) no backup opens the shredded
keys either; the receipt's ``final_at`` says when.

Progress is saved in the request's receipt after each store, so a crash
resumes where it stopped and a rerun changes nothing. Each store's count is
taken before it is erased and saved first, so a crash in the middle of a store
does not lose what that store held. Every state change, store erasure and key
destruction is an audit entry whose sequence number the receipt keeps.

Requests hold only ``subject_ref``/``user_ref``: the account and user names
given on the command line never reach the table. The free-text reason is
encrypted under the subject's own data key, so it is shredded with it; the
receipt keeps its SHA-256. Each request leaves a tombstone that keeps the
erased subject's old records from coming back (see :mod:`pipeline.tombstones`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, delete, insert, select, update

from pipeline import tombstones
from pipeline.audit import entry_fault
from pipeline.db import deletion_requests, ingested_batches, reading, transaction
from pipeline.errors import (
    AuditIntegrityError,
    KeyringError,
    PipelineError,
    RequestBusy,
    StoreError,
    StoreUnavailable,
    UnknownAccountError,
)
from pipeline.keys import KEY_STATE_READ_EVERY
from pipeline.records import utcnow
from pipeline.retention.lease import Leases

if TYPE_CHECKING:
    from pipeline.audit import AuditEntry
    from pipeline.keys import Keyring
    from pipeline.runtime import Pipeline
    from pipeline.stores.base import Removed, Store

__all__ = [
    "DeletionRequest",
    "RequestNotFound",
    "file_request",
    "get_request",
    "list_requests",
    "process_pending",
    "retry_request",
    "seal_reason",
]

logger = logging.getLogger(__name__)

STATES = ("pending", "in_progress", "completed", "failed")
OPEN_STATES = ("pending", "in_progress")
#: how long one process may work on one request before another may take over
REQUEST_LEASE = timedelta(minutes=10)
#: back-off between retries of a failed request: doubles from the first to the last
RETRY_FIRST, RETRY_MAX = timedelta(minutes=5), timedelta(hours=6)
_NONCE = 12


class RequestNotFound(PipelineError, LookupError):
    """No deletion request has this id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"no deletion request with id {request_id!r}")


@dataclass
class DeletionRequest:
    """One request as stored, with its receipt (a JSON document)."""

    request_id: str
    subject_ref: str
    user_ref: str | None
    reason: str | None
    state: str
    created_at: datetime
    deadline: datetime
    updated_at: datetime
    completed_at: datetime | None
    receipt: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: when the master versions its rotation superseded were in fact all retired (and destroyed), if they are
    retired_at: datetime | None = None

    @property
    def scope(self) -> str:
        return "account" if self.user_ref is None else "user"

    def overdue(self, now: datetime | None = None) -> bool:
        """Not completed by its erasure deadline (a failed request too: it is still owed)."""
        return self.state != "completed" and (now or utcnow()) > self.deadline

    @property
    def completed_late(self) -> bool:
        return self.completed_at is not None and self.completed_at > self.deadline

    @property
    def final_at(self) -> datetime | None:
        """When no backup opens the erased data any more: the superseded master keys' retirement as
        planned at the rotation (the receipt's), or as it happened when an operator retired them sooner."""
        planned = self.receipt.get("rotation", {}).get("final_at")
        final = None if planned is None else datetime.fromisoformat(planned)
        return self.retired_at if self.retired_at is not None and (final is None or self.retired_at < final) else final

    def retry_due(self, now: datetime) -> bool:
        """A failed request whose back-off has passed."""
        due = self.receipt.get("next_attempt_at")
        return self.state == "failed" and (due is None or datetime.fromisoformat(due) <= now)

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "scope": self.scope,
            "subject_ref": self.subject_ref,
            "user_ref": self.user_ref,
            "reason": self.reason,
            "state": self.state,
            "overdue": self.overdue(now),
            "completed_late": self.completed_late,
            "created_at": self.created_at,
            "deadline": self.deadline,
            "updated_at": self.updated_at,
            "completed_at": self.completed_at,
            "final_at": self.final_at,
            "error": self.error,
            "receipt": self.receipt,
        }


def file_request(
    pipeline: Pipeline,
    account: str,
    user: str | None = None,
    reason: str | None = None,
    *,
    suppress: bool = False,
    now: datetime | None = None,
    actor: str | None = None,
    unless_open: bool = False,
    request_id: str | None = None,
) -> DeletionRequest:
    """Record a pending request to erase an account (or one user of it) everywhere.

    With ``suppress``, records of the subject observed later are dropped on
    ingest too, until the tombstone is lifted (:func:`pipeline.tombstones.lift`).
    ``actor`` names who filed it in the audit trail (an API token's principal);
    by default the OS user of this process. The request, its tombstone and its
    ``erasure.pending`` entry are written in one transaction.

    With ``unless_open``, a subject that has an open request gets that one back instead
    (the caller tells it from a new one by its id: not ``request_id``, a new UUID by default);
    with ``suppress``, that request suppresses later records from then on, audited.
    The check and the filing hold the audit chain's lock, which every process takes: two
    ``serve`` processes filing for one subject at once file one request, not two.
    """
    now = now or utcnow()
    request = DeletionRequest(
        request_id=request_id or str(uuid.uuid4()),
        subject_ref=pipeline.keyring.subject_ref(account),
        user_ref=pipeline.keyring.user_ref(account, user),
        reason=reason,
        state="pending",
        created_at=now,
        deadline=now + pipeline.policy.erasure_deadline,
        updated_at=now,
        completed_at=None,
    )
    open_id: str | None = None
    if unless_open:  # the usual refiling: answered before the reason is sealed (which may make a key)
        with reading(pipeline.keyring.engine, "looking for an open deletion request") as conn:
            open_id = conn.execute(_open_request(request.subject_ref, request.user_ref)).scalar()
        if open_id is not None:  # nothing sealed for it: a reason would make the subject a key again
            if suppress:
                found = open_id
                pipeline.audit.append_with(lambda conn, _seq: _suppressing(conn, found, actor))
            return get_request(pipeline, open_id)
    held = pipeline.keyring.key_state(request.subject_ref, request.user_ref)  # first: sealing a reason makes a key
    sealed_reason = _seal_reason(pipeline, request, reason)

    def filed(conn: Connection, seq: int) -> dict[str, Any] | None:
        nonlocal open_id
        if unless_open:  # again, under the lock: another process may have filed since
            open_id = conn.execute(_open_request(request.subject_ref, request.user_ref)).scalar()
            if open_id is not None:
                return _suppressing(conn, open_id, actor) if suppress else None
        request.receipt = {
            "scope": request.scope,
            "stores": {},
            "audit": {"pending": seq},
            "suppress": suppress,
            "key_at_filing": held,
        }
        if reason is not None:
            request.receipt["reason_sha256"] = hashlib.sha256(reason.encode()).hexdigest()
        conn.execute(
            insert(deletion_requests).values(
                request_id=request.request_id,
                subject_ref=request.subject_ref,
                user_ref=request.user_ref,
                reason=sealed_reason,
                state=request.state,
                created_at=now,
                deadline=request.deadline,
                updated_at=now,
                receipt=json.dumps(request.receipt),
            )
        )
        tombstones.add(conn, request.request_id, request.subject_ref, request.user_ref, at=now, suppress=suppress)
        return _entry(request, "erasure.pending", actor=actor, deadline=request.deadline.isoformat(), suppress=suppress)

    pipeline.audit.append_with(filed)
    return request if open_id is None else get_request(pipeline, open_id)


def _suppressing(conn: Connection, request_id: str, actor: str | None) -> dict[str, Any] | None:
    """An open request refiled with ``suppress``: its tombstone and receipt now suppress later records (again,
    if it was lifted), and the audit entry that says so (``None`` when it suppressed already)."""
    if not tombstones.suppress(conn, request_id):
        return None
    row = conn.execute(select(deletion_requests).where(deletion_requests.c.request_id == request_id)).one()
    receipt = {**json.loads(row.receipt), "suppress": True}
    conn.execute(
        update(deletion_requests)
        .where(deletion_requests.c.request_id == request_id)
        .values(receipt=json.dumps(receipt))
    )
    details = {"request_id": request_id, "user_ref": row.user_ref}
    return {"action": "erasure.suppressed", "actor": actor, "subject_ref": row.subject_ref, "details": details}


def _open_request(subject_ref: str, user_ref: str | None) -> Select[Any]:
    """The oldest open request of exactly this subject (an account's own, or one user's)."""
    c = deletion_requests.c
    user = c.user_ref.is_(None) if user_ref is None else c.user_ref == user_ref
    return (
        select(c.request_id)
        .where(c.subject_ref == subject_ref, user, c.state.in_(OPEN_STATES))
        .order_by(c.created_at)
        .limit(1)
    )


def get_request(pipeline: Pipeline, request_id: str) -> DeletionRequest:
    """:raises RequestNotFound:"""
    for request in _select(pipeline, deletion_requests.c.request_id == request_id):
        return request
    raise RequestNotFound(request_id)


def receipt_disagreements(pipeline: Pipeline, request: DeletionRequest) -> list[str]:
    """Where a receipt says other than the audit entries it cites; empty when they agree.

    A receipt is a row anyone holding the database can edit (500 records erased, where none were);
    the entries are chained, signed and checkpointed outside it (``audit verify``).
    """
    try:
        return _disagreements(pipeline, request)
    except AuditIntegrityError as exc:  # an entry that does not read, or a rolled-back witness
        return [f"the audit trail fails its check ({exc}), so no entry it cites can vouch for it"]


def _disagreements(pipeline: Pipeline, request: DeletionRequest) -> list[str]:
    receipt, request_id = request.receipt, request.request_id
    # the time the report's SLA figures count to, as its entry says
    completed = {} if request.completed_at is None else {"completed_at": request.completed_at.isoformat()}
    cited: list[tuple[int, str, dict[str, Any]]] = [
        (seq, f"erasure.{state}", {"request_id": request_id, **(completed if state == "completed" else {})})
        for state, seq in receipt.get("audit", {}).items()
    ]
    for store, got in receipt.get("stores", {}).items():
        if "audit_seq" in got:
            said = {"request_id": request_id, "store": store, "segments": got["segments"], "records": got["records"]}
            cited.append((got["audit_seq"], "store.erased", said))
    key = receipt.get("key", {})
    if "audit_seq" in key:  # the first release's receipts and entries do not count the keys
        # destroyed_by: the erasure of the subject that destroyed them before this one ran (it destroyed none)
        counted = {"keys": key["keys_destroyed"]} if "keys_destroyed" in key and "destroyed_by" not in key else {}
        when = {"destroyed_at": key["destroyed_at"]} if "destroyed_at" in key else {}
        said = {"request_id": key.get("destroyed_by", request_id), **counted, **when}
        cited.append((key["audit_seq"], "key.destroyed", said))
    rotation = receipt.get("rotation", {})
    if "audit_seq" in rotation:
        said = {name: rotation.get(name) for name in ("master_key_version", "rotated_at", "final_at")}
        cited.append((rotation["audit_seq"], "key.rotated", said))
    found = _uncited(pipeline, request)
    found += [
        f"it cites {seq!r} as {action}, which is no audit entry's number"
        for seq, action, _ in cited
        if not _is_seq(seq)
    ]
    cited = [(seq, action, said) for seq, action, said in cited if _is_seq(seq)]
    if not cited:
        return found
    seqs = {seq for seq, _action, _said in cited}
    entries = {e.seq: e for e in pipeline.audit.entries(after=min(seqs) - 1) if e.seq in seqs}
    _checkpoint, schedule = pipeline.audit.trusted()
    for seq, action, said in cited:
        entry = entries.get(seq)
        if entry is None or entry.action != action:
            found.append(f"it cites audit entry {seq} as {action}, which the trail does not hold")
            continue
        if (fault := entry_fault(entry.as_dict(), schedule)) is not None:  # edited beside the receipt
            found.append(f"it cites audit entry {seq}, whose {fault}")
            continue
        if action == "key.rotated" and not _rotated_for(entry, request):
            found.append(f"it cites audit entry {seq} as its rotation, which was not made for it")
            continue
        if action == "key.destroyed" and not _covers(entry, request):
            found.append(f"it cites audit entry {seq} as its key's destruction, which destroyed another subject's")
            continue
        by_another = action == "key.destroyed" and "destroyed_by" in key
        if by_another and _is_seq(done := receipt.get("audit", {}).get("completed")) and seq > done:
            found.append(f"it cites audit entry {seq} as its key's destruction, made after it completed")
            continue
        vouched = {**entry.details, **_vouched_times(pipeline, entry)}
        found += [
            f"{name} {value!r}, audit entry {seq} says {vouched.get(name)!r}"
            for name, value in said.items()
            if not _agrees(name, value, vouched) and (name in vouched or name not in _LATER_FIGURES)
        ]
    return found


#: figures a receipt holds that an earlier release's entries do not record: compared where they do (its
#: completion entry's own time is no stand-in: a pass run with ``--now`` completed requests at that time)
_LATER_FIGURES = frozenset({"completed_at", "final_at"})


#: times of a receipt, and how far from its entry's each may be: an earlier release read the clock once for
#: the receipt and once for the entry (this one writes both from one reading)
_TIMES = frozenset({"completed_at", "final_at", "rotated_at", "destroyed_at"})
_CLOCK_READS_APART = timedelta(seconds=1)


def _agrees(name: str, said: Any, vouched: dict[str, Any]) -> bool:
    """Whether a receipt's figure is what the entry it cites says (a time: within two clock readings)."""
    if said == vouched.get(name):
        return True
    if name not in _TIMES:
        return False
    try:
        return abs(datetime.fromisoformat(said) - datetime.fromisoformat(vouched[name])) <= _CLOCK_READS_APART
    except (TypeError, ValueError, KeyError):  # not a time (edited into anything), or none to compare
        return False


def _vouched_times(pipeline: Pipeline, entry: AuditEntry) -> dict[str, Any]:
    """The times an entry vouches for beside its details: a rotation's, or when keys were destroyed."""
    if entry.action == "key.rotated":
        return _rotation(pipeline, entry)
    return {"destroyed_at": entry.recorded_at.isoformat()} if entry.action == "key.destroyed" else {}


def _covers(entry: AuditEntry, request: DeletionRequest) -> bool:
    """Whether a ``key.destroyed`` entry destroyed keys of the request's subject: the account's, or (for a
    user's request) hers or her whole account's."""
    user_ref = entry.details.get("user_ref")
    return entry.subject_ref == request.subject_ref and (
        request.user_ref is None or user_ref in (None, request.user_ref)
    )


def _rotated_for(entry: AuditEntry, request: DeletionRequest) -> bool:
    """Whether a ``key.rotated`` entry is a rotation made for the request: every rotation a receipt holds
    names the erasures it follows (an earlier release's receipts got theirs at upgrade, naming them). Any
    other rotation's figures, an operator's ``keys rotate`` even after the filing, would make it final sooner."""
    return request.request_id in (entry.details.get("after_erasures") or ())


def _is_seq(value: Any) -> bool:
    """An audit sequence number, as a receipt holds it (a receipt edited in the database may hold anything:
    a number past the column's 64 bits was an overflow, not a disagreement)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63


def _uncited(pipeline: Pipeline, request: DeletionRequest) -> list[str]:
    """What a receipt must cite and does not: a completed one its completion, the erasure of every store it
    names or the trail records, and a destroyed key (a receipt edited to claim an erasure that never ran cites
    nothing, and had nothing to disagree with); one of any state, each store erasure and key destruction it
    claims (an unfinished request's run would skip them as done)."""
    receipt, completed = request.receipt, request.state == "completed"
    trail = _entries_of(pipeline, request, ("erasure.completed", "store.erased", "key.destroyed"))
    found = []
    if completed and not any(e.action == "erasure.completed" for e in trail):
        found.append("it says completed, and the trail holds no erasure.completed entry for it")
    elif completed and "completed" not in receipt.get("audit", {}):
        found.append("it cites no erasure.completed entry")
    stores = receipt.get("stores", {})
    recorded = {str(e.details.get("store")) for e in trail if e.action == "store.erased"}
    # unfinished: a run stopped after an entry, before saving the receipt, left one it does not cite yet
    for store in sorted(set(stores) | (recorded if completed else set())):
        progress = stores.get(store, {})
        if "audit_seq" not in progress and (completed or "erased_at" in progress):
            found.append(f"it cites no store.erased entry for {store}")
    key = receipt.get("key", {})
    claimed = key.get("state") == "destroyed"  # by this request, or (destroyed_by) the erasure before it
    if (claimed or (completed and any(e.action == "key.destroyed" for e in trail))) and "audit_seq" not in key:
        found.append("it cites no key.destroyed entry")
    own = [e for e in trail if e.action == "key.destroyed"]
    # another's, where it destroyed keys itself (an earlier release's resumed run may have written two of its own)
    if own and "audit_seq" in key and key["audit_seq"] not in {e.seq for e in own}:
        found.append(f"it cites no key.destroyed entry of its own (audit entry {own[0].seq})")
    if "destroyed_by" in key and key.get("keys_destroyed") != 0:
        found.append(f"it counts {key.get('keys_destroyed')!r} keys destroyed, and cites another erasure's destruction")
    rotation, rotated = receipt.get("rotation", {}), _rotations_for(pipeline, request)
    if "audit_seq" not in rotation and (rotation or rotated):  # its final_at would be its own say
        found.append(
            "it cites no key.rotated entry" + (", and the trail rotated the master key after it" if rotated else "")
        )
    return found


def _rotations_for(pipeline: Pipeline, request: DeletionRequest) -> list[AuditEntry]:
    """The trail's master key rotations made for the request (never its receipt's word: one edited to hold a
    rotation kept its run from making one)."""
    return [e for e in pipeline.audit.entries(_filed(request), actions=("key.rotated",)) if _rotated_for(e, request)]


def list_requests(pipeline: Pipeline, *, states: tuple[str, ...] = STATES) -> list[DeletionRequest]:
    """Requests in the given states, oldest first."""
    return list(_select(pipeline, deletion_requests.c.state.in_(states)))


def process_pending(
    pipeline: Pipeline, *, leases: Leases | None = None, now: datetime | None = None
) -> list[DeletionRequest]:
    """Carry out every open request, and every failed one whose back-off has passed; returns them.

    Requests another process is working on are skipped. The erasures that got
    this far share one master key rotation before they are marked completed.
    """
    now = now or utcnow()
    due = [
        r for r in list_requests(pipeline, states=(*OPEN_STATES, "failed")) if r.state != "failed" or r.retry_due(now)
    ]
    return _process(pipeline, due, leases or Leases(pipeline.keyring.engine))


def retry_request(pipeline: Pipeline, request_id: str, *, leases: Leases | None = None) -> DeletionRequest:
    """Run a request now, whatever its back-off says (``erase retry ID``); a completed one is left as it is."""
    request = get_request(pipeline, request_id)
    if request.state == "completed":
        return request
    leases = leases or Leases(pipeline.keyring.engine)
    done = _process(pipeline, [request], leases)
    if done:
        return done[0]
    held = leases.held_by(f"erasure:{request_id}")
    if held is not None:  # another process carries it out, or one on another host died doing so
        raise RequestBusy(
            f"deletion request {request_id} is being carried out by {held[0]} until {held[1].isoformat()} "
            "(a process of another host that died doing so holds it until then)"
        )
    return get_request(pipeline, request_id)


def _process(pipeline: Pipeline, requests: list[DeletionRequest], leases: Leases) -> list[DeletionRequest]:
    held, done, erased = [], [], []
    try:
        for request in requests:
            name = f"erasure:{request.request_id}"
            if not leases.acquire(name, REQUEST_LEASE):
                continue
            held.append(name)
            current = get_request(pipeline, request.request_id)
            if current.state == "completed":  # another run finished it after this one listed it
                continue
            request = _erase(pipeline, current)
            erased_at = time.monotonic()
            done.append(request)
            if request.state == "in_progress" and "key" in request.receipt:
                erased.append(request)
        if erased:
            unrotated = _unrotated(pipeline, erased)  # a resumed run's were rotated for
            if unrotated:
                _rotate(pipeline, unrotated)
            # every read in progress reads the destroyed keys' state again before the receipts say completed
            time.sleep(max(0.0, erased_at + KEY_STATE_READ_EVERY - time.monotonic()))
            for request in erased:
                at = utcnow()  # the tombstone first: the request's completion ends its dropping of all
                tombstones.complete(pipeline.keyring.engine, request.request_id, at)
                _transition(pipeline, request, "completed", at=at)
            try:  # the erasures are done: a pass's own checkpoint step reports a failure (and the witness away)
                pipeline.audit.checkpoint()
            except (AuditIntegrityError, StoreUnavailable) as exc:
                logger.warning("erasures completed; audit checkpoint not written: %s", exc)
    finally:
        for name in held:
            leases.release(name)
    return done


def _erase(pipeline: Pipeline, request: DeletionRequest) -> DeletionRequest:
    """Erase the stores and shred the keys, from wherever the request stopped.

    A store that cannot be reached leaves the request in progress with the error
    noted, to be resumed by the next run; any other error fails it with the reason
    and schedules its retry.
    """
    if request.state == "completed":
        return request
    if request.state != "in_progress":
        _transition(pipeline, request, "in_progress")
    try:
        _erase_stores(pipeline, request)
        _destroy_keys(pipeline, request)
        _sweep_stores(pipeline, request)
        _forget_batches(pipeline, request)
    except StoreUnavailable as exc:
        request.error = str(exc)
        _save(pipeline, request)
        logger.warning("deletion request %s paused: %s", request.request_id, exc)
        return request
    except PipelineError as exc:
        attempts = request.receipt.get("attempts", 0) + 1
        backoff = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
        request.receipt.update(attempts=attempts, next_attempt_at=(utcnow() + backoff).isoformat())
        request.error = str(exc)
        _transition(pipeline, request, "failed", error=str(exc), attempt=attempts, retry_in_s=backoff.total_seconds())
        return request
    request.error = None
    return request


def _erase_stores(pipeline: Pipeline, request: DeletionRequest) -> None:
    # as the keyring stood when the request was filed: a reason filed with it is sealed under a key made then,
    # and nothing of the subject is taken while the request is open
    held = request.receipt.get("key_at_filing")
    if held is None and not request.receipt.get("stores"):  # an earlier release's filing, not begun: as it stands
        held = pipeline.keyring.key_state(request.subject_ref, request.user_ref)
    if held in _NOTHING_HELD:
        request.receipt["note"] = _NOTHING_HELD[held]
    stores = request.receipt.setdefault("stores", {})
    erased = {e.details.get("store") for e in _entries_of(pipeline, request, ("store.erased",))}
    # every store: one the policy lists as holding nothing may hold what it held before an edit
    for name in dict.fromkeys([*pipeline.policy.erasure_stores, *pipeline.stores]):
        store = pipeline.stores.get(name)
        progress = stores.get(name, {})
        if store is None or ("erased_at" in progress and name in erased):
            continue
        if "erased_at" in progress:  # said done with no entry of it (a receipt edited in the database): counted again
            progress = {}
        if "started_at" not in progress:  # count first: a crash inside erase() must not lose it
            held = list(store.scan(subject_ref=request.subject_ref, user_ref=request.user_ref, with_payload=False))
            progress = {
                "started_at": utcnow().isoformat(),
                "segments": len(held),
                "records": sum(s.n_records for s in held),
            }
            stores[name] = progress
            _save(pipeline, request)
        removed = _erased(pipeline, request, store, progress)
        progress["segments"] = max(progress["segments"], removed.segments)
        progress["records"] = max(progress["records"], removed.records)
        _note_deleted(progress, removed.places)
        if removed.expires_at is not None:  # the backend cannot delete them: the key destroyed below, then expiry
            progress.update(method="crypto-shredding plus expiry", expires_at=removed.expires_at.isoformat())
        entry = _audited_once(
            pipeline,
            request,
            "store.erased",
            {"store": name},
            segments=progress["segments"],
            records=progress["records"],
        )
        progress.update(erased_at=utcnow().isoformat(), audit_seq=entry.seq)
        _save(pipeline, request)


def _erased(pipeline: Pipeline, request: DeletionRequest, store: Store, progress: dict[str, Any]) -> Removed:
    """``store`` erased of the request's subject; what it deleted before an error is saved in the receipt,
    as no listing shows it again."""
    try:
        return store.erase(request.subject_ref, request.user_ref)
    except StoreError as exc:
        if exc.deleted:
            _note_deleted(progress, exc.deleted)
            _save(pipeline, request)
        raise


def _sweep_stores(pipeline: Pipeline, request: DeletionRequest) -> None:
    """Erase each store once more now the keys are shredded: a rewrite that read the subject's data before
    the store was erased (a compaction in another process) may have put it back since, under the old key.
    Unreadable, but deleted and named in the receipt all the same."""
    for name, progress in request.receipt.get("stores", {}).items():
        store = pipeline.stores.get(name)
        if store is None or not store.deletes or "swept_at" in progress:
            continue
        _note_deleted(progress, _erased(pipeline, request, store, progress).places)
        progress["swept_at"] = utcnow().isoformat()
        _save(pipeline, request)


def _note_deleted(progress: dict[str, Any], places: Iterable[str]) -> None:
    """Add the S3 objects and Cloud Logging logs an erasure deleted to its receipt's store progress."""
    deleted = set(progress.get("deleted", [])) | set(places)
    if deleted:
        progress["deleted"] = sorted(deleted)


def _forget_batches(pipeline: Pipeline, request: DeletionRequest) -> None:
    """An erased account's batch ids, counts and arrival times go too: a timeline of its activity.
    (A batch replayed later is taken as new, and its records dropped by the tombstone.)"""
    if request.user_ref is not None:  # the rows are the account's: a user's are not told apart
        return
    with transaction(pipeline.keyring.engine, "forgetting an erased account's batches") as conn:
        conn.execute(delete(ingested_batches).where(ingested_batches.c.subject_ref == request.subject_ref))


#: what a receipt notes when the keyring held no live key of the subject as its request was filed
_NOTHING_HELD = {
    "unknown": "no data was ever stored for this subject: nothing to erase",
    "destroyed": "nothing was stored for this subject since its last erasure: nothing to erase",
}


def _destroy_keys(pipeline: Pipeline, request: DeletionRequest) -> None:
    """Shred the user's key, or every key of an account, its ``key.destroyed`` entry committed with the
    destruction (a run stopped in between leaves both or neither: each receipt counts the keys its own
    request destroyed, not another erasure's of the same subject); then drop the copies SQLite's WAL keeps.
    What the receipt says is not taken for done: one edited in the database to say so kept the key live."""
    entries = _entries_of(pipeline, request, ("key.destroyed",))  # a run stopped before saving the receipt
    if not entries:

        def recorded(conn: Connection, destroyed: int) -> None:
            entries.append(pipeline.audit.append_within(conn, **_entry(request, "key.destroyed", keys=destroyed)))

        pipeline.keyring.destroy(request.subject_ref, request.user_ref, recorded)
        if not entries and "key_at_filing" not in request.receipt:  # filed by an earlier release (see below)
            entries += _destroyed_unrecorded(pipeline, request)
    pipeline.keyring.compact()
    key: dict[str, Any] = {"state": pipeline.keyring.key_state(request.subject_ref, request.user_ref)}
    if entries:  # none: every key was destroyed before (a refiling, or an erasure running beside it)
        entry = entries[0]
        key.update(
            keys_destroyed=entry.details.get("keys"),
            destroyed_at=entry.recorded_at.isoformat(),
            audit_seq=entry.seq,
        )
    else:
        key["keys_destroyed"] = 0
        earlier = _last_destruction(pipeline, request) if key["state"] == "destroyed" else None
        if earlier is not None:  # a refiling, or an erasure of the subject run beside it: that one's entry
            key.update(
                destroyed_at=earlier.recorded_at.isoformat(),
                audit_seq=earlier.seq,
                destroyed_by=earlier.details.get("request_id"),
            )
    request.receipt["key"] = key
    _save(pipeline, request)


def _destroyed_unrecorded(pipeline: Pipeline, request: DeletionRequest) -> list[AuditEntry]:
    """The entry an earlier release's run owed: it destroyed the keys, then wrote their entry in a transaction of
    its own, and one killed in between left keys destroyed since the filing that no entry records."""
    recorded = pipeline.audit.entries(_filed(request), actions=("key.destroyed",))
    if any(_covers(e, request) for e in recorded):  # another erasure of the subject destroyed them, on the record
        return []
    keys = pipeline.keyring.destroyed_since(request.subject_ref, request.user_ref, request.created_at)
    return [pipeline.audit.append(**_entry(request, "key.destroyed", keys=keys))] if keys else []


def _last_destruction(pipeline: Pipeline, request: DeletionRequest) -> AuditEntry | None:
    """The newest ``key.destroyed`` entry of the request's subject (see :func:`_covers`), of any request."""
    covering = [e for e in pipeline.audit.entries(0, actions=("key.destroyed",)) if _covers(e, request)]
    return covering[-1] if covering else None


def _rotation(pipeline: Pipeline, entry: AuditEntry) -> dict[str, Any]:
    """What a receipt says of the rotation a ``key.rotated`` entry records: the new master key version,
    when, and when the erasure is final (the old versions retired, and for KMS its waiting period past)."""
    rotation = {
        "master_key_version": entry.details.get("master_key_version"),
        "rotated_at": entry.recorded_at.isoformat(),
    }
    if "old_versions_retire_at" in entry.details:  # not in the first release's entries
        retire_at = datetime.fromisoformat(entry.details["old_versions_retire_at"])
        rotation["final_at"] = (retire_at + pipeline.keyring.provider.destroyed_after).isoformat()
    return rotation


def _rotate(pipeline: Pipeline, requests: list[DeletionRequest]) -> None:
    """One master key rotation for these erasures: the shredded keys' backups die with the old versions.
    Each receipt notes it in the rotation's own transaction, so a resumed run never rotates for it again."""

    def noted(conn: Connection, entry: AuditEntry) -> None:
        rotation = {**_rotation(pipeline, entry), "audit_seq": entry.seq}
        for request in requests:
            request.receipt["rotation"] = rotation
            _save_on(conn, request)

    pipeline.rotate_master(after_erasures=[r.request_id for r in requests], then=noted)
    pipeline.keyring.compact()


def rotate_for_unrotated(pipeline: Pipeline) -> list[str]:
    """Give completed erasures that an earlier release made without a master key rotation (the first
    release's) one rotation now, recorded in their receipts: a backup from before them opens their data
    until the versions before it retire, and their ``final_at`` says when. Their request ids."""
    unrotated = _unrotated(pipeline, list_requests(pipeline, states=("completed",)))
    if unrotated:
        _rotate(pipeline, unrotated)
    return [r.request_id for r in unrotated]


def _unrotated(pipeline: Pipeline, requests: Iterable[DeletionRequest]) -> list[DeletionRequest]:
    """Of ``requests``, those the trail holds no master key rotation for. One it holds and the receipt does not
    cite (an earlier release noted it in the receipt only after, and one killed in between lost it) is noted
    in the receipt now, not made again."""
    unrotated = []
    for request in requests:
        made = _rotations_for(pipeline, request)
        if not made:
            unrotated.append(request)
        elif request.receipt.get("rotation", {}).get("audit_seq") not in {e.seq for e in made}:
            request.receipt["rotation"] = {**_rotation(pipeline, made[0]), "audit_seq": made[0].seq}
            _save(pipeline, request)
    return unrotated


def not_final(pipeline: Pipeline) -> list[DeletionRequest]:
    """Completed erasures that a backup could still undo: a master version older than their rotation lives."""
    live = [v.version for v in pipeline.keyring.master_versions() if v.retired_at is None]
    oldest = min(live, default=None)
    return [
        r
        for r in list_requests(pipeline, states=("completed",))
        if "rotation" in r.receipt and oldest is not None and oldest < r.receipt["rotation"]["master_key_version"]
    ]


def _transition(
    pipeline: Pipeline, request: DeletionRequest, state: str, *, at: datetime | None = None, **details: Any
) -> None:
    """The request's new state and its entry, in one transaction: a process killed between the two
    left the trail saying ``completed`` of a request still in progress, which a resumed run then
    erased, rotated for and audited again."""

    def moved(conn: Connection, seq: int) -> dict[str, Any]:
        request.state = state
        request.receipt.setdefault("audit", {})[state] = seq
        if state == "completed":
            request.completed_at = at or utcnow()
            request.receipt.pop("next_attempt_at", None)
            details["completed_at"] = request.completed_at.isoformat()  # the SLA's figure, vouched for
        _save_on(conn, request)
        return _entry(request, f"erasure.{state}", **details)

    pipeline.audit.append_with(moved)


def _audit(
    pipeline: Pipeline, request: DeletionRequest, action: str, *, actor: str | None = None, **details: Any
) -> AuditEntry:
    """An entry about this request, naming the subject by its ref only."""
    return pipeline.audit.append(**_entry(request, action, actor=actor, **details))


def _audited_once(
    pipeline: Pipeline, request: DeletionRequest, action: str, match: dict[str, Any], **details: Any
) -> AuditEntry:
    """This request's entry of ``action`` (with ``match`` in its details) that a run stopped before saving
    the receipt wrote, else a new one: a resumed erasure audits each step once."""
    for entry in _entries_of(pipeline, request, (action,)):
        if all(entry.details.get(name) == value for name, value in match.items()):
            return entry
    return _audit(pipeline, request, action, **match, **details)


def _entries_of(pipeline: Pipeline, request: DeletionRequest, actions: Iterable[str]) -> list[AuditEntry]:
    """The trail's entries of ``actions`` about this request, oldest first (from its filing on)."""
    entries = pipeline.audit.entries(_filed(request), actions=actions)
    return [e for e in entries if e.details.get("request_id") == request.request_id]


def _filed(request: DeletionRequest) -> int:
    """The number of the request's filing entry, where its entries begin (0 for one a receipt edited in the
    database holds, which may be anything)."""
    filed = request.receipt.get("audit", {}).get("pending", 0)
    return filed if _is_seq(filed) else 0


def _entry(request: DeletionRequest, action: str, *, actor: str | None = None, **details: Any) -> dict[str, Any]:
    """The audit entry (as :meth:`pipeline.audit.AuditLog.append`'s arguments) about this request."""
    return {
        "action": action,
        "actor": actor,
        "subject_ref": request.subject_ref,
        "details": {"request_id": request.request_id, "scope": request.scope, "user_ref": request.user_ref, **details},
    }


def _save(pipeline: Pipeline, request: DeletionRequest) -> None:
    with transaction(pipeline.keyring.engine, f"deletion request {request.request_id}") as conn:
        _save_on(conn, request)


def _save_on(conn: Connection, request: DeletionRequest) -> None:
    request.updated_at = utcnow()
    # a refiling with --suppress may have made it suppress since this copy was read
    suppressing = bool(request.receipt.get("suppress")) or tombstones.suppresses(conn, request.request_id)
    request.receipt["suppress"] = suppressing
    conn.execute(
        update(deletion_requests)
        .where(deletion_requests.c.request_id == request.request_id)
        .values(
            state=request.state,
            updated_at=request.updated_at,
            completed_at=request.completed_at,
            receipt=json.dumps(request.receipt, sort_keys=True),
            error=request.error,
        )
    )


def _select(pipeline: Pipeline, condition: Any) -> Iterator[DeletionRequest]:
    query = select(deletion_requests).where(condition).order_by(deletion_requests.c.created_at)
    with transaction(pipeline.keyring.engine, "reading deletion requests") as conn:
        rows = conn.execute(query).all()
    retired = _retired_before(pipeline) if rows else {}
    for row in rows:
        receipt = json.loads(row.receipt)
        yield DeletionRequest(
            request_id=row.request_id,
            subject_ref=row.subject_ref,
            user_ref=row.user_ref,
            reason=_open_reason(pipeline, row.request_id, row.subject_ref, row.user_ref, row.reason),
            state=row.state,
            created_at=row.created_at,
            deadline=row.deadline,
            updated_at=row.updated_at,
            completed_at=row.completed_at,
            receipt=receipt,
            error=row.error,
            retired_at=retired.get(receipt.get("rotation", {}).get("master_key_version")),
        )


def _retired_before(pipeline: Pipeline) -> dict[int, datetime]:
    """For each master version, when every version before it was destroyed (their retirement, and for KMS
    its waiting period), where all of them were; a version with none before it is left out."""
    retired: dict[int, datetime] = {}
    latest: datetime | None = None
    for version in pipeline.keyring.master_versions():  # oldest first
        if latest is not None:
            retired[version.version] = latest + pipeline.keyring.provider.destroyed_after
        if version.retired_at is None:
            break
        latest = version.retired_at if latest is None else max(latest, version.retired_at)
    return retired


def _seal_reason(pipeline: Pipeline, request: DeletionRequest, reason: str | None) -> str | None:
    if reason is None:
        return None
    return seal_reason(pipeline.keyring, request.request_id, request.subject_ref, request.user_ref, reason)


def seal_reason(keyring: Keyring, request_id: str, subject_ref: str, user_ref: str | None, reason: str) -> str:
    """Free text may name people: encrypted under the subject's own key, so the erasure shreds it."""
    version, cipher = keyring.cipher(subject_ref, user_ref)
    nonce = os.urandom(_NONCE)
    sealed = nonce + cipher.encrypt(nonce, reason.encode(), request_id.encode())
    return f"{version}:{base64.b64encode(sealed).decode()}"


def _open_reason(
    pipeline: Pipeline, request_id: str, subject_ref: str, user_ref: str | None, sealed: str | None
) -> str | None:
    """The reason, or None once the subject's key is shredded (the receipt's SHA-256 remains)."""
    if sealed is None:
        return None
    version, _, data = sealed.partition(":")
    blob = base64.b64decode(data)
    try:
        cipher = pipeline.keyring.cipher_for(subject_ref, user_ref, int(version))
    except (KeyringError, UnknownAccountError):
        return None
    return cipher.decrypt(blob[:_NONCE], blob[_NONCE:], request_id.encode()).decode()
