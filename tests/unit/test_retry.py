"""Retry policies: validated values with capped exponential delays."""

from __future__ import annotations

from typing import Any

import pytest

from saga.errors import DefinitionError, PermanentError, RetryableError, StepError
from saga.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy


def no_jitter() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_delay": float("nan")}, "initial_delay"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"max_delay": -1}, "max_delay"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": "0.1"}, "jitter"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"initial_delay": 10, "max_delay": 5}, "max_delay must be >= initial_delay"),
        ({"retry_on": ()}, "retry_on"),
        ({"retry_on": (int,)}, "retry_on"),
        ({"retry_on": ("ValueError",)}, "retry_on"),
    ],
)
def test_an_invalid_policy_is_refused_naming_the_setting(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(DefinitionError, match=message) as info:
        RetryPolicy(**kwargs)

    assert isinstance(info.value, ValueError)
    assert info.value.workflow is None
    assert str(info.value).startswith("RetryPolicy: ")


def test_an_unknown_policy_option_is_a_definition_error() -> None:
    with pytest.raises(DefinitionError, match=r"unknown option.*retries") as info:
        RetryPolicy(retries=3)  # type: ignore[call-arg]

    assert isinstance(info.value, TypeError)


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=10, initial_delay=1.0, multiplier=2.0, max_delay=10.0)

    delays = [policy.delay_after(n, rand=no_jitter) for n in range(1, 10)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0]


def test_no_delay_is_given_once_the_attempts_are_spent() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, max_delay=60.0)

    assert policy.delay_after(2, rand=no_jitter) == 2.0
    assert policy.delay_after(3, rand=no_jitter) is None
    assert policy.delay_after(4, rand=no_jitter) is None


def test_a_single_attempt_policy_never_retries() -> None:
    assert NO_RETRY.delay_after(1, rand=no_jitter) is None


def test_jitter_adds_up_to_its_amount() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=1.0, jitter=0.5)

    assert policy.delay_after(1, rand=lambda: 0) == 1.0
    assert policy.delay_after(1, rand=lambda: 1.0) == 1.5
    assert policy.delay_after(2, rand=lambda: 0.5) == 2.25


def test_the_default_policy_tries_three_times() -> None:
    assert DEFAULT_RETRY.max_attempts == 3
    assert DEFAULT_RETRY.delay_after(1, rand=no_jitter) is not None
    assert DEFAULT_RETRY.delay_after(3, rand=no_jitter) is None


def test_a_permanent_error_is_never_retryable() -> None:
    everything = RetryPolicy(retry_on=(BaseException,))

    assert not everything.is_retryable(PermanentError("card declined"))
    assert not DEFAULT_RETRY.is_retryable(PermanentError("card declined"))


def test_a_permanent_error_marked_retryable_is_still_not_retried() -> None:
    error = PermanentError("nope")
    error.retryable = True

    assert not DEFAULT_RETRY.is_retryable(error)


def test_step_errors_say_themselves_whether_they_are_retryable() -> None:
    narrow = RetryPolicy(retry_on=(KeyError,))

    assert narrow.is_retryable(RetryableError("flaky"))
    assert narrow.is_retryable(StepError("failed"))


def test_retry_on_decides_for_other_errors() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError, TimeoutError))

    assert policy.is_retryable(ConnectionResetError("reset"))
    assert policy.is_retryable(TimeoutError())
    assert not policy.is_retryable(ValueError("bad input"))
    assert not policy.is_retryable(KeyboardInterrupt())


def test_the_default_policy_retries_any_exception() -> None:
    assert DEFAULT_RETRY.is_retryable(ValueError("x"))
    assert not DEFAULT_RETRY.is_retryable(KeyboardInterrupt())


def test_describe_names_every_setting_for_the_definition_hash() -> None:
    policy = RetryPolicy(max_attempts=4, retry_on=(ConnectionError,))

    assert policy.describe() == {
        "max_attempts": 4,
        "initial_delay": 1.0,
        "multiplier": 2.0,
        "max_delay": 60.0,
        "jitter": 0.5,
        "retry_on": ["builtins.ConnectionError"],
    }


def test_policies_with_equal_settings_are_equal() -> None:
    assert RetryPolicy(max_attempts=4) == RetryPolicy(max_attempts=4)
    assert RetryPolicy(max_attempts=4) != RetryPolicy(max_attempts=5)
