"""Append-only, hash-chained, Ed25519-signed audit trail in the metadata database.

Each entry is canonical JSON (sorted keys, no spaces) of its sequence number,
time, actor, action, subject_ref (never a name), details and the previous
entry's hash; ``entry_hash = sha256(canonical)`` and ``signature =
Ed25519(entry_hash)``. Altering, deleting, inserting or reordering entries
breaks the chain at the first affected sequence number. The signing key is not
in the database and not under the master key: it has its own 0600 file
(:mod:`pipeline.signing`). After every retention pass and erasure, and hourly,
a signed checkpoint of the chain's head goes to a witness outside the database
(:mod:`pipeline.witness`); verification compares the chain with the newest one,
so cutting the tail, wiping the table or restoring an older database is caught.

Trust never comes from the database: the verifier's key is the configured
signing key's public half or ``pipeline.audit.verify-key``
(:mod:`pipeline.audit_trust`). A keyring made before the signing key had its
own file still holds the old wrapped key: on first open the new key file is
made, an ``audit.signing_key_replaced`` entry signed by the old key and
endorsed by the new one names the new public key, a checkpoint pins the chain
up to it, and the wrapped old key is destroyed. Before a checkpoint pins new
entries they are verified, so a checkpoint never vouches for a forgery.

Writers serialise on a database lock (PostgreSQL advisory lock, SQLite's write
lock) while they read the chain's head and append, so concurrent processes
still produce one chain. ``audit export`` writes the entries as JSON lines with
the public key and a README: a third party verifies them with ``cryptography``
alone (see :mod:`pipeline.audit_export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pwd
import socket
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    LargeBinary,
    Select,
    and_,
    cast,
    func,
    insert,
    inspect,
    select,
    text,
    true,
    update,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from pipeline.audit_trust import HANDOVER, KeySchedule, handover_statement, key_schedule, signed_by
from pipeline.db import as_stored, audit_log, driver_reason, mapped_errors, stored_reader
from pipeline.errors import AuditIntegrityError, KeyringError, StoreError, StoreUnavailable
from pipeline.keys import Keyring
from pipeline.records import utcnow
from pipeline.redact import mask_url
from pipeline.signing import AuditSigner, FileSigner, PublicKey, open_signer, public_hex
from pipeline.witness import Checkpoint, HighWater, Witness, open_witness

__all__ = [
    "AuditEntry",
    "AuditLog",
    "VerifyResult",
    "canonical_entry",
    "default_actor",
    "entry_fault",
    "verify_entries",
]

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
#: where the signing key lived before it had a file of its own (wrapped by the master key)
LEGACY_SIGNING_KEY_ID = "audit-signing"
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


def _recorded_elsewhere(witness: Witness, high_water: HighWater | None) -> str | None:
    """Where a trail with entries was recorded outside the database (any checkpoint, whoever signed it:
    the key to check it is what is missing); ``None`` for a new trail."""
    if high_water is not None and (seen := high_water.read()) is not None:
        return f"this host saw the {seen.label} recording seq {seen.seq} ({high_water.path})"
    newest = witness.newest(lambda _checkpoint: True)
    return None if newest is None else f"witness {witness.url} holds the {newest.label} recording seq {newest.seq}"


class AuditLog:
    """Append, checkpoint and verify the audit trail."""

    def __init__(
        self,
        engine: Engine,
        signer: AuditSigner,
        witness: Witness,
        *,
        verify_key: PublicKey | None = None,
        high_water: HighWater | None = None,
    ) -> None:
        """:param verify_key: the trust anchor; default: the signer's public key
        :param high_water: where this host remembers the newest checkpoint it has seen
        """
        self.engine = engine
        self.signer = signer
        self.witness = witness
        self.trusted_key = verify_key or signer.public_key
        self.high_water = high_water

    @classmethod
    def open(
        cls,
        engine: Engine,
        keyring: Keyring,
        signing_key_url: str,
        witness_url: str,
        *,
        verify_key: PublicKey | None = None,
        high_water: HighWater | None = None,
    ) -> AuditLog:
        """The trail with its signing key file, made on first use (see the module docstring).

        :raises KeyringError: the key file is missing although the trail has entries and
            no old key to hand over from
        """
        witness = open_witness(witness_url)
        signer = open_signer(signing_key_url)
        trusting = functools.partial(cls, verify_key=verify_key, high_water=high_water)
        if signer is not None:
            return trusting(engine, signer, witness)
        path = Path(urlparse(signing_key_url).path)
        if keyring.key_state(LEGACY_SIGNING_KEY_ID) == "active":
            legacy = FileSigner(
                path, Ed25519PrivateKey.from_private_bytes(keyring.named_key(LEGACY_SIGNING_KEY_ID, "audit"))
            )
            audit = trusting(engine, FileSigner.create(path), witness)
            cls(engine, legacy, witness)._hand_over(audit.signer)
            keyring.destroy(LEGACY_SIGNING_KEY_ID)
            audit.checkpoint()
            return audit
        with _reading(engine) as conn:
            if conn.execute(select(audit_log.c.seq).limit(1)).first() is not None:
                raise KeyringError(
                    f"audit signing key {path} is missing but the audit trail has entries: restore the key file"
                )
        recorded = _recorded_elsewhere(witness, high_water)
        if recorded is not None:  # a wiped table and a deleted key file: a new key would verify an empty trail
            raise KeyringError(
                f"audit signing key {path} is missing and the audit trail is empty, but {recorded}: "
                "the trail was wiped; restore the key file and the trail"
            )
        return trusting(engine, FileSigner.create(path), witness)

    def _hand_over(self, new: AuditSigner) -> None:
        """Append a hand-over signed by this trail's key and endorsed by ``new``."""

        def once(conn: Connection, seq: int, prev_hash: str) -> list[Mapping[str, Any]]:
            if conn.execute(select(audit_log.c.seq).where(audit_log.c.action == HANDOVER).limit(1)).first():
                return []  # another process handed over first
            keys = {"previous_public_key": public_hex(self.public_key), "public_key": public_hex(new.public_key)}
            endorsement = new.sign(handover_statement(seq, prev_hash, **keys)).hex()
            return [{"action": HANDOVER, "details": {**keys, "key_url": new.url, "endorsement": endorsement}}]

        self._append(once)

    @property
    def public_key(self) -> PublicKey:
        return self.signer.public_key

    def public_key_pem(self) -> bytes:
        """The trusted key, as ``audit export`` ships it."""
        return _pem(self.trusted_key)

    def key_schedule(self, pinned_through: int = 0) -> KeySchedule:
        """Which key is trusted for each entry, from the configured key back through endorsed hand-overs."""
        query = _entries_query().where(audit_log.c.action == HANDOVER)
        with _reading(self.engine) as conn:
            read_time = _time_reader(conn.dialect)
            handovers = [_entry(row, read_time).as_dict() for row in conn.execute(query)]
        return key_schedule(handovers, self.trusted_key, pinned_through=pinned_through)

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
        return self._append(lambda *_: [item])[0]

    def append_within(
        self,
        conn: Connection,
        action: str,
        *,
        actor: str | None = None,
        subject_ref: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """:meth:`append` in the caller's transaction (``conn``), which then holds the chain's lock to its end:
        the entry commits with the caller's change or not at all."""
        item = {"action": action, "actor": actor, "subject_ref": subject_ref, "details": details}
        return self._append_on(conn, lambda *_: [item])[0]

    def hold(self, conn: Connection) -> None:
        """Take the chain's lock in the caller's transaction now, to its end: a transaction that appends with
        :meth:`append_within` after taking other locks takes this one first, in the order every writer
        takes them (the chain's, then a subject's tombstones: see :func:`pipeline.tombstones.hold`)."""
        _lock_chain(conn)

    def append_with(self, build: Callable[[Connection, int], Mapping[str, Any] | None]) -> AuditEntry | None:
        """Add the entry ``build(conn, its seq)`` returns (keys as :meth:`append`'s arguments), ``None``
        for none, in the transaction that holds the chain's lock: what ``build`` writes through
        ``conn`` commits with the entry or not at all, and two processes' builds run one after the other."""

        def one(conn: Connection, seq: int, _head: str) -> list[Mapping[str, Any]]:
            item = build(conn, seq)
            return [] if item is None else [item]

        entries = self._append(one)
        return entries[0] if entries else None

    def append_many(self, items: Iterable[Mapping[str, Any]]) -> list[AuditEntry]:
        """Add several entries in one transaction (keys as :meth:`append`'s arguments)."""
        items = list(items)
        return self._append(lambda *_: items) if items else []

    def note_policy(self, path: str, sha256: str) -> AuditEntry | None:
        """Record ``policy.loaded`` when the policy differs from the last one recorded."""
        try:
            with _reading(self.engine) as conn:
                if _last_policy_sha(conn) == sha256:  # the usual case: no write lock taken
                    return None
            newest = self.newest_checkpoint()
        except AuditIntegrityError as exc:  # its table gone, a rolled-back witness: left as found, for `audit verify`
            logger.warning("policy %s not recorded in the audit trail: %s", path, exc)
            return None

        def changed(conn: Connection, *_: Any) -> list[Mapping[str, Any]]:
            if _last_policy_sha(conn) == sha256:  # another process recorded it meanwhile
                return []
            if newest is not None and (conn.scalar(select(func.max(audit_log.c.seq))) or 0) < newest.seq:
                return []  # the trail was cut: leave it as found, for `audit verify` to name

            return [{"action": "policy.loaded", "details": {"path": path, "sha256": sha256}}]

        entries = self._append(changed)
        return entries[0] if entries else None

    def _append(self, build: Callable[[Connection, int, str], Iterable[Mapping[str, Any]]]) -> list[AuditEntry]:
        """Lock the chain, read its head, sign and insert what ``build(conn, next seq, head hash)`` returns."""
        try:
            with self.engine.begin() as conn:
                return self._append_on(conn, build)
        except SQLAlchemyError as exc:
            where = mask_url(self.engine.url.render_as_string(hide_password=False))
            raise StoreUnavailable(f"audit log in {where} unwritable: {driver_reason(exc)}") from exc

    def _append_on(
        self, conn: Connection, build: Callable[[Connection, int, str], Iterable[Mapping[str, Any]]]
    ) -> list[AuditEntry]:
        _lock_chain(conn)
        last = conn.execute(
            select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
        ).first()
        seq, prev_hash = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
        entries = []
        for item in build(conn, seq, prev_hash):
            entries.append(self._sign(seq, prev_hash, item))
            seq, prev_hash = seq + 1, entries[-1].entry_hash
        if entries:
            conn.execute(insert(audit_log), [_row(entry) for entry in entries])
        return entries

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
            signature=self.signer.sign(bytes.fromhex(entry_hash)).hex(),
        )

    def entries(
        self, after: int | None = None, *, actions: Iterable[str] | None = None
    ) -> Generator[AuditEntry, None, None]:
        """Every entry (past seq ``after``; of ``actions`` only, when given) in sequence order, streamed.
        Without ``after``, rows numbered below 1 too: inserted beside the chain, verification names them.

        :raises AuditIntegrityError: at an entry whose row holds what the trail never writes
        :raises StoreUnavailable: the database or its audit table cannot be read
        """
        query = _entries_query().where(_past(after)).order_by(audit_log.c.seq)
        if actions is not None:
            query = query.where(audit_log.c.action.in_(list(actions)))
        with _reading(self.engine) as conn, conn.execution_options(yield_per=1000).execute(query) as rows:
            read_time = _time_reader(conn.dialect)
            last: int | None = after
            try:
                for row in rows:
                    yield _entry(row, read_time)
                    last = row.seq
            except OperationalError as exc:
                if "decode to UTF-8" not in str(exc.orig):  # SQLite's own message; else the database is away
                    raise
                reason = "holds text that is not UTF-8 (altered in the database)"
                raise AuditIntegrityError(_first_not_utf8(conn, last), reason) from None

    def verify(self) -> int:
        """Check the chain, every signature and the newest witness checkpoint; returns the entry count.

        :raises AuditIntegrityError: naming the first bad sequence number, or what the
            checkpoint records that the chain lacks
        """
        checkpoint, schedule = self.trusted()
        with contextlib.closing(self.entries()) as entries:  # close the cursor when verification stops early
            return verify_entries((e.as_dict() for e in entries), schedule, checkpoint=checkpoint)

    def trusted(self) -> tuple[Checkpoint | None, KeySchedule]:
        """The newest checkpoint, and the key trusted for each entry: hand-overs written before endorsements
        existed count up to the checkpoint that pins them.

        :raises AuditIntegrityError: the witness lacks a checkpoint this host has seen (rolled back)
        """
        checkpoint = self.newest_checkpoint()
        return checkpoint, self.key_schedule(checkpoint.seq if checkpoint else 0)

    def check(self) -> VerifyResult:
        """:meth:`verify` as a result to report rather than an exception."""
        try:
            return VerifyResult(True, self.verify())
        except AuditIntegrityError as exc:
            return VerifyResult(False, max(exc.seq - 1, 0), exc.seq, exc.reason)

    def newest_checkpoint(self) -> Checkpoint | None:
        """The trusted key's checkpoint with the highest sequence number among all the witness holds.

        A checkpoint past it that no trusted key signed is named, whatever its name: an older key counts only
        where a hand-over trusts it (see :meth:`_vouches`).

        :raises AuditIntegrityError: the witness lacks a checkpoint this host has seen (rolled back), or it or
            this host's mark holds one that no trusted key signed (the signing key replaced, the trail rewritten)
        """
        return self._anchored()[0]

    def _anchored(self) -> tuple[Checkpoint | None, Callable[[Checkpoint], bool]]:
        """:meth:`newest_checkpoint`, and the test (:meth:`_vouches`) the witness and this host's mark passed:
        the mark is raised only past what it accepts."""
        newest, past = self.witness.survey(lambda c: signed_by(self.trusted_key, c.signature, c.body()))
        vouches = self._vouches(newest)
        if (foreign := next((c for c in past if not vouches(c)), None)) is not None:
            raise AuditIntegrityError(
                0,
                f"witness {self.witness.url} holds the {foreign.label} recording seq {foreign.seq}, signed by "
                "a key other than the trusted one (the signing key was replaced, or the trail rewritten)",
            )
        if self.high_water is not None:  # the witness's newest a trusted key signed, the key before a hand-over too
            highest = max((c for c in (newest, *past) if c is not None), key=lambda c: (c.seq, c.time), default=None)
            self._check_high_water(highest, vouches)
        return newest, vouches

    def _vouches(self, newest: Checkpoint | None) -> Callable[[Checkpoint], bool]:
        """Whether the key trusted at a checkpoint's seq signed it: the anchor, or an older key a hand-over
        names, so the checkpoints written before a legitimate hand-over stay explained. The hand-overs are
        read only for a checkpoint the anchor did not sign."""
        schedule = functools.cache(lambda: self.key_schedule(newest.seq if newest else 0))

        def vouches(checkpoint: Checkpoint) -> bool:
            body = checkpoint.body()
            return signed_by(self.trusted_key, checkpoint.signature, body) or signed_by(
                schedule().key_for(checkpoint.seq), checkpoint.signature, body
            )

        return vouches

    def _check_high_water(self, newest: Checkpoint | None, vouches: Callable[[Checkpoint], bool]) -> None:
        """Name a witness that lacks what this host saw, or a mark no trusted key signed; else remember ``newest``
        (the witness's newest checkpoint that a trusted key signed)."""
        assert self.high_water is not None
        seen = self.high_water.seen(vouches)
        if seen is not None and (newest is None or newest.seq < seen.seq):
            holds = f"holds checkpoints up to seq {newest.seq}" if newest else "holds no checkpoint"
            raise AuditIntegrityError(
                seen.seq,
                f"witness {self.witness.url} {holds}, but this host saw the {seen.label} "
                f"recording seq {seen.seq} (witness rolled back or checkpoints hidden)",
            )
        if newest is not None:
            self.high_water.raise_to(newest, vouches)

    def checkpoint(self) -> Checkpoint:
        """Sign the chain's head and write it to the witness.

        :raises AuditIntegrityError: the chain no longer holds the newest checkpoint's
            head (cut or rolled back): a new checkpoint would paper over it
        """
        newest, vouches = self._anchored()
        with _reading(self.engine) as conn:
            head = conn.execute(
                select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
            ).first()
            count = conn.scalar(select(func.count()).where(_numbered())) or 0
            if newest is not None:
                pinned = conn.scalar(select(audit_log.c.entry_hash).where(audit_log.c.seq == newest.seq))
                if pinned != newest.head_hash:
                    raise AuditIntegrityError(newest.seq, _mismatch(newest, head.seq if head else 0))
        seq, head_hash = (head.seq, head.entry_hash) if head else (0, GENESIS)
        self._verify_since(newest, seq)
        unsigned = Checkpoint(seq, head_hash, count, utcnow())
        checkpoint = dataclasses.replace(unsigned, signature=self.signer.sign(unsigned.body()).hex())
        self.witness.write(checkpoint)
        if self.high_water is not None:
            self.high_water.raise_to(checkpoint, vouches)
        return checkpoint

    def _verify_since(self, pinned: Checkpoint | None, head_seq: int) -> None:
        """Verify the entries after ``pinned`` up to ``head_seq`` before a checkpoint vouches for them."""
        start = (pinned.seq + 1, pinned.head_hash) if pinned else (1, GENESIS)
        schedule = self.key_schedule(pinned.seq if pinned else 0)
        with contextlib.closing(self.entries(after=pinned.seq if pinned else None)) as entries:
            rows = (e.as_dict() for e in entries if e.seq <= head_seq)
            verify_entries(rows, schedule, start=start)

    def action_counts(self, through: int | None = None) -> dict[str, int]:
        """How many entries of each action the chain holds (up to seq ``through``, say the verified ones)."""
        query = select(audit_log.c.action, func.count()).where(_numbered(through)).group_by(audit_log.c.action)
        with _reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return {action: n for action, n in rows}

    def last(self, action: str) -> AuditEntry | None:
        """The newest entry with this action (e.g. the last ``retention.pass``)."""
        return self._one(action, audit_log.c.seq.desc())

    def first(self, action: str) -> AuditEntry | None:
        """The oldest entry with this action."""
        return self._one(action, audit_log.c.seq)

    def _one(self, action: str, order: Any) -> AuditEntry | None:
        query = _entries_query().where(audit_log.c.action == action, _numbered()).order_by(order).limit(1)
        with _reading(self.engine) as conn:
            row = conn.execute(query).first()
            return None if row is None else _entry(row, _time_reader(conn.dialect))


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


