"""Running a real system: Celery workers and a relay as supervised subprocesses, on Redis or
RabbitMQ, against a fresh database; plus what the tests need to start runs and read results.

Every process gets ``SAGA_LEASE_GRACE`` and ``SAGA_REPUBLISH_AFTER`` of a few seconds, so that
recovery (lease expiry, republishing lost messages) happens within a test's patience.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import create_engine, text

import saga
from saga import Settings
from tests.support.procs import Supervisor
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP = "tests.apps.flows:app"
LEASE_GRACE = 3
REPUBLISH_AFTER = 3
FINISHED = {"completed", "failed", "compensated", "compensation_failed", "cancelled", "resolved"}

EXECUTIONS_DDL = """
CREATE TABLE executions (
    id bigserial primary key, run_id uuid, kind text, step text, attempt int,
    idempotency_key text, note text, outcome text, at timestamptz default clock_timestamp())
"""

def _relay_code(app: str, batch_size: int) -> str:
    return (
        "import logging, sys; "
        "logging.basicConfig(level=logging.INFO, "
        "format='[%(asctime)s: %(levelname)s/%(name)s] %(message)s'); "
        "from saga.relay import main; "
        f"sys.exit(main({app!r}, batch_size={batch_size}))"
    )


@dataclass
class System:
    """One test's system: its database, broker, queue, processes and an engine to start runs."""

    broker: str
    broker_url: str
    queue: str
    db_url: str
    supervisor: Supervisor
    engine: saga.Saga
    env: dict[str, str] = field(default_factory=dict)
    app: str = APP
    """The ``module:celery_app`` the worker and relay processes run."""

    # -- processes ---------------------------------------------------------------------------

    def start_worker(
        self,
        name: str = "worker",
        concurrency: int = 2,
        *,
        queues: Sequence[str] = (),
        pool: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> int:
        """Start ``celery worker`` on this test's queue (or ``queues``) and wait until it is
        ready. ``pool`` picks Celery's pool (``-P``); ``env`` is added to the system's."""
        argv = [
            str(BIN / "celery"),
            "-A",
            self.app.partition(":")[0],
            "worker",
            "-Q",
            ",".join(queues or [self.queue]),
            "-c",
            str(concurrency),
            "--loglevel=INFO",
            "-n",
            f"{name}-{self.queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if pool:
            argv += ["-P", pool]
        pid = self.supervisor.start(name, argv, env={**self.env, **(env or {})}, cwd=REPO)
        if wait:
            self.wait_ready(name)
        return pid

    def wait_ready(self, name: str, times: int = 1, timeout: float = 60) -> None:
        """Wait until worker ``name`` has said it is ready ``times`` times (once per start)."""
        wait_until(
            lambda: self.supervisor.log(name).count(" ready.") >= times,
            timeout=timeout,
            interval=0.1,
            message=f"worker {name} did not become ready",
        )

    def start_relay(
        self, name: str = "relay", batch_size: int = 200, env: dict[str, str] | None = None
    ) -> int:
        """Start a relay (with its sweeper) and wait until it says it started."""
        argv = [sys.executable, "-c", _relay_code(self.app, batch_size)]
        pid = self.supervisor.start(name, argv, env={**self.env, **(env or {})}, cwd=REPO)
        wait_until(
            lambda: "relay started" in self.supervisor.log(name),
            timeout=30,
            interval=0.1,
            message=f"relay {name} did not start",
        )
        return pid

    def broker_outage(self, redis_server: RedisServer, workers: Sequence[str]) -> None:
        """Kill the private Redis broker until one of ``workers`` notices (a worker may even
        exit over it; the supervisor restarts it), then start it again, empty: whatever was
        queued or unacknowledged is gone."""
        seen = {name: len(self.supervisor.log(name)) for name in workers}
        with redis_server.outage():
            wait_until(
                lambda: any(
                    "Connection to broker lost" in self.supervisor.log(name)[seen[name] :]
                    or self.supervisor.restarts(name) > 0
                    for name in workers
                ),
                timeout=30,
                message="no worker noticed the broker outage",
            )

    # -- runs --------------------------------------------------------------------------------

    def start_runs(self, workflow: str, input: Any, count: int = 1) -> list[str]:
        """Start ``count`` runs of ``workflow`` in one transaction; their ids."""
        with self.engine.engine.begin() as conn:
            return [self.engine.start(conn, workflow, input).run_id for _ in range(count)]

    def states(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Each run's state."""
        with self.engine.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id::text, state FROM saga.runs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": list(run_ids)},
            ).all()
        return {r[0]: r[1] for r in rows}

    def wait_finished(self, run_ids: Sequence[str], timeout: float = 60) -> dict[str, str]:
        """Wait until every run has finished (whatever the outcome); their states."""

        def finished() -> dict[str, str] | None:
            states = self.states(run_ids)
            if len(states) == len(run_ids) and set(states.values()) <= FINISHED:
                return states
            raise AssertionError(f"states so far: {dict(Counter(states.values()))}")

        return wait_until(
            finished, timeout=timeout, interval=0.2, message=f"{len(run_ids)} runs did not finish"
        )

    def run(self, run_id: str) -> dict[str, Any]:
        """The run's row with its steps and history."""
        return self.engine.get_run(run_id)

    def executions(self, run_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Recorded executions of step code (of ``run_ids``, or all), oldest first."""
        sql = (
            "SELECT run_id::text AS run_id, kind, step, attempt, idempotency_key, note "
            "FROM executions"
        )
        params: dict[str, Any] = {}
        if run_ids is not None:
            sql += " WHERE run_id = ANY(CAST(:ids AS uuid[]))"
            params["ids"] = list(run_ids)
        with self.engine.engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(sql + " ORDER BY id"), params).mappings()]

    def history_count(self, event: str) -> int:
        """How many history entries of ``event`` all runs have."""
        with self.engine.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM saga.history WHERE event = :e"), {"e": event}
                ).scalar_one()
            )

    def execution_count(self) -> int:
        """How many times any step code ran so far."""
        with self.engine.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM executions")).scalar_one())


@pytest.fixture
def broker() -> str:
    """The broker a system uses; tests parametrize it ("redis" or "rabbitmq")."""
    return "redis"


WorkflowsOf = Callable[[str], list[saga.Workflow]]
"""Builds an app's workflows for a queue, as the test process must see them."""


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    """The Celery app a system's processes run, and how the test process builds the same
    workflows for the test's queue. A test module overrides it to run another app."""
    from tests.apps import flows

    return APP, flows.workflows


@pytest.fixture
def system(
    request: pytest.FixtureRequest,
    system_app: tuple[str, WorkflowsOf],
    broker: str,
    db_url: str,
    redis_url: str,
    amqp_url: str,
    supervisor: Supervisor,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[System]:
    """A database with an ``executions`` table, a queue of this test's own on ``broker``, and
    the environment for worker and relay processes; start them with the System's methods.
    A test that also asks for ``redis_server`` gets that private Redis as its broker."""
    queue = f"saga_{secrets.token_hex(4)}"
    broker_url = redis_url if broker == "redis" else amqp_url
    if "redis_server" in request.fixturenames:
        broker_url = request.getfixturevalue("redis_server").url
    env = {
        "SAGA_DATABASE_URL": db_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_TEST_QUEUE": queue,
        "SAGA_LEASE_GRACE": str(LEASE_GRACE),
        "SAGA_REPUBLISH_AFTER": str(REPUBLISH_AFTER),
        "PYTHONUNBUFFERED": "1",
    }
    setup = create_engine(db_url)
    try:
        with setup.begin() as conn:
            conn.execute(text(EXECUTIONS_DDL))
    finally:
        setup.dispose()

    # The test process builds the same workflow definitions as its workers (same queue, so
    # the same definition hash). Importing the app module needs a database URL.
    monkeypatch.setenv("SAGA_DATABASE_URL", db_url)
    app, workflows_of = system_app
    registry = saga.Registry(*workflows_of(queue))
    settings = Settings(lease_grace=LEASE_GRACE, republish_after=REPUBLISH_AFTER)
    engine = saga.Saga(registry, database_url=db_url, settings=settings)
    try:
        yield System(broker, broker_url, queue, db_url, supervisor, engine, env, app=app)
    finally:
        supervisor.stop_all()
        engine.engine.dispose()
        if broker == "rabbitmq":
            with contextlib.suppress(Exception), Connection(amqp_url) as conn:
                conn.default_channel.queue_delete(queue)


# -- Redis outages ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis server for a test that kills its broker; stopped at teardown."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
