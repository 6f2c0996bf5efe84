"""The slow path: failures, stopping and compensating, cancelling and operator actions.

Each function runs in the caller's transaction and first locks the run's row, so it sees a
consistent run: claims (``FOR KEY SHARE``) and completions (``UPDATE``) of that run wait for it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.core import graph
from saga.core.attempts import AttemptRef
from saga.core.decide import decide_stop, retry_plan
from saga.core.states import LIVE_RUN_STATES, STOPPING
from saga.definition import Workflow
from saga.errors import InvalidTransitionError, UnknownRunError, storable_text
from saga.maps import undo_plan
from saga.registry import Registry
from saga.store.base import Row, Tables
from saga.store.history import HistoryStore
from saga.store.outbox import OutboxStore
from saga.store.runs import RunStore
from saga.store.steps import StepStore


class Lifecycle:
    """Guarded transitions off the hot path, for one schema and registry."""

    def __init__(self, tables: Tables, registry: Registry) -> None:
        self.registry = registry
        self.runs = RunStore(tables)
        self.steps = StepStore(tables)
        self.outbox = OutboxStore(tables)
        self.history = HistoryStore(tables)

    # -- attempts ----------------------------------------------------------------------------

    def fail_attempt_in_tx(
        self, conn: Connection, ref: AttemptRef, error: Any, retry_delay: float | None
    ) -> str:
        """Record a failed attempt: ``'retry_scheduled'`` (a retry after ``retry_delay`` s, only
        while the run is live), ``'failed'`` (for good; the run starts stopping) or
        ``'duplicate'`` (stale attempt: nothing changed)."""
        run = self.runs.lock(conn, ref.run_id)
        if run is None:
            return "duplicate"
        live = run["state"] in LIVE_RUN_STATES[ref.kind]
        if retry_delay is not None and live:
            attempt = self.steps.retry_attempt(
                conn, ref.run_id, ref.kind, ref.step, ref.attempt, error, retry_delay
            )
            if attempt is None:
                return "duplicate"
            wf = self.registry.get(run["workflow"], run["version"])
            message = {**wf.route(ref.step), "attempt": attempt, "delay": retry_delay}
            self.outbox.enqueue(conn, ref.run_id, ref.kind, [message], run["trace_context"])
            detail = {"error": error, "retry_in": round(retry_delay, 3), "next_attempt": attempt}
            self.history.append(
                conn, ref.run_id, "step_retry_scheduled", kind=ref.kind, step=ref.step,
                attempt=ref.attempt, detail=detail,
            )
            return "retry_scheduled"
        if not self.steps.fail_attempt(conn, ref.run_id, ref.kind, ref.step, ref.attempt, error):
            return "duplicate"
        self.history.append(
            conn, ref.run_id, "step_failed", kind=ref.kind, step=ref.step, attempt=ref.attempt,
            detail={"error": error},
        )
        if ref.kind == "compensation":
            if self.runs.set_state(
                conn, ref.run_id, list(STOPPING), "compensation_failed",
                error=dumps({"step": ref.step, "kind": ref.kind, **_as_dict(error)}),
            ):
                self.history.append(conn, ref.run_id, "run_compensation_failed", step=ref.step)
            return "failed"
        if run["state"] == "running":
            reason = {"step": ref.step, "kind": ref.kind, **_as_dict(error)}
            self.stop_in_tx(conn, run, "compensating", "run_compensating", reason, step=ref.step)
        else:
            self.advance_in_tx(conn, run)
        return "failed"

    # -- stopping ----------------------------------------------------------------------------

    def stop_in_tx(
        self,
        conn: Connection,
        run: Row,
        to: str,
        event: str,
        reason: dict[str, Any],
        step: str | None = None,
    ) -> str:
        """Stop a running run (``run`` is its row, locked by the caller): it dispatches
        nothing new, drops the result gathered so far, keeps ``reason`` as its error (and in
        the history, from where a retried compensation restores it), and moves on."""
        run_id = str(run["id"])
        self.runs.set_state(
            conn, run_id, ["running"], to, error=dumps(reason), clear_result=True
        )
        self.history.append(conn, run_id, event, step=step, detail={"error": reason})
        run["state"] = to
        # A stopping run's live children are cancelled with it (locks go parent first, then
        # child, everywhere); its child steps' compensations then wait for them to end.
        for child in self.runs.live_children(conn, run_id):
            self.cancel_in_tx(conn, child, f"its parent {run_id} is {to}")
        return self.advance_in_tx(conn, run)

    def advance_in_tx(self, conn: Connection, run: Row) -> str:
        """Move a stopping run on (``run`` is its row, locked by the caller): skip what waits,
        and once nothing runs, start the compensations of every step that started, or end
        the run. Idempotent."""
        if run["state"] not in STOPPING:
            return run["state"]  # type: ignore[no-any-return]
        run_id = str(run["id"])
        rows = self.steps.of_run(conn, run_id)
        if any(r["kind"] == "compensation" for r in rows):
            return run["state"]  # type: ignore[no-any-return]
        skipped = self.steps.skip_unstarted(conn, run_id)
        self.history.append_steps(conn, run_id, "step_skipped", "step", skipped)
        self.outbox.drop_unstarted(conn, run_id)
        wf = self.registry.get(run["workflow"], run["version"])
        with_comp = {s for s in wf.step_names if wf[s].compensation is not None}
        # A map that undoes its instances is undone as one step, its barrier (saga.maps).
        with_comp |= {m for m, r in wf.maps.items() if r.compensation is not None}
        decision = decide_stop(
            run["state"],
            wf.after_map,
            with_comp,
            running=StepStore.names(rows, "step", "running"),
            started={r["step"] for r in rows if r["kind"] == "step" and r["started_at"]},
        )
        if decision.wait:
            return run["state"]  # type: ignore[no-any-return]
        if decision.end_state is not None:
            self.runs.set_state(conn, run_id, list(STOPPING), decision.end_state, finished=True)
            self.history.append(conn, run_id, f"run_{decision.end_state}")
            return decision.end_state
        pending = undo_plan(wf, decision.compensations, rows)
        self.steps.insert(conn, run_id, "compensation", pending)
        self.runs.set_state(
            conn, run_id, list(STOPPING), run["state"], compensations_remaining=len(pending)
        )
        ready = [{**wf.route(s), "attempt": 1} for s, n in pending.items() if n == 0]
        self.outbox.enqueue(conn, run_id, "compensation", ready, run["trace_context"])
        # A map's instances are counted, not listed (there may be 100,000 of them).
        declared = sorted(s for s in pending if wf.map_of(s) is None)
        detail: dict[str, Any] = {"compensations": declared}
        if len(declared) < len(pending):
            detail["map_instances"] = len(pending) - len(declared)
        self.history.append(conn, run_id, "compensation_started", detail=detail)
        return run["state"]  # type: ignore[no-any-return]

    def advance(self, conn: Connection, run_id: str) -> str:
        """Lock the run and :meth:`advance_in_tx` it."""
        run = self.runs.lock(conn, run_id)
        if run is None:
            raise UnknownRunError(f"no run {run_id}")
        return self.advance_in_tx(conn, run)

    # -- operator actions ----------------------------------------------------------------------

    def cancel_in_tx(self, conn: Connection, run_id: str, reason: str | None = None) -> str:
        """Stop a running run and compensate it; it ends ``cancelled``."""
        run = self._locked(conn, run_id)
        if run["state"] != "running":
            raise InvalidTransitionError(
                f"run {run_id} is {run['state']}: only a running run can be cancelled"
            )
        message = storable_text(reason) if reason else "cancelled by an operator"
        error = {"type": "cancelled", "message": message}
        return self.stop_in_tx(conn, run, "cancelling", "run_cancelling", error)

    def undo_child_in_tx(self, conn: Connection, run_id: str, parent: str, step: str) -> str:
        """Compensate the ``completed`` child run ``run_id`` whose parent ``parent`` undoes its
        step ``step`` (``completed --undo_child--> compensating``); it ends ``compensated``.
        A child none of whose steps has a compensation is left ``completed``: nothing to do."""
        run = self._locked(conn, run_id)
        if run["state"] != "completed":
            return run["state"]  # type: ignore[no-any-return]
        wf = self.registry.get(run["workflow"], run["version"])
        if not any(wf[s].compensation is not None for s in wf.step_names):
            return "completed"
        reason = {"type": "parent_undone", "message": f"its parent {parent} undoes {step!r}"}
        self.runs.set_state(conn, run_id, ["completed"], "compensating", error=dumps(reason),
                            clear_result=True)
        self.history.append(conn, run_id, "run_compensating", detail={"error": reason})
        run["state"] = "compensating"
        return self.advance_in_tx(conn, run)

    def retry_in_tx(self, conn: Connection, run_id: str, from_step: str | None = None) -> str:
        """Retry a ``failed`` run from its failed step (or ``from_step``), or a
        ``compensation_failed`` run's failed compensations, each with a fresh retry budget."""
        run = self._locked(conn, run_id)
        wf = self.registry.get(run["workflow"], run["version"])
        rows = self.steps.of_run(conn, run_id)
        if run["state"] == "compensation_failed":
            if from_step is not None:
                raise InvalidTransitionError("--from applies to failed runs, not compensations")
            failed = StepStore.names(rows, "compensation", "failed")
            # Ready compensations whose messages workers dropped while the run waited for an
            # operator are sent again, under a new attempt number.
            stranded = StepStore.names(rows, "compensation", "ready")
            self.outbox.drop_unstarted(conn, run_id, "compensation")
            reset = self.steps.reset(
                conn, run_id, "compensation", dict.fromkeys(failed | stranded, 0)
            )
            # The compensation's failure replaced the run's error: the history still knows why
            # the run stopped, and that reason is its error again.
            history = self.history.of_run(conn, run_id)
            stops = [h for h in history if h["event"] in ("run_compensating", "run_cancelling")]
            back = "cancelling" if stops and stops[-1]["event"] == "run_cancelling" else (
                "compensating"
            )
            reason = (stops[-1]["detail"] or {}).get("error") if stops else None
            self.runs.set_state(
                conn, run_id, ["compensation_failed"], back,
                error=None if reason is None else dumps(reason),
            )
            self._enqueue_ready(conn, run, wf, "compensation", reset)
            detail = {"compensations": sorted(failed)}
            self.history.append(conn, run_id, "operator_retry", detail=detail)
            return back
        if run["state"] != "failed":
            raise InvalidTransitionError(
                f"run {run_id} is {run['state']}: "
                "only failed or compensation_failed runs can be retried"
            )
        if any(wf.map_of(r["step"]) is not None for r in rows):
            raise InvalidTransitionError(
                f"run {run_id} has expanded a map: a failed run with map instances cannot be "
                "retried (yet)"
            )
        completed = StepStore.names(rows, "step", "completed")
        restart: set[str] = set()
        if from_step is not None:
            if from_step not in wf:
                raise InvalidTransitionError(f"workflow {wf.name!r} has no step {from_step!r}")
            restart = ({from_step} | graph.descendants(wf.after_map, from_step)) & completed
        pending = retry_plan(wf.after_map, completed - restart, restart)
        reset = self.steps.reset(conn, run_id, "step", pending)
        # The run's error was its failure's, which the history keeps; it runs again.
        self.runs.set_state(
            conn, run_id, ["failed"], "running", finished=False, clear_error=True,
            steps_remaining=len(pending),
        )
        self.runs.gather_result(conn, run_id, graph.sinks(wf.after_map))
        # A deadline that has passed would stop the retried run at once: it starts again.
        self.runs.restart_deadline(conn, run_id, wf.deadline)
        self._enqueue_ready(conn, run, wf, "step", reset)
        ready = sorted(s for s, n in pending.items() if n == 0)
        self.history.append(conn, run_id, "operator_retry", detail={"from": ready})
        return "running"

    def resolve_in_tx(self, conn: Connection, run_id: str, reason: str) -> str:
        """Mark a ``compensation_failed`` run ``resolved`` by hand, keeping ``reason``."""
        if not reason or not reason.strip():
            raise InvalidTransitionError("a reason is required to resolve a run")
        run = self._locked(conn, run_id)
        moved = self.runs.set_state(
            conn, run_id, ["compensation_failed"], "resolved", finished=True
        )
        if not moved:
            raise InvalidTransitionError(
                f"run {run_id} is {run['state']}: only compensation_failed runs can be resolved"
            )
        detail = {"reason": storable_text(reason)}
        self.history.append(conn, run_id, "operator_resolved", detail=detail)
        return "resolved"

    # -- helpers -------------------------------------------------------------------------------

    def _locked(self, conn: Connection, run_id: str) -> Row:
        run = self.runs.lock(conn, run_id)
        if run is None:
            raise UnknownRunError(f"no run {run_id}")
        return run

    def _enqueue_ready(
        self, conn: Connection, run: Row, wf: Workflow, kind: str,
        reset: list[tuple[str, str, int]],
    ) -> None:
        ready = [{**wf.route(s), "attempt": a} for s, state, a in reset if state == "ready"]
        self.outbox.enqueue(conn, str(run["id"]), kind, ready, run["trace_context"])


def _as_dict(error: Any) -> dict[str, Any]:
    return dict(error) if isinstance(error, dict) else {"message": str(error)}
