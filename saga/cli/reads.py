"""``saga status`` (overview, or one run) and ``saga list``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from saga import tracebacks
from saga.cli import docs, queries
from saga.cli.options import config_of, db_options, json_option, output_of
from saga.cli.output import Output, between, fmt_duration, fmt_time, one_line
from saga.db.states import RUN_STATES
from saga.presence import STALE_AFTER

MAX_PAGE = 1_000_000
"""The highest ``--page`` (deeper pages are cheaper to reach with ``--before``)."""


@click.command()
@click.argument("run", required=False)
@click.option("--full", is_flag=True, help="With RUN: show input and results whole.")
@click.option(
    "--check", is_flag=True,
    help="Exit with a warning's code (10-13, see below) when any warning holds.",
)
@click.option(
    "--stale-after", type=click.FloatRange(min=0.1), default=STALE_AFTER,
    show_default=True, metavar="SECONDS", help="A process not seen for this long is gone.",
)
@click.option(
    "--outbox-age", type=click.FloatRange(min=0), default=docs.OUTBOX_AGE, show_default=True,
    metavar="SECONDS", help="Warn when the oldest due unpublished message is older.",
)
@json_option
@db_options
@click.pass_context
def status(
    ctx: click.Context,
    run: str | None,
    full: bool,
    check: bool,
    stale_after: float,
    outbox_age: float,
    as_json: bool,
) -> int:
    """Overview of the system, or the details of RUN (a run id, a unique prefix of 8 or more
    of its characters, or its business key).

    The overview shows runs by workflow and state, the outbox backlog, steps running past
    their lease, runs waiting for an operator, the live workers and relays, and warnings.
    With --check it exits 10 when no relay is live, 11 when a queue has waiting steps and no
    live worker consumes it, 12 when runs wait for a workflow definition no live worker has,
    13 when the oldest due outbox message is older than --outbox-age (the first that holds).
    """
    config = config_of(ctx)
    tables = config.tables()
    out = output_of(ctx)
    limits = docs.Thresholds(stale_after=stale_after, outbox_age=outbox_age)
    with config.engine().connect() as conn:
        doc = (
            docs.overview(conn, tables, limits) if run is None
            else docs.run_detail(conn, tables, run)
        )
    if as_json:
        out.json(doc)
    elif run is None:
        _print_overview(out, doc)
    else:
        _print_run(out, doc, full)
    if check and run is None and doc["warnings"]:
        return int(min(w["exit_code"] for w in doc["warnings"]))
    return 0


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
    out.line()
    live = [p for p in doc["processes"] if p["live"]]
    out.line(f"Live processes: {len(live)}", style="bold")
    if doc["processes"]:
        out.table(
            None,
            ["kind", "name", "pid", "version", "queues", "definitions", "last seen"],
            [
                [p["kind"], p["name"], p["pid"], p["version"], ",".join(p["queues"]) or "-",
                 len(p["definitions"]),
                 f"{fmt_duration(p['seen_seconds_ago'])} ago" + ("" if p["live"] else " (gone)")]
                for p in doc["processes"]
            ],
        )
    out.line()
    out.line(f"Warnings: {len(doc['warnings'])}", style="bold red" if doc["warnings"] else "bold")
    for w in doc["warnings"]:
        out.line(f"  WARNING {w['code']}: {w['message']}", style="red")


def _bounded(value: Any, full: bool, width: int = 100) -> str:
    if value is None:
        return "-"
    text = json.dumps(value, default=str, indent=2 if full else None, ensure_ascii=False)
    return text if full else one_line(text, width)


def _waits(step: dict[str, Any]) -> str | None:
    """What a suspended step waits for, shown in place of its (not yet known) result."""
    if step.get("state") != "suspended":
        return None
    if step.get("wake_at") is None:
        return "waits for its child run"
    until = fmt_time(step.get("wake_at"))
    if step.get("signal"):
        return f"waits for signal {step['signal']!r} until {until}"
    return f"sleeps until {until}"


def _parent(parent: dict[str, Any]) -> str:
    return (f"{parent['id']} ({parent['workflow']}, step {parent['step']}, "
            f"attempt {parent['attempt']}, {parent['state']})")


def _print_run(out: Output, doc: dict[str, Any], full: bool = False) -> None:
    run = doc["run"]
    error = doc["latest_error"]
    out.fields(
        f"Run {run['id']}",
        [
            ("workflow", f"{run['workflow']} v{run['version']}"),
            ("state", run["state"]),
            ("key", run["business_key"]),
            ("started", fmt_time(run["created_at"])),
            ("finished", fmt_time(run["finished_at"])),
            ("duration", fmt_duration(run["duration_seconds"])),
            ("input", _bounded(run["input"], full)),
            *([("result", _bounded(run["result"], full))] if run["result"] is not None else []),
            *([("error", one_line(error.get("message", error), 100))] if error else []),
            *([("parent", _parent(doc["parent"]))] if doc.get("parent") else []),
        ],
    )
    if doc.get("children"):
        out.line()
        out.table(
            "Children",
            ["run", "workflow", "state", "step", "attempt"],
            [[c["id"], f"{c['workflow']} v{c['version']}", c["state"], c["step"], c["attempt"]]
             for c in doc["children"]],
            state_column=2,
        )
    for title, rows in (("Steps", doc["steps"]), ("Compensations", doc["compensations"])):
        if not rows and title == "Compensations":
            continue
        out.line()
        out.table(
            title,
            ["step", "state", "attempt", "started", "duration", "result", "last error"],
            [
                [s["step"], s["state"], s["attempt"], fmt_time(s["started_at"]),
                 fmt_duration(s["duration_seconds"]),
                 _waits(s) or _bounded(s["result"], full, 40),
                 one_line(s["error_message"] or "-", 60)]
                for s in rows
            ],
            state_column=1,
        )
    for m in doc.get("maps", ()):
        out.line()
        counts = ", ".join(f"{n} {state}" for state, n in sorted(m["counts"].items()))
        what = "compensations of map" if m["kind"] == "compensation" else "map"
        out.line(f"{what.capitalize()} {m['map']!r}: {m['instances']} instances ({counts})",
                 style="bold")
        for s in m["failed"]:
            out.line(f"  failed {s['step']} attempt {s['attempt']}: "
                     f"{one_line(s['error_message'] or '-', 80)}", style="red")
    if error:
        out.line()
        where = f" in {error['kind']} {error['step']!r}" if error.get("step") else ""
        attempt = f", attempt {error['attempt']}" if error.get("attempt") else ""
        out.line(f"Latest error{where}{attempt}", style="bold")
        out.line(f"  {error.get('type') or 'error'}: {one_line(error.get('message', ''), 300)}")
        for line in tracebacks.render(error.get("traceback")):
            out.line("  " + line)
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
    if doc.get("instance_events"):
        out.line(f"  ({doc['instance_events']} events of map instances not shown)")


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
