"""Schedules: workflows started on an interval or a cron expression, declared in Python.

A :class:`Schedule` is a validated value; register it with :meth:`saga.Registry.add_schedule`
(or :meth:`saga.Saga.schedule`). The relay fires its slots (:mod:`saga.scheduler`); this module
is the pure part: which instants are slots, and which due slots one firing starts. Nothing
here reads a clock or the database, so it is tested with a fake clock.

Slots are UTC instants. An interval's slots are whole multiples of it since the UNIX epoch
(``every=timedelta(minutes=5)`` fires at :00, :05, ...), so every relay computes the same
ones. A cron expression's slots are the minutes it matches (:mod:`saga.cron`).

Catch-up, when slots were missed (no relay ran, or all were busy):

- ``"skip"`` (the default): only the most recent due slot fires; the older ones are skipped.
- ``"all"``: every missed slot fires, oldest first, but at most ``max_catch_up`` of them (the
  most recent ones; the older are skipped), 100 by default.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from saga.codec import dumps, problem
from saga.cron import Cron, CronError
from saga.errors import ScheduleError

if TYPE_CHECKING:
    from saga.definition import Workflow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""Where interval slots are counted from."""
CATCH_UP = ("skip", "all")
"""The catch-up policies."""
MAX_CATCH_UP_LIMIT = 1000
"""The highest ``max_catch_up`` a schedule may declare."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_US = timedelta(microseconds=1)


def slot_key(name: str, slot: datetime) -> str:
    """The business key of the run a schedule's slot starts: ``schedule:<name>:<slot>`` (ISO
    8601, UTC). One slot has one key, so a slot fired twice finds the run it started."""
    return f"schedule:{name}:{slot.astimezone(UTC).isoformat()}"


@dataclass(frozen=True)
class Firing:
    """What one firing of a schedule does, given its next unfired slot and the time."""

    slots: tuple[datetime, ...]
    """The slots to start, oldest first (none when the next slot is not due yet)."""
    skipped: int
    """Due slots skipped under the catch-up policy."""
    next_slot: datetime
    """The schedule's next unfired slot afterwards."""


