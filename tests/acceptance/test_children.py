"""Child sagas against real processes (a Celery worker and a relay): a child that fails
compensates its parent, and cancelling the parent cancels its child."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import text

from tests.acceptance.conftest import System, WorkflowsOf
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    from tests.apps import nested

    return "tests.apps.nested:app", nested.workflows


def _children(system: System, run_ids: list[str]) -> dict[str, str]:
    """Each parent's child run id (one child per parent here)."""
    with system.engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT parent_run_id::text, id::text FROM saga.runs "
                 "WHERE parent_run_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": run_ids},
        ).all()
    return {r[0]: r[1] for r in rows}


def test_a_child_that_fails_compensates_its_parent_and_one_that_completes_completes_it(
    system: System,
) -> None:
    system.start_worker("worker")
    system.start_relay()
    failing = system.start_runs("n.order", {"fail": True}, count=2)
    passing = system.start_runs("n.order", {}, count=2)
    assert system.wait_finished(failing + passing, timeout=90) == {
        **dict.fromkeys(failing, "compensated"), **dict.fromkeys(passing, "completed")
    }
    children = _children(system, failing + passing)
    assert set(children) == set(failing + passing)  # exactly one child each
    assert system.states(list(children.values())) == {
        **{children[r]: "compensated" for r in failing},
        **{children[r]: "completed" for r in passing},
    }
    ran = Counter((e["run_id"], e["kind"], e["step"]) for e in system.executions())
    for run in failing:  # the child undid its step, then the parent undid its own
        child = children[run]
        assert ran[(child, "step", "reserve")] == 1  # a permanent error: no retry
        assert ran[(child, "compensation", "reserve")] == 1
        assert ran[(run, "compensation", "order")] == 1
        assert ran[(run, "step", "ship")] == 0
        error = system.run(run)["error"]
        assert error["type"] == "saga.ChildFailed" and child in error["message"]
    for run in passing:
        assert system.run(run)["result"] == {"ship": {"done": "ship"}}
        stock = next(s for s in system.run(run)["steps"] if s["step"] == "stock")
        assert stock["result"] == {"reserve": {"done": "reserve"}}


def test_cancelling_a_parent_cancels_its_waiting_child(system: System) -> None:
    system.start_worker("worker")
    system.start_relay()
    (parent,) = system.start_runs("n.waiting", {})

    def child_waits() -> str:
        child = _children(system, [parent]).get(parent)
        assert child is not None, "no child yet"
        go = next(s for s in system.run(child)["steps"] if s["step"] == "go")
        assert go["state"] == "suspended", go["state"]
        return child

    child = wait_until(child_waits, timeout=60, interval=0.2,
                       message="the child did not start waiting")
    system.engine.cancel(parent)
    assert system.wait_finished([parent, child], timeout=60) == {
        parent: "cancelled", child: "cancelled"
    }
    ran = Counter((e["run_id"], e["kind"], e["step"]) for e in system.executions())
    assert ran[(child, "step", "begin")] == 1
    assert ran[(child, "compensation", "begin")] == 1  # the child undid what it had done
