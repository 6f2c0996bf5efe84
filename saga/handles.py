"""Waiting for a run's outcome from code: a handle per run, woken by ``LISTEN/NOTIFY``.

A waiter registers its run in ``run_waiters``; the runs table then notifies ``<schema>_runs``
with the run's id when that run reaches an end state (or ``compensation_failed``). Runs nobody
waits on notify nothing: a notification costs every listening connection of the database a
transaction. One :class:`RunWatcher` per engine keeps a single listening
connection of its own, in a thread that runs only while someone waits, and wakes each waiter
whose run was named; a waiter re-reads its run then, and also every ``poll_interval`` seconds
in case a notification was lost (the listening connection dropped, or cannot LISTEN at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine, text

from saga.context import JSON
from saga.db.states import RUN_ENDED
from saga.errors import RunFailedError, SagaError, UnknownRunError, WaitTimeoutError
from saga.store.base import Tables

LISTEN_START = 2.0
"""Seconds a first waiter gives the listening connection to start before relying on polls."""
_READ = "SELECT state, result, error FROM {runs} WHERE id = CAST(:id AS uuid)"
_REGISTER = 'INSERT INTO "{schema}".run_waiters (id, run_id) VALUES (:waiter, CAST(:id AS uuid))'
_UNREGISTER = 'DELETE FROM "{schema}".run_waiters WHERE id = :waiter'
_FORGET_STALE = 'DELETE FROM "{schema}".run_waiters WHERE since < now() - interval \'1 day\''



class _ThreadWaiter:
    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> None:
        self._event.wait(seconds)
        self._event.clear()


class _AsyncWaiter:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def wake(self) -> None:
        # Called from the watcher's thread.
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()


_Waiter = _ThreadWaiter | _AsyncWaiter


@dataclass
class _Clock:
    run_id: str
    timeout: float | None
    poll_interval: float
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def pause(self, state: str) -> float:
        """How long to sleep before reading the run again; raises once the time is up."""
        if self.deadline is None:
            return self.poll_interval
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeoutError(self.run_id, state, float(self.timeout or 0))
        return min(remaining, self.poll_interval)


class RunWatcher:
    """Wakes the callers waiting on runs when the database says a run ended."""

    def __init__(
        self,
        engine: Engine,
        tables: Tables,
        listen: Callable[[], psycopg.Connection[Any]],
        poll_interval: float,
    ) -> None:
        self._engine = engine
        self._read = tables.sql(_READ)
        self._register = text(_REGISTER.format(schema=tables.schema))
        self._unregister = text(_UNREGISTER.format(schema=tables.schema))
        self._connect = listen
        self._channel = tables.runs_channel
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._waiters: dict[str, set[_Waiter]] = {}
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()

    # -- waiting -----------------------------------------------------------------------------

    def wait(self, run_id: str, timeout: float | None) -> JSON:
        """Block until the run ends; its result, or :class:`RunFailedError`."""
        with self._waiting(run_id, _ThreadWaiter()) as waiter:
            assert isinstance(waiter, _ThreadWaiter)
            self._listening.wait(LISTEN_START)
            clock = _Clock(run_id, timeout, self.poll_interval)
            while True:
                done, value = self.check(run_id)
                if done:
                    return value
                waiter.wait(clock.pause(value))

    async def wait_async(self, run_id: str, timeout: float | None) -> JSON:
        """:meth:`wait` for asyncio: the event loop is never blocked."""
        with self._waiting(run_id, _AsyncWaiter()) as waiter:
            assert isinstance(waiter, _AsyncWaiter)
            await asyncio.to_thread(self._listening.wait, LISTEN_START)
            clock = _Clock(run_id, timeout, self.poll_interval)
            while True:
                done, value = await asyncio.to_thread(self.check, run_id)
                if done:
                    return value
                await waiter.wait(clock.pause(value))

    def check(self, run_id: str) -> tuple[bool, Any]:
        """``(True, result)`` for a completed run, ``(False, state)`` for one that has not
        ended; :class:`RunFailedError` for one that ended otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(self._read, {"id": run_id}).mappings().first()
        if row is None:
            raise UnknownRunError(
                f"no run {run_id} (a run started in a transaction exists once it commits)"
            )
        if row["state"] == "completed":
            return True, row["result"]
        if row["state"] in RUN_ENDED:
            raise RunFailedError(run_id, row["state"], row["error"])
        return False, row["state"]

    # -- the listening thread ----------------------------------------------------------------

    @contextlib.contextmanager
    def _waiting(self, run_id: str, waiter: _Waiter) -> Iterator[_Waiter]:
        # Registered before the first read of the run: a run that ends after it notifies.
        registration = {"waiter": uuid.uuid4(), "id": run_id}
        with self._engine.begin() as conn:
            conn.execute(self._register, registration)
        try:
            with self._waiting_here(run_id, waiter):
                yield waiter
        finally:
            with contextlib.suppress(Exception), self._engine.begin() as conn:
                conn.execute(self._unregister, registration)

    @contextlib.contextmanager
    def _waiting_here(self, run_id: str, waiter: _Waiter) -> Iterator[_Waiter]:
        with self._lock:
            self._waiters.setdefault(run_id, set()).add(waiter)
            if self._thread is None or not self._thread.is_alive():
                self._listening.clear()
                self._thread = threading.Thread(
                    target=self._listen, name="saga-run-watcher", daemon=True
                )
                self._thread.start()
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(run_id, set())
                waiters.discard(waiter)
                if not waiters:
                    self._waiters.pop(run_id, None)

    def _wake(self, run_ids: list[str] | None) -> None:
        with self._lock:
            if run_ids is None:
                woken = [w for ws in self._waiters.values() for w in ws]
            else:
                woken = [w for r in run_ids for w in self._waiters.get(r, ())]
        for waiter in woken:
            waiter.wake()

    def _listen(self) -> None:
        """Listen while anyone waits; reconnect (with backoff) when the connection drops."""
        conn: psycopg.Connection[Any] | None = None
        backoff = 0.5
        try:
            while True:
                with self._lock:
                    if not self._waiters:
                        self._thread = None
                        self._listening.clear()
                        return
                try:
                    if conn is None:
                        conn = self._connect()
                        conn.execute(f'LISTEN "{self._channel}"')
                        self._listening.set()
                        backoff = 0.5
                        self._wake(None)  # a run may have ended while nobody listened
                    for note in conn.notifies(timeout=1.0):
                        self._wake([note.payload])
                except psycopg.Error:
                    self._listening.clear()
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            conn.close()
                    conn = None
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()


