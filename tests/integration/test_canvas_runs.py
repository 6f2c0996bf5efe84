"""Canvases run as workflows on the real PostgreSQL, their tasks called in-process as a worker
calls them: each task gets the arguments Celery itself would give it (Celery's local
``apply()`` of the same canvas is the oracle), and a replaced task fails its step by name."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, chord, group
from sqlalchemy import create_engine

from saga import Registry, Saga, Settings
from saga.celery_adapter import _TaskCaller
from saga.testing import drain

app = Celery("canvas-runs", broker="memory://")
CALLS: list[tuple[str, Any, Any]] = []


def _task(name: str) -> Any:
    @app.task(name=name)  # type: ignore[untyped-decorator]
    def task(*args: Any, **kwargs: Any) -> Any:
        CALLS.append((name, repr(args), repr(sorted(kwargs.items()))))
        return [name, list(args), kwargs]

    return task


reserve, charge, label, receipt, mark_fulfilled = (
    _task(f"it.{n}") for n in ("reserve", "charge", "label", "receipt", "mark_fulfilled")
)


@app.task(name="it.replaced", bind=True)  # type: ignore[untyped-decorator]
def replaced(self: Any, order: int) -> Any:
    return self.replace(label.s(order))


CANVASES = {
    "harbor": lambda: chain(
        reserve.s(7), charge.s(), group(label.s(), receipt.s()), mark_fulfilled.si(7)
    ),
    "chord_of_chains": lambda: chain(
        reserve.s(1),
        chord([chain(charge.s(), label.s()), receipt.s(x=2)], mark_fulfilled.s(5)),
    ),
    "chain_after_chord": lambda: chain(
        chord([label.s(1), receipt.s(2)], charge.s()), mark_fulfilled.s(kw="v")
    ),
    "group_of_chains": lambda: group(chain(reserve.s(1), charge.s()), label.s(3)),
}


@pytest.fixture
def saga_engine(db_url: str) -> Iterator[Saga]:
    engine = create_engine(db_url, pool_size=5, max_overflow=5)
    try:
        yield Saga(Registry(), engine=engine, settings=Settings())
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", sorted(CANVASES))
def test_each_task_gets_the_arguments_celery_would_give_it(saga_engine: Saga, name: str) -> None:
    CALLS.clear()
    expected = CANVASES[name]().apply().get()
    celery_calls = Counter(CALLS)

    CALLS.clear()
    with saga_engine.engine.begin() as conn:
        started = saga_engine.start_canvas(conn, f"canvas.{name}", CANVASES[name]())
    drain(saga_engine, tasks=_TaskCaller(app))

    assert Counter(CALLS) == celery_calls
    result = started.wait(timeout=10)
    if name == "group_of_chains":  # a group's result: its members' results, by last step
        assert sorted(result.values()) == sorted(expected)
    else:
        assert list(result.values()) == [expected]


def test_a_task_that_replaces_itself_fails_its_step_by_name(saga_engine: Saga) -> None:
    with saga_engine.engine.begin() as conn:
        started = saga_engine.start_canvas(conn, "canvas.replace", replaced.s(1))
    drain(saga_engine, tasks=_TaskCaller(app))

    run = saga_engine.get_run(started.run_id)
    assert run["state"] == "failed"
    assert "called self.replace()" in run["error"]["message"]
    [step] = run["steps"]
    assert step["attempt"] == 1, "a replaced task is not retried"
