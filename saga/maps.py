"""Maps over a list (:meth:`saga.Workflow.map`): expanding a map, its instances' items, the
list its join receives, and undoing its instances.

Costs. A map of N items takes O(N) statements in all, and none of them reads the N siblings
but two, each once: the expansion (one statement inserts the N rows and their messages) and the
join's claim (then one statement reads the N results in item order). Every instance is a step
row of its own, claimed (the claim returns its item) and completed by the ordinary hot-path
statements: its completion decrements the join's ``pending_deps`` (set to N at the
expansion), so a fan-in of N is O(1) per completion, as any join. With ``max_parallel`` K,
instance i waits for instance i-K (its ``pending_deps`` is 1), which its completion releases by
name: O(1) too.

Undoing. When a run stops, the map's own row (which started) is undone by a *barrier*: its
compensation row waits for the compensations of the steps after the map, like any
compensation; when it runs it makes the compensations of every started instance ready, in one
statement; the steps before the map wait for those instances' compensations and the barrier.
So the reverse order holds: the join, then the instances (in parallel), then the map's source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.core import graph
from saga.core.attempts import AttemptRef
from saga.definition import Workflow
from saga.errors import SagaError
from saga.steps.maps import INDEX_DIGITS, MAX_MAP_ITEMS, instance_name
from saga.store.base import Row
from saga.transitions import Completion

if TYPE_CHECKING:  # saga.app makes a Maps: no import at run time
    from saga.app import Saga

_EXPAND = """
WITH m AS (
    SELECT sr.run_id FROM {steps} sr
    WHERE sr.run_id = :run_id AND sr.kind = 'step' AND sr.step = :map AND sr.state = 'running'
      AND sr.attempt = :attempt AND sr.worker = :token
), items AS (
    SELECT x.item, x.n - 1 AS i
    FROM m JOIN {steps} src ON src.run_id = m.run_id AND src.kind = 'step' AND src.step = :over
    CROSS JOIN LATERAL jsonb_array_elements(src.result) WITH ORDINALITY AS x(item, n)
), made AS (
    INSERT INTO {steps} (run_id, kind, step, state, attempt, first_attempt, pending_deps, item)
    SELECT :run_id, 'step', :map || '[' || lpad(i::text, :digits, '0') || ']',
           CASE WHEN i < :lanes THEN 'ready' ELSE 'waiting' END,
           CASE WHEN i < :lanes THEN 1 ELSE 0 END, 1, CASE WHEN i < :lanes THEN 0 ELSE 1 END,
           item
    FROM items
    RETURNING step, state
), queued AS (
    INSERT INTO {outbox} (run_id, kind, step, attempt, queue, priority, time_limit, trace_context)
    SELECT :run_id, 'step', made.step, 1, :queue, :priority, :time_limit, r.trace_context
    FROM made JOIN {runs} r ON r.id = :run_id WHERE made.state = 'ready'
), joins AS (
    -- The steps after the map wait for its N instances instead of the map itself (whose
    -- completion, right after, counts for one).
    UPDATE {steps} SET pending_deps = pending_deps + (SELECT count(*) FROM items)
    WHERE run_id = :run_id AND kind = 'step' AND step = ANY(:joins) AND state = 'waiting'
      AND EXISTS (SELECT 1 FROM m)
), counted AS (
    UPDATE {runs} SET steps_remaining = steps_remaining + (SELECT count(*) FROM items)
    WHERE id = :run_id AND EXISTS (SELECT 1 FROM m)
)
SELECT EXISTS (SELECT 1 FROM m) AS mine, (SELECT count(*) FROM items) AS n
"""
_GATHER = """
SELECT coalesce(jsonb_agg(result ORDER BY step COLLATE "C"), '[]'::jsonb) FROM {steps}
WHERE run_id = :run_id AND kind = 'step' AND starts_with(step, :prefix)
"""
_UNDO_INSTANCES = """
WITH m AS (
    SELECT 1 FROM {steps}
    WHERE run_id = :run_id AND kind = 'compensation' AND step = :map AND state = 'running'
      AND attempt = :attempt AND worker = :token
), made AS (
    UPDATE {steps} SET state = 'ready', attempt = attempt + 1, pending_deps = 0
    WHERE run_id = :run_id AND kind = 'compensation' AND starts_with(step, :prefix)
      AND state = 'waiting' AND EXISTS (SELECT 1 FROM m)
    RETURNING step, attempt
)
INSERT INTO {outbox} (run_id, kind, step, attempt, queue, priority, time_limit, trace_context)
SELECT :run_id, 'compensation', made.step, made.attempt, :queue, :priority, :time_limit,
       r.trace_context
FROM made JOIN {runs} r ON r.id = :run_id
"""


class MapItemsError(SagaError):
    """A map's source result is not a list, or has more than
    :data:`~saga.steps.maps.MAX_MAP_ITEMS` items: the map's step fails (not retried)."""


