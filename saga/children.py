"""Child sagas: a step that runs another workflow as a child run (:mod:`saga.steps.children`).

Starting: the worker that claimed a child step starts the child run (under the business key
``child:<parent run>:<step>:<attempt>``, so a re-delivered attempt finds the child instead of
starting another), writes the parent columns on it and suspends the step's row, in one
transaction: exactly one child per attempt, and no worker held while it runs.

Waking: the relay (and :func:`saga.testing.drain`) looks for finished children whose parent
row is still suspended, on each turn of its loop (at most twice a second, and at least
once per poll interval), with one indexed query (``ix_runs_parent``; a
suspended child wait is the suspended row without ``wake_at``). Nothing is added to the
completing statement of the hot path, which every step of every run pays for; a child's end
reaches its parent within about a second instead. A completed child completes the step
with its result; one that failed, was compensated or was cancelled fails the attempt (retried
under the step's policy with a new child, then the parent compensates). A child that waits for
an operator (``compensation_failed``) keeps its parent waiting until it is retried or resolved.

Undoing: a child step's compensation (:class:`~saga.steps.children.UndoChild`) compensates a
completed child (``completed --undo_child--> compensating``) or cancels a live one, and waits
for it to end. A parent that stops (cancelled, or compensating) cancels its live children in
its own transaction (:meth:`saga.lifecycle.Lifecycle.stop_in_tx`); its waiting child step is
skipped, and that step's compensation then waits for the cancelled child to end. A child that
ended otherwise has nothing left to undo.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from saga import logs
from saga.codec import dumps
from saga.context import StepContext
from saga.core.attempts import AttemptRef
from saga.core.states import STOPPING
from saga.definition import Workflow
from saga.errors import SagaError, UnknownWorkflowError
from saga.keys import KeyPolicy
from saga.starting import Starter
from saga.steps.children import ChildStep

if TYPE_CHECKING:  # saga.app makes a Children: no import at run time
    from saga.app import Saga

log = logging.getLogger("saga.children")

STEP_ENDS = ("completed", "failed", "compensated", "cancelled", "resolved")
"""Child states that wake a waiting child step (it completes on ``completed``, else fails)."""
UNDO_ENDS = ("failed", "compensated", "cancelled", "resolved")
"""Child states that complete a waiting compensation of a child step (nothing left to undo)."""
WAKE_EVERY = 0.5
"""Seconds between two looks of a relay for finished children."""

_SET_PARENT = """
UPDATE {runs} SET parent_run_id = :parent, parent_step = :step, parent_attempt = :attempt
WHERE id = :child AND parent_run_id IS NULL
"""
_SUSPEND = """
UPDATE {steps}
SET state = 'suspended', lease_expires_at = NULL, wake_at = NULL, signal = NULL
WHERE run_id = :run_id AND kind = :kind AND step = :step AND state = 'running'
  AND attempt = :attempt AND worker = :token
RETURNING attempt
"""
# The child of a step is the one its row's current attempt started.
_CHILD_OF = """
SELECT c.id::text AS id, c.workflow, c.version, c.state FROM {runs} c
JOIN {steps} st ON st.run_id = c.parent_run_id AND st.kind = 'step' AND st.step = c.parent_step
  AND st.attempt = c.parent_attempt
WHERE c.parent_run_id = :run_id AND c.parent_step = :step
FOR UPDATE OF c
"""
_FINISHED = """
SELECT s.run_id::text AS run_id, s.kind, s.step, c.id::text AS child_id, c.state AS child_state,
       p.workflow, p.version
FROM {steps} s
JOIN {runs} p ON p.id = s.run_id
JOIN {steps} st ON st.run_id = s.run_id AND st.kind = 'step' AND st.step = s.step
JOIN {runs} c ON c.parent_run_id = s.run_id AND c.parent_step = s.step
  AND c.parent_attempt = st.attempt
WHERE s.state = 'suspended' AND s.wake_at IS NULL
  AND c.state = ANY(CASE WHEN s.kind = 'step' THEN CAST(:step_ends AS text[])
                         ELSE CAST(:undo_ends AS text[]) END)
LIMIT :limit
"""
_WAKE = """
UPDATE {steps} sr
SET state = 'running', worker = :token, lease_expires_at = now() + interval '60 seconds'
FROM {runs} r
WHERE r.id = sr.run_id AND r.state = ANY(:live)
  AND sr.run_id = :run_id AND sr.kind = :kind AND sr.step = :step AND sr.state = 'suspended'
  AND sr.wake_at IS NULL
