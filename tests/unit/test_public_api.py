"""The public API is what ``saga.__all__`` names; changing it is a deliberate act."""

from __future__ import annotations

import saga

PUBLIC = {
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
}


def test_the_public_names_are_exactly_the_pinned_ones() -> None:
    assert set(saga.__all__) == PUBLIC


def test_every_public_name_exists_and_has_a_docstring() -> None:
    for name in saga.__all__:
        value = getattr(saga, name)
        if name != "JSON":  # a type alias
            assert (value.__doc__ or "").strip(), f"saga.{name} has no docstring"


def test_importing_saga_does_not_import_celery() -> None:
    import subprocess
    import sys

    code = "import sys, saga; print('celery' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