def _numbered(through: int | None = None) -> ColumnElement[bool]:
    """Rows in the chain's numbering (1, 2, …; up to ``through``): one below 1 was inserted beside it, and
    counts for nothing (:func:`verify_entries` names it)."""
    numbered = audit_log.c.seq >= 1
    return numbered if through is None else and_(numbered, audit_log.c.seq <= through)


def _past(after: int | None) -> ColumnElement[bool]:
    """Rows past seq ``after``; every row, those numbered below 1 too, for ``None``."""
    return audit_log.c.seq > after if after is not None else true()


def _lock_chain(conn: Connection) -> None:
    """Hold the chain's write lock until the transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:  # SQLite: the transaction's first write takes the database write lock (busy_timeout waits)
        conn.execute(update(audit_log).where(audit_log.c.seq == -1).values(seq=audit_log.c.seq))


@contextlib.contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """A connection (in a transaction on PostgreSQL: :meth:`AuditLog.entries` streams through a server-side
    cursor) whose failures, an unreachable database or no audit table, are one line.

    :raises AuditIntegrityError: the audit table is gone (``init`` made it: dropped since, the trail with it)
    :raises StoreError: the database cannot be read
    """
    try:
        with mapped_errors("reading the audit log"), engine.connect() as conn:
            yield conn
    except StoreError:
        with mapped_errors("reading the audit log"):
            gone = not inspect(engine).has_table(audit_log.name)
        if gone:
            raise AuditIntegrityError(1, f"the table {audit_log.name} is gone from the database (dropped)") from None
        raise


def _last_policy_sha(conn: Connection) -> str | None:
    """The newest ``policy.loaded`` entry's sha256; None if there is none or its details do not read
    (altered: recording the policy again is harmless, and `audit verify` names the altered entry)."""
    details = conn.execute(
        select(audit_log.c.details)
        .where(audit_log.c.action == "policy.loaded")
        .order_by(audit_log.c.seq.desc())
        .limit(1)
    ).scalar()
    try:
        recorded = json.loads(details) if details is not None else None
    except (ValueError, TypeError, RecursionError):
        return None
    return recorded.get("sha256") if isinstance(recorded, dict) else None


def _pem(key: PublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _row(entry: AuditEntry) -> dict[str, Any]:
    return {**entry.as_dict(), "recorded_at": entry.recorded_at, "details": json.dumps(entry.details, sort_keys=True)}


def _entries_query() -> Select[Any]:
    """Every column, ``recorded_at`` as stored: :func:`_entry` converts it, so an altered time fails
    its own entry (named by seq) rather than the whole read."""
    return select(*(as_stored(c) if c.name == "recorded_at" else c for c in audit_log.c))


def _time_reader(dialect: Dialect) -> Callable[[Any], Any]:
    return stored_reader(audit_log.c.recorded_at, dialect)


def _entry(row: Any, read_time: Callable[[Any], Any]) -> AuditEntry:
    """The entry a row of :func:`_entries_query` holds.

    :raises AuditIntegrityError: the row holds a value the trail never writes (altered in the database)
    """
    for name in ("actor", "action", "subject_ref", "prev_hash", "entry_hash", "signature"):
        value = getattr(row, name)
        if value is not None and not isinstance(value, str):  # a BLOB in SQLite
            raise AuditIntegrityError(row.seq, f"{name} is not text")
    return AuditEntry(
        seq=row.seq,
        recorded_at=_recorded_at(row, read_time),
        actor=row.actor,
        action=row.action,
        subject_ref=row.subject_ref,
        details=_details(row),
        prev_hash=row.prev_hash,
        entry_hash=row.entry_hash,
        signature=row.signature,
    )


def _recorded_at(row: Any, read_time: Callable[[Any], Any]) -> datetime:
    try:
        value = read_time(row.recorded_at)
    except (ValueError, TypeError, OverflowError):
        value = None
    if not isinstance(value, datetime):
        raise AuditIntegrityError(row.seq, "recorded_at is not a time")
    return value


def _first_not_utf8(conn: Connection, after: int | None) -> int:
    """The first entry past ``after`` with a text column that is not UTF-8 (SQLite keeps what it is given),
    read as bytes: read as text, the whole chunk of rows it is in fails."""
    names = ("recorded_at", "actor", "action", "subject_ref", "details", "prev_hash", "entry_hash", "signature")
    as_bytes = [cast(audit_log.c[name], LargeBinary) for name in names]
    query = select(audit_log.c.seq, *as_bytes).where(_past(after)).order_by(audit_log.c.seq)
    for seq, *values in conn.execute(query):
        for value in values:
            try:
                if isinstance(value, bytes):
                    value.decode()
            except UnicodeDecodeError:
                return int(seq)
    return 1 if after is None else after + 1


class _KeyTwice(ValueError):
    """A JSON object names one key twice."""


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each named once: of two values the hash covers the last, and another
    reader may take the first (``{"records": 999, "records": 6}``)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _KeyTwice
    return found


def _details(row: Any) -> dict[str, Any]:
    try:
        details = json.loads(row.details, object_pairs_hook=_object_once)
    except _KeyTwice:
        raise AuditIntegrityError(row.seq, "details name a key twice (altered)") from None
    except (ValueError, TypeError, RecursionError):
        raise AuditIntegrityError(row.seq, "details are not JSON") from None
    if not isinstance(details, dict):
        raise AuditIntegrityError(row.seq, "details are not a JSON object")
    if "\\u" in row.details:  # an escape may decode to a lone surrogate, which no UTF-8 encoder takes
        try:
            json.dumps(details, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise AuditIntegrityError(row.seq, "details hold text that is not Unicode (altered)") from None
    return details


def _mismatch(checkpoint: Checkpoint, last_seq: int) -> str:
    if last_seq < checkpoint.seq:
        ends = f"ends at seq {last_seq}" if last_seq else "is empty"
        return f"audit trail {ends}; {checkpoint.label} records seq {checkpoint.seq}"
    return f"entry differs from the {checkpoint.label} (rewritten, or a database rolled back and extended)"


def entry_fault(entry: Mapping[str, Any], schedule: KeySchedule) -> str | None:
    """Why one entry (as a dict) is not as it was signed, its content or its signature; ``None`` when it is."""
    if hashlib.sha256(canonical_entry(entry)).hexdigest() != entry["entry_hash"]:
        return "content does not match its hash (altered)"
    if not signed_by(schedule.key_for(entry["seq"]), entry["signature"], bytes.fromhex(entry["entry_hash"])):
        return "signature does not verify (not signed by a trusted audit signing key)"
    return None


def verify_entries(
    entries: Iterator[Mapping[str, Any]],
    schedule: KeySchedule,
    *,
    checkpoint: Checkpoint | None = None,
    start: tuple[int, str] = (1, GENESIS),
) -> int:
    """Verify entries as dicts (as exported); returns the last sequence number checked.

    :param schedule: the key trusted for each sequence number (:func:`pipeline.audit_trust.key_schedule`)
    :param checkpoint: the chain must reach its sequence number with its head hash
    :param start: the first entry's seq and the hash it chains to (a verified prefix skipped)
    """
    expected_seq, prev_hash = start
    for entry in entries:
        seq = entry["seq"]
        if seq < 1:
            raise AuditIntegrityError(seq, "numbered below 1, outside the chain (inserted into the table)")
        if seq != expected_seq:
            raise AuditIntegrityError(expected_seq, f"missing or out of order (found seq {seq} instead)")
        if entry["prev_hash"] != prev_hash:
            raise AuditIntegrityError(seq, "does not chain to the previous entry (deleted, inserted or reordered)")
        if (fault := entry_fault(entry, schedule)) is not None:
            raise AuditIntegrityError(seq, fault)
        if checkpoint is not None and seq == checkpoint.seq and entry["entry_hash"] != checkpoint.head_hash:
            raise AuditIntegrityError(seq, _mismatch(checkpoint, seq))
        prev_hash, expected_seq = entry["entry_hash"], seq + 1
    last = expected_seq - 1
    if checkpoint is not None and last < checkpoint.seq:
        raise AuditIntegrityError(last + 1, _mismatch(checkpoint, last))
    return last
