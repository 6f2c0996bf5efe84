"""The engine object: a registry, a database and settings. No global state; create one per
process (or per test) and hand it to the worker and the relay."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from saga import telemetry
from saga.definition import Workflow
from saga.errors import SagaError
from saga.lifecycle import Lifecycle
from saga.registry import Registry
from saga.settings import Settings
from saga.starting import Started, Starter
from saga.store.base import Row, Tables
from saga.transitions import Transitions

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
            engine = create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)
        self.engine = engine
        self.tables = Tables(self.settings.schema)
        self.transitions = Transitions(self.tables)
        self.lifecycle = Lifecycle(self.tables, registry)
        self._starter = Starter(self.tables, self.settings)
        self._hot = threading.local()

    # -- starting ----------------------------------------------------------------------------

    def start(
        self,
        target: Session | Connection,
        workflow: Workflow | str,
        input: Any,
        *,
        key: str | None = None,
        version: int | None = None,
    ) -> Started:
        """Start a run in the caller's transaction (``target`` is their Session or Connection):
        it exists once they commit, and not at all if they roll back. With a business ``key``,
        starting again returns the existing run. The current trace context goes with the run."""
        wf = (
            self.registry.get(workflow, version)
            if isinstance(workflow, str)
            else self.registry.register(workflow)
        )
        return self._starter.start(
            target, wf, input, key=key, trace_context=telemetry.capture_context()
        )

    def start_now(self, workflow: Workflow | str, input: Any, *, key: str | None = None) -> Started:
        """Start a run in a transaction of its own (for scripts and tests)."""
        with self.engine.begin() as conn:
            return self.start(conn, workflow, input, key=key)

    # -- operator actions --------------------------------------------------------------------

    def cancel(self, run: str, reason: str | None = None) -> str:
        """Cancel a running run: it stops, compensates and ends ``cancelled``."""
        return self._in_tx(
            lambda c: self.lifecycle.cancel_in_tx(c, self.resolve_run(c, run), reason)
        )

    def retry(self, run: str, from_step: str | None = None) -> str:
        """Retry a ``failed`` run from the step that failed (or ``from_step``), or the failed
        compensations of a ``compensation_failed`` run."""
        return self._in_tx(
            lambda c: self.lifecycle.retry_in_tx(c, self.resolve_run(c, run), from_step)
        )

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

    def on_hot_path(self, statement: Callable[[Connection], T]) -> T:
        """Run one guarded hot-path statement on this thread's own autocommit connection.

        The connection is kept between steps, so a step pays no pool checkout or pre-ping. If it
        turns out to be dead, the statement runs once more on a fresh one: claims and
        completions are guarded, so a retry of one that did commit is reported as a duplicate
        and changes nothing."""
        for attempt in (1, 2):
            conn: Connection | None = getattr(self._hot, "conn", None)
            if conn is None or conn.closed or conn.invalidated:
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._hot.conn = conn
            try:
                return statement(conn)
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
                conn.close()
                self._hot.conn = None
        raise AssertionError("unreachable")  # pragma: no cover

    def forget_connections(self) -> None:
        """After a fork: drop the parent's pooled and hot-path connections without closing
        them (they belong to the parent)."""
        self._hot = threading.local()
        self.engine.dispose(close=False)

    def _in_tx(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)
