"""Privacy deletion requests: file them, carry them out, prove it.

States: ``pending → in_progress → completed`` (or ``failed`` with the reason).
Erasing an account removes its segments from every store the policy's erasure
covers, then destroys its data key (crypto-shredding), so a copy left anywhere
no longer decrypts. Erasing one user of an account removes that user's
segments only; the account's key stays.

Progress is saved in the request's receipt after each store, so a crash
resumes where it stopped and a rerun changes nothing. Each store's count is
taken before it is erased and saved first, so a crash in the middle of a store
does not lose what that store held. Every state change, store erasure and key
destruction is an audit entry whose sequence number the receipt keeps.

Requests hold only ``subject_ref``/``user_ref``: the account and user names
given on the command line never reach the table, and the free-text reason is
stored encrypted under a keyring key of its own.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert, select, update

from pipeline.db import deletion_requests, transaction
from pipeline.errors import PipelineError, StoreUnavailable
from pipeline.records import utcnow
from pipeline.retention.lease import Leases

if TYPE_CHECKING:
    from pipeline.audit import AuditEntry
    from pipeline.keys import Keyring
    from pipeline.runtime import Pipeline

__all__ = [
    "DeletionRequest",
    "RequestNotFound",
    "file_request",
    "get_request",
    "list_requests",
    "process_pending",
]

logger = logging.getLogger(__name__)

STATES = ("pending", "in_progress", "completed", "failed")
OPEN_STATES = ("pending", "in_progress")
REASON_KEY_ID = "deletion-reasons"
#: how long one process may work on one request before another may take over
REQUEST_LEASE = timedelta(minutes=10)
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

    @property
    def scope(self) -> str:
        return "account" if self.user_ref is None else "user"

    def overdue(self, now: datetime | None = None) -> bool:
        """Still open after its erasure deadline."""
        return self.state in OPEN_STATES and (now or utcnow()) > self.deadline

    @property
    def completed_late(self) -> bool:
        return self.completed_at is not None and self.completed_at > self.deadline

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
            "error": self.error,
            "receipt": self.receipt,
        }


def file_request(
    pipeline: Pipeline,
    account: str,
    user: str | None = None,
    reason: str | None = None,
    *,
    now: datetime | None = None,
) -> DeletionRequest:
    """Record a pending request to erase an account (or one user of it) everywhere."""
    now = now or utcnow()
    request = DeletionRequest(
        request_id=str(uuid.uuid4()),
        subject_ref=pipeline.keyring.subject_ref(account),
        user_ref=pipeline.keyring.user_ref(account, user),
        reason=reason,
        state="pending",
        created_at=now,
        deadline=now + pipeline.policy.erasure_deadline,
        updated_at=now,
        completed_at=None,
    )
    entry = _audit(pipeline, request, "erasure.pending", deadline=request.deadline.isoformat())
    request.receipt = {"scope": request.scope, "stores": {}, "audit": {"pending": entry.seq}}
    with transaction(pipeline.keyring.engine, "filing a deletion request") as conn:
        conn.execute(
            insert(deletion_requests).values(
                request_id=request.request_id,
                subject_ref=request.subject_ref,
                user_ref=request.user_ref,
                reason=_seal_reason(pipeline, request.request_id, reason),
                state=request.state,
                created_at=now,
                deadline=request.deadline,
                updated_at=now,
                receipt=json.dumps(request.receipt),
            )
        )
    return request


def get_request(pipeline: Pipeline, request_id: str) -> DeletionRequest:
    """:raises RequestNotFound:"""
    for request in _select(pipeline, deletion_requests.c.request_id == request_id):
        return request
    raise RequestNotFound(request_id)


def list_requests(pipeline: Pipeline, *, states: tuple[str, ...] = STATES) -> list[DeletionRequest]:
    """Requests in the given states, oldest first."""
    return list(_select(pipeline, deletion_requests.c.state.in_(states)))


def process_pending(pipeline: Pipeline, *, leases: Leases | None = None) -> list[DeletionRequest]:
    """Carry out every open request another process is not working on; returns them."""
    leases = leases or Leases(pipeline.keyring.engine)
    done = []
    for request in list_requests(pipeline, states=OPEN_STATES):
        name = f"erasure:{request.request_id}"
        if not leases.acquire(name, REQUEST_LEASE):
            continue
        try:
            done.append(process_request(pipeline, get_request(pipeline, request.request_id)))
        finally:
            leases.release(name)
    return done


def process_request(pipeline: Pipeline, request: DeletionRequest) -> DeletionRequest:
    """Take one request from wherever it stopped to completed (or failed).

    A store that cannot be reached leaves the request in progress with the error
    noted, to be resumed by the next run; any other error fails it with the reason.
    """
    if request.state not in OPEN_STATES:
        return request
    if request.state == "pending":
        _transition(pipeline, request, "in_progress")
    try:
        _erase_stores(pipeline, request)
        if request.scope == "account":
            _destroy_key(pipeline, request)
    except StoreUnavailable as exc:
        request.error = str(exc)
        _save(pipeline, request)
        logger.warning("deletion request %s paused: %s", request.request_id, exc)
        return request
    except PipelineError as exc:
        request.error = str(exc)
        _transition(pipeline, request, "failed", error=str(exc))
        return request
    request.error = None
    _transition(pipeline, request, "completed")
    return request


def _erase_stores(pipeline: Pipeline, request: DeletionRequest) -> None:
    unknown = pipeline.keyring.key_state(request.subject_ref) == "unknown"
    if unknown:
        request.receipt["note"] = "no data was ever stored for this subject: nothing to erase"
    stores = request.receipt.setdefault("stores", {})
    for name in pipeline.policy.erasure_stores:
        store = pipeline.stores.get(name)
        progress = stores.get(name, {})
        if store is None or "erased_at" in progress:
            continue
        if "started_at" not in progress:  # count first: a crash inside erase() must not lose it
            held = list(store.scan(subject_ref=request.subject_ref, user_ref=request.user_ref, with_payload=False))
            progress = {
                "started_at": utcnow().isoformat(),
                "segments": len(held),
                "records": sum(s.n_records for s in held),
            }
            stores[name] = progress
            _save(pipeline, request)
        removed = store.erase(request.subject_ref, request.user_ref)
        progress["segments"] = max(progress["segments"], removed.segments)
        progress["records"] = max(progress["records"], removed.records)
        if removed.places:  # the S3 objects and Cloud Logging logs deleted
            progress["deleted"] = sorted(set(progress.get("deleted", [])) | set(removed.places))
        entry = _audit(
            pipeline,
            request,
            "store.erased",
            store=name,
            segments=progress["segments"],
            records=progress["records"],
        )
        progress.update(erased_at=utcnow().isoformat(), audit_seq=entry.seq)
        _save(pipeline, request)


def _destroy_key(pipeline: Pipeline, request: DeletionRequest) -> None:
    if "key" in request.receipt:
        return
    pipeline.keyring.destroy(request.subject_ref)
    state = pipeline.keyring.key_state(request.subject_ref)
    key: dict[str, Any] = {"state": state}
    if state == "destroyed":
        entry = _audit(pipeline, request, "key.destroyed")
        key.update(destroyed_at=utcnow().isoformat(), audit_seq=entry.seq)
    request.receipt["key"] = key
    _save(pipeline, request)


def _transition(pipeline: Pipeline, request: DeletionRequest, state: str, **details: Any) -> None:
    entry = _audit(pipeline, request, f"erasure.{state}", **details)
    request.state = state
    request.receipt.setdefault("audit", {})[state] = entry.seq
    if state == "completed":
        request.completed_at = utcnow()
    _save(pipeline, request)


def _audit(pipeline: Pipeline, request: DeletionRequest, action: str, **details: Any) -> AuditEntry:
    """An entry about this request, naming the subject by its ref only."""
    return pipeline.audit.append(
        action,
        subject_ref=request.subject_ref,
        details={
            "request_id": request.request_id,
            "scope": request.scope,
            "user_ref": request.user_ref,
            **details,
        },
    )


def _save(pipeline: Pipeline, request: DeletionRequest) -> None:
    request.updated_at = utcnow()
    with transaction(pipeline.keyring.engine, f"deletion request {request.request_id}") as conn:
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
    for row in rows:
        yield DeletionRequest(
            request_id=row.request_id,
            subject_ref=row.subject_ref,
            user_ref=row.user_ref,
            reason=_open_reason(pipeline, row.request_id, row.reason),
            state=row.state,
            created_at=row.created_at,
            deadline=row.deadline,
            updated_at=row.updated_at,
            completed_at=row.completed_at,
            receipt=json.loads(row.receipt),
            error=row.error,
        )


@functools.lru_cache(maxsize=8)
def _reason_cipher(keyring: Keyring) -> AESGCM:
    return AESGCM(keyring.named_key(REASON_KEY_ID, "requests"))


def _seal_reason(pipeline: Pipeline, request_id: str, reason: str | None) -> str | None:
    """Free text may name people: it is kept encrypted, bound to its request."""
    if reason is None:
        return None
    nonce = os.urandom(_NONCE)
    sealed = nonce + _reason_cipher(pipeline.keyring).encrypt(nonce, reason.encode(), request_id.encode())
    return base64.b64encode(sealed).decode()


def _open_reason(pipeline: Pipeline, request_id: str, sealed: str | None) -> str | None:
    if sealed is None:
        return None
    blob = base64.b64decode(sealed)
    return _reason_cipher(pipeline.keyring).decrypt(blob[:_NONCE], blob[_NONCE:], request_id.encode()).decode()
