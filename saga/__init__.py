"""saga: durable workflows and sagas for teams who run Celery and PostgreSQL.

Declare a :class:`Workflow`, register it, start runs with :meth:`Saga.start` inside your own
transaction, wire the engine into your Celery app with :func:`install`, and run ``saga relay``
beside your workers.
"""

from saga.app import ConfigurationError, Saga
from saga.canvas import from_canvas
from saga.context import JSON, StepContext
from saga.definition import Step, Workflow
from saga.errors import (
    DefinitionError,
    DefinitionMismatchError,
    InputError,
    InvalidTransitionError,
    KeyConflictError,
    PermanentError,
    RetryableError,
    RunFailedError,
    SagaError,
    ScheduleError,
    SignalRefusedError,
    StepError,
    UnknownRunError,
    UnknownWorkflowError,
    WaitTimeoutError,
)
from saga.handles import RunHandle
from saga.keys import KeyPolicy
from saga.registry import Registry
from saga.retry import RetryPolicy
from saga.schedules import Schedule
from saga.settings import Settings
from saga.starting import Started
from saga.steps import CeleryTaskStep, FunctionStep, TransactionalStep, transactional


def install(celery_app: object, engine: Saga) -> object:
    """Wire ``engine`` into the Celery app (see :func:`saga.celery_adapter.install`)."""
    from saga.celery_adapter import install as _install

    return _install(celery_app, engine)


__all__ = [
    "JSON",
    "CeleryTaskStep",
    "ConfigurationError",
    "DefinitionError",
    "DefinitionMismatchError",
    "FunctionStep",
    "InputError",
    "InvalidTransitionError",
    "KeyConflictError",
    "KeyPolicy",
    "PermanentError",
    "Registry",
    "RetryPolicy",
    "RetryableError",
    "RunFailedError",
    "RunHandle",
    "Saga",
    "SagaError",
    "Schedule",
    "ScheduleError",
    "Settings",
    "SignalRefusedError",
    "Started",
    "Step",
    "StepContext",
    "StepError",
    "TransactionalStep",
    "UnknownRunError",
    "UnknownWorkflowError",
    "WaitTimeoutError",
    "Workflow",
    "from_canvas",
    "install",
    "transactional",
]
