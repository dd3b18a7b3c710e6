"""Tombstones: what keeps an erased account or user from coming back through ingest.

Every deletion request leaves one (refs and time, no names). A record of the
subject observed before the erasure — a replayed spool, a late batch — is
dropped on ingest: it would bring back data the receipt says is gone. Until the
request completes, every record of the subject is dropped: one taken between the
key's destruction and the completion would be sealed under a new key and outlive
the erasure it was observed before. A tombstone filed with ``suppress`` also
drops records observed later, until it is lifted (``erase lift ID``); lifting
lets new records in, never old ones.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Connection, Engine, bindparam, insert, or_, select, text, update

from pipeline.db import deletion_requests, reading, tombstones, transaction
from pipeline.errors import PipelineError

__all__ = ["Tombstone", "TombstoneNotFound", "add", "complete", "drop_erased", "hold", "lift", "load", "stand"]


class TombstoneNotFound(PipelineError, LookupError):
    """No suppressing tombstone has this request id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"no deletion request {request_id!r} filed with --suppress and not yet lifted")


@dataclass(frozen=True)
class Tombstone:
    request_id: str
    subject_ref: str
    user_ref: str | None
    erased_at: datetime
    suppress: bool
    lifted_at: datetime | None
    #: the request is filed, not completed: every record of the subject is dropped
    open: bool = False


#: PostgreSQL advisory lock space (int4) of the subjects' tombstones ("tomb")
_LOCK_SPACE = 0x746F6D62


def hold(conn: Connection, subject_refs: Iterable[str], *, exclusive: bool = False) -> None:
    """Hold the subjects' tombstones still until the transaction ends: shared by the commits that write
    the subjects' records, exclusive by the filing of a request (:func:`add`).

    A commit that reads the tombstones after this (:func:`stand`) then sees every request filed before
    it, and a request filed after it waits for the commit to be durable, so its erasure finds what the
    commit wrote. Without it a batch that read no tombstone was written after an erasure filed, ran and
    completed meanwhile: sealed under a new key, its records from before the erasure stayed readable.
    PostgreSQL: a transaction-level advisory lock a subject (one round trip); SQLite: the database's
    write lock, which its one writer at a time holds to the end (a write taking it is the first
    statement of the transaction: a read before it could see tombstones older than the lock).
    """
    refs = sorted(set(subject_refs))
    if not refs:
        return
    if conn.dialect.name == "postgresql":
        lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        keys = sorted({int.from_bytes(hashlib.sha256(ref.encode()).digest()[:4], "big", signed=True) for ref in refs})
        conn.execute(
            text(f"SELECT {lock}(:space, key) FROM unnest(CAST(:keys AS integer[])) AS key"),
            {"space": _LOCK_SPACE, "keys": keys},
        ).all()
    else:
        conn.execute(update(tombstones).where(tombstones.c.request_id.is_(None)).values(suppress=tombstones.c.suppress))


def stand(conn: Connection, loaded: Mapping[str, list[Tombstone]]) -> bool:
    """Whether the tombstones of ``loaded``'s subjects are still as :func:`load` read them (in a transaction
    that holds them: :func:`hold`)."""
    now = _load_on(conn, loaded)
    return all(set(now[ref]) == set(stones) for ref, stones in loaded.items())


def add(
    conn: Connection, request_id: str, subject_ref: str, user_ref: str | None, *, at: datetime, suppress: bool
) -> None:
    """The tombstone of a request being filed (in the caller's transaction), its subject held (:func:`hold`)."""
    hold(conn, [subject_ref], exclusive=True)
    conn.execute(
        insert(tombstones).values(
            request_id=request_id, subject_ref=subject_ref, user_ref=user_ref, erased_at=at, suppress=suppress
        )
    )


def suppress(conn: Connection, request_id: str) -> bool:
    """Make an open request's tombstone suppress later records too, again if it was lifted (in the caller's
    transaction); ``False`` when it suppresses already."""
    made = conn.execute(
        update(tombstones)
        .where(
            tombstones.c.request_id == request_id,
            or_(tombstones.c.suppress.is_(False), tombstones.c.lifted_at.is_not(None)),
        )
        .values(suppress=True, lifted_at=None)
    )
    return bool(made.rowcount)


def suppresses(conn: Connection, request_id: str) -> bool:
    """Whether a request's tombstone was made to suppress (lifted or not)."""
    return bool(conn.scalar(select(tombstones.c.suppress).where(tombstones.c.request_id == request_id)))


def complete(engine: Engine, request_id: str, at: datetime) -> None:
    """Move the tombstone to the erasure's completion: anything observed before it stays out.

    Run before the request is marked completed (at ``at``): until then its tombstone drops all.
    """
    with transaction(engine, "updating a tombstone") as conn:
        conn.execute(update(tombstones).where(tombstones.c.request_id == request_id).values(erased_at=at))


