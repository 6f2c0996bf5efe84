"""Child sagas, run inline (saga.testing.drain drains the children too) on the real
PostgreSQL: a child step starts one child run per attempt, completes with its result, fails
when it does not complete, and is undone by the child's own compensations."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from saga import RetryPolicy, Saga, Settings, StepContext, Workflow
from saga.cli.main import cli
from saga.executor import Executor
from saga.registry import Registry
from saga.relay import Relay
from saga.testing import InlinePublisher, drain
from tests.support.publishers import Collect
from tests.support.waiting import wait_until

NOW = RetryPolicy(max_attempts=1, initial_delay=0.01, max_delay=0.01, jitter=0.0)
TWICE = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.01, jitter=0.0)
UNDONE: list[str] = []
FAIL: set[str] = set()


def _reserve(ctx: StepContext) -> dict[str, Any]:
    if "reserve" in FAIL:
        raise RuntimeError("out of stock")
    return {"reserved": ctx.input["sku"]}


def _undo_reserve(ctx: StepContext) -> None:
    if "undo_reserve" in FAIL:
        raise RuntimeError("the warehouse is away")
    UNDONE.append(f"reserve:{ctx.input['sku']}")


def _undo_order(ctx: StepContext) -> None:
    UNDONE.append("order")


def _workflows() -> list[Workflow]:
    stock = Workflow("c.stock", retry=NOW)
    stock.add_step("reserve", _reserve, compensate=_undo_reserve)
    parent = Workflow("c.order", retry=NOW)
    parent.add_step("order", lambda ctx: {"order": 1}, compensate=_undo_order)
    parent.child("stock", workflow=stock, input=lambda ctx: {"sku": ctx.input["sku"]},
                 after=["order"])
    parent.add_step("ship", lambda ctx: ctx.results["stock"], after=["stock"])
    retried = Workflow("c.retried", retry=NOW)
    retried.child("stock", workflow="c.stock", retry=TWICE)
    late = Workflow("c.late", retry=NOW)
    late.add_step("order", lambda ctx: {"order": 1}, compensate=_undo_order)
    late.child("stock", workflow=stock, after=["order"])
    late.add_step("bill", lambda ctx: (_ for _ in ()).throw(RuntimeError("card declined"))
                  if "bill" in FAIL else {}, after=["stock"])
    unknown = Workflow("c.unknown", retry=NOW)
    unknown.child("missing", workflow="c.nowhere")
    leaf = Workflow("c.leaf", retry=NOW)
    leaf.wait_for_signal("go", signal="go", timeout=600)
    mid = Workflow("c.mid", retry=NOW)
    mid.child("leaf", workflow=leaf)
    top = Workflow("c.top", retry=NOW)
    top.child("mid", workflow=mid)
    return [parent, retried, late, unknown, top]


@pytest.fixture
def engine(db_url: str) -> Iterator[Saga]:
    UNDONE.clear()
    FAIL.clear()
    eng = create_engine(db_url)
    try:
        yield Saga(Registry(*_workflows()), engine=eng, settings=Settings())
    finally:
        eng.dispose()


def _children(saga: Saga, run_id: str) -> list[dict[str, Any]]:
    with saga.engine.connect() as conn:
        return saga.children.of_run(conn, run_id)


def _step(saga: Saga, run_id: str, step: str, kind: str = "step") -> dict[str, Any]:
    rows = saga.get_run(run_id)["steps"]
    return next(s for s in rows if s["step"] == step and s["kind"] == kind)


def test_a_child_step_completes_with_its_child_runs_result(engine: Saga) -> None:
    run = engine.start_now("c.order", {"sku": "A1"})
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "completed"
    (child,) = _children(engine, run.run_id)
    assert (child["workflow"], child["state"], child["parent_step"]) == (
        "c.stock", "completed", "stock"
    )
    assert engine.get_run(child["id"])["result"] == {"reserve": {"reserved": "A1"}}
    assert engine.get_run(run.run_id)["result"] == {"ship": {"reserve": {"reserved": "A1"}}}


def test_a_child_that_fails_fails_its_step_and_compensates_the_parent(engine: Saga) -> None:
    FAIL.add("reserve")
    run = engine.start_now("c.order", {"sku": "B2"})
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "compensated"
    (child,) = _children(engine, run.run_id)
    assert child["state"] == "compensated"  # a step that started is undone, failed or not
    error = engine.get_run(run.run_id)["error"]
    assert error["type"] == "saga.ChildFailed" and child["id"] in error["message"]
    assert UNDONE == ["reserve:B2", "order"]  # the child undid itself before its parent


def test_a_retried_child_step_starts_a_new_child_per_attempt(engine: Saga) -> None:
    FAIL.add("reserve")
    run = engine.start_now("c.retried", {"sku": "C3"})
    drain(engine)
    children = _children(engine, run.run_id)
    assert [c["parent_attempt"] for c in children] == [1, 2]
    assert {c["state"] for c in children} == {"compensated"}
    assert engine.get_run(run.run_id)["state"] == "compensated"


def test_a_redelivered_attempt_finds_its_child_instead_of_starting_another(engine: Saga) -> None:
    run = engine.start_now("c.order", {"sku": "D4"})
    drain(engine)
    (child,) = _children(engine, run.run_id)
    # The child's key names the attempt: starting under it again returns the same run.
    again = engine.start_now("c.stock", {"sku": "D4"}, key=f"child:{run.run_id}:stock:1")
    assert (again.run_id, again.created) == (child["id"], False)


def test_undoing_a_step_whose_child_completed_runs_the_childs_compensations(
    engine: Saga,
) -> None:
    FAIL.add("bill")
    run = engine.start_now("c.late", {"sku": "E5"})
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "compensated"
    (child,) = _children(engine, run.run_id)
    assert child["state"] == "compensated"
    assert UNDONE == ["reserve:E5", "order"]  # the child is undone before what came before it


def _run_until(saga: Saga, done: Callable[[], bool]) -> None:
    """Relay and run messages inline, waking no parent, until ``done()``."""
    publisher = InlinePublisher(Executor(saga, worker_id="inline"))
    relay = Relay(saga, publisher, batch_size=50)
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, "not done in 30 s"
        relay.publish_batch()
        publisher.run_pending()


def test_the_relays_own_loop_wakes_a_parent_whose_child_completed(engine: Saga) -> None:
    run = engine.start_now("c.order", {"sku": "J9"})

    def child_completed() -> bool:
        found = _children(engine, run.run_id)
        return bool(found) and found[0]["state"] == "completed"

    _run_until(engine, child_completed)
    assert _step(engine, run.run_id, "stock")["state"] == "suspended"
    collect = Collect()
    relay = Relay(engine, collect, poll_interval=0.2)
    loop = threading.Thread(target=relay.run)
    loop.start()
    try:
        wait_until(lambda: (run.run_id, "ship") in collect.steps, timeout=20,
                   message="the relay did not wake the parent")
    finally:
        relay.stop()
        loop.join(timeout=10)
    stock = _step(engine, run.run_id, "stock")
    assert (stock["state"], stock["result"]) == ("completed", {"reserve": {"reserved": "J9"}})


def test_cancelling_the_parent_cancels_its_child(engine: Saga, db_url: str) -> None:
    run = engine.start_now("c.order", {"sku": "F6"})
    # Run until the child step waits for its child, not further.
    _run_until(engine, lambda: _step(engine, run.run_id, "stock")["state"] == "suspended")
    (child,) = _children(engine, run.run_id)
    assert child["state"] == "running"
    shown = CliRunner().invoke(cli, ["--plain", "--database-url", db_url, "status", run.run_id])
    assert "waits for its child run" in shown.output
    engine.cancel(run.run_id)
    # In the cancel's own transaction: the child had started nothing, so it ends at once.
    assert engine.get_run(child["id"])["state"] == "cancelled"
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "cancelled"
    assert engine.get_run(child["id"])["state"] == "cancelled"
    assert UNDONE == ["order"]  # the child never reserved: its step had not run


def test_cancelling_a_run_cancels_its_children_and_theirs(engine: Saga) -> None:
    top = engine.start_now("c.top", {}).run_id

    def leaf_waits() -> bool:
        mids = _children(engine, top)
        leaves = _children(engine, mids[0]["id"]) if mids else []
        return bool(leaves) and _step(engine, leaves[0]["id"], "go")["state"] == "suspended"

    _run_until(engine, leaf_waits)
    (mid,) = _children(engine, top)
    (leaf,) = _children(engine, mid["id"])
    engine.cancel(top)
    assert engine.get_run(leaf["id"])["state"] == "cancelled"  # in the cancel's transaction
    drain(engine)
    assert [engine.get_run(r)["state"] for r in (top, mid["id"], leaf["id"])] == [
        "cancelled", "cancelled", "cancelled"
    ]


def test_a_child_waiting_for_an_operator_keeps_its_parent_waiting_until_resolved(
    engine: Saga,
) -> None:
    FAIL.update({"reserve", "undo_reserve"})
    run = engine.start_now("c.order", {"sku": "H8"})
    drain(engine)
    (child,) = _children(engine, run.run_id)
    assert child["state"] == "compensation_failed"
    assert _step(engine, run.run_id, "stock")["state"] == "suspended"
    engine.resolve(child["id"], "released by hand")
    drain(engine)
    assert _step(engine, run.run_id, "stock")["state"] == "failed"
    assert engine.get_run(run.run_id)["state"] == "compensated"
    assert UNDONE == ["order"]


def test_a_parent_that_cannot_be_woken_is_logged_and_the_others_still_wake(
    engine: Saga, caplog: pytest.LogCaptureFixture
) -> None:
    broken = engine.start_now("c.order", {"sku": "K1"}).run_id
    fine = engine.start_now("c.order", {"sku": "K2"}).run_id

    def children_completed() -> bool:
        found = [c for r in (broken, fine) for c in _children(engine, r)]
        return len(found) == 2 and {c["state"] for c in found} == {"completed"}

    _run_until(engine, children_completed)
    # A row the database refuses to wake (as a bug or a bad row would).
    with engine.engine.begin() as conn:
        conn.execute(text("ALTER TABLE saga.step_runs ADD CONSTRAINT no_wake_of_broken CHECK "
                          f"(NOT (run_id = '{broken}' AND step = 'stock' AND state = 'running'))"))
    with caplog.at_level(logging.ERROR, logger="saga.children"):
        assert engine.children.wake_finished() == 1
    assert engine.get_run(fine)["state"] == "running"  # woken: its next step is ready
    assert _step(engine, fine, "stock")["state"] == "completed"
    assert _step(engine, broken, "stock")["state"] == "suspended"
    (line,) = [r.getMessage() for r in caplog.records if "could not wake" in r.getMessage()]
    assert broken in line and "no_wake_of_broken" in line


def test_a_child_of_an_unregistered_workflow_fails_its_step_naming_it(engine: Saga) -> None:
    run = engine.start_now("c.unknown", {})
    drain(engine)
    found = engine.get_run(run.run_id)
    assert found["state"] == "compensated"  # its (empty) undo ran: no child to undo
    assert "child step 'missing'" in found["error"]["message"]
    assert "c.nowhere" in found["error"]["message"]


def test_saga_status_shows_the_parent_and_the_children_of_a_run(
    engine: Saga, db_url: str
) -> None:
    run = engine.start_now("c.order", {"sku": "G7"})
    drain(engine)
    (child,) = _children(engine, run.run_id)
    runner = CliRunner()
    base = ["--plain", "--database-url", db_url, "status"]
    shown = runner.invoke(cli, [*base, run.run_id, "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["parent"] is None
    assert [(c["id"], c["workflow"], c["state"]) for c in doc["children"]] == [
        (child["id"], "c.stock", "completed")
    ]
    shown = runner.invoke(cli, [*base, child["id"], "--json"])
    assert json.loads(shown.output)["parent"]["id"] == run.run_id
    shown = runner.invoke(cli, [*base, child["id"]])
    assert f"{run.run_id} (c.order, step stock, attempt 1, completed)" in " ".join(
        shown.output.split()
    )
    shown = runner.invoke(cli, [*base, run.run_id])
    assert child["id"] in shown.output and "Children" in shown.output
