"""Errors raised by saga, each saying whether retrying can help."""

from __future__ import annotations


class SagaError(Exception):
    """Base class of every error saga raises on purpose."""

    retryable: bool = False


class DefinitionError(SagaError, ValueError):
    """A workflow definition is wrong; raised when it is declared, naming the workflow and step."""

    def __init__(self, workflow: str, message: str, steps: tuple[str, ...] = ()) -> None:
        self.workflow = workflow
        self.steps = steps
        where = f" (step {', '.join(repr(s) for s in steps)})" if steps else ""
        super().__init__(f"workflow {workflow!r}{where}: {message}")


class InputError(SagaError, ValueError):
    """A run's input (or a step's result) was refused: not JSON, or too large."""

    def __init__(self, workflow: str, field: str, message: str) -> None:
        self.workflow = workflow
        self.field = field
        super().__init__(f"workflow {workflow!r}, {field}: {message}")


class UnknownWorkflowError(SagaError, LookupError):
    """No workflow of that name (and version) is registered."""


class UnknownRunError(SagaError, LookupError):
    """No run has that id or business key."""


class InvalidTransitionError(SagaError):
    """An operator action does not apply to the run's state (e.g. cancelling a finished run)."""


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