def lift(engine: Engine, request_id: str, at: datetime) -> None:
    """End a suppression: records observed from ``at`` on are accepted again.

    :raises TombstoneNotFound: no unlifted suppressing tombstone has this id
    """
    with transaction(engine, "lifting a tombstone") as conn:
        lifted = conn.execute(
            update(tombstones)
            .where(
                tombstones.c.request_id == request_id, tombstones.c.suppress.is_(True), tombstones.c.lifted_at.is_(None)
            )
            .values(lifted_at=at)
        ).rowcount
    if not lifted:
        raise TombstoneNotFound(request_id)


#: built once: building an IN clause of literal values costs more than the query
_OF_SUBJECTS = (
    select(tombstones, deletion_requests.c.state)
    .join(deletion_requests, deletion_requests.c.request_id == tombstones.c.request_id, isouter=True)
    .where(tombstones.c.subject_ref.in_(bindparam("refs", expanding=True)))
)


def load(engine: Engine, subject_refs: Iterable[str]) -> dict[str, list[Tombstone]]:
    """The tombstones of each of ``subject_refs`` (an empty list for none), in one query per 500 subjects."""
    refs = sorted(set(subject_refs))
    if not refs:  # a group commit of replays only: nothing to ask
        return {}
    with reading(engine, "reading tombstones") as conn:
        return _load_on(conn, refs)


def _load_on(conn: Connection, subject_refs: Iterable[str]) -> dict[str, list[Tombstone]]:
    refs = sorted(set(subject_refs))
    found: dict[str, list[Tombstone]] = {ref: [] for ref in refs}
    for start in range(0, len(refs), 500):
        for r in conn.execute(_OF_SUBJECTS, {"refs": refs[start : start + 500]}):
            found[r.subject_ref].append(
                Tombstone(
                    r.request_id,
                    r.subject_ref,
                    r.user_ref,
                    r.erased_at,
                    r.suppress,
                    r.lifted_at,
                    open=r.state not in (None, "completed"),
                )
            )
    return found


def drop_erased(
    engine: Engine,
    tables: Iterable[pa.Table],
    refs: Callable[[str, str | None], tuple[str, str | None]],
    *,
    loaded: Mapping[str, list[Tombstone]] | None = None,
) -> tuple[list[pa.Table], Counter[str]]:
    """The tables without the records tombstones forbid, and how many each tombstone dropped.

    One query for the batch's subjects that ``loaded`` (a result of :func:`load`: a group
    commit reads its batches' tombstones once) does not hold; rows are filtered vectorised,
    per tombstone.

    :param refs: ``(account, user) -> (subject_ref, user_ref)`` (the keyring's HMAC refs)
    """
    tables = list(tables)
    # plain Python: for a batch's few thousand rows at most, a grouping kernel's set-up costs more
    columns = ((t.column("account").to_pylist(), t.column("user").to_pylist()) for t in tables)
    pairs = {pair for accounts, users in columns for pair in zip(accounts, users, strict=True)}
    by_pair = {pair: refs(*pair) for pair in pairs}
    loaded = loaded or {}
    missing = {subject for subject, _user in by_pair.values()} - loaded.keys()
    stones = {**loaded, **load(engine, missing)} if missing else loaded
    dropped: Counter[str] = Counter()
    if not any(stones.values()):
        return tables, dropped
    kept = []
    for table in tables:
        for (account, user), (subject_ref, user_ref) in by_pair.items():
            for stone in stones.get(subject_ref, ()):
                if stone.user_ref not in (None, user_ref):
                    continue
                hit = _mask(table, account, user if stone.user_ref else None, stone)
                n = pc.sum(hit).as_py() or 0
                if n:
                    dropped[stone.request_id] += n
                    table = table.filter(pc.invert(hit))
        kept.append(table)
    return kept, dropped


def _mask(table: pa.Table, account: str, user: str | None, stone: Tombstone) -> pa.ChunkedArray:
    """Rows of ``account`` (and ``user``, for a user's tombstone) that ``stone`` drops."""
    mask = pc.equal(table.column("account"), account)
    if user is not None:
        mask = pc.and_(mask, pc.equal(table.column("user"), user))
    if stone.open:  # not erased yet: nothing of the subject may be taken meanwhile
        return pc.fill_null(mask, False)
    observed = table.column("observed_at")
    until = stone.erased_at
    if stone.suppress:
        if stone.lifted_at is None:
            return pc.fill_null(mask, False)
        until = max(until, stone.lifted_at)
    return pc.fill_null(pc.and_(mask, pc.less(observed, pa.scalar(until, observed.type))), False)
