"""Shared fixtures: real PostgreSQL databases cloned from a migrated template, Redis and
RabbitMQ URLs, and a process supervisor."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest
import redis
from sqlalchemy import Engine, create_engine

from tests.support import db
from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

REDIS_TEST_DB = int(os.environ.get("SAGA_TEST_REDIS_DB", "5"))
REDIS_BASE = os.environ.get("SAGA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session")
def db_template() -> Iterator[str]:
    """Name of the migrated template database, (re)created once per session."""
    name = db.create_template()
    yield name
    db.drop_database(name)


@pytest.fixture
def db_url(db_template: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database with saga's schema (``saga``) migrated to head."""
    name = db.random_name()
    db.create_database(name, template=db_template)
    try:
        yield db.sqlalchemy_url(name)
    finally:
        db.drop_database(name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on :func:`db_url`'s database, disposed at teardown."""
    eng = create_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database (no migrations), for migration tests."""
    name = db.random_name()
    db.create_database(name)
    try:
        yield db.sqlalchemy_url(name)
    finally:
        db.drop_database(name)


@pytest.fixture
def redis_url() -> str:
    """URL of a Redis database reserved for tests, emptied first. It first waits (with a
    deadline) for Redis to answer: an outage test may have just restarted it."""
    url = f"{REDIS_BASE}/{REDIS_TEST_DB}"
    wait_until(
        lambda: _redis_answers(url), timeout=60, interval=0.2, message="Redis is not up"
    )
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def amqp_url() -> str:
    """URL of the test RabbitMQ broker."""
    return AMQP_URL


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def supervisor(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Supervisor]:
    """A :class:`~tests.support.procs.Supervisor` whose processes are stopped at teardown; when
    the test failed, the tail of each process's log is printed."""
    sup = Supervisor(log_dir=tmp_path_factory.mktemp("procs"))
    try:
        yield sup
    finally:
        sup.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for name in sup.names():
                print(f"\n===== last lines of {name} ({sup.log_path(name)}) =====")
                print(sup.tail(name, 60))
