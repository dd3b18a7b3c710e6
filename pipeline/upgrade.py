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

- **An owned cluster's name and image under the account's key.** Releases before
  a cluster's owner had a key of her own there kept them with the account's names;
  they are moved under her key (dropped where an erasure destroyed it), so her
  erasure shreds them. This runs at every ``init``: it reads only the owned
  clusters that have no names of their owner's, none once moved.

- **Erasures completed without a master key rotation** (the first release's): one
  rotation for them all, recorded in their receipts, so they are listed as not
  final until the versions before it retire (audited as ``key.rotated``).

The others are audited as ``upgrade.resealed``.
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

from pipeline.db import clusters, deletion_requests, leases, transaction
from pipeline.errors import KeyringError, UnknownAccountError
from pipeline.keys import Keyring
from pipeline.retention.lease import Leases
from pipeline.retention.requests import rotate_for_unrotated, seal_reason
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
    done = _resealed_under_user_keys(pipeline) or {}
    if rotated := rotate_for_unrotated(pipeline):
        done["erasures_rotated"] = len(rotated)
    if moved := move_owner_names(pipeline):
        done["cluster_names"] = moved
        pipeline.audit.append(RESEALED, details={"cluster_names": moved})
    return done or None


def _resealed_under_user_keys(pipeline: Pipeline) -> dict[str, Any] | None:
    """Records and reasons moved off the first release's keys, once per database (a lease marks it done)."""
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


def move_owner_names(pipeline: Pipeline) -> int:
    """Move each owned cluster's name and image from the account's names to its owner's; returns how many.

    Where her key was destroyed (she was erased before the upgrade) they are dropped: they were hers.
    """
    from pipeline.server.names import NameBox

    box = NameBox(pipeline.keyring)
    owned = select(clusters).where(clusters.c.user_ref.is_not(None), clusters.c.owner_names.is_(None))
    with transaction(pipeline.keyring.engine, "reading clusters") as conn:
        rows = conn.execute(owned).all()
    moved = 0
    for row in rows:
        names = box.open(row.cluster_id, row.names, subject_ref=row.subject_ref)
        if names is None or not {"name", "image"} & names.keys():
            continue  # the account's key is gone, or nothing of hers is there
        chosen = {key: names.pop(key, None) for key in ("name", "image")}
        owner = f"{row.cluster_id}/owner"
        try:
            sealed = box.seal(owner, chosen, subject_ref=row.subject_ref, user_ref=row.user_ref, create=False)
        except UnknownAccountError:  # never made: made now, as a registration makes it
            sealed = box.seal(owner, chosen, subject_ref=row.subject_ref, user_ref=row.user_ref)
        except KeyringError:  # destroyed by her erasure
            sealed = None
        with transaction(pipeline.keyring.engine, f"cluster {row.cluster_id}") as conn:
            conn.execute(
                update(clusters)
                .where(clusters.c.cluster_id == row.cluster_id, clusters.c.names == row.names)
                .values(names=box.seal(row.cluster_id, names, subject_ref=row.subject_ref), owner_names=sealed)
            )
        moved += 1
    return moved
