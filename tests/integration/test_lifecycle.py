"""Operator actions and the slow path, driven in-process: messages are read from the outbox
(joined with their run) and handed to an :class:`~saga.executor.Executor`, as a worker would get
them from the broker, each delivered once. No Celery, no relay: fast and deterministic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from saga import (
    InvalidTransitionError,
    PermanentError,
    Registry,
    RetryPolicy,
    Saga,
    Settings,
    StepContext,
    Workflow,
)
from saga.executor import Executor
from tests.support import db

NOW = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.01, jitter=0.0)


@pytest.fixture(scope="session")
def db_template() -> Iterator[str]:
    """A migrated template of this session's own (the shared one is remade by every session,
    which breaks sessions running side by side)."""
    from saga.db import migrate

    name = db.random_name() + "_tpl"
    db.create_database(name)
    try:
        setup = create_engine(db.sqlalchemy_url(name))
        try:
            migrate.upgrade(setup, schema="saga")
        finally:
            setup.dispose()
        yield name
    finally:
        db.drop_database(name)


class Script:
    """What the steps do in one test: ``fail[(kind, step)]`` is ``"permanent"``/``"always"``
    while set; ``during[(kind, step)]`` is called inside that code; ``ran`` counts executions;
    ``outcomes`` keeps what each compensation was told of the step it undoes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fail: dict[tuple[str, str], str] = {}
        self.during: dict[tuple[str, str], Callable[[], object]] = {}
        self.ran: Counter[tuple[str, str]] = Counter()
        self.outcomes: dict[str, str | None] = {}

    def __call__(self, ctx: StepContext) -> Any:
        key = (ctx.kind, ctx.step)
        self.ran[key] += 1
        if ctx.is_compensation:
            self.outcomes[ctx.step] = ctx.outcome
        if key in self.during:
            self.during.pop(key)()
        how = self.fail.get(key)
        if how == "permanent":
            raise PermanentError(f"{ctx.kind} {ctx.step} declined")
        if how == "always":
            raise RuntimeError(f"{ctx.kind} {ctx.step} failed on attempt {ctx.attempt}")
        return {"step": ctx.step, "attempt": ctx.attempt}


SCRIPT = Script()


def _act(ctx: StepContext) -> Any:
    return SCRIPT(ctx)


def make_workflows() -> list[Workflow]:
    plain = Workflow("lc.plain", retry=NOW)  # nothing to undo
    plain.add_step("a", _act)
    plain.add_step("b", _act, after=["a"])
    plain.add_step("c", _act, after=["b"])

    undoable = Workflow("lc.undoable", retry=NOW)
    undoable.add_step("a", _act, compensate=_act)
    undoable.add_step("b", _act, after=["a"], compensate=_act)

    diamond = Workflow("lc.diamond", retry=NOW)  # d, which fails in tests, has nothing to undo
    diamond.add_step("a", _act, compensate=_act)
    diamond.add_step("b", _act, after=["a"], compensate=_act)
    diamond.add_step("c", _act, after=["a"], compensate=_act)
    diamond.add_step("d", _act, after=["b", "c"])
    return [plain, undoable, diamond]


@pytest.fixture
def lc(db_url: str) -> Iterator[Saga]:
    """An engine with the lifecycle workflows on a fresh database, and a fresh script."""
    SCRIPT.reset()
    engine = create_engine(db_url)
    try:
        yield Saga(Registry(*make_workflows()), engine=engine, settings=Settings())
    finally:
        engine.dispose()


# -- delivering messages ---------------------------------------------------------------------

_MESSAGES = """
SELECT o.run_id::text AS run_id, r.workflow, r.version, o.kind, o.step, o.attempt
FROM saga.outbox o JOIN saga.runs r ON r.id = o.run_id ORDER BY o.id
"""


def messages(saga: Saga) -> list[dict[str, Any]]:
    """Step messages in the outbox, as the relay would publish them."""
    with saga.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(_MESSAGES)).mappings()]


