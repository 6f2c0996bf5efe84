"""Child sagas against real processes (a Celery worker and a relay): a child that fails
compensates its parent, undoing a parent's step compensates its completed child, and
cancelling the parent cancels its child."""

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


def _children(system: System, run_ids: list[str]) -> dict[str, list[str]]:
    """Each parent's child run ids, by the attempt that started them."""
    with system.engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT parent_run_id::text, id::text FROM saga.runs "
                 "WHERE parent_run_id = ANY(CAST(:ids AS uuid[])) ORDER BY parent_attempt"),
            {"ids": run_ids},
        ).all()
    found: dict[str, list[str]] = {}
    for parent, child in rows:
        found.setdefault(parent, []).append(child)
    return found


def test_a_child_that_fails_compensates_its_parent_and_one_that_completes_completes_it(
    system: System,
) -> None:
    system.start_worker("worker")
    system.start_relay()
    failing = system.start_runs("n.order", {"fail": True}, count=2)
    passing = system.start_runs("n.order", {}, count=2)
    declined = system.start_runs("n.order", {"decline": True})
    everything = failing + passing + declined
    assert system.wait_finished(everything, timeout=90) == {
        **dict.fromkeys(failing + declined, "compensated"), **dict.fromkeys(passing, "completed")
    }
    children = _children(system, everything)
    # The child step's policy allows two attempts: a failed child is followed by a new one.
    assert {r: len(c) for r, c in children.items()} == {
        **dict.fromkeys(failing, 2), **dict.fromkeys(passing + declined, 1)
    }
    assert system.states([c for r in everything for c in children[r]]) == {
        **{c: "compensated" for r in failing + declined for c in children[r]},
        **{children[r][0]: "completed" for r in passing},
    }
    ran = Counter((e["run_id"], e["kind"], e["step"]) for e in system.executions())
    for run in failing:  # each child undid its step, then the parent undid its own
        for child in children[run]:
            assert ran[(child, "step", "reserve")] == 1  # a permanent error: no retry
            assert ran[(child, "compensation", "reserve")] == 1
        assert ran[(run, "compensation", "order")] == 1
        assert ran[(run, "step", "ship")] == 0
        error = system.run(run)["error"]
        assert error["type"] == "saga.ChildFailed" and children[run][-1] in error["message"]
    for run in declined:  # its child had completed: the parent's undo compensated it
        (child,) = children[run]
        assert ran[(child, "step", "reserve")] == 1
        assert ran[(child, "compensation", "reserve")] == 1
        assert ran[(run, "compensation", "order")] == 1
    for run in passing:
        assert system.run(run)["result"] == {"ship": {"done": "ship"}}
        stock = next(s for s in system.run(run)["steps"] if s["step"] == "stock")
        assert stock["result"] == {"reserve": {"done": "reserve"}}


def test_cancelling_a_parent_cancels_its_waiting_child(system: System) -> None:
    system.start_worker("worker")
    system.start_relay()
    (parent,) = system.start_runs("n.waiting", {})

    def child_waits() -> str:
        (child,) = _children(system, [parent]).get(parent, [None])
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
