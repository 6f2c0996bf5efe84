"""The engine object: a registry, a database and settings. No global state; create one per
process (or per test) and hand it to the worker and the relay."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from saga import faults, telemetry
from saga.children import Children
from saga.definition import Workflow
from saga.dispatch import Dispatcher
from saga.errors import InvalidTransitionError, SagaError
from saga.handles import RunHandle, RunWatcher
from saga.keys import KeyPolicy, is_unfinished_key_conflict, rerun_refusal
from saga.lifecycle import Lifecycle
from saga.maps import Maps
from saga.messages import Publisher
from saga.registry import Registry
from saga.schedules import Schedule
from saga.settings import Settings
from saga.starting import Executes, Started, Starter
from saga.store.base import Row, Tables
from saga.transitions import Transitions
from saga.waits import Waits

if TYPE_CHECKING:  # the asyncio extension needs greenlet (saga[async])
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

T = TypeVar("T")


class ConfigurationError(SagaError):
    """A required setting (such as the database URL) is missing or wrong."""


def database_url_from_env() -> str:
    """``SAGA_DATABASE_URL``, with a plain ``postgresql://`` URL mapped to psycopg 3."""
    url = os.environ.get("SAGA_DATABASE_URL")
    if not url:
        raise ConfigurationError("SAGA_DATABASE_URL is not set")
    return normalize_url(url)


