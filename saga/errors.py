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


class StepError(Exception):
    """Raise from a step to fail the attempt; ``retryable`` says whether the policy may retry it."""

    retryable = True


class PermanentError(StepError):
    """Raise from a step to fail it for good: the remaining retries are skipped."""

    retryable = False


class RetryableError(StepError):
    """Raise from a step for a transient failure the retry policy should retry."""

    retryable = True
