"""Errors raised by saga, each saying whether retrying can help; and how an exception's text
is made safe to store and to log."""

from __future__ import annotations

import re
from typing import Any

ERROR_TEXT_LIMIT = 2000
"""Characters of an exception's text kept in a stored error document."""


class SagaError(Exception):
    """Base class of every error saga raises on purpose."""

    retryable: bool = False


class DefinitionError(SagaError, ValueError, TypeError):
    """A workflow definition (or one of its options, such as a :class:`~saga.RetryPolicy`) is
    wrong; raised when it is declared, naming the workflow and step where there are ones.

    It is a ``ValueError`` (a bad value) and a ``TypeError`` (an unknown keyword option), so
    code that caught either before keeps working."""

    def __init__(
        self, workflow: str | None, message: str, steps: tuple[str, ...] = ()
    ) -> None:
        self.workflow = workflow
        self.steps = steps
        where = f"step {', '.join(repr(s) for s in steps)}" if steps else ""
        if workflow is not None:
            prefix = f"workflow {workflow!r}" + (f" ({where})" if where else "")
        else:
            prefix = where
        super().__init__(f"{prefix}: {message}" if prefix else message)


class InputError(SagaError, ValueError):
    """A run's input (or a step's result) was refused: not JSON, not storable, or too large."""

    def __init__(self, workflow: str, field: str, message: str) -> None:
        self.workflow = workflow
        self.field = field
        super().__init__(f"workflow {workflow!r}, {field}: {message}")


class ScheduleError(SagaError, ValueError):
    """A schedule's declaration is wrong (its name, interval or cron expression, catch-up
    policy, input or workflow); raised when it is declared, naming the schedule."""

    def __init__(self, schedule: object, message: str) -> None:
        self.schedule = schedule
        super().__init__(f"schedule {schedule!r}: {message}")


class UnstorableResultError(SagaError):
    """A step's code returned, but its result cannot be stored (not JSON, a NUL byte, too
    large...). The step's code may have had its effect, so the outcome is unknown."""

    outcome_unknown = True

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"the step's result is not storable: {detail}")


class UnknownWorkflowError(SagaError, LookupError):
    """No workflow of that name (and version) is registered."""


class UnknownRunError(SagaError, LookupError):
    """No run has that id or business key."""


class InvalidTransitionError(SagaError):
    """An operator action does not apply to the run's state (e.g. cancelling a finished run)."""


class SignalRefusedError(SagaError):
    """A signal was sent to a run that is not running (finished, stopping, or waiting for an
    operator): nothing waits for it, so it is refused rather than kept. ``state`` is the run's
    state."""

    def __init__(self, run_id: str, state: str, name: str) -> None:
        self.run_id = run_id
        self.state = state
        self.name = name
        super().__init__(f"run {run_id} is {state}: it takes no signal {name!r}")


class DefinitionMismatchError(SagaError):
    """A run was started with another definition of its workflow than the one registered here."""


class KeyConflictError(SagaError, ValueError):
    """Starting a run under a business key whose run has another input, where the workflow's
    key policy is ``refuse_changed_input``; ``run_id`` is the key's existing run."""

    def __init__(self, workflow: str, key: str, run_id: str) -> None:
        self.workflow = workflow
        self.key = key
        self.run_id = run_id
        super().__init__(
            f"workflow {workflow!r}: key {key!r} names run {run_id} with another input "
            "(its key policy refuses a changed input)"
        )


class RunFailedError(SagaError):
    """A run a caller waited on ended without completing: ``state`` is its end state
    (``compensated``, ``failed``, ``cancelled``, ``resolved`` or ``compensation_failed``) and
    ``error`` its error (a JSON object, or ``None``). Waiting again does not change it."""

    retryable = False

    def __init__(self, run_id: str, state: str, error: object) -> None:
        self.run_id = run_id
        self.state = state
        self.error = error
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"run {run_id} ended {state}" + (f": {message}" if message else ""))


class WaitTimeoutError(SagaError, TimeoutError):
    """A run a caller waited on had not ended within the timeout; ``state`` is the state it
    was in. The run goes on: waiting again may see it end."""

    retryable = True

    def __init__(self, run_id: str, state: str, timeout: float) -> None:
        self.run_id = run_id
        self.state = state
        super().__init__(f"run {run_id} is still {state} after {timeout:g}s")


class StepError(Exception):
    """Raise from a step to fail the attempt; ``retryable`` says whether the policy may retry it."""

    retryable = True


class PermanentError(StepError):
    """Raise from a step to fail it for good: the remaining retries are skipped."""

    retryable = False


class RetryableError(StepError):
    """Raise from a step for a transient failure the retry policy should retry."""

    retryable = True


# -- exception text ------------------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """``text`` as PostgreSQL can store it: NUL bytes removed, lone surrogates replaced by
    U+FFFD, at most ``limit`` characters (the last three ``...`` when it was cut)."""
    text = text[: limit * 2].replace("\x00", "")
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def type_name(exc: BaseException) -> str:
    """``module.QualifiedName`` of the exception's type (storable)."""
    return storable_text(f"{type(exc).__module__}.{type(exc).__qualname__}", 300)


def exception_text(exc: BaseException, limit: int = ERROR_TEXT_LIMIT) -> str:
    """The exception's text, safe to store (see :func:`storable_text`); when its ``__str__``
    raises, its type name (and what ``__str__`` raised) instead."""
    try:
        text = str(exc)
    except Exception as failure:
        text = f"{type(exc).__qualname__} (its __str__ raised {type(failure).__qualname__})"
    return storable_text(text, limit)


def error_document(exc: BaseException, attempt: int) -> dict[str, Any]:
    """A failed attempt's error as stored: ``type``, ``message`` (see :func:`exception_text`)
    and ``attempt``; plus ``"outcome": "unknown"`` when the step's code ran and may have had
    its effect although its outcome is not known (an unstorable result, a time limit overrun:
    the exception's class says ``outcome_unknown = True``)."""
    doc: dict[str, Any] = {
        "type": type_name(exc),
        "message": exception_text(exc),
        "attempt": attempt,
    }
    if getattr(exc, "outcome_unknown", False) is True:
        doc["outcome"] = "unknown"
    return doc
