"""The relay against the real PostgreSQL and a real Redis broker, driven in-process: no
transaction across a publish, and republishing that backs off per message."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import text

from saga import Saga, Settings
from saga.celery_adapter import CeleryPublisher
from saga.core.attempts import AttemptRef
from saga.messages import Envelope
from saga.relay import Relay
from saga.sweeper import Sweeper
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


@pytest.fixture
def slow_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis server that a test can put to sleep (``DEBUG SLEEP``)."""
    server = RedisServer(tmp_path, extra=["--enable-debug-command", "yes"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Spy:
    """Wraps a real publisher and says when a publish has begun."""

    def __init__(self, inner: CeleryPublisher) -> None:
        self.inner = inner
        self.publishing = threading.Event()
        self.count = 0

    def publish(self, envelope: Envelope) -> None:
        self.publishing.set()
        self.inner.publish(envelope)
        self.count += 1


def test_a_cancel_returns_while_the_relay_is_still_publishing_its_batch(
    saga_engine: Saga, slow_redis: RedisServer
) -> None:
    app = Celery("relay-test", broker=slow_redis.url)
    spy = Spy(CeleryPublisher(app, timeout=30))
    relay = Relay(saga_engine, spy, batch_size=10)
    run_ids = [saga_engine.start_now("it.diamond", {}).run_id for _ in range(3)]
    client = redis.Redis.from_url(slow_redis.url)
    client.ping()

    asleep = threading.Thread(target=lambda: client.execute_command("DEBUG", "SLEEP", "4"))
    asleep.start()
    wait_until(lambda: _sleeping(slow_redis), message="Redis did not go to sleep")
    batch = threading.Thread(target=relay.publish_batch)
    batch.start()
    assert spy.publishing.wait(10), "the relay did not start publishing"

    # The broker answers nothing for seconds; the relay is inside its first publish.
    assert saga_engine.cancel(run_ids[0]) == "cancelled"  # nothing of it had started
    assert batch.is_alive(), "the cancel waited for the relay's publishes"
    with saga_engine.autocommit() as conn:  # nor does anything else of the run's
        conn.execute(text("SELECT 1 FROM saga.runs WHERE id = :r FOR UPDATE"),
                     {"r": run_ids[1]})
    assert batch.is_alive()

    asleep.join(10)
    batch.join(30)
    assert not batch.is_alive()
    assert saga_engine.get_run(run_ids[0])["state"] == "cancelled"
    # The other runs' messages went out and are marked published.
    with saga_engine.engine.connect() as conn:
        unpublished = conn.execute(
            text("SELECT count(*) FROM saga.outbox WHERE published_at IS NULL")
        ).scalar()
    assert unpublished == 0
    client.close()


def _sleeping(server: RedisServer) -> bool:
    probe = redis.Redis.from_url(server.url, socket_timeout=0.2)
    try:
        probe.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        probe.close()


def test_a_relay_killed_between_taking_and_marking_a_batch_leaves_it_due_again(
    saga_engine: Saga,
) -> None:
    saga_engine.start_now("it.linear", {})
    outbox = saga_engine.lifecycle.outbox
    with saga_engine.autocommit() as conn:
        taken = outbox.take_batch(conn, limit=10, lookahead=0, hold=0.3)
        assert len(taken) == 1
        # Another relay does not take what this one holds ...
        assert outbox.take_batch(conn, limit=10, lookahead=0, hold=0.3) == []
    # ... and once the hold passes (this one died), it is due again: published twice at most.
    def due_again() -> bool:
        with saga_engine.autocommit() as conn:
            return len(outbox.take_batch(conn, limit=10, lookahead=0, hold=30)) == 1

    wait_until(due_again, timeout=10, message="the held message never came due again")


def test_a_message_a_worker_sent_back_while_the_relay_published_it_stays_sent_back(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    outbox = saga_engine.lifecycle.outbox
    with saga_engine.autocommit() as conn:
        taken = outbox.take_batch(conn, limit=10, lookahead=0, hold=30)
        # A fast worker without the run's definition got the message and sent it back ...
        assert outbox.defer(conn, AttemptRef(run_id, "step", "a", 1)) == 1
        # ... before the relay said it had published it.
        outbox.mark_published(conn, [r["id"] for r in taken], taken[0]["held_until"], 300)
        row = conn.execute(text("SELECT published_at, deferrals FROM saga.outbox")).one()
    assert tuple(row) == (None, 1), "the deferral must not be overwritten"


def test_fifty_unclaimed_messages_and_five_sweeps_past_republish_after_make_two_copies_each(
    db_url: str, redis_url: str, saga_engine: Saga
) -> None:
    settings = Settings(republish_after=0.5)
    engine = Saga(saga_engine.registry, engine=saga_engine.engine, settings=settings)
    app = Celery("republish-test", broker=redis_url)
    relay = Relay(engine, CeleryPublisher(app), batch_size=100)
    sweeper = Sweeper(engine)
    for _ in range(50):
        engine.start_now("it.linear", {})  # each readies one step; no worker ever takes it
    assert relay.publish_batch() == 50

    client = redis.Redis.from_url(redis_url)
    republished = 0
    for _ in range(5):
        # Each sweep comes once republish_after has passed since the one before.
        since = time.monotonic()
        wait_until(lambda: time.monotonic() - since > 0.6, interval=0.05)  # noqa: B023
        republished += sweeper.republish_lost()
        relay.publish_batch()
    copies = client.llen("saga")
    client.close()
    assert republished == 50, "the first republish is due after republish_after"
    assert copies <= 100, f"{copies} broker messages for 50 steps"
    assert _publish_counts(engine) == {2: 50}


def _publish_counts(engine: Saga) -> dict[int, int]:
    with engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT publish_count, count(*) FROM saga.outbox GROUP BY publish_count")
        ).all()
    return {int(r[0]): int(r[1]) for r in rows}


def test_a_message_published_again_goes_out_later_each_time(saga_engine: Saga) -> None:
    engine = Saga(
        saga_engine.registry, engine=saga_engine.engine, settings=Settings(republish_after=10)
    )
    engine.start_now("it.linear", {})
    outbox = engine.lifecycle.outbox
    gaps: list[float] = []
    for _ in range(3):
        with engine.autocommit() as conn:
            taken = outbox.take_batch(conn, limit=10, lookahead=0, hold=30)
            outbox.mark_published(conn, [r["id"] for r in taken], taken[0]["held_until"], 10)
            gap = conn.execute(
                text("SELECT EXTRACT(EPOCH FROM republish_at - published_at) FROM saga.outbox")
            ).scalar()
            gaps.append(round(float(gap)))
            conn.execute(text("UPDATE saga.outbox SET published_at = NULL, available_at = now()"))
    assert gaps == [10, 80, 640]


def test_a_reader_never_sees_a_completed_run_without_its_result(saga_engine: Saga) -> None:
    from saga.testing import drain

    seen: list[Any] = []
    done = threading.Event()

    def read() -> None:
        with saga_engine.autocommit() as conn:
            while not done.is_set():
                seen.extend(
                    conn.execute(
                        text(
                            "SELECT id FROM saga.runs WHERE state = 'completed' "
                            "AND (result IS NULL OR finished_at IS NULL)"
                        )
                    ).all()
                )

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(4):
            with saga_engine.engine.begin() as conn:
                for _ in range(50):
                    saga_engine.start(conn, "it.diamond", {})
            drain(saga_engine, timeout=60)
    finally:
        done.set()
        reader.join(10)
    assert seen == []
    with saga_engine.engine.connect() as conn:
        results = conn.execute(text("SELECT DISTINCT result::text FROM saga.runs")).scalars()
        assert list(results) == ['{"d": "abac"}']


def test_a_sweeper_without_a_runs_workflow_leaves_the_run_to_a_relay_that_has_it(
    saga_engine: Saga,
) -> None:
    from saga import Registry, Workflow

    stopping = saga_engine.start_now("it.linear", {}).run_id
    late = saga_engine.start_now("it.diamond", {}).run_id
    with saga_engine.engine.begin() as conn:
        conn.execute(text(
            "UPDATE saga.runs SET state = 'compensating', updated_at = now() - interval '1 hour' "
            "WHERE id = :r"), {"r": stopping})
        conn.execute(text(
            "UPDATE saga.runs SET deadline_at = now() - interval '1 minute' WHERE id = :r"),
            {"r": late})
    other = Workflow("it.other")
    other.add_step("x", lambda ctx: None)
    old_relay = Saga(Registry(other), engine=saga_engine.engine)

    Sweeper(old_relay).sweep()  # an old relay in a rolling deploy: it must not stop

    assert saga_engine.get_run(stopping)["state"] == "compensating"
    assert saga_engine.get_run(late)["state"] == "running"
    assert Sweeper(saga_engine).sweep().total >= 2  # a relay with the workflows moves them
    assert saga_engine.get_run(stopping)["state"] == "failed"  # nothing of either had started
    assert saga_engine.get_run(late)["state"] == "failed"


def test_a_batch_the_broker_refused_is_due_again_as_it_was(saga_engine: Saga) -> None:
    saga_engine.start_now("it.linear", {})
    outbox = saga_engine.lifecycle.outbox
    with saga_engine.autocommit() as conn:
        due = conn.execute(text("SELECT available_at FROM saga.outbox")).scalar_one()
        taken = outbox.take_batch(conn, limit=10, lookahead=0, hold=30)
        outbox.release(conn, taken, taken[0]["held_until"])
        again = conn.execute(text("SELECT available_at FROM saga.outbox")).scalar_one()
    assert again == due, "its age still counts from when it first came due"


class Refusing:
    """A publisher that records what it publishes and refuses everything from its
    ``refuse_from``-th message on (``None``: never)."""

    def __init__(self, refuse_from: int | None = None) -> None:
        self.refuse_from = refuse_from
        self.sent: list[str] = []

    def publish(self, envelope: Envelope) -> None:
        if self.refuse_from is not None and len(self.sent) >= self.refuse_from:
            raise ConnectionError("the broker refused")
        self.sent.append(envelope.message.run_id)


def _outbox_rows(saga: Saga) -> list[tuple[str, bool, object]]:
    with saga.autocommit() as conn:
        rows = conn.execute(
            text("SELECT run_id::text, published_at IS NOT NULL, available_at FROM saga.outbox"
                 " ORDER BY id")
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def test_the_relays_backlog_goes_out_in_order_batch_after_batch_each_message_once(
    saga_engine: Saga,
) -> None:
    run_ids = [saga_engine.start_now("it.linear", {}).run_id for _ in range(25)]
    publisher = Refusing()
    relay = Relay(saga_engine, publisher, batch_size=10)

    assert relay.publish_backlog(seconds=60) == (25, False)

    assert publisher.sent == run_ids  # the outbox's order, across the three batches
    assert [published for _, published, _ in _outbox_rows(saga_engine)] == [True] * 25
    assert relay.publish_backlog() == (0, False)


def test_a_broker_failure_in_the_backlog_hands_back_the_rest_and_the_batch_taken_after_it(
    saga_engine: Saga,
) -> None:
    run_ids = [saga_engine.start_now("it.linear", {}).run_id for _ in range(30)]
    before = _outbox_rows(saga_engine)
    publisher = Refusing(refuse_from=14)  # the second batch fails after 4 of its messages
    relay = Relay(saga_engine, publisher, batch_size=10)

    with pytest.raises(ConnectionError):
        relay.publish_backlog(seconds=60)

    assert publisher.sent == run_ids[:14]
    after = _outbox_rows(saga_engine)
    assert [published for _, published, _ in after] == [True] * 14 + [False] * 16
    # What did not go out (the rest of the second batch and the whole third one, taken while
    # the second was published) is due again at once, as it was: nothing waits for the hold.
    assert [due for _, _, due in after[14:]] == [due for _, _, due in before[14:]]
