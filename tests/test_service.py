"""The retention service: leases, and APScheduler driven by a frozen clock."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import freezegun
import pandas  # noqa: F401 - pyarrow imports it lazily; it must not load under freezegun
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, EVENT_SCHEDULER_STARTED
from conftest import make_record

from pipeline.db import create_schema, engine_for
from pipeline.processes import namespace
from pipeline.retention.lease import Leases
from pipeline.retention.requests import file_request, get_request
from pipeline.retention.service import RetentionService
from pipeline.runtime import Pipeline

T0 = datetime(2026, 3, 1, 10, 2, 30, tzinfo=UTC)
JOB_EVENTS = EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED


@pytest.fixture
def clock():  # noqa: ANN201
    """A frozen clock that the scheduler's threads see too.

    freezegun hands out real time to callers up to five frames below a module it
    ignores, and it ignores ``threading`` by default: a scheduler thread would see
    the real date. Un-ignore it for the test.
    """
    saved = list(freezegun.config.settings.default_ignore_list)
    freezegun.configure(default_ignore_list=[m for m in saved if m != "threading"])
    try:
        with freezegun.freeze_time(T0) as frozen:
            yield frozen
    finally:
        freezegun.configure(default_ignore_list=saved)


class Driver:
    """Runs a service's BlockingScheduler in a thread; wakes it and collects job events."""

    def __init__(self, service: RetentionService, events: queue.Queue | None = None) -> None:
        self.service = service
        self.events = events if events is not None else queue.Queue()
        started = threading.Event()
        service.scheduler.add_listener(lambda e: self.events.put(e), JOB_EVENTS)
        service.scheduler.add_listener(lambda e: started.set(), EVENT_SCHEDULER_STARTED)
        self.thread = threading.Thread(target=service.run, daemon=True)
        self.thread.start()
        assert started.wait(30)

    def wake(self, expected: int) -> list[tuple[str, datetime]]:
        """Wake the scheduler and wait for ``expected`` job events: (job, scheduled time)."""
        self.service.scheduler.wakeup()
        got = [self.events.get(timeout=30) for _ in range(expected)]
        assert all(e.code == EVENT_JOB_EXECUTED for e in got), [getattr(e, "exception", e) for e in got]
        return sorted((e.job_id, e.scheduled_run_time) for e in got)

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.events.empty()  # no run beyond those waited for


def at(hour: int, minute: int = 0) -> datetime:
    return T0.replace(hour=hour, minute=minute, second=0)


def _passes(pipeline: Pipeline) -> int:
    return sum(e.action == "retention.pass" for e in pipeline.audit.entries())


@pytest.fixture(params=["sqlite", "postgresql"])
def metadata_engine(request, tmp_path):  # noqa: ANN001, ANN201
    url = f"sqlite:///{tmp_path}/meta.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = engine_for(url)
    create_schema(engine)
    return engine


def test_leases_grant_a_slot_once_and_an_abandoned_one_after_it_expires(metadata_engine) -> None:
    engine = metadata_engine
    a, b = Leases(engine, "a"), Leases(engine, "b")
    ttl = timedelta(minutes=10)
    assert a.acquire("retention@T", ttl, now=T0)
    assert not b.acquire("retention@T", ttl, now=T0)  # held
    a.complete("retention@T", now=T0)
    assert not b.acquire("retention@T", ttl, now=T0 + timedelta(days=2))  # done: never again
    assert a.acquire("requests@T", ttl, now=T0)  # holder dies without completing...
    assert not b.acquire("requests@T", ttl, now=T0 + timedelta(minutes=9))
    assert b.acquire("requests@T", ttl, now=T0 + timedelta(minutes=10))  # ...and b takes over
    b.release("requests@T")
    assert a.acquire("requests@T", ttl, now=T0 + timedelta(minutes=11))
    assert a.prune(T0 + timedelta(days=1)) == 1  # the completed retention slot


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(metadata_engine) -> None:
    """An erasure killed mid-way held its lease 10 minutes: enforce skipped it unsaid and erase retry failed.
    Only a process of this very PID namespace is judged by its id: a container sharing the hostname, or a
    machine of the same name, would take a running process for dead."""

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here, gone, ns = socket.gethostname(), ended.stdout.strip(), namespace()
    ttl = timedelta(minutes=10)
    holders = {
        "erasure:killed": f"{here}:{gone}:ab12cd34:{ns}",
        "erasure:running": f"{here}:{os.getpid()}:ef56ab78:{ns}",
        "erasure:other-namespace": f"{here}:{gone}:01234567:0123456789ab.4026531999",
        "erasure:earlier-release": f"{here}:{gone}:89abcdef",
        "erasure:elsewhere": "other-host:1:00000000:0123456789ab.4026531836",
    }
    for name, holder in holders.items():
        assert Leases(metadata_engine, holder).acquire(name, ttl, now=T0)
    taker = Leases(metadata_engine, "taker")
    soon = T0 + timedelta(seconds=1)
    assert [name for name in holders if taker.acquire(name, ttl, now=soon)] == ["erasure:killed"]
    assert taker.held_by("erasure:elsewhere") == (holders["erasure:elsewhere"], T0 + ttl)
    assert taker.acquire("erasure:elsewhere", ttl, now=T0 + ttl)  # expired


