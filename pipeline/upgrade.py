"""Data an earlier release left in a key layout this one no longer reads: re-sealed by ``init``.

The schema migrations (alembic, run whenever the database opens) move tables
and columns; they hold no keys. What needs the keyring runs here, once per
database, after them (``init`` calls :func:`upgrade_data`; a completed lease
named :data:`UPGRADE`, or the audit entry of what it moved, marks it done;
running it again changes nothing, it only reads every user's segments):

- **Records of a user sealed under the account's key.** The first release had
  one data key per account; since per-user keys a user's segment opens only
  under the user's key. Each such segment, in every store, is opened with the
  account's key and sealed again under the user's own key, under a segment id
  derived from the old one (so a crash and a re-run write the same segment),
  and then the old one is deleted.
- **Deletion-request reasons under the shared reasons key.** The first release
  sealed every reason under one keyring key (``deletion-reasons``). An open
  request's reason is sealed again under its subject's key; a completed one is
  dropped (its subject's key is gone; the receipt keeps the reason's SHA-256);
  then the shared key is destroyed.

Both are audited as ``upgrade.resealed``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, update

from pipeline.db import deletion_requests, leases, transaction
from pipeline.errors import KeyringError, UnknownAccountError
from pipeline.keys import Keyring
from pipeline.retention.lease import Leases
from pipeline.retention.requests import seal_reason
from pipeline.segments import Segment, open_segment, seal
from pipeline.stores import Store

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = ["UPGRADE", "upgrade_data"]

#: the lease whose completion marks this database's data as upgraded
UPGRADE = "upgrade:per-user-keys"
RESEALED = "upgrade.resealed"
LEGACY_REASON_KEY_ID = "deletion-reasons"
_NONCE = 12


def upgrade_data(pipeline: Pipeline) -> dict[str, Any] | None:
    """Re-seal what earlier releases sealed under keys this one does not use; None when there was nothing."""
    engine = pipeline.keyring.engine
    with transaction(engine, "reading the upgrade state") as conn:
        if conn.scalar(select(leases.c.completed_at).where(leases.c.name == UPGRADE)) is not None:
            return None  # the usual case: one read, no write lock
    if pipeline.audit.last(RESEALED) is not None:
        return None  # done before the lease was pruned
    holder = Leases(engine)
    if not holder.acquire(UPGRADE, timedelta(hours=1)):
        return None  # done meanwhile, or another process is doing it
    try:
        done: dict[str, Any] = {
            "segments": {
                name: reseal_user_segments(pipeline.keyring, store) for name, store in pipeline.stores.items()
            },
            "reasons": reseal_reasons(pipeline),
        }
    except BaseException:
        holder.release(UPGRADE)
        raise
    moved = any(done["segments"].values()) or any(done["reasons"].values())
    if moved:
        pipeline.audit.append(RESEALED, details=done)
    holder.complete(UPGRADE)
    return done if moved else None


def reseal_user_segments(keyring: Keyring, store: Store) -> int:
    """Seal each user's segment that only the account's key opens under the user's key; returns how many."""
    users = sorted({(s.subject_ref, s.user_ref) for s in store.scan(with_payload=False) if s.user_ref is not None})
    moved = 0
    for subject_ref, user_ref in users:
        legacy = list(_sealed_under_account(keyring, store.scan(subject_ref=subject_ref, user_ref=user_ref)))
        for segment, table in legacy:
            store.write([seal(keyring, subject_ref, user_ref, table, segment_id=_resealed_id(segment))])
            store.delete([segment.segment_id])
        moved += len(legacy)
    return moved


def _sealed_under_account(keyring: Keyring, found: Iterator[Segment]) -> Iterator[tuple[Segment, pa.Table]]:
    """The user's segments the user's key does not open but the account's key (same version) does."""
    for segment in list(found):  # read before writing: the store's cursor is not held across writes
        try:
            open_segment(keyring, segment)
            continue  # already under the user's key
        except (KeyringError, UnknownAccountError):
            pass
        try:
            account_key = keyring.cipher_for(segment.subject_ref, None, segment.key_version)
            yield segment, open_segment(keyring, segment, cipher=account_key)
        except (KeyringError, UnknownAccountError):
            continue  # erased, or unreadable under any key: left as found


def _resealed_id(segment: Segment) -> str:
    return hashlib.sha256(f"resealed:{segment.segment_id}".encode()).hexdigest()[:32]


def reseal_reasons(pipeline: Pipeline) -> dict[str, int]:
    """Move reasons off the first release's shared key; returns how many were re-sealed and dropped."""
    keyring = pipeline.keyring
    counts = {"resealed": 0, "dropped": 0}
    if keyring.key_state(LEGACY_REASON_KEY_ID) != "active":
        return counts
    shared = AESGCM(keyring.named_key(LEGACY_REASON_KEY_ID, "requests"))
    with transaction(keyring.engine, "reading deletion requests") as conn:
        rows = conn.execute(select(deletion_requests).where(deletion_requests.c.reason.is_not(None))).all()
    for row in rows:
        if ":" in row.reason:  # "<key version>:<base64>": already under the subject's key
            continue
        receipt, sealed = json.loads(row.receipt or "{}"), None
        try:
            blob = base64.b64decode(row.reason)
            reason = shared.decrypt(blob[:_NONCE], blob[_NONCE:], row.request_id.encode()).decode()
        except (ValueError, InvalidTag):
            reason = None  # unreadable under the shared key too: nothing to move
        if reason is not None:
            receipt["reason_sha256"] = hashlib.sha256(reason.encode()).hexdigest()
            if row.state != "completed":  # an erased subject's key is gone: its reason goes with it
                sealed = seal_reason(keyring, row.request_id, row.subject_ref, row.user_ref, reason)
        with transaction(keyring.engine, f"deletion request {row.request_id}") as conn:
            conn.execute(
                update(deletion_requests)
                .where(deletion_requests.c.request_id == row.request_id)
                .values(reason=sealed, receipt=json.dumps(receipt, sort_keys=True))
            )
        counts["resealed" if sealed else "dropped"] += 1
    keyring.destroy(LEGACY_REASON_KEY_ID)
    return counts
