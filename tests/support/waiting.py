"""Polling with a deadline: tests wait for a condition, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_UNSET = object()


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition was not met",
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises ``AssertionError`` naming ``message`` and the last value (or the last exception the
    predicate raised) once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    last: object = _UNSET
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except AssertionError as exc:  # a predicate may assert; keep polling
            last_error = exc
        else:
            last_error = None
            last = value
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = (
                f"last error: {last_error!r}"
                if last_error is not None
                else f"last value: {'<none>' if last is _UNSET else repr(last)}"
            )
            raise AssertionError(f"{message} (within {timeout:g}s; {detail})")
        time.sleep(interval)
