"""Running one step attempt on a worker, whatever delivered the message: parse, claim, run the
step's code under its time limit and a heartbeat-kept lease, record the outcome.

It never raises. A bad or stale message is logged and dropped; a message for a run whose
workflow definition this worker lacks goes back to the outbox for another worker; an outcome
that cannot be recorded (the database is away) is logged, and the attempt's lease, no longer
renewed, brings the step back through the sweeper.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from saga import faults, logs, telemetry, tracebacks
from saga.app import Saga
from saga.codec import encode_result
from saga.context import StepContext
from saga.core.attempts import AttemptRef
from saga.core.states import STOPPING
from saga.definition import Workflow
from saga.dispatch import Dispatcher
from saga.errors import SagaError, UnknownWorkflowError, error_document
from saga.heartbeat import Heartbeat, Lease
from saga.maps import MapItemsError, release_of
from saga.messages import MalformedMessageError, Publisher, StepMessage
from saga.steps import TaskCaller, TransactionalStep, WaitStep
from saga.steps.children import ChildStep, UndoChild
from saga.steps.maps import MapStep
from saga.timeouts import Watchdog, time_limit
from saga.transitions import Claim, Completion

log = logging.getLogger("saga.worker")

HARD_LIMIT_MARGIN = 1.0
"""Seconds a chained step must leave before the delivery's hard time limit."""


class _LeaseLostError(Exception):
    """The attempt's lease went to another attempt while its code ran."""


@dataclass(frozen=True)
class _Plan:
    """How to record one attempt's completion: the rows it releases (a step's dependents,
    or the compensations waiting for this one), their routes, and the steps it may chain."""

    release: tuple[str, ...]
    routes: list[dict[str, Any]]
    follow: str | None
    """The step to run next in-process if the completion makes it ready (it claims it)."""
    follow_alone: bool
    """Whether that step runs after this one alone (the completion knows all its inputs)."""
    follow_token: str


@dataclass
class Delivery:
    """One message as a worker got it, which may run a chain of steps in-process."""

    tasks: TaskCaller | None = None
    carrier: Mapping[str, str] | None = None
    deadline: float | None = None
    """Monotonic time at which the transport kills this delivery (Celery's hard time limit)."""
    begun: float = field(default_factory=time.monotonic)
    steps: int = 0


def error_doc(exc: BaseException, attempt: int) -> dict[str, Any]:
    """A failed attempt's error as stored (see :func:`saga.errors.error_document`), with a
    bounded traceback of the step's code (:func:`saga.tracebacks.capture`)."""
    return {**error_document(exc, attempt), "traceback": tracebacks.capture(exc)}


