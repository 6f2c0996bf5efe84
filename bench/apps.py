"""The benchmark's app module: one Celery app carrying both the saga workflows and the plain
Celery tasks of the baseline, so one worker (``celery -A bench.apps:app worker -c 2 -Q saga``)
serves both workloads with the same settings.

Configured from the environment (``bench/throughput.py`` sets these for its subprocesses):

- ``SAGA_DATABASE_URL``  default ``postgresql+psycopg://postgres@127.0.0.1:5432/saga_bench``
- ``BENCH_REDIS_URL``    broker *and* result backend, default ``redis://127.0.0.1:6379/4``

Every step and task is a no-op: the figures measure the engine's overhead, not work.
The last task of a Celery chain and the body of a chord push ``"<tag> <unix time>"`` onto the
Redis list :data:`DONE_KEY`, which is how the driver knows a chain/chord has finished.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis
from celery import Celery

import saga
from saga import StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS

DATABASE_URL = os.environ.setdefault(
    "SAGA_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/saga_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/4")
QUEUE = "saga"
DONE_KEY = "bench:done"
FAN_WIDTH = 10


# -- saga workflows ---------------------------------------------------------------------------


def noop_step(ctx: StepContext) -> Any:
    """A step that does nothing (its result is JSON ``null``)."""
    return None


def _linear() -> Workflow:
    """first -> second -> third."""
    wf = Workflow("bench.linear", time_limit=60, queue=QUEUE)
    wf.add_step("first", noop_step)
    wf.add_step("second", noop_step, after=["first"])
    wf.add_step("third", noop_step, after=["second"])
    return wf


def _fan() -> Workflow:
    """branch_0..branch_9 (all ready at start) -> join: the same shape as a Celery chord of
    10 header tasks and a body."""
    wf = Workflow("bench.fan", time_limit=60, queue=QUEUE)
    branches = [f"branch_{i}" for i in range(FAN_WIDTH)]
    for name in branches:
        wf.add_step(name, noop_step)
    wf.add_step("join", noop_step, after=branches)
    return wf


linear = _linear()
fan = _fan()
registry = saga.Registry(linear, fan)
engine = saga.Saga(registry, database_url=DATABASE_URL)

app = Celery("saga-bench", broker=REDIS_URL, backend=REDIS_URL)
saga.install(app, engine)
# install() sets nothing on the app: saga's task carries its own options (JSON, acks_late,
# reject on worker lost, no result). The baseline's plain tasks get the same ones as the
# app's defaults, and the worker the settings saga wants, so both sides run on equal terms.
# Plain Celery tasks go to the same queue the worker consumes. (The chord's header tasks
# store results: a chord needs them.)
app.conf.update(
    WORKER_SETTINGS,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
)

# -- the plain Celery baseline ----------------------------------------------------------------


@functools.cache
def _redis() -> redis.Redis:
    """This process's client (first used in a pool child, after the fork)."""
    return redis.Redis.from_url(REDIS_URL)


def _done(tag: str) -> None:
    _redis().rpush(DONE_KEY, f"{tag} {time.time()}")


@app.task(name="bench.noop", ignore_result=True)  # type: ignore[untyped-decorator]
def noop() -> None:
    """A chain link that does nothing."""


@app.task(name="bench.chain_last", ignore_result=True)  # type: ignore[untyped-decorator]
def chain_last(tag: str) -> None:
    """The last link of a chain: a no-op that reports the chain finished."""
    _done(tag)


@app.task(name="bench.branch", ignore_result=False)  # type: ignore[untyped-decorator]
def branch(i: int) -> int:
    """A chord header task: a no-op whose (tiny) result the chord collects."""
    return i


@app.task(name="bench.join", ignore_result=True)  # type: ignore[untyped-decorator]
def join(results: list[int], tag: str) -> None:
    """A chord body: a no-op that reports the chord finished."""
    _done(tag)
