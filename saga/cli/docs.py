"""The documents ``saga status`` and ``saga list`` print, and the dashboard shows: built from
:mod:`saga.cli.queries` on one connection, as plain dicts (``--json`` prints them as they are).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from saga.cli import queries
from saga.cli.output import between
from saga.db.states import RUN_STATES
from saga.presence import STALE_AFTER
from saga.steps.maps import parse_instance
from saga.store.base import Row, Tables
from saga.store.processes import ProcessStore

SAMPLE = 10
"""How many expired leases / waiting runs the overview lists."""
OUTBOX_AGE = 60.0
"""Seconds the oldest due unpublished message may wait before it is a warning."""


class StatusWarning(enum.IntEnum):
    """What ``saga status`` warns about; the value is ``saga status --check``'s exit code."""

    NO_RELAY = 10
    QUEUE_WITHOUT_CONSUMER = 11
    DEFINITION_MISSING = 12
    OUTBOX_STALE = 13


@dataclass(frozen=True)
class Thresholds:
    """When the overview warns: a process not seen for ``stale_after`` seconds is gone; the
    oldest due unpublished message may be ``outbox_age`` seconds old."""

    stale_after: float = STALE_AFTER
    outbox_age: float = OUTBOX_AGE


def _process_doc(row: Row, stale_after: float) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "name": row["name"],
        "host": row["host"],
        "pid": row["pid"],
        "version": row["version"],
        "queues": row["queues"],
        "definitions": row["definitions"],
        "started_at": row["started_at"],
        "last_seen_at": row["last_seen_at"],
        "seen_seconds_ago": round(float(row["seen_seconds_ago"]), 1),
        "live": float(row["seen_seconds_ago"]) <= stale_after,
    }