@dataclass(frozen=True, init=False)
class Schedule:
    """Start ``workflow`` (a :class:`~saga.Workflow` or a registered workflow's name) with
    ``input`` on every slot: ``every`` (a ``timedelta``, or seconds; at least one second) or
    ``cron`` (five fields, UTC), exactly one of them. ``catch_up`` says what happens to slots
    missed while no relay ran (``"skip"`` or ``"all"``, see :mod:`saga.schedules`). Each slot
    starts one run, whatever the number of relays, under the business key
    :func:`slot_key`. A wrong declaration raises :class:`~saga.errors.ScheduleError` naming
    the schedule."""

    name: str
    workflow: str
    every: timedelta | None
    cron: Cron | None
    input: Any
    catch_up: str
    max_catch_up: int
    definition: Workflow | None = field(compare=False, repr=False)
    """The workflow object when one was given (registered with the schedule)."""

    def __init__(
        self,
        name: str,
        workflow: Workflow | str,
        *,
        every: timedelta | float | None = None,
        cron: str | None = None,
        input: Any = None,
        catch_up: str = "skip",
        max_catch_up: int = 100,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ScheduleError(
                name, "the name must be 1-100 letters, digits or '_.:-', starting with a "
                "letter or digit",
            )
        wf_name = workflow if isinstance(workflow, str) else getattr(workflow, "name", None)
        if not isinstance(wf_name, str) or not wf_name:
            raise ScheduleError(name, f"workflow must be a Workflow or its name, got {workflow!r}")
        if (every is None) == (cron is None):
            raise ScheduleError(name, "give exactly one of every= or cron=")
        interval: timedelta | None = None
        parsed: Cron | None = None
        if every is not None:
            interval = _interval(name, every)
        else:
            assert cron is not None  # one of the two is given (checked above)
            try:
                parsed = Cron.parse(cron)
            except CronError as exc:
                raise ScheduleError(name, f"cron: {exc}") from None
        if catch_up not in CATCH_UP:
            raise ScheduleError(name, f"catch_up must be 'skip' or 'all', got {catch_up!r}")
        if (
            not isinstance(max_catch_up, int) or isinstance(max_catch_up, bool)
            or not 1 <= max_catch_up <= MAX_CATCH_UP_LIMIT
        ):
            raise ScheduleError(
                name, f"max_catch_up must be a whole number 1-{MAX_CATCH_UP_LIMIT}, "
                f"got {max_catch_up!r}",
            )
        found = problem(input, "input")
        if found:
            raise ScheduleError(name, f"{found[1]} at {found[0]}")
        for attr, value in (
            ("name", name), ("workflow", wf_name), ("every", interval), ("cron", parsed),
            ("input", input), ("catch_up", catch_up), ("max_catch_up", max_catch_up),
            ("definition", None if isinstance(workflow, str) else workflow),
        ):
            object.__setattr__(self, attr, value)

    @property
    def spec(self) -> str:
        """When it fires, as stored and listed: ``every 300s`` or ``cron */5 * * * *``."""
        if self.every is not None:
            return f"every {self.every.total_seconds():g}s"
        assert self.cron is not None
        return f"cron {self.cron.expression}"

    @property
    def input_json(self) -> str:
        """The input as JSON text (checked storable when declared)."""
        return dumps(self.input)

    def next_slot(self, after: datetime) -> datetime:
        """The first slot strictly after ``after`` (an aware datetime)."""
        if after.tzinfo is None:
            raise ValueError("schedule times must be aware datetimes (UTC)")
        if self.cron is not None:
            return self.cron.next_after(after)
        step = self._step_us()
        index = (after - EPOCH) // _US // step + 1
        return EPOCH + index * step * _US

    def slots(self, start: datetime, until: datetime) -> Iterator[datetime]:
        """The slots from ``start`` (included when it is one) to ``until`` (included)."""
        slot = self.next_slot(start - _US)
        while slot <= until:
            yield slot
            slot = self.next_slot(slot)

    def plan(self, next_slot: datetime, now: datetime) -> Firing:
        """What firing at ``now`` does when ``next_slot`` is the oldest unfired slot: the due
        slots (``next_slot`` up to ``now``) the catch-up policy starts, how many it skips, and
        the next unfired slot after them."""
        keep = 1 if self.catch_up == "skip" else self.max_catch_up
        if next_slot > now:
            return Firing((), 0, next_slot)
        if self.every is not None:
            # Counted, not stepped through: a long downtime of a short interval is many slots.
            step = self._step_us()
            first = -(-((next_slot - EPOCH) // _US) // step)
            last = (now - EPOCH) // _US // step
            due = last - first + 1
            fire = range(max(first, last - keep + 1), last + 1)
            slots = tuple(EPOCH + i * step * _US for i in fire)
            return Firing(slots, due - len(slots), EPOCH + (last + 1) * step * _US)
        recent: deque[datetime] = deque(maxlen=keep)
        due = 0
        for slot in self.slots(next_slot, now):
            recent.append(slot)
            due += 1
        return Firing(tuple(recent), due - len(recent), self.next_slot(now))

    def _step_us(self) -> int:
        assert self.every is not None
        return self.every // _US


def _interval(name: str, every: timedelta | float) -> timedelta:
    if isinstance(every, bool) or not isinstance(every, timedelta | int | float):
        raise ScheduleError(name, f"every must be a timedelta or seconds, got {every!r}")
    try:
        interval = every if isinstance(every, timedelta) else timedelta(seconds=every)
    except (OverflowError, ValueError):
        interval = timedelta(0)  # nan or infinite: refused below
    if interval < timedelta(seconds=1) or interval > timedelta(days=3660):
        raise ScheduleError(name, f"every must be 1 second to 10 years, got {every!r}")
    return interval
