"""A map over a list against real processes: a worker (two processes) and a relay run a map
of 200 items at most 20 at a time; the join runs once with every result in item order."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.acceptance.conftest import System, WorkflowsOf

pytestmark = pytest.mark.slow


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    from tests.apps import mapping

    return "tests.apps.mapping:app", mapping.workflows


def test_a_map_of_200_items_runs_each_once_at_most_20_at_a_time_and_joins_them_in_order(
    system: System,
) -> None:
    system.start_worker("worker")
    system.start_relay()

    [run_id] = system.start_runs("m.mapped", {"n": 200})
    assert system.wait_finished([run_id], timeout=180) == {run_id: "completed"}

    run = system.run(run_id)
    assert run["result"] == {"join": [{"index": i, "double": 2 * i} for i in range(200)]}
    ran = Counter(e["step"] for e in system.executions([run_id]))
    assert ran["join"] == 1
    assert sorted(s for s in ran if s != "join") == [f"each[{i:05d}]" for i in range(200)]
    assert set(ran.values()) == {1}  # no instance's code ran twice
    # At most 20 at a time: instance i starts only after instance i-20 completed.
    at = {(h["event"], h["step"]): h["id"] for h in run["history"]}
    for i in range(20, 200):
        began, freed = ("step_started", f"each[{i:05d}]"), ("step_completed", f"each[{i - 20:05d}]")
        assert at[began] > at[freed]
