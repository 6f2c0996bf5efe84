"""The state names the database constrains: those of the state machine (:mod:`saga.core.states`)
and the history's events."""

from __future__ import annotations

from saga.core.states import KINDS as STEP_KINDS
from saga.core.states import RUN_STATES, STEP_STATES

__all__ = [
    "HISTORY_EVENTS",
    "PROCESS_KINDS",
    "RUN_ACTIVE",
    "RUN_ENDED",
    "RUN_FINISHED",
    "RUN_STATES",
    "RUN_UNFINISHED",
    "STEP_KINDS",
    "STEP_STATES",
    "check_in",
]

RUN_ACTIVE = ("running", "compensating", "cancelling")

RUN_FINISHED = ("completed", "compensated", "failed", "cancelled", "resolved")
"""Finished run states: counted in ``run_counts`` and prunable by retention. A
``compensation_failed`` run is not finished: it waits for an operator."""

PROCESS_KINDS = ("worker", "relay")
"""What registers in ``processes``."""

RUN_UNFINISHED = (*RUN_ACTIVE, "compensation_failed")
"""Run states a business key can have one run in at most (``compensation_failed`` waits for an
operator, who may retry it): a new run of the key starts only once its run left them."""

RUN_ENDED = ("completed", "compensated", "failed", "cancelled", "resolved", "compensation_failed")
"""Run states a caller waiting on a run stops at (``compensation_failed`` included: it waits for
an operator, not for the engine). The runs table notifies when a run reaches one."""

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
    "step_suspended",
    "step_woken",
    "signal_received",
)


def check_in(column: str, values: tuple[str, ...]) -> str:
    """A CHECK expression limiting ``column`` to ``values``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"