def release_of(wf: Workflow, kind: str, step: str) -> tuple[str, ...]:
    """The rows whose wait the completion of ``step`` (a ``kind`` row) shortens: a step's
    dependents (for an instance of a map: the map's, and the instance ``max_parallel`` after
    it), or the compensations waiting for a compensation."""
    after = wf.after_map
    mapped = wf.map_of(step)
    if mapped is None:
        if kind == "step":
            return graph.dependents(after)[step]
        return tuple(sorted(graph.ancestors(after, step)))
    name, index = mapped
    if kind == "compensation":
        return tuple(sorted({name} | graph.ancestors(after, name)))
    lanes = wf.maps[name].max_parallel
    after_it = (instance_name(name, index + lanes),) if lanes is not None else ()
    return graph.dependents(after)[name] + after_it


def undo_plan(
    wf: Workflow, pending: Mapping[str, int], rows: Sequence[Row]
) -> dict[str, int]:
    """The compensation rows of a stopping run, maps' instances included: ``pending`` is the
    plan of its declared steps (each map that started and has a compensation counts as one
    step there, its barrier); each started instance of such a map waits for its barrier, and
    each step before the map waits for the instances too."""
    plan = dict(pending)
    after = wf.after_map
    for name, runner in wf.maps.items():
        if runner.compensation is None or name not in plan:
            continue
        started = sorted(
            r["step"] for r in rows
            if r["kind"] == "step" and r["started_at"] and wf.map_of(r["step"]) is not None
            and r["step"].startswith(name + "[")
        )
        for s in graph.ancestors(after, name):
            if s in plan:
                plan[s] += len(started)
        plan.update(dict.fromkeys(started, 1))
    return plan


class Maps:
    """The statements of maps, for one engine."""

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        t = saga.tables
        self._expand = t.sql(_EXPAND)
        self._gather = t.sql(_GATHER)
        self._undo_instances = t.sql(_UNDO_INSTANCES)

    @staticmethod
    def check_items(wf: Workflow, step: str, items: Any) -> int:
        """The number of items of a map's source result; :class:`MapItemsError` unless it is
        a list of at most :data:`MAX_MAP_ITEMS`."""
        over = wf.maps[step].over
        if not isinstance(items, list):
            raise MapItemsError(
                f"map {step!r} needs a list from step {over!r}, got {type(items).__name__}"
            )
        if len(items) > MAX_MAP_ITEMS:
            raise MapItemsError(
                f"map {step!r}: step {over!r} returned {len(items)} items, over the most a "
                f"map expands to ({MAX_MAP_ITEMS})"
            )
        return len(items)

    def expand(
        self, conn: Connection, wf: Workflow, ref: AttemptRef, token: str
    ) -> Completion | None:
        """Expand the claimed map attempt ``ref`` (claimed under ``token``) in the caller's
        transaction: its instances' rows and messages, the joins' and the run's counters, and
        the map's completion (``{"items": N}``). ``None`` if the attempt is not ours."""
        runner = wf.maps[ref.step]
        route = wf.route(ref.step)
        joins = graph.dependents(wf.after_map)[ref.step]
        # Locked first, as every completion locks it after its own row: the expansion then
        # updates the joins' rows with no completion waiting on the run in between.
        self.saga.lifecycle.runs.lock(conn, ref.run_id)
        params: dict[str, Any] = {
            "run_id": ref.run_id, "map": ref.step, "attempt": ref.attempt, "token": token,
            "over": runner.over, "digits": INDEX_DIGITS,
            "lanes": runner.max_parallel or MAX_MAP_ITEMS, "joins": list(joins),
        }
        params |= {k: route[k] for k in ("queue", "priority", "time_limit")}
        row = conn.execute(self._expand, params).mappings().one()
        if not row["mine"]:
            return None
        return self.saga.transitions.complete(
            conn, ref, dumps({"items": row["n"]}), token=token, release=joins,
            routes=[wf.route(s) for s in joins], sink=not joins,
            republish_after=self.saga.settings.republish_after,
        )

    def results(
        self, conn: Connection, wf: Workflow, run_id: str, step: str, results: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``results`` (a step's inputs), each map's entry replaced by its instances' results
        in item order."""
        out = dict(results)
        for dep in wf[step].after:
            if dep in wf.maps:
                found = conn.execute(self._gather, {"run_id": run_id, "prefix": dep + "["})
                out[dep] = found.scalar()
        return out

    def undo_instances(
        self, conn: Connection, wf: Workflow, ref: AttemptRef, token: str
    ) -> Completion | None:
        """Run the barrier ``ref`` (the claimed compensation of a map): make its started
        instances' compensations ready and complete it, in the caller's transaction."""
        route = wf.route(ref.step)
        params: dict[str, Any] = {
            "run_id": ref.run_id, "map": ref.step, "attempt": ref.attempt, "token": token,
            "prefix": ref.step + "[",
        }
        params |= {k: route[k] for k in ("queue", "priority", "time_limit")}
        conn.execute(self._undo_instances, params)
        release = release_of(wf, "compensation", ref.step)
        return self.saga.transitions.complete(
            conn, ref, "null", token=token, release=release,
            routes=[wf.route(s) for s in release], sink=False,
            republish_after=self.saga.settings.republish_after,
        )
