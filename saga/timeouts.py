"""A step's time limit, enforced around the step's code only, in every pool saga accepts.

Celery's soft time limit raises wherever the task happens to be, possibly inside the engine's
own database calls, which leaves the connection unusable; and Celery's thread pool has no time
limit at all. saga times the step's code itself:

- on a process's main thread (Celery's prefork and solo pools) with ``SIGALRM``, which also
  interrupts a blocking system call;
- on any other thread (Celery's threads pool) with an asynchronous exception raised in that
  thread by a watchdog thread (``PyThreadState_SetAsyncExc``). It lands at the next bytecode the
  thread runs: Python code is stopped at once; code blocked in a C call is stopped when the call
  returns. Past the time limit plus ``lease_grace`` the worker's heartbeat stops renewing the
  attempt's lease, so a thread that never comes back is given up and the step retried.

Pools that run many steps on one thread (gevent, eventlet) cannot be timed this way; the Celery
adapter refuses them for saga's queues.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from saga.errors import StepError


class StepTimeoutError(StepError):
    """The step's code ran past its time limit (a failed attempt, retryable by policy). It may
    have had its effect: the stored error says ``"outcome": "unknown"``."""

    retryable = True
    outcome_unknown = True


class _AsyncStepTimeoutError(StepTimeoutError):
    """Raised into a thread by the watchdog (it can carry no message): translated into a
    :class:`StepTimeoutError` with one by :func:`time_limit`."""


@contextmanager
def time_limit(seconds: float, what: str, watchdog: Watchdog) -> Iterator[None]:
    """Raise :class:`StepTimeoutError` in this block after ``seconds`` (``watchdog`` times it
    off the main thread)."""
    if seconds <= 0:
        yield
        return
    message = f"{what} ran past its time limit of {seconds:g}s"
    if threading.current_thread() is threading.main_thread():
        with _alarm(seconds, message):
            yield
        return
    try:
        with watchdog.armed(seconds):
            yield
    except _AsyncStepTimeoutError:
        raise StepTimeoutError(message) from None


@contextmanager
def _alarm(seconds: float, message: str) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise StepTimeoutError(message)

    previous: Callable[[int, FrameType | None], object] | int | None
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    # None clears an exception set but not raised yet.
    target = ctypes.py_object(exc) if exc is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


class Watchdog:
    """One daemon thread per process that raises :class:`StepTimeoutError` into threads whose
    armed deadline has passed."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child has no watchdog thread, and must not inherit a lock held by it.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._armed: dict[int, int] = {}  # token -> thread id
        self._fired: set[int] = set()
        self._deadlines: list[tuple[float, int]] = []
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def armed(self, seconds: float) -> Iterator[None]:
        """Raise in the calling thread if the block runs past ``seconds``."""
        thread_id = threading.get_ident()
        with self._lock:
            token = next(self._tokens)
            self._armed[token] = thread_id
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, token))
            self._start()
            self._wake.notify()
        try:
            yield
        finally:
            with self._lock:
                self._armed.pop(token, None)
                fired = token in self._fired
                self._fired.discard(token)
            if fired:
                # It fired as the block ended: drop the exception if it is still pending.
                _raise_in(thread_id, None)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="saga-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)
                if not self._deadlines:
                    self._wake.wait()
                    continue
                due, token = self._deadlines[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._deadlines)
                self._fired.add(token)
                _raise_in(self._armed.pop(token), _AsyncStepTimeoutError)
