"""``saga schedules``: the schedules the relays fire, with their last and next slots."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy import Connection

from saga.cli.options import config_of, db_options, json_option, output_of
from saga.cli.output import fmt_duration, fmt_time
from saga.store.base import Row, Tables

_LIST = """
SELECT name, workflow, spec, catch_up, last_slot, next_slot, last_run_id::text AS last_run_id,
       fired, skipped, updated_at
FROM {schedules} ORDER BY name
"""


def list_schedules(conn: Connection, tables: Tables) -> list[Row]:
    """Every schedule a relay has written, by name."""
    return [dict(r) for r in conn.execute(tables.sql(_LIST)).mappings()]


def _next(row: dict[str, Any], now: datetime) -> str:
    slot = row["next_slot"]
    wait = (slot - now).total_seconds()
    when = "due" if wait <= 0 else "in " + fmt_duration(wait)
    return f"{fmt_time(slot)} ({when})"


@click.command()
@json_option
@db_options
@click.pass_context
def schedules(ctx: click.Context, as_json: bool) -> None:
    """Schedules (declared with saga.Schedule, written by the relays that fire them): their
    workflow, when they fire, their catch-up policy, last and next slot, slots fired and
    skipped. A schedule appears once a relay with it in its registry has started."""
    config = config_of(ctx)
    with config.engine().connect() as conn:
        rows = list_schedules(conn, config.tables())
    out = output_of(ctx)
    if as_json:
        out.json({"schedules": rows})
        return
    now = datetime.now(UTC)
    out.table(
        None,
        ["name", "workflow", "when", "catch-up", "last slot", "next slot", "fired", "skipped",
         "last run"],
        [
            [r["name"], r["workflow"], r["spec"], r["catch_up"], fmt_time(r["last_slot"]),
             _next(r, now), r["fired"], r["skipped"], r["last_run_id"]]
            for r in rows
        ],
    )
    if not rows:
        click.echo("no schedules (a relay writes them when it starts)", err=True)
