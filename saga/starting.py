"""Starting a run inside the caller's own transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from saga.codec import check_storable, dumps, encode
from saga.db.states import RUN_UNFINISHED, check_in
from saga.definition import Workflow
from saga.errors import InputError, KeyConflictError
from saga.handles import RunHandle
from saga.keys import KeyPolicy
from saga.keys import key_policy as key_policy_of
from saga.settings import Settings
from saga.store.base import Tables

if TYPE_CHECKING:  # the asyncio extension needs greenlet (saga[async]): imported when used
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

_START = """
WITH latest AS (
    -- The key's newest run of this workflow, if any: the run to return (no new one starts),
    -- unless the policy starts anew after a finish and it has finished.
    SELECT id, input, NOT (:new_after_finish AND state <> ALL(:unfinished)) AS blocks
    FROM {runs}
    WHERE CAST(:key AS text) IS NOT NULL AND workflow = :workflow AND business_key = :key
    ORDER BY created_at DESC LIMIT 1
), run AS (
    INSERT INTO {runs} (id, workflow, version, definition_hash, state, business_key, input,
                        trace_context, steps_remaining, deadline_at)
    SELECT :id, :workflow, :version, :hash, 'running', :key, CAST(:input AS jsonb),
           CAST(:trace AS jsonb), :n_steps,
           now() + make_interval(secs => CAST(:deadline AS float8))
    WHERE NOT EXISTS (SELECT 1 FROM latest WHERE latest.blocks)
    -- A concurrent start of the same key won (one unfinished run per key): none is returned
    -- here, and the caller looks the winner up.
    ON CONFLICT (workflow, business_key)
        WHERE business_key IS NOT NULL AND {unfinished} DO NOTHING
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
SELECT id::text AS id, true AS created, NULL AS same_input FROM run
UNION ALL
SELECT id::text, false, input = CAST(:input AS jsonb) FROM latest WHERE blocks
"""
_EXISTING = """
SELECT id::text AS id, false AS created, input = CAST(:input AS jsonb) AS same_input
FROM {runs} WHERE workflow = :workflow AND business_key = :key
ORDER BY created_at DESC LIMIT 1
"""


@dataclass(frozen=True)
class Started(RunHandle):
    """The run a start call refers to; ``created`` is ``False`` when the business key matched
    an existing run, which is returned instead of starting another (see
    :class:`~saga.keys.KeyPolicy`). Wait for its outcome with :meth:`wait` or
    :meth:`wait_async`, once the transaction that started it has committed."""

    created: bool


@dataclass(frozen=True)
class StartPlan:
    """One start, validated and ready to run: the statement's parameters, and what to make of
    the row it returns. Shared by every way to start (sync, async, Django's connection)."""

    workflow: str
    key: str | None
    policy: KeyPolicy
    params: dict[str, Any]

    @property
    def lookup(self) -> dict[str, Any]:
        """The parameters of the fallback look-up of the key's run."""
        return {k: self.params[k] for k in ("workflow", "key", "input")}

    def conclude(self, row: Mapping[Any, Any] | None) -> Started:
        """The :class:`Started` of the start statement's (or the look-up's) row."""
        if row is None:  # pragma: no cover - the conflicting insert rolled back meanwhile
            raise RuntimeError(f"could not start or find run {self.workflow!r} key {self.key!r}")
        if (
            not row["created"]
            and self.policy is KeyPolicy.REFUSE_CHANGED_INPUT
            and not row["same_input"]
        ):
            raise KeyConflictError(self.workflow, str(self.key), row["id"])
        return Started(run_id=row["id"], created=bool(row["created"]))


class Executes(Protocol):
    """A connection saga can run its statements on in the caller's transaction: an SQLAlchemy
    ``Connection``, or an adapter such as :class:`saga.contrib.django.DjangoConnection`."""

    def execute(self, statement: Any, parameters: Any = ..., /) -> Any:
        """Run ``statement`` (a ``TextClause``) with ``parameters``; a result with rows."""
        ...


class Starter:
    """Writes a new run, its steps and its first messages in the caller's transaction."""

    def __init__(self, tables: Tables, settings: Settings) -> None:
        self._settings = settings
        self._start = tables.sql(_START.replace("{unfinished}", check_in("state", RUN_UNFINISHED)))
        self._existing = tables.sql(_EXISTING)

    def plan(
        self,
        workflow: Workflow,
        input: Any,
        *,
        key: str | None = None,
        key_policy: KeyPolicy | str | None = None,
        trace_context: dict[str, str] | None = None,
        published: bool = False,
    ) -> StartPlan:
        """Check ``input`` and ``key`` and build the start's parameters (no I/O). Input and key
        are checked before anything is sent to the database: one that cannot be stored raises
        :class:`~saga.errors.InputError`. With ``published`` the first steps' messages are
        written as published: the caller publishes them after its commit (see
        :mod:`saga.dispatch`)."""
        input_json = encode(
            input, workflow=workflow.name, field="input", limit=self._settings.max_input_bytes
        )
        if key is not None:
            if not isinstance(key, str) or not key or len(key) > 200:
                raise InputError(workflow.name, "key", "must be a string of 1-200 characters")
            check_storable(key, workflow=workflow.name, field="key")
        policy = key_policy_of(workflow.key_policy if key_policy is None else key_policy)
        after = workflow.after_map
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
            "new_after_finish": policy is KeyPolicy.NEW_AFTER_FINISH,
            "unfinished": list(RUN_UNFINISHED),
        }
        return StartPlan(workflow.name, key, policy, params)

    def start(
        self,
        target: Session | Connection | Executes,
        workflow: Workflow,
        input: Any,
        *,
        key: str | None = None,
        key_policy: KeyPolicy | str | None = None,
        trace_context: dict[str, str] | None = None,
        published: bool = False,
    ) -> Started:
        """Start ``workflow`` with ``input`` in the transaction of ``target`` (the caller's
        Session or Connection); nothing is committed here, so a rollback leaves nothing (see
        :meth:`plan` for ``published`` and the checks)."""
        plan = self.plan(
            workflow, input, key=key, key_policy=key_policy, trace_context=trace_context,
            published=published,
        )
        conn = target.connection() if isinstance(target, Session) else target
        row = conn.execute(self._start, plan.params).mappings().first()
        if row is None:
            row = conn.execute(self._existing, plan.lookup).mappings().first()
        return plan.conclude(row)

    async def start_async(
        self,
        target: AsyncSession | AsyncConnection,
        workflow: Workflow,
        input: Any,
        *,
        key: str | None = None,
        key_policy: KeyPolicy | str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Started:
        """:meth:`start` on SQLAlchemy's asyncio API (an ``AsyncSession`` or
        ``AsyncConnection``, e.g. with psycopg's async driver): the same statement, awaited."""
        from sqlalchemy.ext.asyncio import AsyncSession

        plan = self.plan(
            workflow, input, key=key, key_policy=key_policy, trace_context=trace_context
        )
        conn = await target.connection() if isinstance(target, AsyncSession) else target
        row = (await conn.execute(self._start, plan.params)).mappings().first()
        if row is None:
            row = (await conn.execute(self._existing, plan.lookup)).mappings().first()
        return plan.conclude(row)
