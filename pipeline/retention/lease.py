"""Database leases: one holder at a time for a named piece of work, across processes.

APScheduler does not coordinate several schedulers sharing a job store, so two
retention services on one database would both run a due pass. Each run first
takes a lease named after the job and its scheduled slot (``retention@<time>``):
the first service inserts the row and runs; the other finds it and skips. A
finished run marks its lease completed, so that slot never runs again; a holder
that dies leaves an uncompleted lease that anyone may take over once it expires,
and a process of the same host (and PID namespace) at once.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select, update

from pipeline.db import insert_ignoring_duplicates, leases, transaction
from pipeline.processes import dead_here, namespace
from pipeline.records import utcnow

__all__ = ["Leases", "default_holder"]


def default_holder() -> str:
    """``host:pid:random:namespace``, unique per process and per service object; the namespace tells another
    process whether the pid is one it can check (:mod:`pipeline.processes`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{namespace()}"


def _abandoned(holder: str) -> bool:
    """Whether ``holder`` is a process of this namespace that is gone (an earlier release's name: unknown)."""
    parts = holder.split(":")
    return len(parts) == 4 and dead_here(where=parts[3], pid=parts[1])


class Leases:
    """Acquire, complete and release named leases in the metadata database."""

    def __init__(self, engine: Engine, holder: str | None = None) -> None:
        self.engine = engine
        self.holder = holder or default_holder()

    def acquire(self, name: str, ttl: timedelta, *, now: datetime | None = None) -> bool:
        """Take ``name`` for ``ttl``; False when someone holds it or it was completed.

        :raises StoreUnavailable: the database cannot be reached
        """
        now = now or utcnow()
        values = {"holder": self.holder, "expires_at": now + ttl, "completed_at": None}
        with transaction(self.engine, f"lease {name!r}") as conn:
            insert = insert_ignoring_duplicates(self.engine, leases).values(name=name, **values)
            if conn.execute(insert.returning(leases.c.name)).first() is not None:
                return True
            # someone had it: take it over only if they abandoned it (it expired, or they died on this host)
            holder = conn.scalar(select(leases.c.holder).where(leases.c.name == name))
            taken_over = (
                leases.c.holder == holder if holder is not None and _abandoned(holder) else leases.c.expires_at <= now
            )
            result = conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.completed_at.is_(None), taken_over)
                .values(**values)
            )
        return result.rowcount == 1

    def held_by(self, name: str) -> tuple[str, datetime] | None:
        """Who holds ``name`` unfinished, and until when; None when nobody does."""
        with transaction(self.engine, f"lease {name!r}") as conn:
            held = conn.execute(
                select(leases.c.holder, leases.c.expires_at).where(
                    leases.c.name == name, leases.c.completed_at.is_(None)
                )
            ).first()
        return None if held is None else (held.holder, held.expires_at)

    def complete(self, name: str, *, now: datetime | None = None) -> None:
        """Mark the work done: the lease is never granted again (until pruned)."""
        with transaction(self.engine, f"lease {name!r}") as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.holder == self.holder)
                .values(completed_at=now or utcnow())
            )

    def release(self, name: str) -> None:
        """Give the lease up unfinished, so that another holder may do the work now."""
        with transaction(self.engine, f"lease {name!r}") as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == self.holder))

    def prune(self, older_than: datetime) -> int:
        """Forget completed leases finished before ``older_than``; returns how many."""
        with transaction(self.engine, "lease pruning") as conn:
            result = conn.execute(
                delete(leases).where(leases.c.completed_at.is_not(None), leases.c.completed_at < older_than)
            )
        return result.rowcount
