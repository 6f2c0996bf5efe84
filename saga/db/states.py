"""The state names the database constrains, in one place."""

from __future__ import annotations

RUN_STATES = (
    "running",
    "compensating",
    "cancelling",
    "completed",
    "compensated",
    "failed",
    "cancelled",
    "compensation_failed",
    "resolved",
)
"""``running`` → ``completed``; on a permanent failure ``compensating`` → ``compensated`` (or
``failed`` when nothing was to undo); on cancel ``cancelling`` → ``cancelled``; a compensation
that fails for good → ``compensation_failed``, which waits for an operator, who may retry
it or mark it ``resolved``."""

RUN_ACTIVE = ("running", "compensating", "cancelling")

STEP_STATES = ("waiting", "ready", "running", "completed", "failed", "skipped")
"""A step (or compensation) row: ``waiting`` for dependencies, ``ready`` with a message in the
outbox, ``running`` under a lease, then ``completed`` or ``failed``; ``skipped`` when the run
stopped before it ran."""

STEP_KINDS = ("step", "compensation")

RUN_FINISHED = ("completed", "compensated", "failed", "cancelled", "resolved")
"""Finished run states: counted in ``run_counts`` and prunable by retention. A
``compensation_failed`` run is not finished: it waits for an operator."""

PROCESS_KINDS = ("worker", "relay")

HISTORY_EVENTS = (
    "run_started",
    "step_ready",
    "step_started",
    "step_completed",
    "step_retry_scheduled",
    "step_failed",
    "step_skipped",
    "lease_expired",
    "message_republished",
    "run_completed",
    "run_compensating",
    "run_cancelling",
    "compensation_started",
    "run_compensated",
    "run_failed",
    "run_cancelled",
    "run_compensation_failed",
    "operator_retry",
    "operator_resolved",
    "deadline_exceeded",
)


def check_in(column: str, values: tuple[str, ...]) -> str:
    """A CHECK expression limiting ``column`` to ``values``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"