class Executor:
    """Executes step messages against one engine."""

    def __init__(
        self,
        saga: Saga,
        worker_id: str | None = None,
        publisher: Callable[[], Publisher] | None = None,
        queues: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """``publisher`` makes (once, lazily: after a fork) the publisher for eager dispatch;
        without one, the engine's (:meth:`~saga.Saga.use_publisher`), and without that every
        message goes through the relay. ``queues`` says which queues this
        worker consumes: a step a completion makes ready on one of them is run next,
        in-process (see :class:`~saga.settings.Settings`); without it, none is."""
        self.saga = saga
        self._queues = queues if saga.settings.chain_steps > 0 else None
        self._worker_id = worker_id
        self.heartbeat = Heartbeat(saga)
        self._watchdog = Watchdog()
        self._dispatcher = (
            Dispatcher(saga, publisher)
            if publisher and saga.settings.eager_dispatch
            else saga.dispatcher
        )

    def execute(
        self,
        body: Any,
        tasks: TaskCaller | None = None,
        carrier: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> str:
        """Run the attempt a message names (and the steps it chains); returns the outcome of
        that attempt (``completed``, ``suspended``, ``retry_scheduled``, ``failed``, ``duplicate``,
        ``deferred``, ``malformed``, ``unknown``, or ``error`` when the outcome could not be
        recorded). ``carrier`` holds the message's trace headers, when the transport kept
        them; ``deadline`` is when the transport kills this delivery (monotonic)."""
        try:
            return self._execute(body, Delivery(tasks, carrier, deadline))
        except Exception as exc:
            logs.event(
                log, logging.ERROR,
                f"attempt not recorded, its lease will bring it back: {logs.describe(exc)}",
            )
            return "error"

    def _execute(self, body: Any, delivery: Delivery) -> str:
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
        if msg.step not in wf or (
            msg.kind == "compensation"
            and not wf[msg.step].compensation
            and msg.step not in wf.maps  # a map's barrier (see saga.maps)
        ):
            logs.event(log, logging.WARNING, "dropped a message for an unknown step", **fields)
            return "unknown"
        token = self._token()
        deps = wf[msg.step].after if msg.kind == "step" else ()
        faults.kill_if_armed("executor.kill", f"before_claim:{msg.step}")
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
        outcome, chained = self._attempt(wf, claim, token, delivery)
        while chained is not None:  # the steps it made ready, run here and now
            _, chained = self._attempt(wf, *chained, delivery)
        return outcome

    def _attempt(
        self, wf: Workflow, claim: Claim, token: str, delivery: Delivery
    ) -> tuple[str, tuple[Claim, str] | None]:
        """Run one claimed attempt under its lease and span; its outcome, and the claim (and
        token) of the step its completion chained, if any."""
        ref = claim.ref
        delivery.steps += 1
        renew_for = wf.time_limit_for(ref.step) + self.saga.settings.lease_grace
        # Only the delivered message's attempt has the message's trace headers.
        carrier = delivery.carrier if delivery.steps == 1 else None
        with (
            self.heartbeat.keep(ref, token, renew_for) as lease,
            telemetry.attempt(
                wf.name, ref.run_id, ref.kind, ref.step, ref.attempt, claim.trace_context, carrier
            ) as attempt,
        ):
            attempt.outcome, chained = self._run(wf, claim, token, lease, delivery)
        return attempt.outcome, chained

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
        deferrals = self.saga.in_transaction(lambda c: self.saga.lifecycle.outbox.defer(c, msg.ref))
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
        self, wf: Workflow, claim: Claim, token: str, lease: Lease, delivery: Delivery
    ) -> tuple[str, tuple[Claim, str] | None]:
        ref = claim.ref
        fields: dict[str, Any] = {"run_id": ref.run_id, "workflow": wf.name, "step": ref.step}
        fields |= {"kind": ref.kind, "attempt": ref.attempt}
        step = wf[ref.step]
        if isinstance(step.runner, MapStep):
            return self._map(wf, claim, token), None
        runner = step.runner if ref.kind == "step" else step.compensation
        assert runner is not None
        results = claim.results or {}
        mapped = wf.map_of(ref.step)
        if ref.kind == "step" and any(d in wf.maps for d in step.after):
            # A map's result is its instances' results, read once, in item order.
            results = self.saga.in_transaction(
                lambda c: self.saga.maps.results(c, wf, ref.run_id, ref.step, results)
            )
        ctx = StepContext(
            run_id=ref.run_id,
            workflow=wf.name,
            step=ref.step,
            kind=ref.kind,
            attempt=ref.attempt,
            input=claim.input,
            results=results,
            idempotency_key=ref.idempotency_key,
            business_key=claim.business_key,
            step_result=claim.step_result,
            outcome=claim.outcome,
            step_idempotency_key=ref.step_idempotency_key,
            item=claim.item,
            index=None if mapped is None else mapped[1],
        )
        if isinstance(runner, TransactionalStep):
            return self._run_in_transaction(wf, claim, token, lease, delivery, runner, ctx)
        if isinstance(runner, WaitStep):
            return self._wait(wf, claim, token, delivery, runner, ctx)
        if isinstance(runner, ChildStep | UndoChild):
            return self._child(wf, claim, token, delivery, runner, ctx)
        try:
            result_json = self._call(wf, runner, ctx, delivery)
        except Exception as exc:
            return self._fail(wf, claim, exc, self._retryable(wf, ref, exc)), None
        if lease.lost:
            logs.event(log, logging.WARNING, "completion refused: the lease was lost", **fields)
            return "duplicate", None
        return self._complete(wf, claim, token, result_json, delivery)

    def _map(self, wf: Workflow, claim: Claim, token: str) -> str:
        """Expand a claimed map (or, for its compensation, undo its instances)."""
        ref = claim.ref
        maps = self.saga.maps
        if ref.kind == "step":
            try:
                maps.check_items(wf, ref.step, (claim.results or {}).get(wf.maps[ref.step].over))
            except MapItemsError as exc:
                return self._fail(wf, claim, exc, retryable=False)
            done = self.saga.in_transaction(lambda c: maps.expand(c, wf, ref, token))
        else:
            done = self.saga.in_transaction(lambda c: maps.undo_instances(c, wf, ref, token))
        plan = _Plan(done.ready if done else (), [], None, False, "")
        return self._finish(wf, claim, done, None, plan)[0]

    def _wait(
        self, wf: Workflow, claim: Claim, token: str, delivery: Delivery, runner: WaitStep,
        ctx: StepContext,
    ) -> tuple[str, tuple[Claim, str] | None]:
        """Suspend a sleep or a signal wait (no worker waits with it), or complete it now if
        its signal came or its time passed already."""
        try:
            begun = self.saga.waits.begin(claim.ref, token, runner, ctx)
        except Exception as exc:  # the sleep's until() failed: the step's own error
            return self._fail(wf, claim, exc, self._retryable(wf, claim.ref, exc)), None
        if begun.result is not None:
            return self._complete(wf, claim, token, begun.result, delivery)
        return "suspended", None

    def _child(
        self, wf: Workflow, claim: Claim, token: str, delivery: Delivery,
        runner: ChildStep | UndoChild, ctx: StepContext,
    ) -> tuple[str, tuple[Claim, str] | None]:
        """Start a child step's child run and suspend the step, or begin undoing it (see
        :mod:`saga.children`); complete it now if there is nothing to wait for."""
        children = self.saga.children
        try:
            if isinstance(runner, ChildStep):
                begun = children.begin(claim.ref, token, runner, ctx, claim.trace_context)
            else:
                begun = children.undo(claim.ref, token)
        except Exception as exc:  # the child's input or workflow: the step's own error
            return self._fail(wf, claim, exc, self._retryable(wf, claim.ref, exc)), None
        if begun.stale:
            logs.event(log, logging.WARNING, "child not started: the lease was lost",
                       run_id=claim.ref.run_id, workflow=wf.name, step=claim.ref.step)
            return "duplicate", None
        if begun.result is not None:
            return self._complete(wf, claim, token, begun.result, delivery)
        return "suspended", None

    def _call(self, wf: Workflow, runner: Any, ctx: StepContext, delivery: Delivery) -> str:
        """Run the step's code under its time limit; its result as stored JSON."""
        limit = wf.time_limit_for(ctx.step)
        with time_limit(limit, f"{ctx.kind} {ctx.step!r}", self._watchdog):
            result = runner.run(ctx, delivery.tasks)
        return encode_result(result, limit=self.saga.settings.max_result_bytes)

    @staticmethod
    def _retryable(wf: Workflow, ref: AttemptRef, exc: BaseException) -> bool:
        policy = wf.retry_for(ref.step, ref.kind)
        return not isinstance(exc, SagaError) and policy.is_retryable(exc)

    def _run_in_transaction(
        self,
        wf: Workflow,
        claim: Claim,
        token: str,
        lease: Lease,
        delivery: Delivery,
        runner: TransactionalStep,
        ctx: StepContext,
    ) -> tuple[str, tuple[Claim, str] | None]:
        """Run a transactional step: its code's writes, its completion and the claim of the
        step it chains commit in one transaction, or none of them does."""
        ref = claim.ref
        plan = self._plan(wf, ref, delivery)
        limit_ms = max(1, int(wf.time_limit_for(ref.step) * 1000))
        committing = False
        try:
            with self.saga.engine.connect() as conn, conn.begin() as transaction:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {limit_ms}")
                result_json = self._call(wf, runner, replace(ctx, connection=conn), delivery)
                if not transaction.is_active:
                    raise SagaError(
                        f"transactional step {ref.step!r} ended its transaction itself: "
                        "it must neither commit nor roll back ctx.connection"
                    )
                if lease.lost:
                    raise _LeaseLostError
                faults.kill_if_armed("transactional.kill", f"before_commit:attempt{ref.attempt}")
                done, chained = self._record(conn, wf, claim, token, plan, result_json)
                committing = True
            faults.kill_if_armed("transactional.kill", f"after_commit:attempt{ref.attempt}")
        except _LeaseLostError:
            logs.event(log, logging.WARNING, "completion refused: the lease was lost",
                       run_id=ref.run_id, workflow=wf.name, step=ref.step)
            return "duplicate", None
        except Exception as exc:
            if not committing:
                return self._fail(wf, claim, exc, self._retryable(wf, ref, exc)), None
            # The commit's outcome is unknown: whether it happened decides, never a re-run.
            done, chained = self._recorded(wf, claim, token, plan)
            if done is None:
                return self._fail(wf, claim, exc, self._retryable(wf, ref, exc)), None
        return self._finish(wf, claim, done, chained, plan)

    def _chainable(
        self, wf: Workflow, ref: AttemptRef, release: tuple[str, ...], delivery: Delivery
    ) -> list[str]:
        """The steps of ``release`` this delivery may run next in-process, best first."""
        settings = self.saga.settings
        if self._queues is None or ref.kind != "step" or not release:
            return []
        now = time.monotonic()
        if delivery.steps >= settings.chain_steps or now - delivery.begun >= settings.chain_seconds:
            return []
        consumed = self._queues()
        return [
            step
            for step in release
            if wf.queue_for(step) in consumed
            and (
                delivery.deadline is None
                or now + wf.time_limit_for(step) + HARD_LIMIT_MARGIN < delivery.deadline
            )
        ]

    def _plan(self, wf: Workflow, ref: AttemptRef, delivery: Delivery) -> _Plan:
        """What recording ``ref``'s completion touches, and which step it may chain."""
        release = release_of(wf, ref.kind, ref.step)
        chain = self._chainable(wf, ref, release, delivery)
        # The completing statement claims the step itself. A successor whose only dependency
        # is this step needs no other input; a join's other inputs are read by a second
        # statement, once the completion has committed (its snapshot sees them all).
        alone = [s for s in chain if wf[s].after == (ref.step,)]
        follow = next(iter(alone or chain), None)
        return _Plan(
            release, [wf.route(s) for s in release], follow, bool(alone), self._token()
        )

    def _record(
        self, conn: Any, wf: Workflow, claim: Claim, token: str, plan: _Plan, result_json: str
    ) -> tuple[Completion | None, Claim | None]:
        """Record the completion on ``conn`` and claim the step it chains, if any."""
        ref = claim.ref
        done = self.saga.transitions.complete(
            conn,
            ref,
            result_json,
            token=token,
            release=plan.release,
            routes=plan.routes,
            # A map's instances are not the run's result (the map's own completion is).
            sink=ref.kind == "step" and not plan.release and wf.map_of(ref.step) is None,
            eager=self._dispatcher is not None,
            republish_after=self.saga.settings.republish_after,
            follow=plan.follow,
            follow_token=plan.follow_token,
            follow_alone=plan.follow_alone,
            lease_seconds=self.heartbeat.timeout,
            definition=(wf.name, wf.version, wf.definition_hash),
        )
        if done is None or done.followed is None:
            return done, None
        if done.follow_claim is not None:
            return done, done.follow_claim
        return done, self._claim_followed(conn, wf, done.followed, plan.follow_token)

    def _recorded(
        self, wf: Workflow, claim: Claim, token: str, plan: _Plan
    ) -> tuple[Completion | None, Claim | None]:
        """After a commit whose reply was lost: what it recorded, if it committed."""
        ref = claim.ref

        def look(conn: Any) -> tuple[Completion | None, Claim | None]:
            done = self.saga.transitions.replay_completion(
                conn, ref, token=token, release=plan.release, follow_token=plan.follow_token
            )
            if done is None or done.followed is None:
                return done, None
            return done, self._claim_followed(conn, wf, done.followed, plan.follow_token)

        return self.saga.on_hot_path("complete", look)

    def _complete(
        self,
        wf: Workflow,
        claim: Claim,
        token: str,
        result_json: str,
        delivery: Delivery,
    ) -> tuple[str, tuple[Claim, str] | None]:
        plan = self._plan(wf, claim.ref, delivery)
        done, chained = self.saga.on_hot_path(
            "complete", lambda conn: self._record(conn, wf, claim, token, plan, result_json)
        )
        return self._finish(wf, claim, done, chained, plan)

    def _finish(
        self,
        wf: Workflow,
        claim: Claim,
        done: Completion | None,
        chained: Claim | None,
        plan: _Plan,
    ) -> tuple[str, tuple[Claim, str] | None]:
        """After the completion's commit: publish what it made ready, move a stopping run."""
        ref = claim.ref
        fields = {"run_id": ref.run_id, "workflow": wf.name, "step": ref.step, "kind": ref.kind}
        if done is None:
            logs.event(log, logging.INFO, "completion of a stale attempt ignored", **fields)
            return "duplicate", None
        if done.replayed:
            logs.event(log, logging.INFO, "completion replayed after a lost reply", **fields)
        if self._dispatcher is not None:
            self._dispatcher.publish(wf, ref.run_id, ref.kind, done.queued, done.trace_context)
        if ref.kind == "step" and done.run_state in STOPPING:
            self.saga.in_transaction(lambda c: self.saga.lifecycle.advance(c, ref.run_id))
        return "completed", None if chained is None else (chained, plan.follow_token)

    def _claim_followed(
        self, conn: Any, wf: Workflow, ref: AttemptRef, token: str
    ) -> Claim | None:
        """The claim of the step a completion claimed for this worker, with all its inputs (a
        statement after the completion's, which sees every dependency's result)."""
        claim = self.saga.transitions.claim(
            conn, ref, workflow=wf.name, version=wf.version,
            definition_hash=wf.definition_hash, deps=wf[ref.step].after,
            lease_seconds=self.heartbeat.timeout, token=token,
        )
        if claim is not None and claim.claimed:
            return claim
        # The completion claimed it under this token a moment ago, so this cannot happen;
        # should it, the step still gets the message it would have had.
        route = {**wf.route(ref.step), "attempt": ref.attempt}
        self.saga.lifecycle.outbox.enqueue(conn, ref.run_id, ref.kind, [route])
        return None

    def _token(self) -> str:
        return f"{self.worker_id}:{uuid.uuid4().hex[:12]}"

    @property
    def worker_id(self) -> str:
        """``host:pid`` of the process running attempts (read when used: a prefork pool
        creates the executor before it forks its children)."""
        return self._worker_id or f"{socket.gethostname()}:{os.getpid()}"

    def _fail(self, wf: Workflow, claim: Claim, exc: BaseException, retryable: bool) -> str:
        telemetry.record_exception(exc)
        ref = claim.ref
        policy = wf.retry_for(ref.step, ref.kind)
        delay = policy.delay_after(ref.attempt - claim.first_attempt + 1) if retryable else None
        error = error_doc(exc, ref.attempt)
        outcome = self.saga.in_transaction(
            lambda c: self.saga.lifecycle.fail_attempt_in_tx(c, ref, error, delay)
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