def _warn(kind: StatusWarning, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": kind.name.lower(), "exit_code": int(kind), "message": message, **extra}


def warnings(
    processes: list[dict[str, Any]],
    by_queue: list[Row],
    by_definition: list[Row],
    backlog: Row,
    limits: Thresholds,
) -> list[dict[str, Any]]:
    """The warnings that hold, most severe first (pure: from what the queries found)."""
    out: list[dict[str, Any]] = []
    live = [p for p in processes if p["live"]]
    workers = [p for p in live if p["kind"] == "worker"]
    if not any(p["kind"] == "relay" for p in live):
        last = min((p["seen_seconds_ago"] for p in processes if p["kind"] == "relay"), default=None)
        seen = "none registered" if last is None else f"last seen {last:.0f}s ago"
        out.append(_warn(
            StatusWarning.NO_RELAY,
            f"no relay seen in the last {limits.stale_after:g}s ({seen}): nothing publishes "
            "the outbox or recovers lost work",
        ))
    consumed = {q for p in workers for q in p["queues"] or []}
    out += [
        _warn(
            StatusWarning.QUEUE_WITHOUT_CONSUMER,
            f"queue {row['queue']!r} has {row['messages']} step attempt(s) waiting (oldest "
            f"{row['oldest_seconds']:.0f}s) and no live worker consumes it",
            queue=row["queue"],
        )
        for row in by_queue if row["queue"] not in consumed
    ]
    have = {(d.get("name"), d.get("version"), d.get("hash"))
            for p in workers for d in p["definitions"] or []}
    out += [
        _warn(
            StatusWarning.DEFINITION_MISSING,
            f"{row['runs']} run(s) of {row['workflow']} v{row['version']} (definition "
            f"{row['definition_hash'][:12]}) wait for a worker, and no live worker has that "
            "definition",
            workflow=row["workflow"], version=row["version"],
            definition_hash=row["definition_hash"],
        )
        for row in by_definition
        if (row["workflow"], row["version"], row["definition_hash"]) not in have
    ]
    age = backlog.get("oldest_age_seconds")
    if age is not None and age > limits.outbox_age:
        out.append(_warn(
            StatusWarning.OUTBOX_STALE,
            f"the oldest due outbox message has waited {age:.0f}s (more than "
            f"{limits.outbox_age:g}s) to be published",
        ))
    return out


def overview(conn: Connection, tables: Tables, limits: Thresholds | None = None) -> dict[str, Any]:
    """The system at a glance: runs by workflow and state, the outbox backlog, expired leases,
    runs waiting for an operator, the registered processes and the warnings."""
    limits = limits or Thresholds()
    by_workflow = queries.counts(conn, tables, RUN_STATES)
    by_state: dict[str, int] = {}
    for states in by_workflow.values():
        for state, n in states.items():
            by_state[state] = by_state.get(state, 0) + n
    lease_count, leases = queries.expired_leases(conn, tables, SAMPLE)
    op_count, waiting = queries.waiting_for_operator(conn, tables, SAMPLE)
    backlog = queries.backlog(conn, tables)
    processes = [_process_doc(p, limits.stale_after) for p in ProcessStore(tables).all(conn)]
    by_queue = queries.waiting_by_queue(conn, tables)
    return {
        "runs": {
            "total": sum(by_state.values()),
            "by_state": {s: by_state[s] for s in RUN_STATES if s in by_state},
            "by_workflow": by_workflow,
        },
        "outbox": backlog,
        "queues": by_queue,
        "expired_leases": {"count": lease_count, "steps": leases},
        "waiting_for_operator": {"count": op_count, "runs": waiting},
        "processes": processes,
        "warnings": warnings(
            processes, by_queue, queries.waiting_by_definition(conn, tables), backlog, limits
        ),
    }


def _step_doc(row: Row, now: datetime) -> dict[str, Any]:
    error = row["error"]
    message = error.get("message") if isinstance(error, dict) else error
    return {
        "step": row["step"],
        "kind": row["kind"],
        "state": row["state"],
        "attempt": row["attempt"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "duration_seconds": between(row["started_at"], row["finished_at"], now),
        "worker": row["worker"],
        "lease_expires_at": row["lease_expires_at"],
        "due_at": row["due_at"],
        "wake_at": row.get("wake_at"),
        "signal": row.get("signal"),
        "error_message": message,
        "error": error,
        "result": row["result"],
    }


def latest_error(run: Row, steps: list[Row]) -> dict[str, Any] | None:
    """The error of the run's current state: the run's own (with the traceback its failed
    step stored, if the run's copy has none), else that of a step awaiting a retry. Errors of
    attempts that were superseded are in the history only."""
    error = run.get("error")
    if isinstance(error, dict):
        doc = dict(error)
        if "traceback" not in doc:
            failed = next(
                (s for s in steps
                 if s["step"] == doc.get("step") and s["kind"] == doc.get("kind", "step")
                 and isinstance(s["error"], dict)),
                None,
            )
            if failed is not None and failed["error"].get("traceback") is not None:
                doc["traceback"] = failed["error"]["traceback"]
        return doc
    if error is not None:
        return {"message": str(error)}
    pending = [
        s for s in steps
        if isinstance(s["error"], dict) and s["state"] in ("ready", "running", "failed")
    ]
    if not pending:
        return None
    last = max(pending, key=lambda s: (s["finished_at"] or s["started_at"] or s["created_at"]))
    return {"step": last["step"], "kind": last["kind"], **last["error"]}


MAP_STATES = {"completed": "done", "running": "running", "failed": "failed"}
"""How a map's summary counts its instances' states (the others are counted as they are)."""


def map_summaries(step_docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per map and kind in ``step_docs`` (instances named ``map[00042]``): the
    count of instances in each state (``done``, ``running``, ``failed``, ...) and the failed
    instances' documents, in place of one line per instance."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for s in step_docs:
        parsed = parse_instance(s["step"])
        if parsed is None:
            continue
        summary = found.setdefault(
            (s["kind"], parsed[0]),
            {"map": parsed[0], "kind": s["kind"], "instances": 0, "counts": {}, "failed": []},
        )
        summary["instances"] += 1
        state = MAP_STATES.get(s["state"], s["state"])
        summary["counts"][state] = summary["counts"].get(state, 0) + 1
        if s["state"] == "failed":
            summary["failed"].append(s)
    return [found[k] for k in sorted(found)]


def run_doc(run: Row, steps: list[Row], history: list[Row]) -> dict[str, Any]:
    """One run: its row (with input and result), its steps and compensations (with results
    and errors; a map's instances summarised, see :func:`map_summaries`), the latest error with
    its traceback, and its history (without the instances' events, which the maps' summaries
    count)."""
    now = datetime.now(UTC)
    every = [_step_doc(s, now) for s in steps]
    step_docs = [s for s in every if parse_instance(s["step"]) is None]
    instance_events = sum(1 for h in history if h["step"] and parse_instance(h["step"]))
    return {
        "run": {
            "id": run["id"],
            "workflow": run["workflow"],
            "version": run["version"],
            "state": run["state"],
            "business_key": run["business_key"],
            "created_at": run["created_at"],
            "updated_at": run["updated_at"],
            "finished_at": run["finished_at"],
            "duration_seconds": between(run["created_at"], run["finished_at"], now),
            "deadline_at": run["deadline_at"],
            "error_message": (
                run["error"].get("message") if isinstance(run["error"], dict) else run["error"]
            ),
            "error": run["error"],
            "input": run["input"],
            "result": run["result"],
        },
        "latest_error": latest_error(run, steps),
        "steps": [s for s in step_docs if s["kind"] == "step"],
        "compensations": [s for s in step_docs if s["kind"] == "compensation"],
        "maps": map_summaries(every),
        "instance_events": instance_events,
        "history": [
            {k: h[k] for k in ("at", "event", "kind", "step", "attempt", "detail")}
            for h in history if not (h["step"] and parse_instance(h["step"]))
        ],
    }


def run_detail(conn: Connection, tables: Tables, ref: str) -> dict[str, Any]:
    """:func:`run_doc` of the run ``ref`` names (id, business key or unique id prefix), with
    its ``parent`` (or ``None``) and ``children`` runs (id, workflow, version, state, and the
    parent's step and attempt that started each)."""
    row = queries.find_run(conn, tables, ref)
    doc = run_doc(
        row,
        queries.run_steps(conn, tables, row["id"]),
        queries.run_history(conn, tables, row["id"]),
    )
    parent, children = queries.run_relatives(conn, tables, row)
    if parent is not None:  # the step and attempt of the parent that started this run
        parent |= {"step": row["parent_step"], "attempt": row["parent_attempt"]}
        del parent["parent_step"], parent["parent_attempt"]
    doc["parent"] = parent
    doc["children"] = [
        {k: c[k] for k in ("id", "workflow", "version", "state")}
        | {"step": c["parent_step"], "attempt": c["parent_attempt"]}
        for c in children
    ]
    return doc
