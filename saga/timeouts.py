"""A step's time limit, enforced around the step's code only.

Celery's soft time limit raises wherever the task happens to be, possibly inside the engine's
own database calls, which leaves the connection unusable. saga arms a timer around the step's
code alone; Celery's hard time limit (a little later) and the step's lease remain the backstop
for code that ignores the exception."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from saga.errors import StepError


class StepTimeoutError(StepError):
    """The step's code ran past its time limit (a failed attempt, retryable by policy)."""

    retryable = True


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`StepTimeoutError` in this block after ``seconds``.

    Works in a process's main thread (Celery's prefork and solo pools); elsewhere the block
    runs unbounded and the hard limit and the lease take over."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise StepTimeoutError(f"{what} ran past its time limit of {seconds:g}s")

    previous: Callable[[int, FrameType | None], object] | int | None
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
