"""Firing schedule slots: what the relay does for the registry's schedules on each turn.

Each declared :class:`~saga.schedules.Schedule` has a row in ``schedules`` holding its next
unfired slot. Firing a due schedule is one transaction: lock its row (``FOR UPDATE SKIP
LOCKED``: a relay never waits for another), start the runs of the slots its catch-up policy
fires, each under the slot's business key (:func:`~saga.schedules.slot_key`), and advance the
row with an update guarded on the slot it read. A relay killed in the middle leaves the row
as it was, for the next relay to fire; two relays never both fire a slot. The business key is
a second guard: a slot whose run exists is not started again.

A new schedule's first slot is the first one after a relay first sees it; a schedule whose
``every`` or ``cron`` changed starts again from the first slot after the change is seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from saga import logs
from saga.codec import dumps
from saga.errors import SagaError
from saga.keys import KeyPolicy
from saga.schedules import Firing, Schedule, slot_key

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.scheduler")

Clock = Callable[[], datetime]
"""What tells the scheduler the time: an aware ``datetime`` (UTC) each call."""

REFRESH_INTERVAL = 10.0
"""Seconds between reads of the earliest next slot while none is due (another relay may have
fired, or a newer deploy changed a schedule)."""
ERROR_PAUSE = 5.0
"""Seconds a scheduler waits after a database error before it tries again (the database is
down, or not migrated to the schedules table yet): one log line per pause, not per turn."""

_DECLARE = """
INSERT INTO {schedules} AS s (name, workflow, spec, catch_up, next_slot)
SELECT x.name, x.workflow, x.spec, x.catch_up, x.next_slot
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS x(name text, workflow text, spec text, catch_up text, next_slot timestamptz)
ON CONFLICT (name) DO UPDATE
SET workflow = EXCLUDED.workflow, spec = EXCLUDED.spec, catch_up = EXCLUDED.catch_up,
    -- A changed spec starts from its own next slot; the slots of the old one are not owed.
    next_slot = CASE WHEN s.spec = EXCLUDED.spec THEN s.next_slot ELSE EXCLUDED.next_slot END,
    last_slot = CASE WHEN s.spec = EXCLUDED.spec THEN s.last_slot END,
    updated_at = now()
WHERE (s.workflow, s.spec, s.catch_up) IS DISTINCT FROM
      (EXCLUDED.workflow, EXCLUDED.spec, EXCLUDED.catch_up)
"""
_TAKE_DUE = """
SELECT name, next_slot FROM {schedules}
WHERE name = ANY(:names) AND next_slot <= :now
ORDER BY next_slot LIMIT 1
FOR UPDATE SKIP LOCKED
"""
_ADVANCE = """
UPDATE {schedules}
SET next_slot = :next_slot, last_slot = COALESCE(:last_slot, last_slot),
    last_run_id = COALESCE(CAST(:run_id AS uuid), last_run_id),
    fired = fired + :fired, skipped = skipped + :skipped, updated_at = now()
