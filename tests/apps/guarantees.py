"""A Celery app for the guarantee tests: leases, unknown outcomes, deploys, time limits.

Configured from the environment: ``SAGA_DATABASE_URL``, ``SAGA_BROKER_URL``,
``SAGA_TEST_QUEUE`` (the default queue; ``charge`` and its refund go to ``<queue>_payments``),
``SAGA_TEST_DEPLOY_VERSIONS`` (which versions of ``g.deploy`` this process has, e.g. ``1`` or
``1,2``) and ``SAGA_TEST_MAX_ATTEMPTS`` (the retry policy of ``g.policy``: a deploy may
change it under running runs). Importing it without a database URL works (nothing connects
until a step runs), so tests build the same definitions as their workers.

Every execution of a step's or a compensation's code is recorded in ``executions`` (a row noted
``start`` when the code begins, ``end`` when it returns, ``stop`` when it raised), with the
time from ``clock_timestamp()``. Behaviour is chosen per run through its input:

- ``sleep``: ``{step: seconds}`` to sleep (in short naps, so a time limit can interrupt it);
- ``fail``: ``{step: n | "always" | "permanent"}`` as in the other test apps;
- ``after_started``: ``{step: other}`` wait (up to 20 s) until ``other`` has started in this run;
- ``comp_outcome``: compensations return the outcome their context reports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from sqlalchemy import text

import saga
from saga import PermanentError, RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS

EXECUTIONS_DDL = (
    "CREATE TABLE executions (id bigserial primary key, run_id uuid, kind text, step text, "
    "attempt int, idempotency_key text, note text, outcome text, "
    "at timestamptz default clock_timestamp())"
)

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=0.5, jitter=0.0)
ONCE = RetryPolicy(max_attempts=1)


def record(ctx: StepContext, note: str) -> None:
    """Record one event of this attempt's code."""
    with engine.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executions "
                "(run_id, kind, step, attempt, idempotency_key, note, outcome) "
                "VALUES (:r, :k, :s, :a, :i, :n, :o)"
            ),
            {
                "r": ctx.run_id,
                "k": ctx.kind,
                "s": ctx.step,
                "a": ctx.attempt,
                "i": ctx.idempotency_key,
                "n": note,
                "o": ctx.outcome,
            },
        )


def _started(run_id: str, step: str) -> bool:
    with engine.engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT 1 FROM executions WHERE run_id = :r AND kind = 'step' AND step = :s "
                "AND note = 'start'"
            ),
            {"r": run_id, "s": step},
        ).first()
    return found is not None


def _nap(seconds: float) -> None:
    # Short naps: a time limit enforced by an asynchronous exception lands between them.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)


def act(ctx: StepContext) -> Any:
    """A step: record, maybe wait for another step, maybe sleep, maybe fail."""
    record(ctx, "start")
    knobs = ctx.input if isinstance(ctx.input, dict) else {}
    try:
        other = knobs.get("after_started", {}).get(ctx.step)
        if other:
            deadline = time.monotonic() + 20
            while not _started(ctx.run_id, other) and time.monotonic() < deadline:
                time.sleep(0.05)
        pause = knobs.get("sleep", {}).get(ctx.step)
        if pause:
            _nap(pause)
        how = knobs.get("fail", {}).get(ctx.step)
        if how == "permanent":
            raise PermanentError(f"{ctx.step} declined")
        if how == "always" or (isinstance(how, int) and ctx.attempt <= how):
            raise RuntimeError(f"{ctx.step} failed on attempt {ctx.attempt}")
    except BaseException:
        record(ctx, "stop")
        raise
    record(ctx, "end")
    return {"step": ctx.step, "attempt": ctx.attempt}


def undo(ctx: StepContext) -> Any:
    """A compensation: record (with the outcome its context reports) and return."""
    record(ctx, "start")
    return {"undone": ctx.step, "outcome": ctx.outcome, "key": ctx.step_idempotency_key}


def payments_queue(queue: str) -> str:
    """The payments queue that goes with a default queue."""
    return f"{queue}_payments"


