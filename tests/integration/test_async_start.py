"""Starting runs with SQLAlchemy's asyncio API (psycopg's async driver) on the real PostgreSQL:
in the caller's AsyncSession or AsyncConnection, committed with the business write or not at
all, under the same key policies as a synchronous start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from saga import KeyConflictError, KeyPolicy, Registry, Saga, Workflow
from saga.testing import drain


def count(saga: Saga, sql: str) -> int:
    with saga.engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def run_async(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE IF NOT EXISTS orders (id int primary key)"))
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_an_async_start_commits_with_the_order_in_the_callers_session(
    saga_engine: Saga, db_url: str
) -> None:
    async def body(engine: AsyncEngine) -> Any:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("INSERT INTO orders VALUES (1)"))
            started = await saga_engine.start_async(
                session, "it.linear", {"order": 1}, key="order-1"
            )
            assert count(saga_engine, "SELECT count(*) FROM saga.runs") == 0, "not committed yet"
        return started

    started = run_async(db_url, body)
    assert started.created
    assert count(saga_engine, "SELECT count(*) FROM orders") == 1
    assert str(saga_engine.get_run("order-1")["id"]) == started.run_id
    drain(saga_engine)
    assert started.wait(timeout=10) == {"c": 3}


def test_a_rolled_back_async_start_leaves_neither_the_order_nor_the_run(
    saga_engine: Saga, db_url: str
) -> None:
    async def body(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("INSERT INTO orders VALUES (1)"))
            await saga_engine.start_async(conn, "it.linear", {"order": 1})
            await conn.rollback()

    run_async(db_url, body)
    for table in ("orders", "saga.runs", "saga.step_runs", "saga.outbox", "saga.history"):
        assert count(saga_engine, f"SELECT count(*) FROM {table}") == 0, table


def test_an_async_start_follows_the_key_policy(saga_engine: Saga, db_url: str) -> None:
    async def body(engine: AsyncEngine) -> tuple[Any, Any]:
        async with engine.begin() as conn:
            first = await saga_engine.start_async(conn, "it.linear", {"n": 1}, key="order-1")
            again = await saga_engine.start_async(conn, "it.linear", {"n": 1}, key="order-1")
            with pytest.raises(KeyConflictError):
                await saga_engine.start_async(
                    conn, "it.linear", {"n": 2}, key="order-1",
                    key_policy=KeyPolicy.REFUSE_CHANGED_INPUT,
                )
        return first, again

    first, again = run_async(db_url, body)
    assert (again.run_id, again.created) == (first.run_id, False)
    assert count(saga_engine, "SELECT count(*) FROM saga.runs") == 1


def _waiting_engine(db_url: str) -> Saga:
    wf = Workflow("it.wait_async")
    wf.wait_for_signal("paid", signal="payment_captured", timeout=60)
    return Saga(Registry(wf), database_url=db_url)


def test_an_async_signal_is_delivered_with_the_callers_write_and_not_if_it_rolls_back(
    db_url: str,
) -> None:
    saga = _waiting_engine(db_url)
    run = saga.start_now("it.wait_async", {})
    drain(saga)

    async def body(engine: AsyncEngine) -> str:
        async with AsyncSession(engine) as session:
            async with session.begin():
                await session.execute(text("INSERT INTO orders VALUES (1)"))
                assert await saga.signal_async(session, run.run_id, "payment_captured", 1) == (
                    "delivered"
                )
                await session.rollback()
            async with session.begin():
                await session.execute(text("INSERT INTO orders VALUES (2)"))
                return await saga.signal_async(session, run.run_id, "payment_captured", 2)

    try:
        assert run_async(db_url, body) == "delivered"
        assert count(saga, "SELECT count(*) FROM orders") == 1
        assert saga.get_run(run.run_id)["result"] == {"paid": 2}
    finally:
        saga.engine.dispose()