RETURNING sr.attempt, sr.first_attempt
"""
_CHILD = "SELECT state, result, error FROM {runs} WHERE id = :id"
_OF_RUN = """
SELECT id::text AS id, workflow, version, state, parent_step, parent_attempt, created_at
FROM {runs} WHERE parent_run_id = :run_id ORDER BY created_at, id
"""


@dataclass(frozen=True)
class Begun:
    """What beginning a child step (or undoing one) did: ``result`` (stored JSON) when it can
    complete at once, ``child`` the child run it waits for, or ``stale`` when the attempt was
    no longer this worker's (nothing was written)."""

    result: str | None = None
    child: str | None = None
    stale: bool = False


class _StaleError(Exception):
    """The attempt is no longer the claimed one: the transaction is rolled back."""


class Children:
    """The statements of child runs, for one engine."""

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        t = saga.tables
        self._starter = Starter(t, saga.settings)
        self._set_parent = t.sql(_SET_PARENT)
        self._suspend = t.sql(_SUSPEND)
        self._child_of = t.sql(_CHILD_OF)
        self._finished = t.sql(_FINISHED)
        self._wake = t.sql(_WAKE)
        self._child = t.sql(_CHILD)
        self._of_run = t.sql(_OF_RUN)

    # -- a worker begins a child step ----------------------------------------------------------

    def begin(
        self, ref: AttemptRef, token: str, runner: ChildStep, ctx: StepContext,
        trace_context: Any = None,
    ) -> Begun:
        """Start the child run of the claimed attempt ``ref`` and suspend the attempt, in one
        transaction. Raises the step's own errors: an unknown child workflow, an input that
        ``input(ctx)`` cannot make or that cannot be stored."""
        try:
            child_wf = self.saga.registry.get(runner.workflow, runner.version)
        except UnknownWorkflowError as exc:
            raise UnknownWorkflowError(f"child step {ref.step!r}: {exc}") from None
        child_input = runner.input_of(ctx)
        lifecycle = self.saga.lifecycle

        def start(conn: Connection) -> Begun:
            parent = lifecycle.runs.lock(conn, ref.run_id)
            if parent is None or parent["state"] != "running":
                # The run stops: failing the attempt moves it on (its advance waited for it).
                state = "gone" if parent is None else parent["state"]
                raise SagaError(f"run is {state}: child step {ref.step!r} starts no child")
            started = self._starter.start(
                conn, child_wf, child_input, key=f"child:{ref.run_id}:{ref.step}:{ref.attempt}",
                key_policy=KeyPolicy.RETURN_EXISTING,
                trace_context=trace_context if isinstance(trace_context, dict) else None,
            )
            conn.execute(self._set_parent, {"parent": ref.run_id, "step": ref.step,
                                            "attempt": ref.attempt, "child": started.run_id})
            if not self._suspend_row(conn, ref, token):
                raise _StaleError  # rolls the child back with it
            detail = {"child": started.run_id, "workflow": child_wf.name}
            lifecycle.history.append(conn, ref.run_id, "step_suspended", kind="step",
                                     step=ref.step, attempt=ref.attempt, detail=detail)
            return Begun(child=started.run_id)

        try:
            begun = self.saga.in_transaction(start)
        except _StaleError:
            return Begun(stale=True)
        logs.event(log, logging.INFO, "child run started", run_id=ref.run_id, step=ref.step,
                   attempt=ref.attempt, child=begun.child, child_workflow=child_wf.name)
        return begun

    def undo(self, ref: AttemptRef, token: str) -> Begun:
        """Begin the claimed compensation ``ref`` of a child step: compensate its completed
        child or cancel its live one, and suspend until the child ends; or say it completes
        at once (no child, or one that ended with nothing left to undo)."""
        lifecycle = self.saga.lifecycle

        def undo(conn: Connection) -> Begun:
            child = conn.execute(
                self._child_of, {"run_id": ref.run_id, "step": ref.step}
            ).mappings().first()
            if child is None:
                return Begun(result="null")
            child_id, state = str(child["id"]), str(child["state"])
            if state == "completed":
                state = lifecycle.undo_child_in_tx(conn, child_id, ref.run_id, ref.step)
            elif state == "running":
                reason = f"its parent {ref.run_id} undoes step {ref.step!r}"
                state = lifecycle.cancel_in_tx(conn, child_id, reason)
            if state in UNDO_ENDS or state == "completed":  # completed: nothing to undo
                return Begun(result=dumps({"child": child_id, "state": state}))
            if not self._suspend_row(conn, ref, token):
                raise _StaleError
            lifecycle.history.append(
                conn, ref.run_id, "step_suspended", kind="compensation", step=ref.step,
                attempt=ref.attempt, detail={"child": child_id, "child_state": state},
            )
            return Begun(child=child_id)

        try:
            return self.saga.in_transaction(undo)
        except _StaleError:
            return Begun(stale=True)

    def _suspend_row(self, conn: Connection, ref: AttemptRef, token: str) -> bool:
        params = {"run_id": ref.run_id, "kind": ref.kind, "step": ref.step,
                  "attempt": ref.attempt, "token": token}
        return conn.execute(self._suspend, params).first() is not None

    # -- waking parents ------------------------------------------------------------------------

    def wake_finished(self, limit: int = 100) -> int:
        """Wake the suspended rows whose child has ended: a child step completes with its
        child's result or fails; a child step's compensation completes. How many woke."""
        params = {"step_ends": list(STEP_ENDS), "undo_ends": list(UNDO_ENDS), "limit": limit}
        with self.saga.engine.connect() as conn:
            rows = conn.execute(self._finished, params).mappings().all()
        woke = 0
        for row in rows:
            try:
                wf = self.saga.registry.get(row["workflow"], row["version"])
            except UnknownWorkflowError:
                continue  # a relay of another deploy wakes it

            def wake(c: Connection, w: Workflow = wf, r: Any = row) -> int:
                return self._wake_one(c, w, r)

            try:
                woke += self.saga.in_transaction(wake)
            except Exception as exc:  # one bad row must not keep the others waiting
                logs.event(log, logging.ERROR,
                           f"could not wake a child's parent: {logs.describe(exc)}",
                           run_id=row["run_id"], step=row["step"], child=row["child_id"])
        return woke

    def _wake_one(self, conn: Connection, wf: Workflow, row: Any) -> int:
        run_id, kind, step = str(row["run_id"]), str(row["kind"]), str(row["step"])
        self.saga.lifecycle.runs.lock(conn, run_id)
        token = f"child:{uuid.uuid4().hex[:12]}"
        live = ["running"] if kind == "step" else list(STOPPING)
        params = {"run_id": run_id, "kind": kind, "step": step, "token": token, "live": live}
        taken = conn.execute(self._wake, params).mappings().first()
        if taken is None:
            return 0  # woken meanwhile, or the run stopped (its advance handles the row)
        ref = AttemptRef(run_id, kind, step, int(taken["attempt"]))
        child = conn.execute(self._child, {"id": row["child_id"]}).mappings().one()
        detail = {"child": row["child_id"], "child_state": child["state"]}
        waits = self.saga.waits
        if kind == "compensation":
            waits.complete_woken(conn, wf, ref, dumps(detail), token, "child", **detail)
        elif child["state"] == "completed":
            waits.complete_woken(conn, wf, ref, dumps(child["result"]), token, "child", **detail)
        else:
            self._fail(conn, wf, ref, int(taken["first_attempt"]), row["child_id"], child)
        logs.event(log, logging.INFO, "woken by its child", run_id=run_id, workflow=wf.name,
                   step=step, kind=kind, attempt=ref.attempt, **detail)
        return 1

    def _fail(
        self, conn: Connection, wf: Workflow, ref: AttemptRef, first_attempt: int,
        child_id: str, child: Any,
    ) -> None:
        self.saga.lifecycle.history.append(
            conn, ref.run_id, "step_woken", kind="step", step=ref.step, attempt=ref.attempt,
            detail={"by": "child", "child": child_id, "child_state": child["state"]},
        )
        error: dict[str, Any] = {
            "type": "saga.ChildFailed",
            "message": f"child run {child_id} ended {child['state']}",
            "attempt": ref.attempt,
            "child": child_id,
        }
        if child["error"] is not None:
            error["child_error"] = child["error"]
        delay = wf.retry_for(ref.step, "step").delay_after(ref.attempt - first_attempt + 1)
        self.saga.lifecycle.fail_attempt_in_tx(conn, ref, error, delay)

    # -- reading -------------------------------------------------------------------------------

    def of_run(self, conn: Connection, run_id: str) -> list[dict[str, Any]]:
        """The child runs a run started, oldest first (id, workflow, version, state, and the
        step and attempt that started each)."""
        return [dict(r) for r in conn.execute(self._of_run, {"run_id": run_id}).mappings()]


class ParentWaker:
    """Calls :meth:`Children.wake_finished` at most every :data:`WAKE_EVERY` seconds (a
    relay's loop turns faster when busy), and never when no registered workflow has a child
    step (a deployment without children pays nothing)."""

    def __init__(self, children: Children) -> None:
        self.children = children
        self._next = 0.0

    def tick(self) -> int:
        """Wake what is due if it is time to look; how many woke."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + WAKE_EVERY
        if not any(wf.child_steps for wf in self.children.saga.registry):
            return 0
        return self.children.wake_finished()