class Broker:
    """Delivers each outbox message once (a broker does not redeliver an acknowledged one)."""

    def __init__(self, saga: Saga) -> None:
        self.executor = Executor(saga, worker_id="test")
        self.saga = saga
        self.delivered: set[tuple[Any, ...]] = set()
        self.outcomes: list[tuple[str, str, int, str]] = []

    def deliver(self, msg: dict[str, Any]) -> str:
        self.delivered.add(tuple(msg.values()))
        outcome = self.executor.execute(msg)
        self.outcomes.append((msg["kind"], msg["step"], msg["attempt"], outcome))
        return outcome

    def pending(
        self, kind: str | None = None, step: str | None = None, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        return [
            m
            for m in messages(self.saga)
            if tuple(m.values()) not in self.delivered
            and (kind is None or m["kind"] == kind)
            and (step is None or m["step"] == step)
            and (run_id is None or m["run_id"] == run_id)
        ]

    def one(self, kind: str, step: str, run_id: str | None = None) -> str:
        """Deliver the one pending message of ``kind``/``step`` (of ``run_id``)."""
        found = self.pending(kind, step, run_id)
        assert len(found) == 1, f"pending {kind} {step}: {found}"
        return self.deliver(found[0])

    def drain(self, limit: int = 200) -> None:
        """Deliver every pending message until none is left."""
        for _ in range(limit):
            todo = self.pending()
            if not todo:
                return
            self.deliver(todo[0])
        raise AssertionError(f"still delivering after {limit} messages")


def state(saga: Saga, run_id: str) -> str:
    return str(saga.get_run(run_id)["state"])


def step_states(saga: Saga, run_id: str, kind: str = "step") -> dict[str, str]:
    return {s["step"]: s["state"] for s in saga.get_run(run_id)["steps"] if s["kind"] == kind}


def events(saga: Saga, run_id: str, event: str) -> list[dict[str, Any]]:
    return [h for h in saga.get_run(run_id)["history"] if h["event"] == event]


# -- operator retry of failed runs -----------------------------------------------------------


def test_retrying_a_failed_run_with_nothing_to_undo_runs_it_again_from_the_failed_step(
    lc: Saga,
) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "b")] = "always"
    run_id = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "failed"
    assert step_states(lc, run_id) == {"a": "completed", "b": "failed", "c": "skipped"}
    assert lc.get_run(run_id)["finished_at"] is not None
    assert SCRIPT.ran[("step", "b")] == 2  # its retry budget: two attempts

    del SCRIPT.fail[("step", "b")]
    assert lc.retry(run_id) == "running"
    run = lc.get_run(run_id)
    assert run["state"] == "running" and run["finished_at"] is None
    assert step_states(lc, run_id) == {"a": "completed", "b": "ready", "c": "waiting"}
    assert [(m["step"], m["attempt"]) for m in broker.pending()] == [("b", 3)]
    assert events(lc, run_id, "operator_retry")[0]["detail"] == {"from": ["b"]}

    broker.drain()
    assert state(lc, run_id) == "completed"
    assert SCRIPT.ran == Counter({("step", "a"): 1, ("step", "b"): 3, ("step", "c"): 1})
    assert lc.get_run(run_id)["result"] == {"c": {"step": "c", "attempt": 1}}


def test_a_retried_step_gets_a_fresh_retry_budget(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "b")] = "always"
    run_id = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "failed"

    lc.retry(run_id)
    broker.drain()
    assert state(lc, run_id) == "failed"
    assert SCRIPT.ran[("step", "b")] == 4  # two attempts, then two more
    b = next(s for s in lc.get_run(run_id)["steps"] if s["step"] == "b")
    assert (b["attempt"], b["first_attempt"]) == (4, 3)


def test_retrying_from_an_earlier_step_runs_it_and_everything_after_it_again(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "c")] = "permanent"
    run_id = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "failed"
    assert SCRIPT.ran == Counter({("step", "a"): 1, ("step", "b"): 1, ("step", "c"): 1})

    del SCRIPT.fail[("step", "c")]
    with pytest.raises(InvalidTransitionError):
        lc.retry(run_id, from_step="nope")
    assert lc.retry(run_id, from_step="b") == "running"
    assert step_states(lc, run_id) == {"a": "completed", "b": "ready", "c": "waiting"}
    broker.drain()
    assert state(lc, run_id) == "completed"
    assert SCRIPT.ran == Counter({("step", "a"): 1, ("step", "b"): 2, ("step", "c"): 2})


