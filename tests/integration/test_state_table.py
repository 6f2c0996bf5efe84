"""The SQL checked against the state table (saga.core.states), on the real PostgreSQL:

- each guarded step statement, tried on a row in every state, moves it only out of the states
  its event has in the table, and only to that event's target;
- an audit trigger records every state change the engine makes while runs succeed, fail, retry,
  compensate, are cancelled and handed to an operator, and each one is in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text

from saga import PermanentError, Registry, RetryPolicy, Saga, Settings, StepContext, Workflow
from saga.codec import dumps
from saga.core import states
from saga.core.attempts import AttemptRef
from saga.testing import FakeClock, drain, send_signal

TOKEN = "walk:token"
NOW = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.01, jitter=0.0)
FAIL: dict[str, str] = {}
"""kind:step -> "permanent" | "always" | "cancel" (the run, from inside the step)."""
ENGINE: list[Saga] = []


def _act(ctx: StepContext) -> Any:
    how = FAIL.get(f"{ctx.kind}:{ctx.step}")
    if how == "cancel":
        ENGINE[0].cancel(ctx.run_id)
    if how == "permanent":
        raise PermanentError("declined")
    if how == "always":
        raise RuntimeError("down")
    return ctx.step


def _workflows() -> list[Workflow]:
    wf = Workflow("walk.diamond", retry=NOW)
    wf.add_step("a", _act, compensate=_act)
    wf.add_step("b", _act, after=["a"], compensate=_act)
    wf.add_step("c", _act, after=["a"], compensate=_act)
    wf.add_step("d", _act, after=["b", "c"])
    plain = Workflow("walk.plain", retry=NOW)  # nothing to undo
    plain.add_step("x", _act)
    plain.add_step("y", _act, after=["x"])
    waits = Workflow("walk.waits", retry=NOW)  # suspended, then woken by a signal and a timer
    waits.wait_for_signal("paid", signal="paid", timeout=60)
    waits.sleep("nap", for_=60, after=["paid"])
    nest = Workflow("walk.nest", retry=NOW)  # a child run, completed, then undone by its parent
    nest.child("kid", workflow=wf)
    nest.add_step("last", _act, after=["kid"])
    return [wf, plain, waits, nest]


@pytest.fixture
def walk(db_url: str) -> Iterator[Saga]:
    FAIL.clear()
    engine = create_engine(db_url)
    try:
        ENGINE[:] = [Saga(Registry(*_workflows()), engine=engine, settings=Settings())]
        yield ENGINE[0]
    finally:
        ENGINE.clear()
        engine.dispose()


def _force(saga: Saga, run_id: str, step: str, state: str) -> None:
    with saga.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE saga.step_runs SET state = :s, attempt = 1, worker = :t, "
                "pending_deps = 0 WHERE run_id = :r AND kind = 'step' AND step = :p"
            ),
            {"s": state, "t": TOKEN, "r": run_id, "p": step},
        )


def _row(saga: Saga, run_id: str, step: str) -> tuple[str, int]:
    with saga.engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT state, attempt FROM saga.step_runs "
                "WHERE run_id = :r AND kind = 'step' AND step = :p"
            ),
            {"r": run_id, "p": step},
        ).one()
    return str(found[0]), int(found[1])


def _statements(saga: Saga) -> dict[str, Callable[[Connection, str], object]]:
    wf = saga.registry.get("walk.diamond")
    ref = lambda run_id: AttemptRef(run_id, "step", "a", 1)  # noqa: E731
    steps = saga.lifecycle.steps
    return {
        "claimed": lambda c, r: saga.transitions.claim(
            c, ref(r), workflow=wf.name, version=wf.version,
            definition_hash=wf.definition_hash, deps=(), lease_seconds=30, token="other",
        ),
        "completed": lambda c, r: saga.transitions.complete(
            c, ref(r), dumps("a"), token=TOKEN, release=("b", "c"),
            routes=[wf.route("b"), wf.route("c")], sink=False,
        ),
        "failed": lambda c, r: steps.fail_attempt(c, r, "step", "a", 1, {"m": "x"}),
        "retry_scheduled": lambda c, r: steps.retry_attempt(c, r, "step", "a", 1, {}, 0.0),
        "run_stopped": steps.skip_unstarted,
        "suspended": lambda c, r: saga.waits.suspend(
            c, ref(r), TOKEN, seconds=60, until=None, signal=None
        ),
        "woken": lambda c, r: saga.waits.wake(c, r, "waker", "a"),
        "operator_retry": lambda c, r: steps.reset(c, r, "step", {"a": 0}),
    }


@pytest.mark.parametrize(
    "event",
    [
        "claimed", "completed", "failed", "retry_scheduled", "run_stopped", "operator_retry",
        "suspended", "woken",
    ],
)
def test_a_step_statement_moves_a_row_only_along_its_event_in_the_table(
    walk: Saga, event: str
) -> None:
    statement = _statements(walk)[event]
    moved: dict[str, str] = {}
    for source in states.STEP_STATES:
        run_id = walk.start_now("walk.diamond", {}).run_id
        _force(walk, run_id, "a", source)
        before = _row(walk, run_id, "a")
        with walk.autocommit() as conn:
            statement(conn, run_id)
        after = _row(walk, run_id, "a")
        if after != before:  # a new attempt in the same state is a move too
            moved[source] = after[0]
    assert set(moved) == set(states.sources("step", event)), moved
    for source, after in moved.items():
        assert states.allowed("step", source, after), (event, source, after)


_AUDIT = """
CREATE TABLE saga.audit (machine text, source text, target text);
CREATE FUNCTION saga.audit_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO saga.audit VALUES (TG_ARGV[0], NULL, NEW.state);
    ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO saga.audit VALUES (TG_ARGV[0], OLD.state, NEW.state);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_runs AFTER INSERT OR UPDATE ON saga.runs
    FOR EACH ROW EXECUTE FUNCTION saga.audit_state('run');