def test_the_hourly_pass_and_the_request_job_fire_when_due_and_coalesce_after_downtime(settings, clock) -> None:
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record(observed_at=T0 - timedelta(days=40))])
    request = file_request(pipeline, "acme")
    driver = Driver(RetentionService(pipeline))
    try:
        clock.move_to(at(10, 4))
        assert driver.wake(0) == []  # nothing due yet

        clock.move_to(at(10, 5))
        assert driver.wake(1) == [("requests", at(10, 5))]
        assert get_request(pipeline, request.request_id).state == "completed"
        assert _passes(pipeline) == 0

        clock.move_to(at(11, 0))  # requests missed 10:10 ... 10:55: one run, for the latest slot
        assert driver.wake(2) == [("requests", at(11)), ("retention", at(11))]
        assert _passes(pipeline) == 1
        assert list(pipeline.read_records("cloud_logging")) == []  # the 40-day-old record expired

        clock.move_to(at(14, 42))  # asleep for 3 hours: one pass, not three
        assert driver.wake(2) == [("requests", at(14, 40)), ("retention", at(14))]
        assert _passes(pipeline) == 2
    finally:
        driver.stop()
    assert sorted((r.job, r.slot, r.outcome) for r in driver.service.history) == [
        ("requests", at(10, 5), "ran"),
        ("requests", at(11), "ran"),
        ("requests", at(14, 40), "ran"),
        ("retention", at(11), "ran"),
        ("retention", at(14), "ran"),
    ]


def test_two_services_on_one_database_run_each_pass_once(settings, clock) -> None:
    """Worst case: each service keeps its own job table, so both submit every slot."""
    pipeline = Pipeline.open(settings, create=True)
    drivers = [
        Driver(RetentionService(pipeline, holder=name, jobstore_table=f"apscheduler_jobs_{name}"))
        for name in ("a", "b")
    ]
    try:
        for hour in (11, 12, 13):
            clock.move_to(at(hour))
            for driver in drivers:
                assert driver.wake(2) == [("requests", at(hour)), ("retention", at(hour))]
    finally:
        for driver in drivers:
            driver.stop()
    outcomes = Counter((r.job, r.slot, r.outcome) for d in drivers for r in d.service.history)
    for hour in (11, 12, 13):
        for job in ("retention", "requests"):
            assert outcomes[(job, at(hour), "ran")] == 1
            assert outcomes[(job, at(hour), "skipped")] == 1
    assert _passes(pipeline) == 3


def test_two_services_sharing_the_job_table_run_a_pass_once(settings, clock) -> None:
    """As deployed: whichever service submits a slot first runs it; the other skips or never sees it."""
    pipeline = Pipeline.open(settings, create=True)
    events: queue.Queue = queue.Queue()
    drivers = [Driver(RetentionService(pipeline, holder=name), events) for name in ("a", "b")]
    clock.move_to(at(11))
    for driver in drivers:
        driver.service.scheduler.wakeup()
    seen = set()
    while seen != {"retention", "requests"}:
        seen.add(events.get(timeout=30).job_id)
    for driver in drivers:
        driver.service.stop()
        driver.thread.join(30)
    ran = Counter((r.job, r.slot) for d in drivers for r in d.service.history if r.outcome == "ran")
    assert ran == {("retention", at(11)): 1, ("requests", at(11)): 1}
    assert _passes(pipeline) == 1


def test_a_restarted_service_runs_the_pass_it_missed_while_down_once(settings, clock) -> None:
    pipeline = Pipeline.open(settings, create=True)
    Driver(RetentionService(pipeline)).stop()  # stored: retention due 11:00, requests 10:05
    clock.move_to(at(13, 30))
    driver = Driver(RetentionService(pipeline))
    try:
        runs = [driver.events.get(timeout=30) for _ in range(2)]
        assert sorted((e.job_id, e.scheduled_run_time) for e in runs) == [
            ("requests", at(13, 30)),
            ("retention", at(13)),
        ]
    finally:
        driver.stop()
    assert _passes(pipeline) == 1


def test_a_changed_retention_schedule_applies_at_once_not_at_the_old_ones_next_slot(settings, clock) -> None:
    """A yearly schedule changed to one at five past each hour waited for New Year's Day."""
    import dataclasses

    yearly = Pipeline.open(dataclasses.replace(settings, retention_cron="0 0 1 1 *"), create=True)
    Driver(RetentionService(yearly)).stop()  # stored: retention due 2027-01-01
    driver = Driver(RetentionService(Pipeline.open(dataclasses.replace(settings, retention_cron="5 * * * *"))))
    try:
        assert driver.service.scheduler.get_job("retention").next_run_time == at(10, 5)
    finally:
        driver.stop()