def test_retry_refuses_runs_that_are_not_failed(lc: Saga) -> None:
    broker = Broker(lc)
    run_id = lc.start_now("lc.plain", {}).run_id
    with pytest.raises(InvalidTransitionError):
        lc.retry(run_id)  # running
    broker.drain()
    assert state(lc, run_id) == "completed"
    with pytest.raises(InvalidTransitionError):
        lc.retry(run_id)
    assert state(lc, run_id) == "completed"


# -- resolve ---------------------------------------------------------------------------------


def test_resolve_refuses_runs_whose_compensation_did_not_fail(lc: Saga) -> None:
    broker = Broker(lc)
    completed = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    SCRIPT.fail[("step", "b")] = "permanent"
    compensated = lc.start_now("lc.undoable", {}).run_id
    failed = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    running = lc.start_now("lc.plain", {}).run_id
    stopping = lc.start_now("lc.undoable", {}).run_id
    broker.one("step", "a", stopping)
    lc.cancel(stopping)  # its compensation of a is not delivered yet

    expected = {
        completed: "completed",
        compensated: "compensated",
        failed: "failed",
        stopping: "cancelling",
    }
    assert {r: state(lc, r) for r in expected} == expected
    expected[running] = "running"
    for run_id, before in expected.items():
        with pytest.raises(InvalidTransitionError):
            lc.resolve(run_id, "looked at it")
        assert state(lc, run_id) == before
        assert events(lc, run_id, "operator_resolved") == []


def test_resolve_requires_a_reason_and_keeps_it(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "b")] = "permanent"
    SCRIPT.fail[("compensation", "a")] = "permanent"
    run_id = lc.start_now("lc.undoable", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "compensation_failed"
    for reason in ("", "   "):
        with pytest.raises(InvalidTransitionError):
            lc.resolve(run_id, reason)
    assert state(lc, run_id) == "compensation_failed"
    assert lc.resolve(run_id, "undone by hand") == "resolved"
    assert events(lc, run_id, "operator_resolved")[0]["detail"] == {"reason": "undone by hand"}
    assert lc.get_run(run_id)["finished_at"] is not None


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_refuses_finished_runs(lc: Saga) -> None:
    broker = Broker(lc)
    completed = lc.start_now("lc.plain", {}).run_id
    broker.drain()
    SCRIPT.fail[("step", "b")] = "permanent"
    compensated = lc.start_now("lc.undoable", {}).run_id
    broker.drain()
    SCRIPT.fail[("compensation", "a")] = "permanent"
    comp_failed = lc.start_now("lc.undoable", {}).run_id
    broker.drain()
    cancelled = lc.start_now("lc.plain", {}).run_id
    lc.cancel(cancelled)
    expected = {
        completed: "completed",
        compensated: "compensated",
        comp_failed: "compensation_failed",
        cancelled: "cancelled",
    }
    assert {r: state(lc, r) for r in expected} == expected
    for run_id, before in expected.items():
        with pytest.raises(InvalidTransitionError):
            lc.cancel(run_id)
        assert state(lc, run_id) == before


def test_cancelling_a_run_before_anything_ran_ends_it_cancelled_with_nothing_to_undo(
    lc: Saga,
) -> None:
    broker = Broker(lc)
    run_id = lc.start_now("lc.undoable", {}).run_id
    assert lc.cancel(run_id, "not needed") == "cancelled"
    assert step_states(lc, run_id) == {"a": "skipped", "b": "skipped"}
    assert messages(lc) == []
    broker.drain()
    assert SCRIPT.ran == Counter()
    assert lc.get_run(run_id)["error"] == {"type": "cancelled", "message": "not needed"}


def test_a_cancelled_run_undoes_only_what_started(lc: Saga) -> None:
    broker = Broker(lc)
    run_id = lc.start_now("lc.undoable", {}).run_id
    broker.one("step", "a")
    assert lc.cancel(run_id) == "cancelling"
    broker.drain()
    assert state(lc, run_id) == "cancelled"
    assert SCRIPT.ran == Counter({("step", "a"): 1, ("compensation", "a"): 1})
    assert step_states(lc, run_id) == {"a": "completed", "b": "skipped"}


def test_a_step_that_failed_for_good_is_undone_first_as_failed(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "b")] = "permanent"
    run_id = lc.start_now("lc.undoable", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "compensated"
    # Its code raised, perhaps after part of its effect: it is undone, and told so.
    assert SCRIPT.outcomes == {"b": "failed", "a": "completed"}
    completed = events(lc, run_id, "step_completed")
    undone = [h["step"] for h in completed if h["kind"] == "compensation"]
    assert undone == ["b", "a"]


def test_a_step_that_failed_and_waits_for_a_retry_when_the_run_stops_is_undone(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "b")] = "always"
    run_id = lc.start_now("lc.undoable", {}).run_id
    broker.one("step", "a")
    assert broker.one("step", "b") == "retry_scheduled"
    assert lc.cancel(run_id) == "cancelling"
    broker.drain()
    assert state(lc, run_id) == "cancelled"
    assert step_states(lc, run_id) == {"a": "completed", "b": "skipped"}
    assert SCRIPT.ran[("step", "b")] == 1
    assert SCRIPT.outcomes == {"b": "failed", "a": "completed"}


