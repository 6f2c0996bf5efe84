"""Retry policy as a validated value, built on tenacity's wait and stop strategies."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Never

import tenacity
from tenacity.wait import wait_base

from saga.errors import DefinitionError, PermanentError, StepError


def _bad(message: str) -> DefinitionError:
    return DefinitionError(None, f"RetryPolicy: {message}")


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


def _retry_state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failed attempt is tried again.

    ``max_attempts`` counts the first attempt. The delay after attempt *n* is exponential
    (``initial_delay * multiplier ** (n-1)``), capped at ``max_delay``, plus up to ``jitter``
    seconds of random jitter. ``retry_on`` lists the exception types that may be retried;
    :class:`~saga.errors.PermanentError` is never retried, whatever this says.
    """

    max_attempts: int = 3
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    _wait: wait_base = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        max_attempts: int = 3,
        initial_delay: float = 1.0,
        multiplier: float = 2.0,
        max_delay: float = 60.0,
        jitter: float = 0.5,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        **unknown: Never,
    ) -> None:
        """A validated policy; a bad value or an unknown option is a :class:`DefinitionError`
        (a ``ValueError`` and a ``TypeError``)."""
        if unknown:
            raise _bad(
                f"unknown option(s) {', '.join(sorted(unknown))}; the options are "
                "max_attempts, initial_delay, multiplier, max_delay, jitter, retry_on"
            )
        values = {
            "max_attempts": max_attempts,
            "initial_delay": initial_delay,
            "multiplier": multiplier,
            "max_delay": max_delay,
            "jitter": jitter,
            "retry_on": tuple(retry_on) if isinstance(retry_on, list | tuple) else retry_on,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise _bad(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        for name in ("initial_delay", "max_delay", "jitter"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise _bad(f"{name} must be a number >= 0, got {value!r}")
        if not _is_number(self.multiplier) or self.multiplier < 1:
            raise _bad(f"multiplier must be a number >= 1, got {self.multiplier!r}")
        if self.max_delay < self.initial_delay:
            raise _bad("max_delay must be >= initial_delay")
        if (
            not isinstance(self.retry_on, tuple)
            or not self.retry_on
            or not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise _bad("retry_on must be a non-empty tuple of exception types")
        wait = tenacity.wait_exponential(
            multiplier=self.initial_delay, exp_base=self.multiplier, max=self.max_delay
        )
        object.__setattr__(self, "_wait", wait)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether this kind of error may be retried at all (ignoring the attempt count)."""
        if isinstance(error, StepError):
            return error.retryable and not isinstance(error, PermanentError)
        return isinstance(error, self.retry_on)

    def delay_after(self, attempt: int, rand: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before the attempt after ``attempt``; ``None`` once attempts are spent.

        Pure but for ``rand``, which tests may pin.
        """
        if tenacity.stop_after_attempt(self.max_attempts)(_retry_state(attempt)):
            return None
        base = float(self._wait(_retry_state(attempt)))
        return min(base, self.max_delay) + self.jitter * rand()

    def describe(self) -> dict[str, object]:
        """A JSON-able form, part of the definition hash."""
        return {
            "max_attempts": self.max_attempts,
            "initial_delay": self.initial_delay,
            "multiplier": self.multiplier,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "retry_on": [f"{t.__module__}.{t.__qualname__}" for t in self.retry_on],
        }


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)
