"""A step's time limit off the main thread (Celery's threads pool), and the pools saga refuses."""

from __future__ import annotations

import threading
import time

import pytest

from saga.celery_adapter import refused_pool
from saga.timeouts import StepTimeoutError, Watchdog, time_limit


def _in_thread(fn: object) -> list[BaseException | str]:
    out: list[BaseException | str] = []

    def target() -> None:
        try:
            fn()  # type: ignore[operator]
            out.append("returned")
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return out


def test_python_code_past_its_limit_on_a_worker_thread_is_stopped() -> None:
    watchdog = Watchdog()

    def spin() -> None:
        with time_limit(0.2, "step 'spin'", watchdog):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass

    begun = time.monotonic()
    (outcome,) = _in_thread(spin)
    assert isinstance(outcome, StepTimeoutError)
    assert "step 'spin' ran past its time limit of 0.2s" in str(outcome)
    assert time.monotonic() - begun < 4


def test_code_within_its_limit_on_a_worker_thread_is_left_alone_afterwards() -> None:
    watchdog = Watchdog()

    def quick() -> None:
        with time_limit(0.3, "step 'quick'", watchdog):
            time.sleep(0.01)
        time.sleep(0.6)  # past the limit, outside the block: nothing may land here

    assert _in_thread(quick) == ["returned"]


def test_a_blocking_call_is_stopped_when_it_returns() -> None:
    watchdog = Watchdog()

    def nap() -> None:
        with time_limit(0.1, "step 'nap'", watchdog):
            time.sleep(0.5)
            time.sleep(0.5)

    begun = time.monotonic()
    (outcome,) = _in_thread(nap)
    assert isinstance(outcome, StepTimeoutError)
    assert time.monotonic() - begun < 0.9, "the second nap did not begin"


@pytest.mark.parametrize("pool", ["gevent", "eventlet", "celery.concurrency.gevent:TaskPool"])
def test_a_green_pool_serving_a_saga_queue_is_refused(pool: str) -> None:
    why = refused_pool(pool, {"saga", "emails"}, {"saga", "payments"})
    assert why is not None and "saga" in why and "time limits" in why
    assert refused_pool(pool, set(), {"saga"}) is not None, "no -Q: it consumes every queue"


def test_other_pools_and_green_pools_without_saga_queues_are_accepted() -> None:
    for pool in ("prefork", "threads", "solo", "celery.concurrency.thread:TaskPool"):
        assert refused_pool(pool, {"saga"}, {"saga"}) is None
    assert refused_pool("gevent", {"emails"}, {"saga"}) is None
