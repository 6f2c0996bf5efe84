"""Five-field cron expressions, parsed and stepped through in pure Python (no I/O, no clock).

``minute hour day-of-month month day-of-week``, each field one of ``*``, a number, a range
``a-b``, a step ``*/n`` or ``a-b/n`` (or ``a/n``: from ``a`` to the field's end), or a list of
those separated by commas. Months and week days may be named (``jan``-``dec``,
``sun``-``sat``, any case); Sunday is ``0`` or ``7``. As in Vixie cron, when both the day of
the month and the day of the week are restricted (neither starts with ``*``), a day matching
either one matches. Times are UTC: a slot is an aware ``datetime`` in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

_MONTHS = {m: i + 1 for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
)}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}

_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    # name, lowest, highest, names
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_SEARCH_YEARS = 5
"""How far ahead a next time is looked for (an expression such as ``0 0 31 2 *`` never
matches: it is refused when parsed, by looking this far)."""


class CronError(ValueError):
    """A cron expression that cannot be parsed, or never matches; the message says why."""


def _number(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise CronError(f"{name}: {text!r} is not a number" + (
                f" or a name ({', '.join(names)})" if names else ""
            ))
        value = int(text)
    if not low <= value <= high:
        raise CronError(f"{name}: {value} is out of range {low}-{high}")
    return value


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{name}: empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{name}: step {step_text!r} must be a whole number >= 1")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _number(first, name, low, high, names)
            end = _number(last, name, low, high, names)
            if start > end:
                raise CronError(f"{name}: range {base!r} runs backwards")
        else:
            start = _number(base, name, low, high, names)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression: the matching values of each field."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """Days of the week, Sunday ``0`` (``7`` is folded into ``0``)."""
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Parse ``expression``; :class:`CronError` says what is wrong with a bad one."""
        if not isinstance(expression, str):
            raise CronError(f"a cron expression must be a string, got {expression!r}")
        parts = expression.split()
        if len(parts) != 5:
            raise CronError(
                f"{expression!r} has {len(parts)} fields; cron takes 5: "
                "minute hour day-of-month month day-of-week"
            )
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        cron = cls(
            " ".join(parts), sets[0], sets[1], sets[2], sets[3], weekdays,
            days_restricted=not parts[2].startswith("*"),
            weekdays_restricted=not parts[4].startswith("*"),
        )
        if cron._next_day(date(2000, 1, 1), _SEARCH_YEARS * 366) is None:
            raise CronError(f"{expression!r} never matches a date")
        return cron

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_month or in_week
        return in_month and in_week

    def _next_day(self, start: date, limit: int) -> date | None:
        day = start
        for _ in range(limit):
            if self._day_matches(day):
                return day
            day += timedelta(days=1)
        return None

    def next_after(self, when: datetime) -> datetime:
        """The first matching minute strictly after ``when`` (an aware datetime), in UTC."""
        if when.tzinfo is None:
            raise ValueError("cron times must be aware datetimes (UTC)")
        t = when.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = _SEARCH_YEARS * 366
        while True:
            day = self._next_day(t.date(), limit)
            if day is None:  # pragma: no cover - parse() refused expressions that never match
                raise CronError(f"{self.expression!r} has no time after {when.isoformat()}")
            if day != t.date():
                t = datetime.combine(day, time(), UTC)
            for hour in sorted(h for h in self.hours if h >= t.hour):
                first = t.minute if hour == t.hour else 0
                minute = next((m for m in sorted(self.minutes) if m >= first), None)
                if minute is not None:
                    return t.replace(hour=hour, minute=minute)
            t = datetime.combine(t.date() + timedelta(days=1), time(), UTC)
