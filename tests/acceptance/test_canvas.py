"""The Harbor seed's canvas, converted with ``saga.from_canvas`` and run by real workers, goes
through a Redis restart that loses every message, and every run completes; the same canvas run
as plain Celery on the same workers and broker loses orders in that restart."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from tests.acceptance.conftest import RedisServer, System, WorkflowsOf
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

TASKS = ("reserve", "charge", "label", "receipt", "mark_fulfilled")
RUNS = 40
PLAIN = 40


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    from tests.apps import canvas

    return "tests.apps.canvas:app", canvas.workflows


def executions(system: System) -> list[tuple[str, int]]:
    with system.engine.engine.connect() as conn:
        rows = conn.execute(text("SELECT step, note FROM executions ORDER BY id")).all()
    return [(str(r[0]).removeprefix("harbor."), int(r[1])) for r in rows]


def fulfilled(rows: list[tuple[str, int]], orders: range) -> set[int]:
    return {o for task, o in rows if task == "mark_fulfilled" and o in orders}


def test_the_converted_harbor_canvas_completes_through_a_redis_restart_plain_celery_loses(
    system: System, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_BROKER_URL", system.broker_url)
    monkeypatch.setenv("SAGA_TEST_QUEUE", system.queue)
    from tests.apps import canvas

    # The test process sends the plain canvases to this test's broker, queue and backend.
    canvas.app.conf.update(
        broker_url=system.broker_url, result_backend=system.broker_url,
        task_default_queue=system.queue,
    )
    workers = ("worker_a", "worker_b")
    for name in workers:
        system.start_worker(name)
    system.start_relay()

    saga_orders, plain_orders = range(1, RUNS + 1), range(1001, 1001 + PLAIN)
    with system.engine.engine.begin() as conn:
        handles = {
            order: system.engine.start_canvas(
                conn, canvas.WORKFLOW, canvas.checkout(order), key=f"order-{order}"
            )
            for order in saga_orders
        }
    for order in plain_orders:
        canvas.checkout(order).apply_async()

    total = (RUNS + PLAIN) * len(TASKS)
    wait_until(
        lambda: len(executions(system)) >= total // 4, timeout=60, message="nothing got going"
    )
    system.broker_outage(redis_server, workers)
    before = executions(system)
    assert len(fulfilled(before, plain_orders)) < PLAIN, "the outage came too late to matter"
    assert len(fulfilled(before, saga_orders)) < RUNS, "the outage came too late to matter"

    # Every saga run completes (each handle is woken as its run ends), with its tasks' results.
    results: dict[int, Any] = {o: h.wait(timeout=150) for o, h in handles.items()}
    assert results == {
        o: {"harbor.mark_fulfilled": {"order": o, "fulfilled": True}} for o in saga_orders
    }
    after = executions(system)
    per_order = {o: Counter(t for t, n in after if n == o) for o in saga_orders}
    # A task cut off by the outage may have run twice; none was skipped.
    assert all(set(c) == set(TASKS) for c in per_order.values()), per_order
    assert system.history_count("message_republished") > 0

    # The plain canvases caught in the restart never finish: their messages, and the chord's
    # state in the result backend, went with Redis.
    lost = set(plain_orders) - fulfilled(after, plain_orders)
    stranded = {
        o for o in lost
        if {"label", "receipt"} <= {t for t, n in after if n == o}  # header done, no body
    }
    print(f"plain Celery: {len(lost)}/{PLAIN} orders never fulfilled, "
          f"{len(stranded)} of them with the chord's header done")
    assert lost, "every plain canvas finished: the restart lost nothing"
