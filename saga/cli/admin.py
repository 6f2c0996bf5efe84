"""``saga prune`` (retention) and ``saga dashboard`` (the web view), and what the relay's
``--metrics-port`` and ``--retention`` share with them."""

from __future__ import annotations

import os

import click

from saga.cli.config import CliError, ExitCode, load_app
from saga.cli.options import app_option, config_of, db_options, json_option, output_of
from saga.db.states import RUN_FINISHED
from saga.errors import SagaError


def duration(text: str | None, flag: str) -> float | None:
    """``text`` (``30d``, ``12h``...) in seconds, or a ``USAGE`` error naming ``flag``."""
    if text is None:
        return None
    from saga.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}", ExitCode.USAGE) from None


def start_metrics(port: int, host: str) -> None:
    """Serve ``/metrics`` on ``host:port``, or a ``CONFIG`` error saying what is missing."""
    from saga import prometheus

    try:
        prometheus.serve(port, host)
    except SagaError as exc:
        raise CliError(str(exc), ExitCode.CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc}", ExitCode.CONFIG) from None


@click.command()
@click.option(
    "--finished-before", "older", required=True, metavar="DURATION",
    help="Prune runs that finished longer ago than this (30d, 12h, 90m...).",
)
@click.option(
    "--state", "states", multiple=True, type=click.Choice(RUN_FINISHED),
    help="Only runs in this state (repeatable; default every finished state).",
)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option(
    "--pause", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
    help="Sleep this long between batches (leaves the hot path room on a busy machine).",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@db_options
@click.pass_context
def prune(
    ctx: click.Context,
    older: str,
    states: tuple[str, ...],
    batch_size: int,
    pause: float,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete finished runs (with their steps, history and outbox rows) in batches, each its
    own short transaction. Unfinished runs (running, compensating, cancelling,
    compensation_failed) are never touched."""
    from saga.cli.ops import confirm
    from saga.retention import Retention

    seconds = duration(older, "--finished-before")
    assert seconds is not None
    config = config_of(ctx)
    retention = Retention(
        config.engine(), config.tables(), seconds, states=states, batch_size=batch_size
    )
    out = output_of(ctx)
    counts = retention.preview()
    total = sum(counts.values())
    if not dry_run and total:
        confirm(f"Delete {total} finished run(s) older than {older}?", yes)
        counts = retention.run(pause=pause)
        total = sum(counts.values())
    if as_json:
        out.json({"dry_run": dry_run, "finished_before": older, "runs": total, "by_state": counts})
        return
    verb = "would delete" if dry_run else "deleted"
    detail = ", ".join(f"{s} {n}" for s, n in counts.items() if n) or "none"
    out.line(f"{verb} {total} run(s) finished more than {older} ago ({detail})")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@app_option
@db_options
@click.pass_context
def dashboard(ctx: click.Context, host: str, port: int) -> None:
    """Serve the web dashboard (read-only unless SAGA_DASHBOARD_TOKEN is set; operator
    actions also need --app for the workflow definitions)."""
    config = config_of(ctx)
    try:
        import uvicorn

        from saga.dashboard.app import create_app
    except ImportError as exc:
        raise CliError(
            f"the dashboard needs the saga[dashboard] extra ({exc.name} is missing)",
            ExitCode.CONFIG,
        ) from None
    saga = None
    if config.app:
        _, saga = load_app(config.app, database_url=config.database_url, schema=config.schema)
    app = create_app(
        config.engine(), config.tables(), saga=saga,
        token=os.environ.get("SAGA_DASHBOARD_TOKEN") or None,
    )
    click.echo(f"saga dashboard on http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


COMMANDS = (prune, dashboard)
"""The commands this module adds to ``saga``."""