def normalize_url(url: str) -> str:
    """Make ``postgresql://`` and ``postgres://`` URLs use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Saga:
    """The engine: starts runs in the caller's transaction and applies guarded transitions.

    Pass an SQLAlchemy ``engine`` (or a ``database_url``; by default ``SAGA_DATABASE_URL``).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        engine: Engine | None = None,
        database_url: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings or Settings.from_env()
        if engine is None:
            url = normalize_url(database_url) if database_url else database_url_from_env()
            # No pre-ping: it is a round trip (and a transaction PostgreSQL counts) on every
            # checkout, and the hot path takes a connection per statement. A connection found
            # dead is retried once on a fresh one instead (see ``on_hot_path``), and
            # SQLAlchemy then renews the whole pool.
            engine = create_engine(url, pool_size=5, max_overflow=5)
        self.engine = engine
        # Shares the engine's pool; every connection it hands out is in autocommit.
        self._autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.tables = Tables(self.settings.schema)
        self.transitions = Transitions(self.tables)
        self.lifecycle = Lifecycle(self.tables, registry)
        self.waits = Waits(self)
        """Suspended steps: timers, signal waits and signals (:mod:`saga.waits`)."""
        self.maps = Maps(self)
        """Maps over a list: expanding them, their items and results (:mod:`saga.maps`)."""
        self.children = Children(self)
        """Child runs: starting them, waking their parents (:mod:`saga.children`)."""
        self._starter = Starter(self.tables, self.settings)
        self.dispatcher: Dispatcher | None = None
        """Publishes what starts and completions make ready after their commit (set by
        :meth:`use_publisher`); without one, the relay publishes everything."""

    # -- starting ----------------------------------------------------------------------------

    def start(
        self,
        target: Session | Connection | Executes,
        workflow: Workflow | str,
        input: Any,
        *,
        key: str | None = None,
        version: int | None = None,
        key_policy: KeyPolicy | str | None = None,
    ) -> Started:
        """Start a run in the caller's transaction (``target`` is their Session or Connection):
        it exists once they commit, and not at all if they roll back. With a business ``key``
        that names a run already, the workflow's ``key_policy`` (or this one) says what
        happens (:class:`~saga.keys.KeyPolicy`; by default the existing run is returned). The
        current trace context goes with the run. The returned handle can :meth:`~Started.wait`
        for the run's outcome once the transaction has committed."""
        wf = self._workflow(workflow, version)
        trace = telemetry.capture_context()
        # Prompt start where the target can say when its transaction commits: a Session, or a
        # connection with an ``on_commit`` hook (Django's).
        prompt = self.dispatcher is not None and (
            isinstance(target, Session) or callable(getattr(target, "on_commit", None))
        )
        started = self._starter.start(
            target, wf, input, key=key, key_policy=key_policy, trace_context=trace,
            published=prompt,
        )
        if prompt and started.created:
            assert self.dispatcher is not None
            self.dispatcher.after_commit(target, wf, started.run_id, trace)
        return replace(started, _watcher=self.watcher)

    async def start_async(
        self,
        target: AsyncSession | AsyncConnection,
        workflow: Workflow | str,
        input: Any,
        *,
        key: str | None = None,
        version: int | None = None,
        key_policy: KeyPolicy | str | None = None,
    ) -> Started:
        """:meth:`start` in the caller's ``AsyncSession`` or ``AsyncConnection`` (SQLAlchemy's
        asyncio API, e.g. ``postgresql+psycopg://`` with ``create_async_engine``). Its first
        steps go out through the relay (no prompt start after an async commit yet)."""
        started = await self._starter.start_async(
            target, self._workflow(workflow, version), input, key=key, key_policy=key_policy,
            trace_context=telemetry.capture_context(),
        )
        return replace(started, _watcher=self.watcher)

    def start_now(
        self,
        workflow: Workflow | str,
        input: Any,
        *,
        key: str | None = None,
        key_policy: KeyPolicy | str | None = None,
    ) -> Started:
        """Start a run in a transaction of its own, committed when this returns (for scripts,
        tests and callers with no transaction of their own); its first steps go out as soon
        as it commits."""
        with Session(self.engine) as session, session.begin():
            return self.start(session, workflow, input, key=key, key_policy=key_policy)

    def schedule(self, schedule: Schedule) -> Schedule:
        """Register ``schedule`` (a :class:`~saga.schedules.Schedule`) with this engine's
        registry: the relays fire its slots (:meth:`saga.Registry.add_schedule`)."""
        return self.registry.add_schedule(schedule)

    def use_publisher(self, make_publisher: Callable[[], Publisher]) -> None:
        """Publish the messages this engine's starts (in a Session, or ``start_now``) and
        completions make ready right after their commit, with a publisher from
        ``make_publisher`` (:func:`saga.install` calls this with the Celery app's); the relay
        stays the fallback. Off with ``Settings(eager_dispatch=False)``."""
        if self.settings.eager_dispatch:
            self.dispatcher = Dispatcher(self, make_publisher)

    def start_canvas(
        self,
        target: Session | Connection | Executes,
        name: str,
        canvas: Mapping[str, Any],
        *,
        key: str | None = None,
        version: int | None = None,
        key_policy: KeyPolicy | str | None = None,
    ) -> Started:
        """Start a Celery canvas (chain, group or chord of task signatures) as a run of the
        workflow ``name`` in the caller's transaction: its tasks are the steps, its arguments
        the input (:mod:`saga.canvas`). The workflow is registered if it is not; a registered
        one must have the canvas's shape. Workers need it too: register
        ``saga.from_canvas(name, ...).workflow`` where they import their workflows."""
        from saga.canvas import as_registered

        run = as_registered(self.registry, name, canvas, version)
        return self.start(target, run.workflow, run.input, key=key, key_policy=key_policy)

    def rerun(self, ref: str) -> Started:
        """Start a finished run (id or business key) again as a new run of its workflow's
        newest version, with its input and key; the key then names the new run."""
        with Session(self.engine) as session, session.begin():
            conn = session.connection()
            run = self.lifecycle.runs.find(conn, self.resolve_run(conn, ref))[0]
            key = run["business_key"]
            latest = self.lifecycle.runs.find(conn, key, run["workflow"]) if key else [run]
            refusal = rerun_refusal(run, str(latest[0]["id"]))
            if refusal:
                raise InvalidTransitionError(refusal)
            return self.start(
                session, run["workflow"], run["input"], key=key,
                key_policy=KeyPolicy.NEW_AFTER_FINISH,
            )

    def signal(
        self, target: Session | Connection | Executes, run: str, name: str, payload: Any = None
    ) -> str:
        """Send the signal ``name`` with its ``payload`` (JSON, checked like a run's input) to
        the run whose id or business key is ``run``, in the caller's transaction (``target``,
        their Session or Connection), so it is atomic with their own write. A step waiting for
        it (``Workflow.wait_for_signal``) completes in that transaction, with the payload as its
        result: ``"delivered"``. Else it is kept for a wait that begins later: ``"stored"``. A
        second signal of the same name to the run is ignored: ``"duplicate"``. A run that is
        not running (finished, stopping) refuses it: :class:`~saga.errors.SignalRefusedError`.
        The run's workflow must be registered here (as for :meth:`start`). The run's row stays
        locked until the caller's transaction ends (a wait beginning meanwhile waits for it to
        see the signal): keep that transaction short."""
        conn = target.connection() if isinstance(target, Session) else target
        return self.waits.signal(cast(Connection, conn), run, name, payload)

    async def signal_async(
        self, target: AsyncSession | AsyncConnection, run: str, name: str, payload: Any = None
    ) -> str:
        """:meth:`signal` in the caller's ``AsyncSession`` or ``AsyncConnection`` (SQLAlchemy's
        asyncio API): atomic with their own writes, delivered once they commit."""

        def send(sync: Session | Connection) -> str:
            return self.signal(sync, run, name, payload)

        return await target.run_sync(send)

    def signal_now(self, run: str, name: str, payload: Any = None) -> str:
        """:meth:`signal` in a transaction of its own, committed when this returns."""
        with Session(self.engine) as session, session.begin():
            return self.signal(session, run, name, payload)

    def handle(self, ref: str) -> RunHandle:
        """A handle on the run whose id or business key (its newest run) is ``ref``, to
        :meth:`~saga.handles.RunHandle.wait` for its outcome."""
        with self.engine.connect() as conn:
            return RunHandle(self.resolve_run(conn, ref), _watcher=self.watcher)

    @cached_property
    def watcher(self) -> RunWatcher:
        """Wakes this process's callers waiting on runs (one listening connection, only while
        someone waits)."""
        return RunWatcher(
            self.engine, self.tables, self.connect_raw, self.settings.wait_poll_interval
        )

    def _workflow(self, workflow: Workflow | str, version: int | None) -> Workflow:
        if isinstance(workflow, str):
            return self.registry.get(workflow, version)
        return self.registry.register(workflow)

    # -- operator actions --------------------------------------------------------------------

    def cancel(self, run: str, reason: str | None = None) -> str:
        """Cancel a running run: it stops, compensates and ends ``cancelled``."""
        return self._in_tx(
            lambda c: self.lifecycle.cancel_in_tx(c, self.resolve_run(c, run), reason)
        )

    def retry(self, run: str, from_step: str | None = None) -> str:
        """Retry a ``failed`` run from the step that failed (or ``from_step``), or the failed
        compensations of a ``compensation_failed`` run."""
        try:
            return self._in_tx(
                lambda c: self.lifecycle.retry_in_tx(c, self.resolve_run(c, run), from_step)
            )
        except IntegrityError as exc:
            if not is_unfinished_key_conflict(exc):
                raise
            raise InvalidTransitionError(
                f"run {run} cannot run again: its business key names a newer unfinished run"
            ) from None

    def resolve(self, run: str, reason: str) -> str:
        """Mark a ``compensation_failed`` run ``resolved`` by hand, keeping ``reason``."""
        return self._in_tx(
            lambda c: self.lifecycle.resolve_in_tx(c, self.resolve_run(c, run), reason)
        )

    # -- reading -----------------------------------------------------------------------------

    def resolve_run(self, conn: Connection, ref: str) -> str:
        """The id of the run whose id, business key or unique id prefix is ``ref``."""
        return str(self.lifecycle.runs.find_one(conn, ref)["id"])

    def get_run(self, ref: str) -> Row:
        """The run's row, with its ``steps`` and ``history`` (for tests and tools)."""
        with self.engine.connect() as conn:
            run_id = self.resolve_run(conn, ref)
            run = self.lifecycle.runs.find(conn, run_id)[0]
            run["steps"] = self.lifecycle.steps.of_run(conn, run_id)
            run["history"] = self.lifecycle.history.of_run(conn, run_id)
            return run

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection on which each statement is its own transaction."""
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def on_hot_path(self, name: str, statement: Callable[[Connection], T]) -> T:
        """Run a guarded hot-path statement (``name``: ``claim`` or ``complete``) on an
        autocommit connection of the engine's pool, held only for it.

        Holding nothing while a step's code runs keeps the pool free for that code and for the
        slow path. If the connection turns out to be dead, the statement runs once more on a
        fresh one: claims and completions are guarded and replayable, so a retry of what did
        commit finds what it did."""
        for attempt in (1, 2):
            try:
                with self._autocommit_engine.connect() as conn:
                    try:
                        result = statement(conn)
                    except psycopg.Error:
                        # Hot statements run on the driver: a dead connection shows as the
                        # driver's error, which SQLAlchemy has not seen.
                        driver = conn.connection.driver_connection
                        if driver is None or driver.closed or driver.broken:
                            conn.invalidate()
                        raise
                    self._maybe_lose_reply(conn, name, attempt)
                    return result
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
            except psycopg.OperationalError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _maybe_lose_reply(conn: Connection, name: str, attempt: int) -> None:
        if attempt == 1 and faults.armed("hot_path.reply_lost", name):
            faults.cut_connection(conn, f"hot_path.reply_lost:{name}")
            conn.exec_driver_sql("SELECT 1")  # fails: as if the reply had been lost

    def connect_raw(self, timeout: float = 5.0) -> psycopg.Connection[Any]:
        """A psycopg connection of its own, outside the engine's pool, in autocommit: for a
        process's long-lived helpers (the relay's LISTEN, a worker's heartbeat), which must
        never wait for the pool."""
        url = make_url(self.engine.url).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=int(timeout))

    def forget_connections(self) -> None:
        """After a fork: drop the parent's pooled connections without closing them (they
        belong to the parent)."""
        self.engine.dispose(close=False)

    def in_transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a transaction of its own, once more on a fresh connection if the
        first turned out to be dead (for the slow path's guarded, idempotent transitions)."""
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _in_tx(self, fn: Callable[[Connection], T]) -> T:
        return self.in_transaction(fn)
