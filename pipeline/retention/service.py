"""The retention service: retention passes on a cron, deletion requests on an interval.

The requests job also anchors the audit chain in the witness once the newest
checkpoint is an hour old (passes and erasures write one anyway).

APScheduler 3's :class:`BlockingScheduler` keeps its jobs in the metadata
database, so a restarted service resumes the stored schedule and a pass missed
during downtime runs once (``coalesce``) when the service is back. Jobs never
overlap within a process (``max_instances=1``); across processes, APScheduler
does not coordinate schedulers sharing a job store, so each run first takes a
database lease named after the job and its scheduled time: of several services
on one database, one runs a given slot and the others skip it.

APScheduler 3 does not tell a job its scheduled time, so the service's executor
adds it (and the service) to the job's arguments when it submits a run.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import undefined
from sqlalchemy import inspect, select

from pipeline.db import APSCHEDULER_TABLE, transaction
from pipeline.records import utcnow
from pipeline.retention.enforcer import enforce
from pipeline.retention.lease import Leases
from pipeline.retention.requests import process_pending
from pipeline.retention.schedule import retention_trigger
from pipeline.runtime import Pipeline

__all__ = ["RetentionService"]

logger = logging.getLogger(__name__)

#: longest a run may take before another service may take its slot over
RUN_LEASE = timedelta(hours=1)
#: a late run still does its job (cutoffs come from the time it runs), so allow it
#: this late; coalescing turns any number of missed slots into one run
MISFIRE_GRACE = {"retention": timedelta(days=1), "requests": timedelta(hours=1)}
#: the audit chain's head is anchored in the witness at least this often
CHECKPOINT_EVERY = timedelta(hours=1)
#: completed slot leases are kept this long (longer than any grace), then pruned
LEASE_MEMORY = timedelta(days=7)
#: interval slots are counted from here, so every service has the same slots
INTERVAL_ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Run:
    """One scheduled run as this service saw it."""

    job: str
    slot: datetime
    outcome: str  # "ran" or "skipped" (another service holds or finished the slot)


@dataclass
class _Submitted:
    """The parts of an APScheduler Job that its ``run_job`` reads, with the slot bound in."""

    id: str
    name: str
    misfire_grace_time: int | None
    _jobstore_alias: str
    func: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


class _SlotExecutor(ThreadPoolExecutor):
    """A thread pool that hands each run its scheduled time and the service."""

    def __init__(self, service: RetentionService) -> None:
        super().__init__(max_workers=2)
        self._service = service

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        kwargs = {**job.kwargs, "service": self._service, "slot": run_times[-1]}
        run = _Submitted(job.id, job.name, job.misfire_grace_time, job._jobstore_alias, job.func, job.args, kwargs)
        super()._do_submit_job(run, run_times)


def scheduled(job: str, **bound: Any) -> None:
    """The stored job; the executor binds ``service`` and ``slot`` when it submits a run."""
    bound["service"].run_job(job, bound["slot"])


class RetentionService:
    """The two jobs, their scheduler and the leases that keep runs unique.

    ``holder`` names this service in the leases table (default: host, pid and a
    random suffix); ``jobstore_table`` is APScheduler's table in the metadata
    database, shared by every service that should follow one schedule.
    """

    def __init__(self, pipeline: Pipeline, *, holder: str | None = None, jobstore_table: str = APSCHEDULER_TABLE):
        self.pipeline = pipeline
        self.leases = Leases(pipeline.keyring.engine, holder)
        self.history: deque[Run] = deque(maxlen=200)
        self._jobstore = SQLAlchemyJobStore(engine=pipeline.keyring.engine, tablename=jobstore_table)
        self._executor = _SlotExecutor(self)
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            jobstores={"default": self._jobstore},
            executors={"default": self._executor},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        settings = pipeline.settings
        cron = retention_trigger(settings.retention_cron)
        interval = IntervalTrigger(seconds=settings.requests_interval, start_date=INTERVAL_ANCHOR, timezone=UTC)
        for job, trigger, title in (
            ("retention", cron, f"retention pass ({settings.retention_cron})"),
            ("requests", interval, f"deletion requests (every {settings.requests_interval:g} s)"),
        ):
            self.scheduler.add_job(
                scheduled,
                trigger,
                id=job,
                name=title,
                kwargs={"job": job},
                misfire_grace_time=int(MISFIRE_GRACE[job].total_seconds()),
                replace_existing=True,
                next_run_time=self._stored_next_run(job),
            )

    def _stored_next_run(self, job: str) -> datetime | Any:
        """When an earlier service left ``job`` due, if that has passed: a slot missed while down still runs.
        A time still to come is the old schedule's: the trigger configured now computes the next one."""
        table = self._jobstore.jobs_t
        with transaction(self.pipeline.keyring.engine, "reading the stored schedule") as conn:
            if not inspect(conn).has_table(table.name):
                return undefined
            timestamp = conn.scalar(select(table.c.next_run_time).where(table.c.id == job))
        if timestamp is None or timestamp > utcnow().timestamp():
            return undefined
        return datetime.fromtimestamp(timestamp, UTC)

    def run_job(self, job: str, slot: datetime) -> None:
        """Run one slot of a job under its lease; a slot another service took is skipped."""
        name = f"{job}@{slot.astimezone(UTC).isoformat()}"
        if not self.leases.acquire(name, RUN_LEASE):
            logger.info("%s: another service has this slot; skipped", name)
            self.history.append(Run(job, slot, "skipped"))
            return
        try:
            if job == "retention":
                enforce(self.pipeline)  # each step runs on its own; failed ones are logged, audited, reported
                self.leases.prune(utcnow() - LEASE_MEMORY)
            else:
                try:
                    process_pending(self.pipeline, leases=self.leases)
                finally:  # the chain is anchored even when the erasures fail
                    newest = self.pipeline.audit.newest_checkpoint()
                    if newest is None or utcnow() - newest.time >= CHECKPOINT_EVERY:
                        self.pipeline.audit.checkpoint()
        except BaseException:
            self.leases.release(name)  # let another service (or the next slot) retry
            raise
        self.leases.complete(name)
        self.history.append(Run(job, slot, "ran"))
        logger.info("%s: done", name)

    def run(self, *, handle_signals: bool = False) -> None:
        """Run until :meth:`stop` (or, with ``handle_signals``, SIGTERM/SIGINT).

        Stopping waits for a run in progress to finish, so no pass stops half way.
        """
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop())
        self.scheduler.start()
        self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """Stop scheduling; :meth:`run` returns once a run in progress is done."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
