"""Starting a run inside the caller's own transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from saga.codec import check_storable, dumps, encode
from saga.definition import Workflow
from saga.errors import InputError
from saga.settings import Settings
from saga.store.base import Tables

_START = """
WITH run AS (
    INSERT INTO {runs} (id, workflow, version, definition_hash, state, business_key, input,
                        trace_context, steps_remaining, deadline_at)
    VALUES (:id, :workflow, :version, :hash, 'running', :key, CAST(:input AS jsonb),
            CAST(:trace AS jsonb), :n_steps,
            now() + make_interval(secs => CAST(:deadline AS float8)))
    ON CONFLICT (workflow, business_key) WHERE business_key IS NOT NULL DO NOTHING
    RETURNING id
), steps AS (
    INSERT INTO {steps} (run_id, kind, step, state, attempt, first_attempt, pending_deps)
    SELECT run.id, 'step', x.step, CASE WHEN x.pending = 0 THEN 'ready' ELSE 'waiting' END,
           CASE WHEN x.pending = 0 THEN 1 ELSE 0 END, 1, x.pending
    FROM run, jsonb_to_recordset(CAST(:steps AS jsonb)) AS x(step text, pending int)
), queued AS (
    -- Written as published when the caller publishes them itself after its commit.
    INSERT INTO {outbox} (run_id, kind, step, attempt, queue, priority, time_limit, trace_context,
                          published_at, publish_count, republish_at)
    SELECT run.id, 'step', x.step, 1, x.queue, x.priority, x.time_limit, CAST(:trace AS jsonb),
           CASE WHEN :published THEN now() END, CASE WHEN :published THEN 1 ELSE 0 END,
           CASE WHEN :published THEN now() + make_interval(secs => :republish_after) END
    FROM run, jsonb_to_recordset(CAST(:roots AS jsonb))
         AS x(step text, queue text, priority int, time_limit float8)
), logged AS (
    INSERT INTO {history} (run_id, event, detail)
    SELECT run.id, 'run_started',
           jsonb_build_object('version', :version, 'definition_hash', :hash)
    FROM run
)
SELECT id::text FROM run
"""
_EXISTING = """
SELECT id::text FROM {runs} WHERE workflow = :workflow AND business_key = :key
"""


@dataclass(frozen=True)
class Started:
    """The run a start call refers to; ``created`` is ``False`` when the business key matched
    an existing run, which is returned instead of starting a second one."""

    run_id: str
    created: bool


class Starter:
    """Writes a new run, its steps and its first messages in the caller's transaction."""

    def __init__(self, tables: Tables, settings: Settings) -> None:
        self._settings = settings
        self._start = tables.sql(_START)
        self._existing = tables.sql(_EXISTING)

    def start(
        self,
        target: Session | Connection,
        workflow: Workflow,
        input: Any,
        *,
        key: str | None = None,
        trace_context: dict[str, str] | None = None,
        published: bool = False,
    ) -> Started:
        """Start ``workflow`` with ``input`` in the transaction of ``target`` (the caller's
        Session or Connection); nothing is committed here, so a rollback leaves nothing.
        With ``published`` the first steps' messages are written as published: the caller
        publishes them after its commit (see :mod:`saga.dispatch`). Input and key are checked
        before anything is sent to the database: one that cannot be stored raises
        :class:`~saga.errors.InputError` and leaves the caller's transaction as it was."""
        input_json = encode(
            input, workflow=workflow.name, field="input", limit=self._settings.max_input_bytes
        )
        if key is not None:
            if not isinstance(key, str) or not key or len(key) > 200:
                raise InputError(workflow.name, "key", "must be a string of 1-200 characters")
            check_storable(key, workflow=workflow.name, field="key")
        after = workflow.after_map
        conn = target.connection() if isinstance(target, Session) else target
        params = {
            "id": str(uuid.uuid4()),
            "workflow": workflow.name,
            "version": workflow.version,
            "hash": workflow.definition_hash,
            "key": key,
            "input": input_json,
            "trace": None if trace_context is None else dumps(trace_context),
            "n_steps": len(after),
            "deadline": workflow.deadline,
            "steps": dumps([{"step": s, "pending": len(d)} for s, d in after.items()]),
            "roots": dumps([workflow.route(s) for s in workflow.roots]),
            "published": published,
            "republish_after": self._settings.republish_after,
        }
        run_id = conn.execute(self._start, params).scalar()
        if run_id is not None:
            return Started(run_id=run_id, created=True)
        existing = conn.execute(self._existing, {"workflow": workflow.name, "key": key}).scalar()
        if existing is None:  # pragma: no cover - the conflicting insert rolled back meanwhile
            raise RuntimeError(f"could not start or find run {workflow.name!r} key {key!r}")
        return Started(run_id=existing, created=False)
