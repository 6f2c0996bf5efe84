"""Business keys on the real PostgreSQL: the key policies, one unfinished run per key, the key's
newest run found by id-or-key look-ups, and running a finished run again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from saga import (
    DefinitionError,
    InvalidTransitionError,
    KeyConflictError,
    KeyPolicy,
    PermanentError,
    Registry,
    Saga,
    Settings,
    StepContext,
    Workflow,
)
from saga.testing import drain
from tests.integration.conftest import NO_WAIT


def _decline(ctx: StepContext) -> Any:
    if ctx.input.get("decline"):
        raise PermanentError("declined")
    return {"charged": ctx.input["order"]}


def _workflows() -> list[Workflow]:
    plain = Workflow("k.plain", retry=NO_WAIT)
    plain.add_step("charge", _decline)
    refusing = Workflow("k.refusing", retry=NO_WAIT, key_policy=KeyPolicy.REFUSE_CHANGED_INPUT)
    refusing.add_step("charge", _decline)
    again = Workflow("k.again", retry=NO_WAIT, key_policy="new_after_finish")
    again.add_step("reserve", lambda ctx: "reserved", compensate=lambda ctx: None)
    again.add_step("charge", _decline, after=["reserve"])
    return [plain, refusing, again]


@pytest.fixture
def saga_engine(db_url: str) -> Iterator[Saga]:
    engine = create_engine(db_url, pool_size=5, max_overflow=5)
    try:
        yield Saga(Registry(*_workflows()), engine=engine, settings=Settings())
    finally:
        engine.dispose()


def runs_of(saga: Saga, key: str) -> list[tuple[str, str]]:
    with saga.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id::text, state FROM saga.runs WHERE business_key = :k "
                "ORDER BY created_at"
            ),
            {"k": key},
        )
        return [(r[0], r[1]) for r in rows]


def test_by_default_a_key_whose_run_finished_still_returns_that_run(saga_engine: Saga) -> None:
    first = saga_engine.start_now("k.plain", {"order": 1}, key="order-1")
    drain(saga_engine)
    again = saga_engine.start_now("k.plain", {"order": 2}, key="order-1")
    assert not again.created
    assert again.run_id == first.run_id
    assert saga_engine.get_run("order-1")["input"] == {"order": 1}


def test_refusing_a_changed_input_returns_the_run_for_the_same_input_and_otherwise_names_it(
    saga_engine: Saga,
) -> None:
    first = saga_engine.start_now("k.refusing", {"order": 1, "items": [1, 2]}, key="order-1")
    same = saga_engine.start_now("k.refusing", {"items": [1, 2], "order": 1}, key="order-1")
    assert (same.run_id, same.created) == (first.run_id, False)

    with pytest.raises(KeyConflictError) as caught:
        saga_engine.start_now("k.refusing", {"order": 1, "items": [3]}, key="order-1")
    assert caught.value.run_id == first.run_id
    assert "order-1" in str(caught.value) and first.run_id in str(caught.value)
    assert not caught.value.retryable
    # A policy passed to one start wins over the declared one.
    passed = saga_engine.start_now(
        "k.refusing", {"order": 9}, key="order-1", key_policy=KeyPolicy.RETURN_EXISTING
    )
    assert passed.run_id == first.run_id
    assert runs_of(saga_engine, "order-1") == [(first.run_id, "running")]


def test_new_after_finish_returns_the_unfinished_run_then_starts_a_new_one_the_key_names(
    saga_engine: Saga,
) -> None:
    first = saga_engine.start_now("k.again", {"order": 1, "decline": True}, key="order-1")
    while_running = saga_engine.start_now("k.again", {"order": 1}, key="order-1")
    assert (while_running.run_id, while_running.created) == (first.run_id, False)
    drain(saga_engine)
    assert saga_engine.get_run("order-1")["state"] == "compensated"

    second = saga_engine.start_now("k.again", {"order": 1}, key="order-1")
    assert second.created and second.run_id != first.run_id
    assert saga_engine.get_run("order-1")["id"].hex == second.run_id.replace("-", "")
    assert saga_engine.handle("order-1").run_id == second.run_id
    drain(saga_engine)
    assert runs_of(saga_engine, "order-1") == [
        (first.run_id, "compensated"),
        (second.run_id, "completed"),
    ]


def test_the_database_refuses_a_second_unfinished_run_of_one_key(saga_engine: Saga) -> None:
    first = saga_engine.start_now("k.plain", {"order": 1}, key="order-1")
    refused = pytest.raises(IntegrityError, match="uq_runs_workflow_business_key_unfinished")
    with refused, saga_engine.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO saga.runs (id, workflow, version, definition_hash, input, "
                "steps_remaining, business_key) SELECT gen_random_uuid(), workflow, "
                "version, definition_hash, input, 1, business_key FROM saga.runs "
                "WHERE id = :id"
            ),
            {"id": first.run_id},
        )


def test_two_concurrent_starts_of_a_finished_key_start_one_new_run(saga_engine: Saga) -> None:
    first = saga_engine.start_now("k.again", {"order": 1}, key="order-1")
    drain(saga_engine)
    results: list[Any] = []
    with saga_engine.engine.connect() as conn_a:
        tx = conn_a.begin()
        mine = saga_engine.start(conn_a, "k.again", {"order": 1}, key="order-1")

        def other() -> None:
            # Waits on the unique index until the first transaction ends.
            results.append(saga_engine.start_now("k.again", {"order": 1}, key="order-1"))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second start did not wait for the first"
        tx.commit()
        thread.join(30)
    assert mine.created
    assert [(r.run_id, r.created) for r in results] == [(mine.run_id, False)]
    assert [r for r, _ in runs_of(saga_engine, "order-1")] == [first.run_id, mine.run_id]


def test_a_finished_run_runs_again_under_its_key_with_its_input(saga_engine: Saga) -> None:
    first = saga_engine.start_now("k.plain", {"order": 1, "decline": True}, key="order-1")
    drain(saga_engine)
    assert saga_engine.get_run(first.run_id)["state"] == "failed"

    again = saga_engine.rerun("order-1")
    assert again.created and again.run_id != first.run_id
    run = saga_engine.get_run("order-1")
    assert (str(run["id"]), run["input"], run["state"]) == (
        again.run_id, {"order": 1, "decline": True}, "running",
    )
    with pytest.raises(InvalidTransitionError, match="only a finished run"):
        saga_engine.rerun(again.run_id)
    drain(saga_engine)
    with pytest.raises(InvalidTransitionError, match=f"names a newer run, {again.run_id}"):
        saga_engine.rerun(first.run_id)


def test_retrying_a_failed_run_whose_key_started_a_new_run_is_refused(saga_engine: Saga) -> None:
    first = saga_engine.start_now("k.plain", {"order": 1, "decline": True}, key="order-1")
    drain(saga_engine)
    second = saga_engine.rerun(first.run_id)

    with pytest.raises(InvalidTransitionError, match="newer unfinished run"):
        saga_engine.retry(first.run_id)
    assert runs_of(saga_engine, "order-1") == [(first.run_id, "failed"), (second.run_id, "running")]


def test_a_wrong_key_policy_is_refused_when_declared_and_when_passed(saga_engine: Saga) -> None:
    with pytest.raises(DefinitionError, match="key_policy must be one of"):
        Workflow("k.bad", key_policy="sometimes")
    with pytest.raises(ValueError, match="key_policy must be one of"):
        saga_engine.start_now("k.plain", {"order": 1}, key="order-1", key_policy="never")
