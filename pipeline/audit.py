"""Append-only, hash-chained, Ed25519-signed audit trail in the metadata database.

Each entry is canonical JSON (sorted keys, no spaces) of its sequence number,
time, actor, action, subject_ref (never a name), details and the previous
entry's hash; ``entry_hash = sha256(canonical)`` and ``signature =
Ed25519(entry_hash)``. Altering, deleting, inserting or reordering entries
breaks the chain at the first affected sequence number. The signing key is kept
in the keyring, wrapped by the master key.

Writers serialise on a database lock (PostgreSQL advisory lock, SQLite's write
lock) while they read the chain's head and append, so concurrent processes
still produce one chain. ``audit export`` writes the entries as JSON lines with
the public key and a README: a third party verifies them with ``cryptography``
alone (see :mod:`pipeline.audit_export`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pwd
import socket
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db import audit_log
from pipeline.errors import AuditIntegrityError, StoreUnavailable
from pipeline.keys import Keyring
from pipeline.records import utcnow
from pipeline.redact import mask_url

__all__ = ["AuditEntry", "AuditLog", "VerifyResult", "canonical_entry", "default_actor", "verify_entries"]

GENESIS = "0" * 64
SIGNING_KEY_ID = "audit-signing"
_LOCK_KEY = 0x617564_6974  # PostgreSQL advisory lock id of the chain ("audit")


@functools.cache
def default_actor() -> str:
    """``user@host`` of this process from its credentials (effective uid), not ``$USER`` or the tty's login."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        user = f"uid{uid}"
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
        item = {"action": action, "actor": actor, "subject_ref": subject_ref, "details": details}
        return self._append(lambda _conn: [item])[0]

    def append_many(self, items: Iterable[Mapping[str, Any]]) -> list[AuditEntry]:
        """Add several entries in one transaction (keys as :meth:`append`'s arguments)."""
        items = list(items)
        return self._append(lambda _conn: items) if items else []

    def note_policy(self, path: str, sha256: str) -> AuditEntry | None:
        """Record ``policy.loaded`` when the policy differs from the last one recorded."""
        with self.engine.connect() as conn:
            if _last_policy_sha(conn) == sha256:  # the usual case: no write lock taken
                return None

        def changed(conn: Connection) -> list[Mapping[str, Any]]:
            if _last_policy_sha(conn) == sha256:  # another process recorded it meanwhile
                return []
            return [{"action": "policy.loaded", "details": {"path": path, "sha256": sha256}}]

        entries = self._append(changed)
        return entries[0] if entries else None

    def _append(self, build: Callable[[Connection], Iterable[Mapping[str, Any]]]) -> list[AuditEntry]:
        """Lock the chain, read its head, sign and insert what ``build`` returns."""
        try:
            with self.engine.begin() as conn:
                _lock_chain(conn)
                last = conn.execute(
                    select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
                ).first()
                seq, prev_hash = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
                entries = []
                for item in build(conn):
                    entries.append(self._sign(seq, prev_hash, item))
                    seq, prev_hash = seq + 1, entries[-1].entry_hash
                if entries:
                    conn.execute(insert(audit_log), [_row(entry) for entry in entries])
            return entries
        except SQLAlchemyError as exc:
            where = mask_url(self.engine.url.render_as_string(hide_password=False))
            raise StoreUnavailable(f"audit log in {where} unwritable: {exc.__class__.__name__}") from exc

    def _sign(self, seq: int, prev_hash: str, item: Mapping[str, Any]) -> AuditEntry:
        body = {
            "seq": seq,
            "recorded_at": utcnow().isoformat(),
            "actor": item.get("actor") or default_actor(),
            "action": item["action"],
            "subject_ref": item.get("subject_ref"),
            # JSON-clean, as it will be read back
            "details": json.loads(json.dumps(item.get("details") or {}, default=str)),
            "prev_hash": prev_hash,
        }
        entry_hash = hashlib.sha256(canonical_entry(body)).hexdigest()
        return AuditEntry(
            **{**body, "recorded_at": datetime.fromisoformat(body["recorded_at"])},
            entry_hash=entry_hash,
            signature=self._signing_key.sign(bytes.fromhex(entry_hash)).hex(),
        )

    def entries(self) -> Generator[AuditEntry, None, None]:
        """Every entry in sequence order, streamed."""
        query = select(audit_log).order_by(audit_log.c.seq)
        with self.engine.connect() as conn, conn.execution_options(yield_per=1000).execute(query) as rows:
            for row in rows:
                yield _entry(row)

    def verify(self) -> int:
        """Check the chain and every signature; returns the number of entries.

        :raises AuditIntegrityError: naming the first bad sequence number
        """
        with contextlib.closing(self.entries()) as entries:  # close the cursor when verification stops early
            return verify_entries((e.as_dict() for e in entries), self.public_key)

    def check(self) -> VerifyResult:
        """:meth:`verify` as a result to report rather than an exception."""
        try:
            return VerifyResult(True, self.verify())
        except AuditIntegrityError as exc:
            return VerifyResult(False, exc.seq - 1, exc.seq, exc.reason)

    def action_counts(self) -> dict[str, int]:
        """How many entries of each action the trail holds."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit_log.c.action, func.count()).group_by(audit_log.c.action)).all()
        return {action: n for action, n in rows}

    def last(self, action: str) -> AuditEntry | None:
        """The newest entry with this action (e.g. the last ``retention.pass``)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(audit_log).where(audit_log.c.action == action).order_by(audit_log.c.seq.desc()).limit(1)
            ).first()
        return None if row is None else _entry(row)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification: entries checked (before the first bad one, if any)."""

    intact: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.intact:
            return f"audit trail intact: {self.entries:,} entries"
        return f"audit trail broken at entry {self.first_bad_seq}: {self.reason}"


def _lock_chain(conn: Connection) -> None:
    """Hold the chain's write lock until the transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:  # SQLite: the transaction's first write takes the database write lock (busy_timeout waits)
        conn.execute(update(audit_log).where(audit_log.c.seq == -1).values(seq=audit_log.c.seq))


def _last_policy_sha(conn: Connection) -> str | None:
    details = conn.execute(
        select(audit_log.c.details)
        .where(audit_log.c.action == "policy.loaded")
        .order_by(audit_log.c.seq.desc())
        .limit(1)
    ).scalar()
    return None if details is None else json.loads(details).get("sha256")


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {**entry.as_dict(), "recorded_at": entry.recorded_at, "details": json.dumps(entry.details, sort_keys=True)}


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
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