CREATE TRIGGER audit_steps AFTER INSERT OR UPDATE ON saga.step_runs
    FOR EACH ROW EXECUTE FUNCTION saga.audit_state('step');
"""


def test_every_state_change_the_engine_makes_is_in_the_table(walk: Saga) -> None:
    with walk.engine.begin() as conn:
        conn.execute(text(_AUDIT))

    def run(
        fail: dict[str, str],
        then: Callable[[str], object] | None = None,
        workflow: str = "walk.diamond",
    ) -> str:
        FAIL.clear()
        FAIL.update(fail)
        run_id = walk.start_now(workflow, {}).run_id
        drain(walk)
        if then is not None:
            FAIL.clear()
            then(run_id)
            drain(walk)
        return str(walk.get_run(run_id)["state"])

    assert run({}) == "completed"
    assert run({"step:c": "always"}) == "compensated"  # retried, then undone
    assert run({"step:a": "permanent"}) == "compensated"
    assert run({"step:d": "permanent"}) == "compensated"
    assert run({"step:y": "permanent"}, then=walk.retry, workflow="walk.plain") == "completed"
    assert run({"step:d": "permanent", "compensation:b": "always"}, then=walk.retry) == (
        "compensated"
    )
    assert run(
        {"step:d": "permanent", "compensation:b": "permanent"},
        then=lambda r: walk.resolve(r, "refunded by hand"),
    ) == "resolved"
    assert run({"step:a": "cancel", "compensation:a": "always"}, then=walk.retry) == "cancelled"
    waiting = walk.start_now("walk.waits", {}).run_id
    drain(walk)
    send_signal(walk, waiting, "paid", {"ok": True})
    FakeClock(walk).advance(timedelta(seconds=61))
    assert walk.get_run(waiting)["state"] == "completed"
    assert run({"step:last": "permanent"}, workflow="walk.nest") == "compensated"
    started = walk.start_now("walk.diamond", {}).run_id
    walk.cancel(started)
    drain(walk)
    assert walk.get_run(started)["state"] == "cancelled"

    with walk.engine.connect() as conn:
        seen = set(conn.execute(text("SELECT DISTINCT machine, source, target FROM saga.audit")))
    created = {(m, t) for m, s, t in seen if s is None}
    assert created == {("run", "running"), ("step", "ready"), ("step", "waiting")}
    changes = {(m, s, t) for m, s, t in seen if s is not None}
    assert changes, "nothing was audited"
    outside = {c for c in changes if not states.allowed(*c)}
    assert outside == set(), f"state changes missing from the table: {sorted(outside)}"
    # Every run transition the table has was exercised, but the deadline's (tested elsewhere).
    run_edges = {(t.source, t.target) for t in states.TRANSITIONS if t.machine == "run"}
    assert run_edges - {(s, t) for m, s, t in changes if m == "run"} == set()