@pytest.mark.parametrize(
    ("cron", "days"),
    [
        ("0 3 * * 1-5", "Mon Tue Wed Thu Fri"),
        ("0 3 * * 0,6", "Sat Sun"),
        ("0 3 * * 7", "Sun"),
        ("0 3 * * */3", "Wed Sat Sun"),
        ("0 3 * * mon-3", "Mon Tue Wed"),  # a name and a number: passes ran on Mondays only (r46)
    ],
)
def test_the_retention_cron_reads_days_of_the_week_as_crontab_does(cron: str, days: str) -> None:
    """APScheduler 3's ``from_crontab`` counts weekdays from Monday: ``1-5`` ran passes Tuesday to Saturday."""
    from pipeline.retention.schedule import retention_trigger

    trigger, fired, at = retention_trigger(cron), set(), datetime(2026, 3, 1, tzinfo=UTC)  # a Sunday
    for _ in range(7):
        at = trigger.get_next_fire_time(None, at + timedelta(seconds=1))
        fired.add(at.strftime("%a"))
    assert sorted(fired) == sorted(days.split())


@pytest.mark.parametrize(
    "field",
    ["*/0", "1/0", "1-5/0", "1/x", "1-5/", "1/", "\u00b2"]
    + ["mon-fri/", "mon/0", "mon-tue-wed", "1-", "sat-sun", "monday", "mon-xyz"],
)
def test_a_day_of_week_step_crontab_refuses_is_refused(field: str) -> None:
    """A step of 0 was read as 1: ``0 0 * * */0`` ran a pass every day where crontab refuses it (r44); an empty
    step was none, and ``²`` a traceback (r46); APScheduler read a day's name by its prefix, and numbered the days
    from Monday: ``mon-fri/`` ran as ``mon-fri``, ``1-`` as ``1``, ``sat-sun`` ran (r49)."""
    from pipeline.errors import ConfigError
    from pipeline.retention.schedule import retention_trigger

    with pytest.raises(ConfigError, match=rf"^pipeline\.service\.retention-cron: '0 0 \* \* {re.escape(field)}': "):
        retention_trigger(f"0 0 * * {field}")


@pytest.mark.parametrize(
    ("cron", "named"),
    [
        ("0 0 1 jan- *", "month 'jan-'"),
        ("0 0 1 feb-mar/ *", "month 'feb-mar/'"),
        ("0 0 last * *", "day of month 'last'"),
        ("0 0 0 * *", "day of month '0'"),
        ("60 0 * * *", "minute '60'"),
        ("0 0-24 * * *", "hour '0-24'"),
    ],
)
def test_a_field_crontab_refuses_is_refused_naming_it(cron: str, named: str) -> None:
    """APScheduler took a prefix of a month's part (``jan-`` ran on January's 1st) and forms of its own (``last``)
    that crontab refuses (r51)."""
    from pipeline.errors import ConfigError
    from pipeline.retention.schedule import retention_trigger

    with pytest.raises(
        ConfigError, match=rf"^pipeline\.service\.retention-cron: '{re.escape(cron)}': {re.escape(named)} is no"
    ):
        retention_trigger(cron)


def test_a_day_of_week_stepped_from_a_star_is_no_restriction_as_crontab_reads_it() -> None:
    """``*/2`` was read as the days it names, then taken as restricted: ``0 0 1 * */2`` ran every other day as well
    as on the 1st, where crontab runs it on a 1st that is one of those days (r49)."""
    from pipeline.retention.schedule import retention_trigger

    trigger, fired, at = retention_trigger("0 0 1 * */2"), [], datetime(2026, 12, 31, tzinfo=UTC)
    for _ in range(3):
        at = trigger.get_next_fire_time(None, at + timedelta(seconds=1))
        fired.append(at.strftime("%a %Y-%m-%d"))
    assert fired == ["Thu 2027-04-01", "Sat 2027-05-01", "Tue 2027-06-01"]


def test_a_retention_cron_restricting_both_day_fields_runs_on_either_as_crontab_does() -> None:
    """APScheduler needs both to match: ``0 3 1 * 1`` ran on a Monday that is the 1st only (months apart), and
    the report allowed a record that many months past its limit."""
    from pipeline.errors import ConfigError
    from pipeline.retention.schedule import retention_trigger

    trigger, fired, at = retention_trigger("0 3 1 * 1"), [], datetime(2026, 11, 25, tzinfo=UTC)
    for _ in range(4):
        at = trigger.get_next_fire_time(None, at + timedelta(seconds=1))
        fired.append(at.strftime("%a %d"))
    assert fired == ["Mon 30", "Tue 01", "Mon 07", "Mon 14"]
    with pytest.raises(ConfigError, match="'0 3 \\* \\* 5-1': day of week '5-1' is no crontab day, range or step"):
        retention_trigger("0 3 * * 5-1")  # named, not "Wrong number of fields"
