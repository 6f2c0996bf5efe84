"""The state machine of runs and step rows, in one table.

Every guarded statement in :mod:`saga.transitions`, :mod:`saga.lifecycle` and the stores moves a
row along one of these transitions and no other; the integration test
``tests/integration/test_state_table.py`` walks the table against the real SQL, and the unit
tests check that the Python decisions only ask for transitions listed here.

A step row (``kind='step'``) and a compensation row (``kind='compensation'``) share one
machine::

    waiting --dependencies_done--> ready --claimed--> running --completed--> completed
                                     ^                  |  |
                                     +--retry_scheduled-+  +--failed--> failed
    running --suspended--> suspended --woken--> running      (a sleep or a signal wait)
    waiting|ready|suspended --run_stopped--> skipped
    failed|skipped|completed|waiting|ready --operator_retry--> ready|waiting

A run::

    running --last_step_completed--> completed
    running --step_failed|deadline_exceeded--> compensating --nothing_to_undo--> failed
    running --cancel--> cancelling --nothing_to_undo--> cancelled
    compensating|cancelling --last_compensation_completed--> compensated|cancelled
    compensating|cancelling --compensation_failed--> compensation_failed
    compensation_failed --operator_retry--> compensating|cancelling
    compensation_failed --operator_resolve--> resolved
    failed --operator_retry--> running
    completed --undo_child--> compensating     (a child run whose parent step is undone)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
"""Every state a run can be in (the database constrains the column to these)."""

STEP_STATES = (
    "waiting", "ready", "running", "completed", "failed", "skipped", "suspended",
)
"""Every state a step or compensation row can be in: ``waiting`` for dependencies, ``ready``
with a message in the outbox, ``running`` under a lease renewed by its worker's heartbeat,
then ``completed`` or ``failed``; ``skipped`` when the run stopped before it ran again;
``suspended`` while a sleep or a signal wait waits (no worker, no lease: a ``wake_at`` the relay
fires, or a signal)."""

KINDS = ("step", "compensation")
"""A step row runs a step's code; a compensation row undoes it."""

STOPPING = ("compensating", "cancelling")
"""Run states in which the run dispatches no new step and undoes what may have happened."""

LIVE_RUN_STATES: dict[str, tuple[str, ...]] = {
    "step": ("running",),
    "compensation": STOPPING,
}
"""Run states in which new attempts of each kind may start."""

FINISHED_RUN_STATES = ("completed", "compensated", "failed", "cancelled", "resolved")
"""Run states nothing moves a run out of, but an operator's retry of a ``failed`` run."""

UNDO_END = {"compensating": "compensated", "cancelling": "cancelled"}
"""Where a stopping run ends once its last compensation completes."""

NOTHING_TO_UNDO_END = {"compensating": "failed", "cancelling": "cancelled"}
"""Where a stopping run ends when nothing of it needs undoing."""


@dataclass(frozen=True)
class Transition:
    """One edge: a ``machine`` (``run`` or ``step``) row in ``source`` moves to ``target`` on
    ``event``."""

    machine: str
    source: str
    event: str
    target: str


def _edges(machine: str, sources: Iterable[str], event: str, target: str) -> list[Transition]:
    return [Transition(machine, s, event, target) for s in sources]


TRANSITIONS: tuple[Transition, ...] = (
    # step and compensation rows
    *_edges("step", ["waiting"], "dependencies_done", "ready"),
    *_edges("step", ["ready"], "claimed", "running"),
    *_edges("step", ["running"], "completed", "completed"),
    *_edges("step", ["running"], "retry_scheduled", "ready"),
    *_edges("step", ["running"], "failed", "failed"),
    *_edges("step", ["running"], "suspended", "suspended"),
    *_edges("step", ["suspended"], "woken", "running"),
    *_edges("step", ["waiting", "ready", "suspended"], "run_stopped", "skipped"),
    *_edges(
        "step", ["failed", "skipped", "completed", "waiting", "ready"], "operator_retry", "ready"
    ),
    *_edges(
        "step", ["failed", "skipped", "completed", "waiting", "ready"], "operator_retry",
        "waiting",
    ),
    # runs
    *_edges("run", ["running"], "last_step_completed", "completed"),
    *_edges("run", ["running"], "step_failed", "compensating"),
    *_edges("run", ["running"], "deadline_exceeded", "compensating"),
    *_edges("run", ["running"], "cancel", "cancelling"),
    *_edges("run", ["compensating"], "nothing_to_undo", "failed"),
    *_edges("run", ["cancelling"], "nothing_to_undo", "cancelled"),
    *_edges("run", ["compensating"], "last_compensation_completed", "compensated"),
    *_edges("run", ["cancelling"], "last_compensation_completed", "cancelled"),
    *_edges("run", STOPPING, "compensation_failed", "compensation_failed"),
    *_edges("run", ["compensation_failed"], "operator_retry", "compensating"),
    *_edges("run", ["compensation_failed"], "operator_retry", "cancelling"),
    *_edges("run", ["compensation_failed"], "operator_resolve", "resolved"),
    *_edges("run", ["failed"], "operator_retry", "running"),
    *_edges("run", ["completed"], "undo_child", "compensating"),
)
"""The whole machine. Nothing else moves a run or a step row."""


def sources(machine: str, event: str) -> tuple[str, ...]:
    """The states an ``event`` may move a ``machine`` row out of (what its SQL guards on)."""
    found = tuple(dict.fromkeys(t.source for t in TRANSITIONS if (t.machine, t.event) ==
                                (machine, event)))
    if not found:
        raise KeyError(f"no {machine} transition on {event!r}")
    return found


def allowed(machine: str, source: str, target: str) -> bool:
    """Whether some event moves a ``machine`` row from ``source`` to ``target``."""
    return any(
        (t.machine, t.source, t.target) == (machine, source, target) for t in TRANSITIONS
    )


def target(machine: str, source: str, event: str) -> str:
    """The one state ``event`` moves a ``machine`` row in ``source`` to."""
    found = {t.target for t in TRANSITIONS if (t.machine, t.source, t.event) ==
             (machine, source, event)}
    if len(found) != 1:
        raise KeyError(f"{machine} in {source!r} has {len(found)} targets on {event!r}")
    return found.pop()
