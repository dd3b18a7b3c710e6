"""Since when the control plane has listened without a gap: a cluster's silence counts from then.

A cluster is lost after ``pipeline.server.cluster-lost-after`` with nothing heard, but nothing is
heard while no ``serve`` listens: an outage longer than that made every live cluster lost, and the
batches its plugin spooled meanwhile, observed after that loss, were refused for good. So each
``serve`` notes every sweep period that it listens (two rows of the leases table, which the
retention service's pruning leaves alone), and a gap of more than :data:`GAP_PERIODS` periods
starts a new run. Silence counts from the later of a cluster's last contact and the run's start;
while no ``serve`` listens, nothing is found lost. Where no ``serve`` ever noted itself (a control
plane embedded in a process, tests), every moment counts, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update

from pipeline.db import insert_ignoring_duplicates, leases, reading, transaction

__all__ = ["GAP_PERIODS", "Listening", "listening", "note_listening", "sweep_period"]

#: sweep periods without a note after which the control plane counts as having stopped listening
GAP_PERIODS = 3
_SINCE = "control-plane.listening-since"
_LAST = "control-plane.listening"


def sweep_period(lost_after: float) -> float:
    """Seconds between two looks for lost clusters (and notes that ``serve`` listens): a quarter of
    ``cluster-lost-after``, at most a minute."""
    return min(60.0, max(0.5, lost_after / 4))


@dataclass(frozen=True)
class Listening:
    """The control plane's current run: its start and its latest note (``None``: never noted)."""

    since: datetime | None
    last: datetime | None

    def silent_from(self, heard: datetime, now: datetime, gap: timedelta) -> datetime | None:
        """When a cluster last heard of at ``heard`` began to be silent while someone listened;
        ``None`` while nobody listens (an outage: no cluster can be heard)."""
        if self.last is not None and self.last < now - gap:
            return None
        return heard if self.since is None else max(heard, self.since)


def listening(engine: Engine) -> Listening:
    """The run as the leases table holds it."""
    with reading(engine, "reading when the control plane listened") as conn:
        rows = conn.execute(select(leases.c.name, leases.c.expires_at).where(leases.c.name.in_((_SINCE, _LAST))))
        found = {name: at for name, at in rows}
    return Listening(found.get(_SINCE), found.get(_LAST))


def note_listening(engine: Engine, holder: str, now: datetime, gap: timedelta) -> None:
    """Note that a ``serve`` listens at ``now``; after a gap longer than ``gap`` a new run starts at ``now``."""
    with transaction(engine, "noting that the control plane listens") as conn:
        last = conn.execute(select(leases.c.expires_at).where(leases.c.name == _LAST)).scalar()
        rows = [{"name": name, "holder": holder, "expires_at": now} for name in (_SINCE, _LAST)]
        conn.execute(insert_ignoring_duplicates(engine, leases), rows)  # the first note of all
        if last is not None and last < now - gap:
            conn.execute(update(leases).where(leases.c.name == _SINCE).values(holder=holder, expires_at=now))
        later = update(leases).where(leases.c.name == _LAST, leases.c.expires_at < now)
        conn.execute(later.values(holder=holder, expires_at=now))
