"""Maps over a list, drained in-process on the real PostgreSQL: a map's instances are made at
run time from an earlier step's result, each a step of its own, and its join receives their
results in item order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from saga import PermanentError, Registry, RetryPolicy, Saga, Settings, Workflow
from saga.cli.main import cli
from saga.context import StepContext
from saga.errors import InvalidTransitionError
from saga.testing import drain

NO_WAIT = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.02, jitter=0)
calls: dict[str, list[Any]] = {}


def record(what: str, value: Any) -> None:
    calls.setdefault(what, []).append(value)


def items(ctx: StepContext) -> Any:
    return ctx.input["raw"] if "raw" in ctx.input else list(range(int(ctx.input["n"])))


def square(ctx: StepContext) -> dict[str, Any]:
    bad = ctx.input.get("fail_at")
    if bad is not None and ctx.index == bad:
        raise RuntimeError(f"item {ctx.item} is refused")
    return {"index": ctx.index, "square": ctx.item * ctx.item, "key": ctx.idempotency_key}


def join(ctx: StepContext) -> int:
    record("join", ctx.results["squares"])
    return len(ctx.results["squares"])


def undo_items(ctx: StepContext) -> None:
    record("undo items", ctx.outcome)


def undo_square(ctx: StepContext) -> None:
    record("undo square", (ctx.item, ctx.outcome, ctx.step_result))


def make_map(name: str = "it.map", max_parallel: int | None = None) -> Workflow:
    wf = Workflow(name, retry=NO_WAIT)
    wf.add_step("items", items, compensate=undo_items)
    wf.map("squares", square, over="items", max_parallel=max_parallel, compensate=undo_square)
    wf.add_step("join", join, after=["squares"])
    return wf


def failing_join(ctx: StepContext) -> None:
    raise PermanentError("the join refuses")


def undo_join(ctx: StepContext) -> None:
    record("undo join", ctx.outcome)


def make_failing_join() -> Workflow:
    wf = Workflow("it.map_join_fails", retry=NO_WAIT)
    wf.add_step("items", items, compensate=undo_items)
    wf.map("squares", square, over="items", compensate=undo_square)
    wf.add_step("join", failing_join, after=["squares"], compensate=undo_join)
    return wf


ENGINES: list[Saga] = []


def make_plain() -> Workflow:
    wf = Workflow("it.map_plain", retry=NO_WAIT)
    wf.add_step("items", items)
    wf.map("squares", square, over="items")
    wf.add_step("join", join, after=["squares"])
    return wf


def cancelling(ctx: StepContext) -> int:
    if ctx.index == ctx.input["cancel_at"]:
        ENGINES[-1].cancel(ctx.run_id, "enough")
    return int(ctx.item)


def make_cancelled() -> Workflow:
    wf = Workflow("it.map_cancelled", retry=NO_WAIT)
    wf.add_step("items", items, compensate=undo_items)
    wf.map("squares", cancelling, over="items", max_parallel=1, compensate=undo_square)
    wf.add_step("join", join, after=["squares"])
    return wf


@pytest.fixture
def saga_engine(db_url: str) -> Iterator[Saga]:
    calls.clear()
    engine = create_engine(db_url, pool_size=5, max_overflow=10)
    registry = Registry(
        make_map(), make_map("it.map_lanes", max_parallel=3), make_failing_join(),
        make_cancelled(), make_plain(),
    )
    try:
        ENGINES.append(Saga(registry, engine=engine, settings=Settings()))
        yield ENGINES[-1]
    finally:
        ENGINES.clear()
        engine.dispose()


def step_states(saga: Saga, run_id: str) -> dict[str, str]:
    return {s["step"]: s["state"] for s in saga.get_run(run_id)["steps"] if s["kind"] == "step"}


def test_a_map_of_ten_items_runs_each_instance_and_the_join_gets_their_results_in_order(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map", {"n": 10})

    drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "completed"
    assert calls["join"] == [
        [{"index": i, "square": i * i, "key": f"{run.run_id}:step:squares[{i:05d}]"}
         for i in range(10)]
    ]
    assert got["result"] == {"join": 10}
    assert step_states(saga_engine, run.run_id)["squares[00009]"] == "completed"


def test_a_map_of_no_items_makes_its_join_ready_at_once_with_an_empty_list(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map", {"n": 0})

    drain(saga_engine)

    assert saga_engine.get_run(run.run_id)["state"] == "completed"
    assert calls["join"] == [[]]


def test_a_map_with_max_parallel_starts_an_instance_only_when_the_one_k_before_completed(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map_lanes", {"n": 8})

    drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "completed"
    assert [r["square"] for r in calls["join"][0]] == [i * i for i in range(8)]
    starts = {
        h["step"]: h["id"] for h in got["history"]
        if h["event"] == "step_started" and h["step"].startswith("squares[")
    }
    done = {
        h["step"]: h["id"] for h in got["history"]
        if h["event"] == "step_completed" and h["step"].startswith("squares[")
    }
    for i in range(3, 8):
        assert starts[f"squares[{i:05d}]"] > done[f"squares[{i - 3:05d}]"]


def test_a_map_over_a_result_that_is_not_a_list_fails_with_a_clear_stored_error(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map", {"raw": {"not": "a list"}})

    outcomes = drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "compensated"  # the source is undone
    assert got["error"]["step"] == "squares"
    assert got["error"]["message"] == (
        "map 'squares' needs a list from step 'items', got dict"
    )
    steps = [o for b, o in outcomes if (b["kind"], b["step"]) == ("step", "squares")]
    assert steps == ["failed"]  # not retried
    assert calls["undo items"] == ["completed"]


def test_an_instance_that_fails_for_good_compensates_the_completed_instances_and_the_source(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map_lanes", {"n": 9, "fail_at": 4})

    drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "compensated"
    assert got["error"]["step"] == "squares[00004]"
    undone = calls["undo square"]
    # Lanes of 3: instance 7 waits for 4, which failed, so it never starts; whichever of the
    # others started before the run stopped are undone, 4 as failed, the others as completed.
    rows = {r["step"]: r for r in got["steps"] if r["kind"] == "step"}
    started = {i for i in range(9) if rows[f"squares[{i:05d}]"]["started_at"] is not None}
    assert {0, 1, 2, 3, 4} <= started and 7 not in started
    assert sorted(undone, key=lambda u: u[0]) == [
        (i, "completed", {"index": i, "square": i * i,
                          "key": f"{run.run_id}:step:squares[{i:05d}]"})
        if i != 4 else (4, "failed", None)
        for i in sorted(started)
    ]
    assert calls["undo items"] == ["completed"]
    history = [(h["event"], h["kind"], h["step"]) for h in got["history"]]
    source_undone = history.index(("step_completed", "compensation", "items"))
    for i, _, _ in undone:
        assert history.index(("step_completed", "compensation", f"squares[{i:05d}]")) < (
            source_undone
        )
    states = step_states(saga_engine, run.run_id)
    assert states["squares[00007]"] == "skipped" and states["join"] == "skipped"
    assert not any(h["step"] == "squares[00007]" and h["kind"] == "compensation"
                   for h in got["history"])


def test_a_failed_join_is_undone_first_then_every_instance_then_the_source(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map_join_fails", {"n": 5})

    drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "compensated"
    assert calls["undo join"] == ["failed"]
    assert sorted(i for i, _, _ in calls["undo square"]) == [0, 1, 2, 3, 4]
    done = [h["step"] for h in got["history"]
            if h["event"] == "step_completed" and h["kind"] == "compensation"]
    assert done[0] == "join" and done[-1] == "items"
    assert sorted(done[1:-1]) == ["squares", *(f"squares[{i:05d}]" for i in range(5))]
    assert done[1] == "squares"  # the barrier, which makes the instances' undoing ready


def test_a_run_cancelled_during_a_map_undoes_the_started_instances_and_skips_the_others(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map_cancelled", {"n": 10, "cancel_at": 3})

    drain(saga_engine)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "cancelled"
    # One at a time: 0..3 ran (3 cancelled the run while it ran, and completed), 4..9 never.
    assert sorted(i for i, _, _ in calls["undo square"]) == [0, 1, 2, 3]
    assert {outcome for _, outcome, _ in calls["undo square"]} == {"completed"}
    assert calls["undo items"] == ["completed"]
    states = step_states(saga_engine, run.run_id)
    assert {states[f"squares[{i:05d}]"] for i in range(4, 10)} == {"skipped"}
    assert "join" not in calls


def test_the_statements_of_a_map_grow_linearly_with_its_items(db_url: str) -> None:
    from bench.map_statements import Counting, workflow

    engine = create_engine(db_url, pool_size=5, max_overflow=5)
    try:
        saga = Saga(Registry(workflow()), engine=engine, settings=Settings())
        counting = Counting(engine)
        per_item = []
        for n in (30, 300):
            saga.start_now("bench.map", {"n": n})
            counting.by_kind.clear()
            drain(saga, timeout=120)
            per_item.append(counting.total / n)
    finally:
        Counting.restore()
        engine.dispose()
    # Ordinary steps and the relay's batches cost a constant per item; a scan of the siblings
    # per completion would cost ten times more per item at ten times the items.
    assert per_item[1] <= per_item[0] * 1.05
    assert per_item[1] < 3  # a claim and a completion each, and the relay's share


def test_an_operators_retry_of_a_failed_run_that_expanded_a_map_is_refused_clearly(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map_plain", {"n": 3, "fail_at": 1})
    drain(saga_engine)
    assert saga_engine.get_run(run.run_id)["state"] == "failed"  # nothing to undo

    with pytest.raises(InvalidTransitionError, match="has expanded a map"):
        saga_engine.retry(run.run_id)

    assert saga_engine.get_run(run.run_id)["state"] == "failed"


def test_saga_status_of_a_run_summarises_each_map_and_lists_its_failed_instances(
    saga_engine: Saga, db_url: str
) -> None:
    run = saga_engine.start_now("it.map_lanes", {"n": 9, "fail_at": 4})
    drain(saga_engine)

    shown = CliRunner().invoke(
        cli, ["--plain", "--database-url", db_url, "status", run.run_id], catch_exceptions=False
    ).stdout

    steps = saga_engine.get_run(run.run_id)["steps"]
    started = sum(1 for r in steps if r["kind"] == "step" and r["started_at"]
                  and r["step"].startswith("squares["))
    skipped = 9 - started
    assert f"Map 'squares': 9 instances ({started - 1} done, 1 failed, {skipped} skipped)" in (
        shown
    )
    assert "failed squares[00004] attempt 2: item 4 is refused" in shown
    assert f"Compensations of map 'squares': {started} instances ({started} done)" in shown
    assert "squares[00000]" not in shown  # no line per instance
    assert "events of map instances not shown" in shown


def test_the_dashboard_shows_a_maps_summary_and_its_failed_instance_not_every_instance(
    saga_engine: Saga,
) -> None:
    from starlette.testclient import TestClient

    from saga.dashboard.app import create_app

    run = saga_engine.start_now("it.map_lanes", {"n": 9, "fail_at": 4})
    drain(saga_engine)

    page = TestClient(create_app(saga_engine.engine, saga_engine.tables, saga=saga_engine)).get(
        f"/runs/{run.run_id}"
    ).text

    assert '<table id="maps">' in page
    assert "squares[00004] (attempt 2): item 4 is refused" in page
    assert "<td>squares[00000]</td>" not in page


def test_an_instance_row_holds_its_item_and_nothing_scans_siblings_to_find_it(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map", {"n": 3})
    drain(saga_engine)
    with saga_engine.engine.connect() as conn:
        found = conn.execute(
            text("SELECT step, item FROM saga.step_runs WHERE run_id = :r AND item IS NOT NULL "
                 "ORDER BY step"), {"r": run.run_id}
        ).all()
    assert [tuple(r) for r in found] == [
        ("squares[00000]", 0), ("squares[00001]", 1), ("squares[00002]", 2)
    ]


def test_a_map_of_ten_thousand_items_completes_with_the_join_run_once_with_all_results_in_order(
    saga_engine: Saga,
) -> None:
    run = saga_engine.start_now("it.map", {"n": 10_000})

    drain(saga_engine, timeout=600)

    got = saga_engine.get_run(run.run_id)
    assert got["state"] == "completed"
    assert got["result"] == {"join": 10_000}
    assert len(calls["join"]) == 1
    assert [r["square"] for r in calls["join"][0]] == [i * i for i in range(10_000)]
    assert [h["event"] for h in got["history"] if h["step"] == "join"] == [
        "step_started", "step_completed"
    ]
