"""A Celery app with saga workflows, as the tests' worker and relay processes import it.

Configured from the environment: SAGA_DATABASE_URL, SAGA_BROKER_URL, and SAGA_TEST_* knobs.
Each step records its executions in ``executions`` (created by the tests), so tests can count
how often a step's code ran."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import text

import saga
from saga import CeleryTaskStep, PermanentError, RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS

registry = saga.Registry()
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.1)
# Acceptance tests give each test a queue of its own (workers consume it with ``-Q``).
QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")


def record(ctx: StepContext, note: str = "") -> None:
    """Record one execution of this step's (or compensation's) code."""
    with engine.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executions (run_id, kind, step, attempt, idempotency_key, note) "
                "VALUES (:r, :k, :s, :a, :i, :n)"
            ),
            {"r": ctx.run_id, "k": ctx.kind, "s": ctx.step, "a": ctx.attempt,
             "i": ctx.idempotency_key, "n": note},
        )


class UnprintableError(Exception):
    """An exception whose text cannot be had: its ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def _poison(kind: str) -> Any:
    """What a step returns or raises that PostgreSQL cannot store as it is."""
    if kind == "nul_result":
        return {"s": "a\x00b"}
    if kind == "nul_error":
        raise ValueError("bad\x00byte")
    if kind == "unprintable_error":
        raise UnprintableError()
    if kind == "huge_error":
        raise ValueError("x" * 2**20)
    raise AssertionError(f"unknown poison {kind!r}")


def _behaviour(ctx: StepContext) -> Any:
    """Per-run knobs in the input: {"sleep": {"step": s}, "fail": {"step": n_times|"always"},
    "poison": {"step": "nul_result"|"nul_error"|"unprintable_error"|"huge_error"}}."""
    record(ctx)
    inp = ctx.input if isinstance(ctx.input, dict) else {}
    pause = inp.get("sleep", {}).get(ctx.step)
    if pause:
        time.sleep(pause)
    poison = inp.get("poison", {}).get(ctx.step)
    if poison:
        return _poison(poison)
    fail = inp.get("fail", {}).get(ctx.step)
    if fail == "permanent":
        raise PermanentError(f"{ctx.step} declined")
    if fail == "always" or (isinstance(fail, int) and ctx.attempt <= fail):
        raise RuntimeError(f"{ctx.step} failed on attempt {ctx.attempt}")
    return {"step": ctx.step, "attempt": ctx.attempt}


def _linear(name: str, time_limit: float, queue: str) -> Workflow:
    """first -> second -> third."""
    wf = Workflow(name, retry=FAST, time_limit=time_limit, queue=queue)
    for step, after in (("first", []), ("second", ["first"]), ("third", ["second"])):
        wf.add_step(step, _behaviour, after=after)
    return wf


def _fan(name: str, time_limit: float, queue: str) -> Workflow:
    """split -> branch_0..branch_9 -> join."""
    wf = Workflow(name, retry=FAST, time_limit=time_limit, queue=queue)
    wf.add_step("split", _behaviour)
    for i in range(10):
        wf.add_step(f"branch_{i}", _behaviour, after=["split"])
    wf.add_step("join", _behaviour, after=[f"branch_{i}" for i in range(10)])
    return wf


def _legacy(queue: str) -> Workflow:
    """An existing Celery task (``tests.legacy_total``, registered below) as a step."""
    wf = Workflow("test.legacy", retry=FAST, time_limit=20, queue=queue)
    wf.add_step("prepare", _behaviour)
    wf.add_step(
        "total",
        CeleryTaskStep("tests.legacy_total", kwargs=lambda ctx: {"prices": ctx.input["prices"]}),
        after=["prepare"],
    )
    return wf


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """The test workflows with their messages on ``queue`` (a test process builds the same
    definitions as its workers, to start runs they accept). The ``_quick`` ones have short
    time limits, so a lost attempt's lease (time limit + SAGA_LEASE_GRACE) runs out quickly."""
    return [
        _linear("test.linear", 20, queue),
        _fan("test.fan", 20, queue),
        _linear("test.linear_quick", 3, queue),
        _fan("test.fan_quick", 5, queue),
        _legacy(queue),
    ]


linear, fan, linear_quick, fan_quick, legacy = workflows()
for _wf in (linear, fan, linear_quick, fan_quick, legacy):
    registry.register(_wf)

engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-tests", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
# What saga wants of a worker serving its queues (install() leaves the app's settings alone).
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
DEAD_LETTER_EXCHANGE = os.environ.get("SAGA_TEST_DEAD_LETTER_EXCHANGE")
if DEAD_LETTER_EXCHANGE:
    # The queue as a RabbitMQ deployment would have it: rejected messages go to a dead-letter
    # exchange (the README recommends a policy; a queue argument does the same).
    app.conf.task_queues = [
        Queue(
            QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE,
            queue_arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
        )
    ]


@app.task(name="tests.legacy_total")  # type: ignore[untyped-decorator]
def legacy_total(prices: list[int]) -> int:
    """A task that existed before saga: it knows nothing of runs or steps."""
    return sum(prices)
