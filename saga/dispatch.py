"""Publishing a transaction's messages right after it commits, without waiting for the relay.

A completion (eager dispatch) and a start (prompt start) write their new outbox rows as
already published, with ``republish_at`` ``republish_after`` seconds ahead, then publish them
themselves once their transaction has committed. If the broker refuses, the unsent rows go back
to the relay at once; if the process dies first, the sweeper publishes them again at
``republish_at``. Either way nothing is lost, and nothing waits for the relay's next wake-up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from saga import logs, telemetry
from saga.definition import Workflow
from saga.messages import Envelope, Publisher, publish_in_order

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.dispatch")


class Dispatcher:
    """Publishes messages its caller wrote as published, for one engine."""

    def __init__(self, saga: Saga, make_publisher: Callable[[], Publisher]) -> None:
        """``make_publisher`` is called once, on first use (after a fork, in a worker)."""
        self._saga = saga
        self._make_publisher = make_publisher
        self._publisher: Publisher | None = None

    def publish(
        self,
        wf: Workflow,
        run_id: str,
        kind: str,
        queued: Sequence[Mapping[str, Any]],
        trace_context: Any,
    ) -> None:
        """Publish ``queued`` (``step``, ``attempt``, ``queue``, ``priority``, ``time_limit``)
        of ``run_id``; never raises: a broker error hands the unsent back to the relay."""
        if not queued:
            return
        if self._publisher is None:
            self._publisher = self._make_publisher()
        envelopes = []
        for message in queued:
            row = {
                **message,
                "run_id": run_id,
                "workflow": wf.name,
                "version": wf.version,
                "definition_hash": wf.definition_hash,
                "kind": kind,
                "countdown": None,
                "trace_context": trace_context,
            }
            with telemetry.publishing(row) as headers:
                envelopes.append(Envelope.from_outbox(row, headers))
        sent, error = publish_in_order(self._publisher, envelopes)
        if error is None:
            return
        unsent = [m["step"] for m in queued[sent:]]
        logs.event(
            log, logging.WARNING,
            f"publishing failed, leaving it to the relay: {logs.describe(error)}",
            run_id=run_id, workflow=wf.name, kind=kind, steps=",".join(unsent),
        )
        with contextlib.suppress(DBAPIError):
            self._saga.in_transaction(
                lambda conn: self._saga.lifecycle.outbox.unpublish(conn, run_id, kind, unsent)
            )

    def after_commit(self, target: Any, wf: Workflow, run_id: str, trace_context: Any) -> None:
        """Publish a run's first steps once the transaction of ``target`` commits (nothing if
        it rolls back: the run was never written). ``target`` is a Session, or anything with
        an ``on_commit(callback)`` hook (Django's connection)."""
        queued = [{**wf.route(step), "attempt": 1} for step in wf.roots]
        if not isinstance(target, Session):
            target.on_commit(lambda: self.publish(wf, run_id, "step", queued, trace_context))
            return
        session = target

        def committed(_: Session) -> None:
            event.remove(session, "after_rollback", rolled_back)
            self.publish(wf, run_id, "step", queued, trace_context)

        def rolled_back(_: Session) -> None:
            event.remove(session, "after_commit", committed)

        event.listen(session, "after_commit", committed, once=True)
        event.listen(session, "after_rollback", rolled_back, once=True)

