"""Transactional steps on the real PostgreSQL: a step's writes through ``ctx.connection`` and
its completion commit together, or neither does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import saga
from saga import RetryPolicy, Saga, StepContext, Workflow
from saga.testing import drain

FAIL_AFTER_WRITE: set[int] = set()
"""Attempts of ``book`` that raise after their write."""
NOW = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01, jitter=0.0)


@saga.transactional
def book(ctx: StepContext) -> dict[str, Any]:
    assert ctx.connection is not None
    ctx.connection.execute(
        text("INSERT INTO ledger (run_id, attempt) VALUES (:r, :a)"),
        {"r": ctx.run_id, "a": ctx.attempt},
    )
    if ctx.attempt in FAIL_AFTER_WRITE:
        raise RuntimeError(f"failed after writing, attempt {ctx.attempt}")
    return {"booked": ctx.attempt}


@saga.transactional
def commits_itself(ctx: StepContext) -> None:
    assert ctx.connection is not None
    ctx.connection.commit()


def _workflows() -> list[Workflow]:
    ledger = Workflow("tx.ledger", retry=NOW)
    ledger.add_step("pay", lambda ctx: "paid")
    ledger.add_step("book", book, after=["pay"])
    ledger.add_step("notify", lambda ctx: ctx.results["book"], after=["book"])
    rude = Workflow("tx.rude", retry=NOW)
    rude.add_step("rude", commits_itself)
    return [ledger, rude]


@pytest.fixture
def tx(db_url: str) -> Iterator[Saga]:
    FAIL_AFTER_WRITE.clear()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE ledger (run_id uuid, attempt int)"))
    try:
        yield Saga(saga.Registry(*_workflows()), engine=engine)
    finally:
        engine.dispose()


def ledger(saga_engine: Saga) -> list[tuple[str, int]]:
    with saga_engine.engine.connect() as conn:
        return [(str(r[0]), r[1]) for r in conn.execute(text("SELECT * FROM ledger"))]


def test_a_transactional_steps_write_commits_with_its_completion(tx: Saga) -> None:
    run_id = tx.start_now("tx.ledger", {}).run_id
    drain(tx)
    run = tx.get_run(run_id)
    assert (run["state"], run["result"]) == ("completed", {"notify": {"booked": 1}})
    assert ledger(tx) == [(run_id, 1)]


def test_a_transactional_step_that_fails_after_writing_leaves_nothing_and_its_retry_writes_once(
    tx: Saga,
) -> None:
    FAIL_AFTER_WRITE.update({1, 2})
    run_id = tx.start_now("tx.ledger", {}).run_id
    drain(tx)
    assert tx.get_run(run_id)["state"] == "completed"
    assert ledger(tx) == [(run_id, 3)], "the failed attempts' writes were rolled back"


def test_a_transactional_step_that_commits_its_own_transaction_fails_saying_so(tx: Saga) -> None:
    run_id = tx.start_now("tx.rude", {}).run_id
    drain(tx)
    run = tx.get_run(run_id)
    assert run["state"] == "failed"
    assert "must neither commit nor roll back ctx.connection" in run["error"]["message"]


def test_a_transactional_step_is_another_kind_of_step_in_the_definition() -> None:
    def declare(fn: Any) -> str:
        wf = Workflow("w")
        wf.add_step("a", fn)
        return wf.definition_hash

    def plain(ctx: StepContext) -> None:
        return None

    assert declare(plain) != declare(saga.transactional(lambda ctx: None))
    assert isinstance(Workflow("x").add_step("a", book).runner, saga.TransactionalStep)