def _checkout(name: str, charge_limit: float, queue: str) -> Workflow:
    """reserve → (charge on the payments queue, check) → ship; reserve and charge undoable."""
    wf = Workflow(name, retry=QUICK, time_limit=30, queue=queue)
    wf.add_step("reserve", act, compensate=undo)
    wf.add_step(
        "charge",
        act,
        after=["reserve"],
        compensate=undo,
        queue=payments_queue(queue),
        retry=ONCE,
        time_limit=charge_limit,
    )
    wf.add_step("check", act, after=["reserve"], retry=ONCE)
    wf.add_step("ship", act, after=["charge", "check"])
    return wf


def _spin(queue: str) -> Workflow:
    """One step with a two-second time limit, tried twice."""
    wf = Workflow("g.spin", retry=RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=0.0),
                  time_limit=2, queue=queue)
    wf.add_step("spin", act)
    return wf


def _hold(queue: str) -> Workflow:
    """One step with a long time limit: a dead worker's attempt must not wait for it."""
    wf = Workflow("g.hold", retry=QUICK, time_limit=120, queue=queue)
    wf.add_step("hold", act)
    return wf


def _policy(queue: str) -> Workflow:
    """first → second, with a retry policy a deploy may change."""
    attempts = int(os.environ.get("SAGA_TEST_MAX_ATTEMPTS", "3"))
    policy = RetryPolicy(max_attempts=attempts, initial_delay=0.2, max_delay=0.5, jitter=0.0)
    wf = Workflow("g.policy", retry=policy, time_limit=30, queue=queue)
    wf.add_step("first", act)
    wf.add_step("second", act, after=["first"])
    return wf


def _deploy(version: int, queue: str) -> Workflow:
    """Version 1: a → b. Version 2 adds c after b."""
    wf = Workflow("g.deploy", version=version, retry=QUICK, time_limit=30, queue=queue)
    wf.add_step("a", act)
    wf.add_step("b", act, after=["a"])
    if version >= 2:
        wf.add_step("c", act, after=["b"])
    return wf


def _mixed(queue: str) -> Workflow:
    """a → (b, c) → d, every step undoable; for many runs on one worker."""
    wf = Workflow("g.mixed", retry=QUICK, time_limit=30, queue=queue)
    wf.add_step("a", act, compensate=undo)
    wf.add_step("b", act, after=["a"], compensate=undo)
    wf.add_step("c", act, after=["a"], compensate=undo)
    wf.add_step("d", act, after=["b", "c"], compensate=undo)
    return wf


@saga.transactional
def book(ctx: StepContext) -> Any:
    """A transactional step: its row in ``ledger`` commits with its completion."""
    assert ctx.connection is not None
    ctx.connection.execute(
        text("INSERT INTO ledger (run_id, attempt) VALUES (:r, :a)"),
        {"r": ctx.run_id, "a": ctx.attempt},
    )
    return {"booked": ctx.attempt}


def _ledger(queue: str) -> Workflow:
    """pay → book (transactional) → notify."""
    wf = Workflow("g.ledger", retry=QUICK, time_limit=30, queue=queue)
    wf.add_step("pay", act)
    wf.add_step("book", book, after=["pay"])
    wf.add_step("notify", act, after=["book"])
    return wf


def workflows(queue: str, versions: str = "1,2") -> list[Workflow]:
    """Every workflow of this app on ``queue``, with ``g.deploy`` in the given versions."""
    found = [
        _checkout("g.checkout", 30, queue),
        _checkout("g.checkout_tight", 1, queue),
        _spin(queue),
        _hold(queue),
        _policy(queue),
        _mixed(queue),
        _ledger(queue),
    ]
    found += [_deploy(int(v), queue) for v in versions.split(",")]
    return found


registry = saga.Registry(
    *workflows(
        os.environ.get("SAGA_TEST_QUEUE", "saga"),
        os.environ.get("SAGA_TEST_DEPLOY_VERSIONS", "1,2"),
    )
)
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery(
    "saga-guarantees", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5")
)
saga.install(app, engine)
# What saga wants of a worker serving its queues (install() leaves the app's settings alone).
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
