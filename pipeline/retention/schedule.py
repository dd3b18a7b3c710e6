"""The retention schedule (``pipeline.service.retention-cron``): when passes run, and how far apart.

A record reaches its limit between two passes and is removed by the next one, so
it may outlive its limit by one interval of this schedule; the report counts a
record overdue only past that (the pass that should have removed it did not).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from pipeline.errors import ConfigError

__all__ = ["retention_interval", "retention_trigger"]


def retention_trigger(cron: str) -> CronTrigger:
    """:raises ConfigError: naming ``pipeline.service.retention-cron``"""
    try:
        return CronTrigger.from_crontab(cron, timezone=UTC)
    except ValueError as exc:
        raise ConfigError(f"pipeline.service.retention-cron: {cron!r}: {exc}") from exc


def retention_interval(cron: str, at: datetime) -> timedelta:
    """The time between the first two passes the schedule runs after ``at``."""
    trigger = retention_trigger(cron)
    first = trigger.get_next_fire_time(None, at)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    return second - first
