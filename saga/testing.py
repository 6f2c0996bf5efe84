"""Running workflows inline, for users' tests: the real engine and database, no broker.

:func:`drain` relays ready messages straight to an :class:`~saga.executor.Executor` in this
process until nothing is left to do. It exercises the same claim/complete transitions as a
Celery worker, so a workflow's logic, retries and compensations can be tested without starting
processes. It does not test delivery (that is what the relay and Celery are for).

Waits run inline too: :func:`drain` fires the timers that are due; a :class:`FakeClock` moves
the time of every suspended step (sleeps end, signal waits time out) without waiting; and
:func:`send_signal` sends a run a signal and drains what it made ready::

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
from datetime import timedelta
from typing import Any

from saga.app import Saga
from saga.executor import Executor
from saga.messages import Envelope
from saga.relay import Relay
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
    """Run every ready step (and retries as they fall due) until the outbox is empty.

    Returns each executed message with its outcome. Raises ``TimeoutError`` past ``timeout``.
    """
    publisher = InlinePublisher(Executor(saga, worker_id="inline"), tasks)
    relay = Relay(saga, publisher, batch_size=50, lookahead=0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saga.waits.fire_due()
        relay.publish_batch()
        if publisher.run_pending():
            continue
        with saga.engine.connect() as conn:
            due = saga.lifecycle.outbox.seconds_to_next_due(conn)
        if due is None:
            return publisher.outcomes
        time.sleep(min(max(due, 0.01), 0.5))
    raise TimeoutError(f"workflows still had messages after {timeout}s")


@dataclass
class FakeClock:
    """Time for the suspended steps of one engine's database, moved by hand: :meth:`advance`
    brings every suspended step's wake time nearer, fires those now due (a sleep ends, a signal
    wait times out, retries and compensation follow) and drains what that made ready. Only
    waits see it; the database's ``now()`` does not move."""

    saga: Saga
    moved: timedelta = timedelta(0)
    """How far it has been advanced."""

    def advance(
        self, by: timedelta, *, tasks: TaskCaller | None = None
    ) -> list[tuple[dict[str, Any], str]]:
        """Let ``by`` pass for the waits, then :func:`drain`; what the drain executed."""
        if by < timedelta(0):
            raise ValueError(f"a clock does not go back: {by}")
        self.moved += by
        self.saga.waits.shift(by.total_seconds())
        return drain(self.saga, tasks=tasks)


def send_signal(
    saga: Saga, run: str, name: str, payload: Any = None, *, tasks: TaskCaller | None = None
) -> str:
    """Send ``run`` the signal ``name`` (:meth:`~saga.Saga.signal_now`), then :func:`drain`;
    what sending it did (``delivered``, ``stored`` or ``duplicate``)."""
    outcome = saga.signal_now(run, name, payload)
    drain(saga, tasks=tasks)
    return outcome
