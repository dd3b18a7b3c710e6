"""The retention schedule (``pipeline.service.retention-cron``): when passes run, and which one is due.

A record reaches its limit between two passes and is removed by the next one. The
report counts it overdue only once a pass scheduled after its limit should have
finished (the pass that should have removed it did not).
"""

from __future__ import annotations

import re
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
_DAY_NUMBERS = {name: number for number, name in enumerate(_DAYS[:7])}
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
    for field, (name, low, high, names) in zip(fields, _OTHER_FIELDS, strict=False):
        _check_field(field, name, low, high, names, cron)
    either = not (fields[2].startswith("*") or fields[4].startswith("*"))  # as written: crontab's "restricted"
    fields[4] = _weekdays(fields[4], cron)  # */2 is restricted to no day, and reads as sun,tue,thu,sat
    if not either:
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


def _weekdays(field: str, cron: str) -> str:
    """A crontab day-of-week field as the day names it means (``*`` alone stays as it is).

    Read here in full, as crontab reads it (0 to 7 or the days' first three letters, ranges low to high, steps
    from 1): APScheduler reads a part by its prefix (``mon-fri/`` ran as ``mon-fri``, ``1-`` as ``1``) and
    numbers days from Monday (``sat-sun`` ran), so what it took of a part crontab refuses ran on days of its own.

    :raises ConfigError: naming the part
    """
    if field == "*":
        return field
    names: list[str] = []
    for part in field.split(","):
        span = _span(part, _DAY_PART, 0, 7, _DAY_NUMBERS)
        if span is None:
            raise _no_days(cron, part)
        first, last, step = span
        names += [_DAYS[day] for day in range(first, last + 1, step)]
    return ",".join(dict.fromkeys(names))


def _part_pattern(number: str) -> re.Pattern[str]:
    """One part of a field: ``*``, a value or a range of values (a number, or a name's first three letters),
    and a step."""
    value = rf"(?:{number}|[A-Za-z]{{3}})"
    return re.compile(rf"(?P<span>\*|(?P<first>{value})(?:-(?P<last>{value}))?)(?:/(?P<step>[0-9]+))?")


_PART, _DAY_PART = _part_pattern("[0-9]+"), _part_pattern("[0-7]")
_MONTHS = {name: number for number, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
    "sep", "oct", "nov", "dec"), start=1)}  # fmt: skip
#: the fields before the day of the week: name, range, and the names crontab takes for values
_OTHER_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
)


def _check_field(field: str, name: str, low: int, high: int, names: dict[str, int], cron: str) -> None:
    """A field as crontab reads it: APScheduler also takes a prefix (``jan-`` as ``jan``) and forms of its own
    (``last``), which ran passes on days crontab refuses to schedule.

    :raises ConfigError: naming the part
    """
    for part in field.split(","):
        if _span(part, _PART, low, high, names) is None:
            raise ConfigError(
                f"pipeline.service.retention-cron: {cron!r}: {name} {part!r} is no crontab value, range or step "
                f"({low}-{high}, low to high, steps from 1)"
            )


def _span(
    part: str, pattern: re.Pattern[str], low: int, high: int, names: dict[str, int]
) -> tuple[int, int, int] | None:
    """The first and last value and the step a part of a field names, as crontab reads it (``*``: the field's
    range; a value with a step: from it to the field's end); None for a part crontab refuses."""
    match = pattern.fullmatch(part)
    if match is None:
        return None
    first: int | None
    last: int | None
    if match["span"] == "*":
        first, last = low, high
    else:
        first = _value(match["first"], names)
        last = _value(match["last"], names) if match["last"] else (high if match["step"] else first)
    step = int(match["step"] or 1)
    if first is None or last is None or not low <= first <= last <= high or step == 0:
        return None
    return first, last, step


def _value(text: str, names: dict[str, int]) -> int | None:
    """A field's value from its number or its name (a month's, a day's first three letters); None for neither."""
    return int(text) if text.isdigit() else names.get(text.lower())


def _no_days(cron: str, part: str) -> ConfigError:
    return ConfigError(
        f"pipeline.service.retention-cron: {cron!r}: day of week {part!r} is no crontab day, range or step "
        "(0-7 or sun-sat, low to high, steps from 1)"
    )


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
