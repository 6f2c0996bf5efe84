"""Running workflows inline, for users' tests: the real engine and database, no broker.

:func:`drain` relays ready messages straight to an :class:`~saga.executor.Executor` in this
process until nothing is left to do. It exercises the same claim/complete transitions as a
Celery worker, so a workflow's logic, retries and compensations can be tested without starting
processes. It does not test delivery (that is what the relay and Celery are for). Maps over a
list (:meth:`saga.Workflow.map`) expand and run their instances inline too, and child runs
(:meth:`~saga.Workflow.child`) are drained with their parents: a child's end wakes its parent's
step in the same drain.

Waits and schedules run inline too, on one :class:`FakeClock`: :func:`drain` fires the timers
that are due; advancing a clock bound to an engine moves the time of every suspended step
(sleeps end, signal waits time out) and drains what that made ready; :func:`send_signal` sends
a run a signal and drains; :func:`fire_schedules` fires the schedule slots due at the clock's
time, without waiting for real time to pass::

    clock = FakeClock(saga)
    run = saga.start_now(checkout, {"order": 7})
    drain(saga)                                # stops at the signal wait
    send_signal(saga, run.run_id, "payment_captured", {"amount": 12})
    clock.advance(timedelta(days=1))           # a sleep after it ends
    assert saga.get_run(run.run_id)["state"] == "completed"
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from saga.app import Saga
from saga.executor import Executor
from saga.messages import Envelope
from saga.relay import Relay
from saga.scheduler import Scheduler
from saga.steps import TaskCaller


@dataclass
class InlinePublisher:
    """A relay publisher that keeps messages in memory; :meth:`run_pending` executes them once
    the relay's batch has committed (as a broker would deliver them)."""

    executor: Executor
    tasks: TaskCaller | None = None
    outcomes: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    pending: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def publish(self, envelope: Envelope) -> None:
        """Hold the message until it is due."""
        due = time.monotonic() + (envelope.countdown or 0.0)
        self.pending.append((due, envelope.message.as_body()))

    def run_pending(self) -> int:
        """Execute the held messages, waiting for each one's countdown; how many ran."""
        todo, self.pending = sorted(self.pending, key=lambda p: p[0]), []
        for due, body in todo:
            time.sleep(max(0.0, due - time.monotonic()))
            self.outcomes.append((body, self.executor.execute(body, self.tasks)))
        return len(todo)


def drain(
    saga: Saga, *, timeout: float = 30.0, tasks: TaskCaller | None = None
) -> list[tuple[dict[str, Any], str]]:
    """Run every ready step (and retries as they fall due), child runs included, and wake
    the steps whose child ended, until the outbox is empty.

    Returns each executed message with its outcome. Raises ``TimeoutError`` past ``timeout``.
    """
    publisher = InlinePublisher(Executor(saga, worker_id="inline"), tasks)
    relay = Relay(saga, publisher, batch_size=50, lookahead=0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saga.waits.fire_due()
        saga.children.wake_finished()
        relay.publish_batch()
        if publisher.run_pending():
            continue
        with saga.engine.connect() as conn:
            due = saga.lifecycle.outbox.seconds_to_next_due(conn)
        if due is None:
            return publisher.outcomes
        time.sleep(min(max(due, 0.01), 0.5))
    raise TimeoutError(f"workflows still had messages after {timeout}s")


def fire_schedules(saga: Saga, clock: FakeClock) -> list[str]:
    """Fire the registry's due schedule slots as a relay would at ``clock``'s time (the
    first call writes the schedules, whose first slots then come after that time); the
    business keys of the runs started, sorted. :func:`drain` then runs them."""
    scheduler = Scheduler(saga, clock)
    with saga.engine.connect() as conn:
        before = _slot_keys(saga, conn)
    scheduler.fire_due()
    with saga.engine.connect() as conn:
        return [k for k in _slot_keys(saga, conn) if k not in before]


def _slot_keys(saga: Saga, conn: Connection) -> list[str]:
    found = conn.execute(
        text(f"SELECT business_key FROM {saga.tables.runs} WHERE business_key LIKE 'schedule:%' "
             "ORDER BY business_key")
    )
    return [str(k) for k in found.scalars()]


class FakeClock:
    """A clock moved by hand, in UTC, for tests: calling it returns the time it was set to
    (``start``), which moves only when :meth:`advance` or :meth:`set` moves it, and never
    back. Schedules read it (:func:`fire_schedules`, :class:`~saga.scheduler.Scheduler`).
    Bound to an engine (``saga``), moving it also brings every suspended step's wake time
    nearer by as much, fires those now due (a sleep ends, a signal wait times out, retries and
    compensation follow) and drains what that made ready; the database's ``now()`` itself
    does not move."""

    def __init__(
        self, saga: Saga | None = None, *, start: datetime | str = "2026-01-01T00:00:00+00:00"
    ) -> None:
        self.saga = saga
        self._now = _aware(start)
        self.moved = timedelta(0)
        """How far it has been moved."""

    def __call__(self) -> datetime:
        """The current fake time."""
        return self._now

    def advance(self, by: timedelta | float, *, tasks: TaskCaller | None = None) -> datetime:
        """Move the clock forward by ``by`` (a ``timedelta`` or seconds), and the bound
        engine's waits with it (then :func:`drain`, with ``tasks``); the new time."""
        step = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if step < timedelta(0):
            raise ValueError(f"a clock does not go back: {step}")
        self._now += step
        self.moved += step
        if self.saga is not None:
            self.saga.waits.shift(step.total_seconds())
            drain(self.saga, tasks=tasks)
        return self._now

    def set(self, when: datetime | str, *, tasks: TaskCaller | None = None) -> datetime:
        """Move the clock forward to ``when`` (an aware datetime or ISO 8601 text)."""
        return self.advance(_aware(when) - self._now, tasks=tasks)


def send_signal(
    saga: Saga, run: str, name: str, payload: Any = None, *, tasks: TaskCaller | None = None
) -> str:
    """Send ``run`` the signal ``name`` (:meth:`~saga.Saga.signal_now`), then :func:`drain`;
    what sending it did (``delivered``, ``stored`` or ``duplicate``)."""
    outcome = saga.signal_now(run, name, payload)
    drain(saga, tasks=tasks)
    return outcome


def _aware(when: datetime | str) -> datetime:
    value = datetime.fromisoformat(when) if isinstance(when, str) else when
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
