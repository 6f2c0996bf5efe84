"""Waiting for a run's outcome on the real PostgreSQL: woken by the runs table's notification,
a bounded poll when none comes, the end state and error of a run that did not complete."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from saga import (
    PermanentError,
    Registry,
    RunFailedError,
    RunHandle,
    Saga,
    SagaError,
    Settings,
    StepContext,
    UnknownRunError,
    WaitTimeoutError,
    Workflow,
)
from saga.testing import drain
from tests.integration.conftest import NO_WAIT
from tests.support.waiting import wait_until

NEVER = 600.0
"""A poll interval longer than any wait here: a waiter that wakes was notified."""


def _charge(ctx: StepContext) -> Any:
    if ctx.input.get("decline"):
        raise PermanentError("card declined")
    return {"charge_id": f"ch_{ctx.input['order']}"}


def _refund(ctx: StepContext) -> None:
    if ctx.input.get("refund_fails"):
        raise PermanentError("refund refused")


def _workflows() -> list[Workflow]:
    wf = Workflow("h.checkout", retry=NO_WAIT)
    wf.add_step("reserve", lambda ctx: "reserved", compensate=_refund)
    wf.add_step("charge", _charge, after=["reserve"])
    return [wf]


def make_engine(db_url: str, poll: float) -> Saga:
    engine = create_engine(db_url, pool_size=5, max_overflow=5)
    return Saga(
        Registry(*_workflows()), engine=engine, settings=Settings(wait_poll_interval=poll)
    )


@pytest.fixture
def saga_engine(db_url: str) -> Iterator[Saga]:
    saga = make_engine(db_url, NEVER)
    try:
        yield saga
    finally:
        saga.engine.dispose()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its value or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def waiting_on(saga: Saga, run_id: str) -> None:
    """Wait until someone waits on ``run_id`` with the listening connection up."""
    watcher = saga.watcher
    wait_until(
        lambda: watcher._listening.is_set() and run_id in watcher._waiters,
        timeout=10,
        message="the waiter did not start listening",
    )


def test_a_waiter_is_woken_by_the_notification_and_gets_the_result(saga_engine: Saga) -> None:
    started = saga_engine.start_now("h.checkout", {"order": 7})
    thread, out = in_thread(lambda: started.wait(timeout=60))
    waiting_on(saga_engine, started.run_id)
    assert out == [], "the run had not ended, yet the wait returned"

    drain(saga_engine)
    thread.join(30)
    assert out == [{"charge": {"charge_id": "ch_7"}}]


def test_a_run_that_ends_otherwise_raises_its_end_state_and_error(saga_engine: Saga) -> None:
    started = saga_engine.start_now("h.checkout", {"order": 7, "decline": True})
    thread, out = in_thread(lambda: started.wait(timeout=60))
    waiting_on(saga_engine, started.run_id)
    drain(saga_engine)
    thread.join(30)

    [error] = out
    assert isinstance(error, RunFailedError)
    assert (error.run_id, error.state) == (started.run_id, "compensated")
    assert error.error["message"] == "card declined"
    assert error.error["step"] == "charge"
    assert not error.retryable
    assert str(error) == f"run {started.run_id} ended compensated: card declined"


def test_a_run_waiting_for_an_operator_ends_the_wait_as_compensation_failed(
    saga_engine: Saga,
) -> None:
    started = saga_engine.start_now(
        "h.checkout", {"order": 7, "decline": True, "refund_fails": True}
    )
    thread, out = in_thread(lambda: saga_engine.handle(started.run_id).wait(timeout=60))
    waiting_on(saga_engine, started.run_id)
    drain(saga_engine)
    thread.join(30)

    [error] = out
    assert isinstance(error, RunFailedError)
    assert error.state == "compensation_failed"
    assert error.error["message"] == "refund refused"


def test_a_wait_that_times_out_says_the_state_the_run_is_in(saga_engine: Saga) -> None:
    started = saga_engine.start_now("h.checkout", {"order": 7})
    with pytest.raises(WaitTimeoutError) as caught:
        started.wait(timeout=0.3)
    assert caught.value.state == "running"
    assert isinstance(caught.value, TimeoutError)
    assert f"run {started.run_id} is still running after 0.3s" == str(caught.value)


def test_without_notifications_a_waiter_still_sees_the_end_by_polling(db_url: str) -> None:
    saga = make_engine(db_url, poll=0.2)
    try:
        with saga.engine.begin() as conn:
            conn.execute(text("ALTER TABLE saga.runs DISABLE TRIGGER runs_notify_ended"))
        started = saga.start_now("h.checkout", {"order": 7})
        thread, out = in_thread(lambda: started.wait(timeout=60))
        waiting_on(saga, started.run_id)
        drain(saga)
        thread.join(30)
        assert out == [{"charge": {"charge_id": "ch_7"}}]
    finally:
        saga.engine.dispose()


def test_an_async_waiter_is_woken_by_the_notification(saga_engine: Saga) -> None:
    started = saga_engine.start_now("h.checkout", {"order": 8})

    async def main() -> Any:
        waiter = asyncio.ensure_future(saga_engine.handle(started.run_id).wait_async(60))
        await asyncio.to_thread(waiting_on, saga_engine, started.run_id)
        assert not waiter.done()
        await asyncio.to_thread(drain, saga_engine)
        return await asyncio.wait_for(waiter, 30)

    assert asyncio.run(main()) == {"charge": {"charge_id": "ch_8"}}


def test_a_handle_by_business_key_waits_on_the_keys_run(saga_engine: Saga) -> None:
    started = saga_engine.start_now("h.checkout", {"order": 9}, key="order-9")
    drain(saga_engine)
    handle = saga_engine.handle("order-9")
    assert handle.run_id == started.run_id
    assert handle.wait(timeout=10) == {"charge": {"charge_id": "ch_9"}}


def test_waiting_on_a_run_whose_start_is_not_committed_says_so(saga_engine: Saga) -> None:
    with saga_engine.engine.connect() as conn, conn.begin():
        started = saga_engine.start(conn, "h.checkout", {"order": 7})
        with pytest.raises(UnknownRunError, match="exists once it commits"):
            started.wait(timeout=5)
    with pytest.raises(SagaError, match="has no engine"):
        RunHandle(started.run_id).wait()


def test_a_run_someone_waits_on_notifies_once_when_it_ends_and_others_not_at_all(
    saga_engine: Saga, db_url: str
) -> None:
    conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute('LISTEN "saga_runs"')
        awaited = saga_engine.start_now("h.checkout", {"order": 7})
        ignored = saga_engine.start_now("h.checkout", {"order": 8})
        listener.execute(
            "INSERT INTO saga.run_waiters (id, run_id) VALUES (gen_random_uuid(), %s)",
            (awaited.run_id,),
        )
        drain(saga_engine)
        with saga_engine.engine.begin() as conn:  # no change of state: no notification
            conn.execute(text("UPDATE saga.runs SET updated_at = now()"))
        notes = [n.payload for n in listener.notifies(timeout=1.0)]
    # A notification costs every listening connection a transaction: only waited-on runs.
    assert notes == [awaited.run_id]
    assert ignored.run_id not in notes
