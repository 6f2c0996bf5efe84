"""``saga status`` (overview, or one run) and ``saga list``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from saga.cli import queries
from saga.cli.options import config_of, db_options, json_option, output_of
from saga.cli.output import Output, between, fmt_duration, fmt_time, one_line
from saga.db.states import RUN_STATES
from saga.store.base import Row

SAMPLE = 10
"""How many expired leases / waiting runs the overview lists."""
MAX_PAGE = 1_000_000
"""The highest ``--page`` (deeper pages are cheaper to reach with ``--before``)."""


@click.command()
@click.argument("run", required=False)
@json_option
@db_options
@click.pass_context
def status(ctx: click.Context, run: str | None, as_json: bool) -> None:
    """Overview of the system, or the details of RUN (a run id or business key).

    The overview shows runs by workflow and state, the outbox backlog, steps running past
    their lease, and runs waiting for an operator (compensation_failed).
    """
    config = config_of(ctx)
    tables = config.tables()
    out = output_of(ctx)
    with config.engine().connect() as conn:
        if run is None:
            doc = _overview(conn, tables)
        else:
            row = queries.find_run(conn, tables, run)
            doc = _run_doc(
                row,
                queries.run_steps(conn, tables, row["id"]),
                queries.run_history(conn, tables, row["id"]),
            )
    if as_json:
        out.json(doc)
    elif run is None:
        _print_overview(out, doc)
    else:
        _print_run(out, doc)


def _overview(conn: Any, tables: Any) -> dict[str, Any]:
    by_workflow = queries.counts(conn, tables, RUN_STATES)
    by_state: dict[str, int] = {}
    for states in by_workflow.values():
        for state, n in states.items():
            by_state[state] = by_state.get(state, 0) + n
    lease_count, leases = queries.expired_leases(conn, tables, SAMPLE)
    op_count, waiting = queries.waiting_for_operator(conn, tables, SAMPLE)
    return {
        "runs": {
            "total": sum(by_state.values()),
            "by_state": {s: by_state[s] for s in RUN_STATES if s in by_state},
            "by_workflow": by_workflow,
        },
        "outbox": queries.backlog(conn, tables),
        "expired_leases": {"count": lease_count, "steps": leases},
        "waiting_for_operator": {"count": op_count, "runs": waiting},
    }


def _print_overview(out: Output, doc: dict[str, Any]) -> None:
    runs = doc["runs"]
    shown = [s for s in RUN_STATES if s in runs["by_state"]]
    rows = [
        [wf, *[counts.get(s, 0) for s in shown], sum(counts.values())]
        for wf, counts in sorted(runs["by_workflow"].items())
    ]
    if len(rows) != 1:
        rows.append(["(all)", *[runs["by_state"][s] for s in shown], runs["total"]])
    out.table("Runs by workflow and state", ["workflow", *shown, "total"], rows)
    ob = doc["outbox"]
    out.line()
    out.fields(
        "Outbox",
        [
            ("unpublished", ob["unpublished"]),
            ("due now", ob["due"]),
            ("oldest due", fmt_duration(ob["oldest_age_seconds"])),
        ],
    )
    leases = doc["expired_leases"]
    out.line()
    out.line(f"Steps past their lease: {leases['count']}", style="bold")
    if leases["steps"]:
        out.table(
            None,
            ["run", "workflow", "kind", "step", "attempt", "worker", "lease expired"],
            [
                [r["run_id"], r["workflow"], r["kind"], r["step"], r["attempt"], r["worker"],
                 fmt_time(r["lease_expires_at"])]
                for r in leases["steps"]
            ],
        )
    waiting = doc["waiting_for_operator"]
    out.line()
    out.line(f"Runs waiting for an operator: {waiting['count']}", style="bold")
    if waiting["runs"]:
        out.table(
            None,
            ["run", "workflow", "key", "since", "error"],
            [
                [r["id"], r["workflow"], r["business_key"], fmt_time(r["updated_at"]),
                 one_line(r["error_message"] or "-", 60)]
                for r in waiting["runs"]
            ],
        )


def _message_of(error: Any) -> Any:
    """The text of a stored error document (``error_message`` in every JSON shape)."""
    return error.get("message") if isinstance(error, dict) else error


def _step_doc(row: Row, now: datetime) -> dict[str, Any]:
    error = row["error"]
    message = _message_of(error)
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
        "error_message": message,
        "error": error,
    }


def _run_doc(run: Row, steps: list[Row], history: list[Row]) -> dict[str, Any]:
    now = datetime.now(UTC)
    step_docs = [_step_doc(s, now) for s in steps]
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
            "error_message": _message_of(run["error"]),
            "error": run["error"],
        },
        "steps": [s for s in step_docs if s["kind"] == "step"],
        "compensations": [s for s in step_docs if s["kind"] == "compensation"],
        "history": [
            {k: h[k] for k in ("at", "event", "kind", "step", "attempt", "detail")}
            for h in history
        ],
    }


def _print_run(out: Output, doc: dict[str, Any]) -> None:
    run = doc["run"]
    error = run["error_message"]
    out.fields(
        f"Run {run['id']}",
        [
            ("workflow", f"{run['workflow']} v{run['version']}"),
            ("state", run["state"]),
            ("key", run["business_key"]),
            ("started", fmt_time(run["created_at"])),
            ("finished", fmt_time(run["finished_at"])),
            ("duration", fmt_duration(run["duration_seconds"])),
            *([("error", one_line(str(error), 100))] if error else []),
        ],
    )
    for title, rows in (("Steps", doc["steps"]), ("Compensations", doc["compensations"])):
        if not rows and title == "Compensations":
            continue
        out.line()
        out.table(
            title,
            ["step", "state", "attempt", "started", "duration", "last error"],
            [
                [s["step"], s["state"], s["attempt"], fmt_time(s["started_at"]),
                 fmt_duration(s["duration_seconds"]), one_line(s["error_message"] or "-", 60)]
                for s in rows
            ],
            state_column=1,
        )
    out.line()
    out.table(
        "History",
        ["time", "event", "step", "attempt", "detail"],
        [
            [fmt_time(h["at"]), h["event"],
             (f"{h['step']} (compensation)" if h["kind"] == "compensation" else h["step"]),
             h["attempt"],
             "-" if h["detail"] is None else one_line(json.dumps(h["detail"], default=str), 70)]
            for h in doc["history"]
        ],
    )


def _timestamp(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _cursor(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[datetime, uuid.UUID | None] | None:
    if value is None:
        return None
    stamp, _, run_id = value.partition(",")
    when = _timestamp(ctx, param, stamp.strip())
    assert when is not None
    try:
        return when, uuid.UUID(run_id.strip()) if run_id.strip() else None
    except ValueError:
        raise click.BadParameter(f"{run_id!r} is not a run id") from None


@click.command("list")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(RUN_STATES),
    help="Only runs in this state (repeatable).",
)
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--key", help="Only runs with this business key.")
@click.option("--since", callback=_timestamp, help="Created at or after (ISO 8601).")
@click.option("--until", callback=_timestamp, help="Created before (ISO 8601).")
@click.option(
    "--before", callback=_cursor, metavar="CURSOR",
    help="Rows older than this cursor: a created_at (ISO 8601), optionally ',<run id>'.",
)
@click.option(
    "--page", type=click.IntRange(1, MAX_PAGE), help="Page number (slower than --before)."
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@db_options
@click.pass_context
def list_(
    ctx: click.Context,
    states: tuple[str, ...],
    workflow: str | None,
    key: str | None,
    since: datetime | None,
    until: datetime | None,
    before: tuple[datetime, uuid.UUID | None] | None,
    page: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """Runs, newest first, by pages (follow the printed --before cursor for the next)."""
    if before is not None and page is not None:
        raise click.UsageError("use --before or --page, not both")
    config = config_of(ctx)
    tables = config.tables()
    f = queries.ListFilter(
        states=tuple(dict.fromkeys(states)),
        workflow=workflow,
        key=key,
        since=since,
        until=until,
        before=before[0] if before else None,
        before_id=before[1] if before else None,
        limit=limit + 1,
        offset=(page - 1) * limit if page else 0,
    )
    with config.engine().connect() as conn:
        rows = queries.list_runs(conn, tables, f)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = f"{rows[-1]['created_at'].isoformat()},{rows[-1]['id']}" if more else None
    out = output_of(ctx)
    if as_json:
        out.json({"runs": rows, "next_before": cursor})
        return
    now = datetime.now(UTC)
    out.table(
        None,
        ["id", "workflow", "state", "key", "created", "duration", "error"],
        [
            [r["id"], f"{r['workflow']} v{r['version']}", r["state"], r["business_key"],
             fmt_time(r["created_at"]),
             fmt_duration(between(r["created_at"], r["finished_at"], now)),
             one_line(r["error_message"] or "-", 50)]
            for r in rows
        ],
        state_column=2,
    )
    if not rows:
        click.echo("no runs match", err=True)
    if cursor:
        click.echo(f"more: --before '{cursor}'", err=True)
