"""Append-only, hash-chained, Ed25519-signed audit trail in the metadata database.

Each entry is canonical JSON (sorted keys, no spaces) of its sequence number,
time, actor, action, subject_ref (never a name), details and the previous
entry's hash; ``entry_hash = sha256(canonical)`` and ``signature =
Ed25519(entry_hash)``. Altering, deleting, inserting or reordering entries
breaks the chain at the first affected sequence number. The signing key is kept
in the keyring, wrapped by the master key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from pipeline.db import audit_log
from pipeline.errors import AuditIntegrityError
from pipeline.keys import Keyring
from pipeline.records import utcnow

__all__ = ["AuditEntry", "AuditLog", "canonical_entry", "default_actor"]

GENESIS = "0" * 64
SIGNING_KEY_ID = "audit-signing"
_APPEND_RETRIES = 50


def default_actor() -> str:
    """``user@host`` of this process: who did it, as far as the machine knows."""
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", f"uid{os.getuid()}")
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    recorded_at: datetime
    actor: str
    action: str
    subject_ref: str | None
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str
    signature: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "recorded_at": self.recorded_at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "subject_ref": self.subject_ref,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "signature": self.signature,
        }


def canonical_entry(entry: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: every field but the hash and signature, canonical JSON."""
    body = {k: entry[k] for k in ("seq", "recorded_at", "actor", "action", "subject_ref", "details", "prev_hash")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditLog:
    """Append and verify the audit trail."""

    def __init__(self, engine: Engine, keyring: Keyring) -> None:
        self.engine = engine
        self._signing_key = Ed25519PrivateKey.from_private_bytes(keyring.named_key(SIGNING_KEY_ID, "audit"))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._signing_key.public_key()

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def append(
        self,
        action: str,
        *,
        actor: str | None = None,
        subject_ref: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Add one entry at the end of the chain; safe under concurrent writers."""
        details = json.loads(json.dumps(details or {}, default=str))  # JSON-clean, as it will be read back
        for _ in range(_APPEND_RETRIES):
            with self.engine.connect() as conn:
                last = conn.execute(
                    select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
                ).first()
            seq, prev_hash = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
            body = {
                "seq": seq,
                "recorded_at": utcnow().isoformat(),
                "actor": actor or default_actor(),
                "action": action,
                "subject_ref": subject_ref,
                "details": details,
                "prev_hash": prev_hash,
            }
            entry_hash = hashlib.sha256(canonical_entry(body)).hexdigest()
            signature = self._signing_key.sign(bytes.fromhex(entry_hash)).hex()
            entry = AuditEntry(
                **{**body, "recorded_at": datetime.fromisoformat(body["recorded_at"])},
                entry_hash=entry_hash,
                signature=signature,
            )
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(audit_log).values(
                            seq=seq,
                            recorded_at=entry.recorded_at,
                            actor=entry.actor,
                            action=action,
                            subject_ref=subject_ref,
                            details=json.dumps(details, sort_keys=True),
                            prev_hash=prev_hash,
                            entry_hash=entry_hash,
                            signature=signature,
                        )
                    )
                return entry
            except IntegrityError:  # another writer took this sequence number: chain onto it
                continue
        raise RuntimeError(f"audit append lost the race {_APPEND_RETRIES} times")

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry in sequence order, streamed."""
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(select(audit_log).order_by(audit_log.c.seq)):
                yield AuditEntry(
                    seq=row.seq,
                    recorded_at=row.recorded_at,
                    actor=row.actor,
                    action=row.action,
                    subject_ref=row.subject_ref,
                    details=json.loads(row.details),
                    prev_hash=row.prev_hash,
                    entry_hash=row.entry_hash,
                    signature=row.signature,
                )

    def verify(self) -> int:
        """Check the chain and every signature; returns the number of entries.

        :raises AuditIntegrityError: naming the first bad sequence number
        """
        return verify_entries((e.as_dict() for e in self.entries()), self.public_key)


def verify_entries(entries: Iterator[Mapping[str, Any]], public_key: Ed25519PublicKey) -> int:
    """Verify entries as dicts (as exported); returns how many were checked."""
    prev_hash, expected_seq = GENESIS, 1
    for entry in entries:
        seq = entry["seq"]
        if seq != expected_seq:
            raise AuditIntegrityError(expected_seq, f"missing or out of order (found seq {seq} instead)")
        if entry["prev_hash"] != prev_hash:
            raise AuditIntegrityError(seq, "does not chain to the previous entry (deleted, inserted or reordered)")
        if hashlib.sha256(canonical_entry(entry)).hexdigest() != entry["entry_hash"]:
            raise AuditIntegrityError(seq, "content does not match its hash (altered)")
        try:
            public_key.verify(bytes.fromhex(entry["signature"]), bytes.fromhex(entry["entry_hash"]))
        except (InvalidSignature, ValueError):
            raise AuditIntegrityError(seq, "signature does not verify") from None
        prev_hash, expected_seq = entry["entry_hash"], seq + 1
    return expected_seq - 1