@dataclass(frozen=True)
class RunHandle:
    """A run to wait on: :meth:`saga.Saga.handle` gives one for a run id or business key, and
    every :class:`~saga.starting.Started` is one.

    :meth:`wait` returns the run's result (its sink steps' results, by step name) once it has
    completed, and raises :class:`~saga.errors.RunFailedError` (with the end state and error)
    if it ended otherwise, or :class:`~saga.errors.WaitTimeoutError` when ``timeout`` seconds
    pass first. The caller is woken by the database's notification, not by polling.
    """

    run_id: str
    _watcher: RunWatcher | None = field(default=None, kw_only=True, compare=False, repr=False)

    def wait(self, timeout: float | None = None) -> JSON:
        """Block until the run ends (or ``timeout`` seconds pass): its result."""
        return self._bound().wait(self.run_id, timeout)

    async def wait_async(self, timeout: float | None = None) -> JSON:
        """Await the run's end (or ``timeout`` seconds) without blocking the event loop."""
        return await self._bound().wait_async(self.run_id, timeout)

    def _bound(self) -> RunWatcher:
        if self._watcher is None:
            raise SagaError(f"the handle of run {self.run_id} has no engine: use saga.handle()")
        return self._watcher


def forget_stale_waiters_in_tx(conn: Any, tables: Tables) -> int:
    """Remove waiters registered over a day ago (their process died while waiting)."""
    found = conn.execute(text(_FORGET_STALE.format(schema=tables.schema)))
    return int(found.rowcount or 0)
