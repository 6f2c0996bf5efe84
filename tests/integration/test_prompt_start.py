"""Prompt start on the real PostgreSQL: a run started in a Session (or with start_now) has its
first steps published right after the commit, by the starting process, with the relay as the
fallback; nothing is published for a rollback."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from saga import Saga


class Recording:
    """A publisher that keeps what it was asked to publish, or refuses everything."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[dict[str, Any]] = []

    def publish(self, envelope: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append(envelope.message.as_body())


@pytest.fixture
def recording(saga_engine: Saga) -> Recording:
    found = Recording()
    saga_engine.use_publisher(lambda: found)
    return found


def unpublished(saga: Saga) -> list[str]:
    with saga.engine.connect() as conn:
        rows = conn.execute(text("SELECT step FROM saga.outbox WHERE published_at IS NULL"))
        return sorted(r[0] for r in rows)


def test_a_run_started_in_a_session_goes_out_right_after_the_commit(
    saga_engine: Saga, recording: Recording
) -> None:
    with Session(saga_engine.engine) as session:
        started = saga_engine.start(session, "it.diamond", {})
        assert recording.sent == [], "nothing goes out before the commit"
        session.commit()
    assert [(m["run_id"], m["step"], m["attempt"]) for m in recording.sent] == [
        (started.run_id, "a", 1)
    ]
    assert recording.sent[0]["definition"] == saga_engine.registry.get("it.diamond").definition_hash
    assert unpublished(saga_engine) == [], "the relay has nothing to do"


def test_a_rolled_back_start_publishes_nothing_and_the_session_stays_usable(
    saga_engine: Saga, recording: Recording
) -> None:
    with Session(saga_engine.engine) as session:
        saga_engine.start(session, "it.diamond", {})
        session.rollback()
        later = saga_engine.start(session, "it.linear", {})
        session.commit()
    assert [m["run_id"] for m in recording.sent] == [later.run_id]
    assert [m["workflow"] for m in recording.sent] == ["it.linear"]


def test_start_now_publishes_after_its_own_commit(saga_engine: Saga, recording: Recording) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    assert [(m["run_id"], m["step"]) for m in recording.sent] == [(run_id, "a")]


def test_when_the_broker_refuses_the_relay_gets_the_first_steps_back(saga_engine: Saga) -> None:
    saga_engine.use_publisher(lambda: Recording(fail=True))
    saga_engine.start_now("it.diamond", {})
    assert unpublished(saga_engine) == ["a"]


def test_a_start_on_a_plain_connection_leaves_its_messages_to_the_relay(
    saga_engine: Saga, recording: Recording
) -> None:
    with saga_engine.engine.begin() as conn:
        saga_engine.start(conn, "it.linear", {})
    assert recording.sent == []
    assert unpublished(saga_engine) == ["a"]
