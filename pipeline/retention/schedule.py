"""The retention schedule (``pipeline.service.retention-cron``): when passes run, and which one is due.

A record reaches its limit between two passes and is removed by the next one. The
report counts it overdue only once a pass scheduled after its limit should have
finished (the pass that should have removed it did not).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from pipeline.errors import ConfigError

__all__ = ["RUN_ALLOWANCE", "retention_trigger", "since_last_pass"]

#: how long a scheduled pass is given to finish before what it should remove counts as overdue
RUN_ALLOWANCE = timedelta(minutes=10)
#: crontab's day-of-week numbers, 0 and 7 both Sunday; APScheduler 3's ``from_crontab`` reads 0 as Monday
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NUMBERS = {name: str(number) for number, name in enumerate(_DAYS[:7])}
#: how far back a last pass is looked for: a schedule that ran none within a year waits for nothing
_LOOK_BACK = (timedelta(hours=1), timedelta(days=1), timedelta(days=8), timedelta(days=32), timedelta(days=367))


def retention_trigger(cron: str) -> BaseTrigger:
    """The crontab expression as a trigger, its days read as crontab reads them: ``1-5`` is Monday to Friday
    (APScheduler alone ran such passes Tuesday to Saturday), and with both a day of the month and a day of
    the week restricted, either one matching runs a pass (APScheduler alone needed both).

    :raises ConfigError: naming ``pipeline.service.retention-cron``
    """
    fields = cron.split()
    if len(fields) != 5:
        return _crontab(cron, cron)
    fields[4] = _weekdays(fields[4])
    if fields[2].startswith("*") or fields[4].startswith("*"):  # as cron tells "restricted": not starting with *
        return _crontab(" ".join(fields), cron)
    by_month_day, by_week_day = (
        " ".join([*fields[:2], *days]) for days in ((fields[2], fields[3], "*"), ("*", *fields[3:]))
    )
    return OrTrigger([_crontab(by_month_day, cron), _crontab(by_week_day, cron)])


def _crontab(expression: str, configured: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError as exc:
        raise ConfigError(f"pipeline.service.retention-cron: {configured!r}: {exc}") from exc


def _weekdays(field: str) -> str:
    """A crontab day-of-week field as the day names it means (``*`` alone stays as it is); a part crontab
    refuses is left as written, for APScheduler to refuse with its own reason (5-1, 9, */0, 1-5/, ²)."""
    names: list[str] = []
    for part in field.split(","):
        span, slash, step = part.partition("/")
        first, _, last = (_DAY_NUMBERS.get(end.lower(), end) for end in span.partition("-"))  # mon-3 is 1-3
        numbers = ("0", "7") if span == "*" else (first, last or (first if not slash else "7"))
        readable = all(_digits(n) and int(n) <= 7 for n in numbers) and int(numbers[0]) <= int(numbers[1])
        if not readable or (span == "*" and not slash) or (slash and not (_digits(step) and int(step))):
            names.append(part)
            continue
        days = range(int(numbers[0]), int(numbers[1]) + 1, int(step) if slash else 1)
        names += [_DAYS[day] for day in days]
    return ",".join(dict.fromkeys(names))


def _digits(text: str) -> bool:
    """Whether ``text`` is a number as crontab writes one (``²`` is a digit to Python, and no number to ``int``)."""
    return text.isascii() and text.isdigit()


def since_last_pass(cron: str, at: datetime) -> timedelta:
    """How long before ``at`` the last pass the schedule should have finished by then started
    (:data:`RUN_ALLOWANCE` given to each); none within a year: no time (nothing waits for a pass)."""
    trigger, due = retention_trigger(cron), at - RUN_ALLOWANCE
    for window in _LOOK_BACK:
        fire = trigger.get_next_fire_time(None, due - window)
        if fire is None or fire > due:
            continue
        while (following := trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))) and following <= due:
            fire = following
        return at - fire
    return timedelta(0)
