"""Running one step attempt on a worker, whatever delivered the message: parse, claim, run the
step's code under its time limit and a heartbeat-kept lease, record the outcome.

It never raises. A bad or stale message is logged and dropped; a message for a run whose
workflow definition this worker lacks goes back to the outbox for another worker; an outcome
that cannot be recorded (the database is away) is logged, and the attempt's lease, no longer
renewed, brings the step back through the sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError

from saga import logs, telemetry
from saga.app import Saga
from saga.codec import encode
from saga.context import StepContext
from saga.core import graph
from saga.core.states import STOPPING
from saga.definition import Workflow
from saga.errors import SagaError, UnknownWorkflowError
from saga.heartbeat import Heartbeat, Lease
from saga.messages import Envelope, MalformedMessageError, Publisher, StepMessage
from saga.steps import TaskCaller
from saga.timeouts import StepTimeoutError, Watchdog, time_limit
from saga.transitions import Claim, Completion

log = logging.getLogger("saga.worker")


def error_doc(exc: BaseException, attempt: int) -> dict[str, Any]:
    """A failed attempt's error as stored: type, message and attempt; ``outcome: unknown``
    when the step's code may have had its effect without the engine knowing (it ran past its
    time limit)."""
    doc: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:2000],
        "attempt": attempt,
    }
    if isinstance(exc, StepTimeoutError):
        doc["outcome"] = "unknown"
    return doc


class Executor:
    """Executes step messages against one engine."""

    def __init__(
        self,
        saga: Saga,
        worker_id: str | None = None,
        publisher: Callable[[], Publisher] | None = None,
    ) -> None:
        """``publisher`` makes (once, lazily: after a fork) the publisher for eager dispatch;
        without one, every message goes through the relay."""
        self.saga = saga
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = Heartbeat(saga)
        self._watchdog = Watchdog()
        self._make_publisher = publisher if saga.settings.eager_dispatch else None
        self._publisher: Publisher | None = None

    def execute(
        self,
        body: Any,
        tasks: TaskCaller | None = None,
        carrier: Mapping[str, str] | None = None,
    ) -> str:
        """Run the attempt a message names; returns the outcome (``completed``,
        ``retry_scheduled``, ``failed``, ``duplicate``, ``deferred``, ``malformed``,
        ``unknown``, or ``error`` when the outcome could not be recorded). ``carrier`` holds
        the message's trace headers, when the transport kept them."""
        try:
            return self._execute(body, tasks, carrier)
        except Exception as exc:
            logs.event(
                log, logging.ERROR,
                f"attempt not recorded, its lease will bring it back: {logs.describe(exc)}",
            )
            return "error"

    def _execute(
        self, body: Any, tasks: TaskCaller | None, carrier: Mapping[str, str] | None
    ) -> str:
        try:
            msg = StepMessage.parse(body)
        except MalformedMessageError as exc:
            logs.event(log, logging.WARNING, f"dropped a malformed step message: {exc}")
            return "malformed"
        fields: dict[str, Any] = {"run_id": msg.run_id, "workflow": msg.workflow}
        fields |= {"step": msg.step, "kind": msg.kind, "attempt": msg.attempt}
        wf = self._definition(msg)
        if wf is None:
            return self._defer(msg, fields)
        if msg.step not in wf or (msg.kind == "compensation" and not wf[msg.step].compensation):
            logs.event(log, logging.WARNING, "dropped a message for an unknown step", **fields)
            return "unknown"
        token = f"{self.worker_id}:{uuid.uuid4().hex[:12]}"
        deps = wf[msg.step].after if msg.kind == "step" else ()
        claim = self.saga.on_hot_path(
            "claim",
            lambda conn: self.saga.transitions.claim(
                conn, msg.ref, workflow=wf.name, version=wf.version,
                definition_hash=wf.definition_hash, deps=deps,
                lease_seconds=self.heartbeat.timeout, token=token,
            ),
        )
        if claim is not None and not claim.claimed and claim.definition_hash != wf.definition_hash:
            return self._defer(msg, fields)
        if claim is None or not claim.claimed:
            logs.event(log, logging.INFO, "dropped a stale or duplicate message", **fields)
            return "duplicate"
        renew_for = wf.time_limit_for(msg.step) + self.saga.settings.lease_grace
        with (
            self.heartbeat.keep(claim.ref, token, renew_for) as lease,
            telemetry.attempt(
                wf.name, msg.run_id, msg.kind, msg.step, msg.attempt, claim.trace_context, carrier
            ) as attempt,
        ):
            attempt.outcome = self._run(wf, claim, token, lease, tasks, fields)
        return attempt.outcome

    def _definition(self, msg: StepMessage) -> Workflow | None:
        """This worker's definition of the message's workflow and version, if it is the run's
        (as far as the message says: the claim checks it against the run)."""
        try:
            wf = self.saga.registry.get(msg.workflow, msg.version)
        except UnknownWorkflowError:
            return None
        if msg.definition is not None and msg.definition != wf.definition_hash:
            return None
        return wf

    def _defer(self, msg: StepMessage, fields: dict[str, Any]) -> str:
        """Send the message back through the outbox, for a worker that has the run's
        definition (an older or newer deploy); it backs off with each deferral."""
        with self.saga.engine.begin() as conn:
            deferrals = self.saga.lifecycle.outbox.defer(conn, msg.ref)
        if deferrals is None:
            logs.event(log, logging.INFO, "dropped a stale or duplicate message", **fields)
            return "duplicate"
        if deferrals == 1:
            logs.event(
                log, logging.WARNING,
                "no worker here has its definition: sent back for another worker",
                version=msg.version, definition=msg.definition, **fields,
            )
        return "deferred"

    def _run(
        self,
        wf: Workflow,
        claim: Claim,
        token: str,
        lease: Lease,
        tasks: TaskCaller | None,
        fields: dict[str, Any],
    ) -> str:
        ref = claim.ref
        step = wf[ref.step]
        runner = step.runner if ref.kind == "step" else step.compensation
        assert runner is not None
        ctx = StepContext(
            run_id=ref.run_id,
            workflow=wf.name,
            step=ref.step,
            kind=ref.kind,
            attempt=ref.attempt,
            input=claim.input,
            results=claim.results or {},
            idempotency_key=ref.idempotency_key,
            business_key=claim.business_key,
            step_result=claim.step_result,
            outcome=claim.outcome,
            step_idempotency_key=ref.step_idempotency_key,
        )
        try:
            limit = wf.time_limit_for(ref.step)
            with time_limit(limit, f"{ref.kind} {ref.step!r}", self._watchdog):
                result = runner.run(ctx, tasks)
            result_json = encode(
                result,
                workflow=wf.name,
                field=f"result of step {ref.step!r}",
                limit=self.saga.settings.max_result_bytes,
            )
        except Exception as exc:
            policy = wf.retry_for(ref.step, ref.kind)
            retryable = not isinstance(exc, SagaError) and policy.is_retryable(exc)
            return self._fail(wf, claim, exc, retryable)
        if lease.lost:
            logs.event(log, logging.WARNING, "completion refused: the lease was lost", **fields)
            return "duplicate"
        return self._complete(wf, claim, token, result_json, fields)

    def _complete(
        self, wf: Workflow, claim: Claim, token: str, result_json: str, fields: dict[str, Any]
    ) -> str:
        ref = claim.ref
        after = wf.after_map
        if ref.kind == "step":
            release: tuple[str, ...] = graph.dependents(after)[ref.step]
        else:
            release = tuple(sorted(graph.ancestors(after, ref.step)))
        routes = [wf.route(s) for s in release]
        eager = self._make_publisher is not None
        done = self.saga.on_hot_path(
            "complete",
            lambda conn: self.saga.transitions.complete(
                conn,
                ref,
                result_json,
                token=token,
                release=release,
                routes=routes,
                sink=ref.kind == "step" and not release,
                eager=eager,
                republish_after=self.saga.settings.republish_after,
            ),
        )
        if done is None:
            logs.event(log, logging.INFO, "completion of a stale attempt ignored", **fields)
            return "duplicate"
        if done.replayed:
            logs.event(log, logging.INFO, "completion replayed after a lost reply", **fields)
        if eager and done.queued:
            self._dispatch(wf, claim, done)
        if ref.kind == "step" and done.run_state in STOPPING:
            with self.saga.engine.begin() as conn:
                self.saga.lifecycle.advance(conn, ref.run_id)
        return "completed"

    def _dispatch(self, wf: Workflow, claim: Claim, done: Completion) -> None:
        """Publish the messages a completion wrote as published. On a broker error they go back
        to the relay; if this process dies first, the sweeper republishes them."""
        assert self._make_publisher is not None
        if self._publisher is None:
            self._publisher = self._make_publisher()
        ref = claim.ref
        sent: list[str] = []
        try:
            for queued in done.queued:
                row = {
                    **queued,
                    "run_id": ref.run_id,
                    "workflow": wf.name,
                    "version": wf.version,
                    "definition_hash": wf.definition_hash,
                    "kind": ref.kind,
                    "countdown": None,
                    "trace_context": done.trace_context,
                }
                with telemetry.publishing(row) as headers:
                    self._publisher.publish(Envelope.from_outbox(row, headers))
                sent.append(queued["step"])
        except Exception as exc:
            unsent = [m["step"] for m in done.queued if m["step"] not in sent]
            logs.event(
                log, logging.WARNING,
                f"eager publish failed, leaving it to the relay: {logs.describe(exc)}",
                run_id=ref.run_id, workflow=wf.name, kind=ref.kind, steps=",".join(unsent),
            )
            with contextlib.suppress(DBAPIError), self.saga.engine.begin() as conn:
                self.saga.lifecycle.outbox.unpublish(conn, ref.run_id, ref.kind, unsent)

    def _fail(self, wf: Workflow, claim: Claim, exc: BaseException, retryable: bool) -> str:
        telemetry.record_exception(exc)
        ref = claim.ref
        policy = wf.retry_for(ref.step, ref.kind)
        delay = policy.delay_after(ref.attempt - claim.first_attempt + 1) if retryable else None
        with self.saga.engine.begin() as conn:
            outcome = self.saga.lifecycle.fail_attempt_in_tx(
                conn, ref, error_doc(exc, ref.attempt), delay
            )
        logs.event(
            log,
            logging.WARNING,
            f"attempt failed: {logs.describe(exc)}",
            run_id=ref.run_id,
            workflow=wf.name,
            step=ref.step,
            kind=ref.kind,
            attempt=ref.attempt,
            outcome=outcome,
        )
        return outcome
