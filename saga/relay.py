"""The outbox relay: publishes ready step attempts to the broker.

It takes unpublished outbox rows in batches (``FOR UPDATE SKIP LOCKED`` inside one short
statement, so several relays can run), publishes each outside any transaction, then marks them
published. It wakes on
``LISTEN/NOTIFY`` and polls as a fallback; broker or database outages are logged and retried
with backoff. It fires durable timers (suspended steps whose ``wake_at`` passed,
:mod:`saga.waits`) within about a second, wakes the steps whose child run ended
(:mod:`saga.children`) and fires the registry's schedules (:mod:`saga.scheduler`).
On SIGTERM it finishes its batch and exits 0. It also runs the sweeper.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
from typing import Any

import psycopg
import tenacity
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from saga import logs, metrics, telemetry
from saga.app import Saga
from saga.children import ParentWaker
from saga.housekeeping import Housekeeping
from saga.messages import Envelope, Publisher, publish_in_order
from saga.scheduler import Clock, Scheduler
from saga.store.base import Row
from saga.sweeper import Sweeper

log = logging.getLogger("saga.relay")


class Relay:
    """Moves messages from the outbox to the broker."""

    def __init__(
        self,
        saga: Saga,
        publisher: Publisher,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        lookahead: float = 2.0,
        sweep_interval: float = 2.0,
        hold: float = 30.0,
        housekeeping: Housekeeping | None = None,
        clock: Clock | None = None,
    ) -> None:
        if batch_size < 1 or poll_interval <= 0:
            raise ValueError("batch_size must be >= 1 and poll_interval > 0")
        self.saga = saga
        self.publisher = publisher
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lookahead = lookahead
        self.sweep_interval = sweep_interval
        self.hold = hold
        """Seconds a batch's rows are held for this relay while it publishes them."""
        self.sweeper = Sweeper(saga)
        self.housekeeping = housekeeping or Housekeeping(saga)
        self.scheduler = Scheduler(saga, clock)
        """Fires the registry's schedules' due slots on every turn of the loop."""
        self.parents = ParentWaker(saga.children)
        """Wakes the steps whose child run ended (:mod:`saga.children`)."""
        self.stopping = threading.Event()
        self._publishing: concurrent.futures.ThreadPoolExecutor | None = None
        """Publishes one batch while the loop takes or marks another (:meth:`publish_backlog`);
        made on first use, shut down when :meth:`run` returns."""
        self._listener: psycopg.Connection[Any] | None = None
        self._conn: Connection | None = None
        self._next_due_sql = self.saga.lifecycle.outbox.next_due_sql
        self._next_wake_sql = self.saga.waits.next_wake_sql
        self._wake_due = 0.0
        """Monotonic time of the next suspended step's wake, as last read (0: look now)."""

    # -- one batch ---------------------------------------------------------------------------

    def publish_batch(self) -> int:
        """Take, publish and mark one batch; the number published. A publish error marks what
        went out before it, hands the rest back, and re-raises.

        No transaction is open while publishing: taking the batch is one short statement that
        holds the rows by pushing their due time ahead (a cancel or a claim never waits on a
        publish), and marking them published is another. A relay killed in between leaves the
        rows due again after ``hold`` seconds: a duplicate publish at most, never a loss."""
        outbox = self.saga.lifecycle.outbox
        conn = self._connection()
        try:
            rows = outbox.take_batch(conn, self.batch_size, self.lookahead, self.hold)
        except DBAPIError:
            self._close_connection()
            raise
        sent, failure = self._publish(rows)
        try:
            self._mark(conn, rows, sent)
        except DBAPIError:
            self._close_connection()
            raise
        if failure is not None:
            raise failure
        return sent

    def publish_backlog(self, seconds: float = 0.5) -> tuple[int, bool]:
        """Publish batches back to back for up to ``seconds``: how many messages went out, and
        whether the last batch was full (more may be due). Each next batch is taken while the
        one before it is published (a thread of the relay's own publishes, in order), and a
        batch is marked while the next one is published: the database's share and the broker's
        overlap instead of adding up. The same holds as for :meth:`publish_batch`: no
        transaction is open while publishing; a relay killed meanwhile leaves its (at most
        two) held batches due again after ``hold`` seconds. A publish error marks what went
        out before it, hands the rest (and the batch taken after it) back, and re-raises."""
        outbox = self.saga.lifecycle.outbox
        conn = self._connection()
        deadline = time.monotonic() + seconds
        total = 0
        if self._publishing is None:
            self._publishing = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="saga-relay-publish"
            )
        try:
            current = outbox.take_batch(conn, self.batch_size, self.lookahead, self.hold)
            if not current:
                return 0, False
            publishing = self._publishing.submit(self._publish, current)
            while True:
                full = len(current) == self.batch_size
                more = full and time.monotonic() < deadline
                following = (
                    outbox.take_batch(conn, self.batch_size, self.lookahead, self.hold)
                    if more else []
                )
                sent, failure = publishing.result()
                if following and failure is None:
                    publishing = self._publishing.submit(self._publish, following)
                elif following:  # the broker failed: the batch taken after goes back as it was
                    outbox.release(conn, following, following[0]["held_until"])
                    following = []
                self._mark(conn, current, sent)
                total += sent
                if failure is not None:
                    raise failure
                if not following:
                    return total, full
                current = following
        except DBAPIError:
            self._close_connection()
            raise

    def _mark(self, conn: Connection, rows: list[Row], sent: int) -> None:
        """Mark the first ``sent`` of a taken batch published and hand the rest back."""
        outbox = self.saga.lifecycle.outbox
        published = [r["id"] for r in rows[:sent]]
        held = rows[0]["held_until"] if rows else None
        outbox.mark_published(conn, published, held, self.saga.settings.republish_after)
        outbox.release(conn, rows[len(published) :], held)

    def _connection(self) -> Connection:
        # Kept across batches (a pool checkout would pre-ping on every wake), in autocommit:
        # each statement is its own short transaction.
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            conn = self.saga.engine.connect()
            self._conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                self._conn.close()
            self._conn = None

    def _publish(self, rows: list[Row]) -> tuple[int, Exception | None]:
        """Publish the batch in order: how many went out, and the broker's error that stopped
        the rest (kept for the caller: what went out is marked first)."""
        envelopes = []
        for row in rows:
            # The span covers making the message; the batch goes out in one call after.
            with telemetry.publishing(row) as headers:
                envelopes.append(Envelope.from_outbox(row, headers))
            if row["publish_count"]:
                logs.event(
                    log, logging.INFO, "published again", run_id=row["run_id"],
                    workflow=row["workflow"], step=row["step"], kind=row["kind"],
                    attempt=row["attempt"],
                )
        return publish_in_order(self.publisher, envelopes) if envelopes else (0, None)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Relay until :meth:`stop`; outages are retried with exponential backoff."""
        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=0.2, max=5.0),
            retry=tenacity.retry_if_exception_type(Exception),
            stop=tenacity.stop_when_event_set(self.stopping),
            before_sleep=self._log_outage,
            sleep=self._backoff,
            reraise=False,
        )
        last_sweep = 0.0
        metrics.observe(self.saga)
        self.housekeeping.start()
        while not self.stopping.is_set():
            try:
                _, more = retrying(self.publish_backlog)
            except tenacity.RetryError:
                break
            now = time.monotonic()
            if now >= self._wake_due:
                self._fire_timers()
            self._wake_parents()
            if now - last_sweep >= self.sweep_interval:
                last_sweep = now
                try:
                    self.sweeper.sweep()
                except (OperationalError, DBAPIError) as exc:
                    logs.event(log, logging.WARNING, f"sweep failed: {type(exc).__name__}")
            self.housekeeping.tick()
            self.scheduler.tick()
            if not more:
                self._wait()
        if self._publishing is not None:
            self._publishing.shutdown(wait=True)
            self._publishing = None
        self._close_listener()
        self._close_connection()
        self.housekeeping.stop()
        metrics.unobserve(self.saga)
        logs.event(log, logging.INFO, "relay stopped")

    def _fire_timers(self) -> None:
        """Wake the suspended steps whose time has come (sleeps end, signal waits time out);
        the steps they make ready go out with the next batch."""
        try:
            woke = self.saga.waits.fire_due(self.batch_size)
        except Exception as exc:  # logged, never the relay's end: it tries again later
            logs.event(log, logging.WARNING, f"firing timers failed: {logs.describe(exc)}")
            woke = 0
        # More may be due (a full batch); else the next wait reads when the next one is.
        self._wake_due = 0.0 if woke >= self.batch_size else time.monotonic() + self.poll_interval

    def _wake_parents(self) -> None:
        """Wake the steps whose child run ended (at most every half second)."""
        try:
            self.parents.tick()
        except Exception as exc:  # logged, never the relay's end: it looks again later
            logs.event(log, logging.WARNING, f"waking parents failed: {logs.describe(exc)}")

    def _backoff(self, seconds: float) -> None:
        self.housekeeping.presence.beat()  # backing off is being alive: the outbox warns
        self.stopping.wait(seconds)

    def stop(self) -> None:
        """Finish the current batch and return from :meth:`run`."""
        self.stopping.set()

    def _log_outage(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._close_listener()
        logs.event(
            log, logging.WARNING,
            f"publishing failed, backing off: {type(exc).__name__}: {str(exc)[:200]}",
            attempt=state.attempt_number,
        )

    def _wait(self) -> None:
        """Sleep until a NOTIFY, the next due retry, the next suspended step's wake, the next
        schedule slot, or the poll interval, whichever is first."""
        timeout = self.poll_interval
        slot_in = self.scheduler.seconds_to_next()
        if slot_in is not None:
            # A floor: a slot another relay holds (firing it) is "due" until that commits.
            timeout = min(timeout, max(slot_in, 0.05))
        try:
            listener = self._listen()
            # On the LISTEN connection (autocommit): one round trip, no pool checkout.
            found = listener.execute(self._next_due_sql).fetchone()
            due = None if found is None or found[0] is None else float(found[0])
            if due is not None:
                timeout = max(0.0, min(timeout, due - self.lookahead))
            found = listener.execute(self._next_wake_sql).fetchone()
            if found is not None and found[0] is not None:
                wake = max(0.0, float(found[0]))
                self._wake_due = time.monotonic() + wake
                timeout = min(timeout, wake)
            if timeout <= 0:
                return
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                break
        except (psycopg.Error, OperationalError, DBAPIError):
            self._close_listener()
            self.stopping.wait(min(timeout, 1.0))

    def _listen(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            self._listener = self.saga.connect_raw()
            self._listener.execute(f'LISTEN "{self.saga.tables.channel}"')
        return self._listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None


def main(
    app_spec: str,
    *,
    batch_size: int = 200,
    poll_interval: float = 1.0,
    retention: float | None = None,
) -> int:
    """``saga relay``: relay for the engine bound to the Celery app ``module:attribute``;
    with ``retention`` (seconds) it also prunes runs finished longer ago than that."""
    from saga.celery_adapter import CeleryPublisher, engine_of, load_celery_app

    celery_app = load_celery_app(app_spec)
    saga = engine_of(celery_app)
    relay = Relay(
        saga, CeleryPublisher(celery_app), batch_size=batch_size, poll_interval=poll_interval,
        housekeeping=Housekeeping(saga, retention=retention),
    )

    def on_term(signum: int, frame: object) -> None:
        logs.event(log, logging.INFO, f"signal {signum}: finishing the batch and stopping")
        relay.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    logs.event(log, logging.INFO, "relay started", schema=saga.settings.schema)
    relay.run()
    return 0