WHERE name = :name AND next_slot = :expected
RETURNING name
"""
_EARLIEST = "SELECT min(next_slot) FROM {schedules} WHERE name = ANY(:names)"


def system_clock() -> datetime:
    """The time now, in UTC."""
    return datetime.now(UTC)


class Scheduler:
    """Fires the due slots of the schedules in ``saga``'s registry (a relay has one)."""

    def __init__(self, saga: Saga, clock: Clock | None = None) -> None:
        self.saga = saga
        self.clock = clock or system_clock
        t = saga.tables
        self._declare = t.sql(_DECLARE)
        self._take_due = t.sql(_TAKE_DUE)
        self._advance = t.sql(_ADVANCE)
        self._earliest = t.sql(_EARLIEST)
        self._declared = False
        self._next_due: datetime | None = None
        self._refresh_at = 0.0
        self._paused_until = 0.0
        self._held: dict[str, float] = {}
        """Schedules whose start was refused, until when they are left alone."""

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The registry's schedules by name."""
        return {s.name: s for s in self.saga.registry.schedules}

    def declare(self) -> int:
        """Write the registry's schedules to ``schedules`` (new ones, and changes); how many
        rows changed."""
        now = self.clock()
        rows = [
            {"name": s.name, "workflow": s.workflow, "spec": s.spec, "catch_up": s.catch_up,
             "next_slot": s.next_slot(now).isoformat()}
            for s in self.schedules.values()
        ]
        if not rows:
            return 0
        with self.saga.engine.begin() as conn:
            changed = conn.execute(self._declare, {"rows": dumps(rows)}).rowcount
        self._declared = True
        return int(changed)

    def fire_due(self) -> int:
        """Fire every due slot now (each schedule in a transaction of its own); how many runs
        started."""
        schedules = self.schedules
        if not schedules:
            return 0
        if not self._declared:
            self.declare()
        started = 0
        now = time.monotonic()
        names = [n for n in schedules if self._held.get(n, 0.0) <= now]
        for _ in range(len(names)):  # each schedule fires once a call at most
            name: str | None = None
            try:
                with self.saga.engine.begin() as conn:
                    row = conn.execute(
                        self._take_due, {"names": names, "now": self.clock()}
                    ).mappings().first()
                    if row is None:
                        break
                    name = row["name"]
                    schedule = schedules[name]
                    firing, runs = self._fire(conn, schedule, row["next_slot"])
                started += sum(created for _, created in runs)
                self._log(schedule, firing, runs)  # once committed: a killed relay logs none
            except SagaError as exc:
                # A start refused (an input over Settings.max_input_bytes): nothing of the
                # firing is kept, the others go on, and this one is tried again after a pause
                # (one line per pause, not per turn of the relay).
                logs.event(log, logging.ERROR, f"schedule not fired: {exc}", schedule=name)
                if name is not None:
                    self._held[name] = time.monotonic() + ERROR_PAUSE
            if name is None:
                break
            names.remove(name)
        self._read_next_due()
        return started

    def _fire(
        self, conn: Connection, schedule: Schedule, expected: datetime
    ) -> tuple[Firing, list[tuple[str, bool]]]:
        """Start the slots' runs and advance the row, in the caller's transaction: the
        firing, and each slot's run id and whether it was created (not found by its key)."""
        firing = schedule.plan(expected, self.clock())
        runs: list[tuple[str, bool]] = []
        for slot in firing.slots:
            run = self.saga.start(
                conn, schedule.workflow, schedule.input, key=slot_key(schedule.name, slot),
                key_policy=KeyPolicy.RETURN_EXISTING,
            )
            runs.append((run.run_id, run.created))
        run_id = runs[-1][0] if runs else None
        advanced = conn.execute(
            self._advance,
            {
                "name": schedule.name, "expected": expected, "next_slot": firing.next_slot,
                "last_slot": firing.slots[-1] if firing.slots else None, "run_id": run_id,
                "fired": len(firing.slots), "skipped": firing.skipped,
            },
        ).first()
        if advanced is None:  # pragma: no cover - the row is locked: nobody else moved it
            raise RuntimeError(f"schedule {schedule.name!r} moved while locked")
        return firing, runs

    @staticmethod
    def _log(schedule: Schedule, firing: Firing, runs: list[tuple[str, bool]]) -> None:
        for slot, (run_id, created) in zip(firing.slots, runs, strict=True):
            logs.event(
                log, logging.INFO, "schedule fired" if created else "schedule slot had its run",
                schedule=schedule.name, workflow=schedule.workflow, slot=slot.isoformat(),
                run_id=run_id,
            )
        if firing.skipped:
            logs.event(
                log, logging.WARNING, f"schedule skipped {firing.skipped} missed slot(s)",
                schedule=schedule.name, catch_up=schedule.catch_up,
            )

    def _read_next_due(self) -> None:
        now = time.monotonic()
        names = [n for n in self.schedules if self._held.get(n, 0.0) <= now]
        with self.saga.engine.connect() as conn:
            found = conn.execute(self._earliest, {"names": names}).scalar()
        self._next_due = found
        # A held schedule is looked at again when its pause ends.
        pause = min((t - now for t in self._held.values() if t > now), default=REFRESH_INTERVAL)
        self._refresh_at = now + min(REFRESH_INTERVAL, pause)

    def seconds_to_next(self) -> float | None:
        """Seconds until the earliest next slot this scheduler knows of (``None``: none)."""
        if self._next_due is None:
            return None
        return max(0.0, (self._next_due - self.clock()).total_seconds())

    def tick(self) -> int:
        """Fire what is due, cheaply when nothing is (no query before the earliest known next
        slot, but a fresh look every :data:`REFRESH_INTERVAL`); a database error is logged and
        tried again on the next tick. How many runs started."""
        if not self.saga.registry.schedules or time.monotonic() < self._paused_until:
            return 0
        due = self._next_due is None or self._next_due <= self.clock()
        if not due and time.monotonic() < self._refresh_at:
            return 0
        try:
            return self.fire_due()
        except DBAPIError as exc:
            self._next_due = None
            self._paused_until = time.monotonic() + ERROR_PAUSE
            logs.event(
                log, logging.WARNING,
                f"firing schedules failed, trying again in {ERROR_PAUSE:g}s: "
                f"{type(exc).__name__}: {str(exc.orig)[:200]}",
            )
            return 0