# -- operator retry of failed compensations --------------------------------------------------


def test_retrying_a_failed_compensation_finishes_compensating_the_run(lc: Saga) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "d")] = "permanent"
    SCRIPT.fail[("compensation", "b")] = "always"
    run_id = lc.start_now("lc.diamond", {}).run_id
    broker.drain()
    assert state(lc, run_id) == "compensation_failed"
    assert SCRIPT.ran[("compensation", "b")] == 2
    assert step_states(lc, run_id, "compensation") == {
        "a": "waiting",
        "b": "failed",
        "c": "completed",
    }
    with pytest.raises(InvalidTransitionError):
        lc.retry(run_id, from_step="b")

    del SCRIPT.fail[("compensation", "b")]
    assert lc.retry(run_id) == "compensating"
    broker.drain()
    assert state(lc, run_id) == "compensated"
    assert SCRIPT.ran[("compensation", "b")] == 3
    assert SCRIPT.ran[("compensation", "a")] == 1


def test_a_cancelled_run_whose_compensation_is_retried_still_ends_cancelled(lc: Saga) -> None:
    broker = Broker(lc)
    run_id = lc.start_now("lc.undoable", {}).run_id
    broker.one("step", "a")
    SCRIPT.fail[("compensation", "a")] = "permanent"
    lc.cancel(run_id)
    broker.drain()
    assert state(lc, run_id) == "compensation_failed"

    del SCRIPT.fail[("compensation", "a")]
    assert lc.retry(run_id) == "cancelling"
    broker.drain()
    assert state(lc, run_id) == "cancelled"


def test_a_parallel_compensation_finishing_after_its_sibling_failed_is_counted_after_a_retry(
    lc: Saga,
) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "d")] = "permanent"
    SCRIPT.fail[("compensation", "c")] = "permanent"
    run_id = lc.start_now("lc.diamond", {}).run_id
    broker.one("step", "a")
    broker.one("step", "b")
    broker.one("step", "c")
    broker.one("step", "d")
    assert state(lc, run_id) == "compensating"
    # b's compensation is running when c's fails for good (two workers, in parallel).
    SCRIPT.during[("compensation", "b")] = lambda: broker.one("compensation", "c")
    assert broker.one("compensation", "b") == "completed"
    assert state(lc, run_id) == "compensation_failed"
    assert step_states(lc, run_id, "compensation") == {
        "a": "waiting",
        "b": "completed",
        "c": "failed",
    }

    del SCRIPT.fail[("compensation", "c")]
    lc.retry(run_id)
    broker.drain()
    assert SCRIPT.ran[("compensation", "a")] == 1
    assert state(lc, run_id) == "compensated"


def test_a_compensation_whose_message_came_while_the_run_waited_for_an_operator_runs_after_a_retry(
    lc: Saga,
) -> None:
    broker = Broker(lc)
    SCRIPT.fail[("step", "d")] = "permanent"
    SCRIPT.fail[("compensation", "c")] = "permanent"
    run_id = lc.start_now("lc.diamond", {}).run_id
    for step in ("a", "b", "c", "d"):
        broker.one("step", step)
    assert broker.one("compensation", "c") == "failed"
    assert state(lc, run_id) == "compensation_failed"
    assert broker.one("compensation", "b") == "duplicate"  # the run is not compensating

    del SCRIPT.fail[("compensation", "c")]
    lc.retry(run_id)
    broker.drain()
    assert state(lc, run_id) == "compensated"
    assert SCRIPT.ran[("compensation", "b")] == 1
