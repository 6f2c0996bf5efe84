"""Running one step attempt on a worker, whatever delivered the message: parse, claim, run the
step's code, record the outcome. It never raises: a bad or stale message is logged and dropped."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError

from saga import logs, telemetry
from saga.app import Saga
from saga.codec import encode_result
from saga.context import StepContext
from saga.core import graph
from saga.core.decide import STOPPING
from saga.definition import Workflow
from saga.errors import (
    DefinitionMismatchError,
    SagaError,
    UnknownWorkflowError,
    describe,
    error_document,
)
from saga.messages import Envelope, MalformedMessageError, Publisher, StepMessage
from saga.starting import route
from saga.steps import TaskCaller
from saga.timeouts import time_limit
from saga.transitions import AttemptRef, Claim, Completion

log = logging.getLogger("saga.worker")


def error_doc(exc: BaseException, attempt: int) -> dict[str, Any]:
    """A failed attempt's error as stored (see :func:`saga.errors.error_document`)."""
    return error_document(exc, attempt)


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
        self._make_publisher = publisher if saga.settings.eager_dispatch else None
        self._publisher: Publisher | None = None

    def execute(
        self,
        body: Any,
        tasks: TaskCaller | None = None,
        carrier: Mapping[str, str] | None = None,
    ) -> str:
        """Run the attempt a message names; returns the outcome (``completed``,
        ``retry_scheduled``, ``failed``, ``duplicate``, ``malformed``, ``unknown``).
        ``carrier`` holds the message's trace headers, when the transport kept them."""
        try:
            msg = StepMessage.parse(body)
        except MalformedMessageError as exc:
            logs.event(log, logging.WARNING, f"dropped a malformed step message: {exc}")
            return "malformed"
        fields: dict[str, Any] = {"run_id": msg.run_id, "workflow": msg.workflow}
        fields |= {"step": msg.step, "kind": msg.kind, "attempt": msg.attempt}
        try:
            wf = self.saga.registry.get(msg.workflow, msg.version)
        except UnknownWorkflowError:
            logs.event(log, logging.WARNING, "dropped a message for an unknown workflow", **fields)
            return "unknown"
        if msg.step not in wf or (msg.kind == "compensation" and not wf[msg.step].compensation):
            logs.event(log, logging.WARNING, "dropped a message for an unknown step", **fields)
            return "unknown"
        deps = wf[msg.step].after if msg.kind == "step" else ()
        lease = wf.time_limit_for(msg.step) + self.saga.settings.lease_grace
        claim = self.saga.on_hot_path(
            lambda conn: self.saga.transitions.claim(
                conn, msg.ref, deps=deps, lease_seconds=lease, worker=self.worker_id
            )
        )
        if claim is None:
            logs.event(log, logging.INFO, "dropped a stale or duplicate message", **fields)
            return "duplicate"
        with telemetry.attempt(
            wf.name, msg.run_id, msg.kind, msg.step, msg.attempt, claim.trace_context, carrier
        ) as attempt:
            attempt.outcome = self._claimed(wf, msg, claim, tasks, fields)
        return attempt.outcome

    def _claimed(
        self,
        wf: Workflow,
        msg: StepMessage,
        claim: Claim,
        tasks: TaskCaller | None,
        fields: dict[str, Any],
    ) -> str:
        if claim.workflow != msg.workflow or claim.version != msg.version:
            return self._fail(wf, claim, SagaError("message names another workflow"), False)
        if claim.definition_hash != wf.definition_hash:
            changed = DefinitionMismatchError(
                f"workflow {wf.name!r} v{wf.version} changed under this run: it started with "
                f"definition {claim.definition_hash}, this worker has {wf.definition_hash}"
            )
            return self._fail(wf, claim, changed, False)
        return self._run(wf, claim, tasks, fields)

    def _run(
        self, wf: Workflow, claim: Claim, tasks: TaskCaller | None, fields: dict[str, Any]
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
            results=claim.results,
            idempotency_key=ref.idempotency_key,
            business_key=claim.business_key,
            step_result=claim.step_result,
        )
        try:
            limit = wf.time_limit_for(ref.step)
            with time_limit(limit, f"{ref.kind} {ref.step!r}"):
                result = runner.run(ctx, tasks)
            result_json = encode_result(result, limit=self.saga.settings.max_result_bytes)
        except Exception as exc:
            policy = wf.retry_for(ref.step, ref.kind)
            retryable = not isinstance(exc, SagaError) and policy.is_retryable(exc)
            return self._fail(wf, claim, exc, retryable)
        return self._complete(wf, claim, result_json, fields)

    def _complete(
        self, wf: Workflow, claim: Claim, result_json: str, fields: dict[str, Any]
    ) -> str:
        ref = claim.ref
        after = wf.after_map
        if ref.kind == "step":
            release: tuple[str, ...] = graph.dependents(after)[ref.step]
        else:
            release = tuple(sorted(graph.ancestors(after, ref.step)))
        routes = [route(wf, s) for s in release]
        eager = self._make_publisher is not None
        done = self.saga.on_hot_path(
            lambda conn: self.saga.transitions.complete(
                conn,
                ref,
                result_json,
                release=release,
                routes=routes,
                sinks=graph.sinks(after),
                eager=eager,
            )
        )
        if done is None:
            logs.event(log, logging.INFO, "completion of a stale attempt ignored", **fields)
            return "duplicate"
        if eager and done.queued:
            self._dispatch(wf, ref, done)
        if ref.kind == "step" and done.run_state in STOPPING:
            with self.saga.engine.begin() as conn:
                self.saga.lifecycle.advance(conn, ref.run_id)
        return "completed"

    def _dispatch(self, wf: Workflow, ref: AttemptRef, done: Completion) -> None:
        """Publish the messages a completion wrote as published. On a broker error they go back
        to the relay; if this process dies first, the sweeper republishes them."""
        assert self._make_publisher is not None
        if self._publisher is None:
            self._publisher = self._make_publisher()
        sent: list[str] = []
        try:
            for queued in done.queued:
                row = {
                    **queued,
                    "run_id": ref.run_id,
                    "workflow": wf.name,
                    "version": wf.version,
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
                log, logging.WARNING, f"eager publish failed, leaving it to the relay: {exc}",
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
            f"attempt failed: {describe(exc)}",
            run_id=ref.run_id,
            workflow=wf.name,
            step=ref.step,
            kind=ref.kind,
            attempt=ref.attempt,
            outcome=outcome,
        )
        return outcome
