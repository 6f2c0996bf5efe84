"""Commands that change things: operator actions on runs (``retry``, ``rerun``, ``cancel``,
``resolve``), signals (``signal``), migrations (``saga db``) and the relay."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from saga.cli import queries
from saga.cli.config import CliError, Config, ExitCode, load_app, mask_url
from saga.cli.options import app_option, config_of, db_options, json_option, output_of
from saga.store.base import Tables


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on a terminal; without one, refuse unless ``--yes`` was given."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(
            "refusing to act without confirmation: stdin is not a terminal (pass --yes)",
            ExitCode.USAGE,
        )
    if not click.confirm(question, default=False, err=True):
        raise CliError("not confirmed; nothing was changed", ExitCode.ERROR)


def _engine_run(config: Config, ref: str) -> tuple[Any, dict[str, Any]]:
    _, saga = load_app(config.require_app(), database_url=config.database_url, schema=config.schema)
    with saga.engine.connect() as conn:
        run = queries.find_run(conn, Tables(saga.settings.schema), ref)
    return saga, run


def _done(ctx: click.Context, action: str, run: dict[str, Any], state: str, as_json: bool) -> None:
    out = output_of(ctx)
    if as_json:
        out.json({"run_id": run["id"], "action": action, "previous_state": run["state"],
                  "state": state})
    else:
        out.line(f"run {run['id']} ({run['workflow']}): {run['state']} -> {state}")


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


@click.command()
@click.argument("run")
@click.option("--from", "from_step", metavar="STEP", help="Rerun from this step (failed runs).")
@yes_option
@json_option
@app_option
@db_options
@click.pass_context
def retry(ctx: click.Context, run: str, from_step: str | None, yes: bool, as_json: bool) -> None:
    """Retry a failed run from its failed step (or --from STEP), or the failed
    compensations of a compensation_failed run."""
    saga, row = _engine_run(config_of(ctx), run)
    where = f" from step {from_step!r}" if from_step else ""
    confirm(f"Retry run {row['id']} ({row['workflow']}, {row['state']}){where}?", yes)
    _done(ctx, "retry", row, saga.retry(str(row["id"]), from_step), as_json)


@click.command()
@click.argument("run")
@click.option("--reason", help="Why (kept in the run's error and history).")
@yes_option
@json_option
@app_option
@db_options
@click.pass_context
def cancel(ctx: click.Context, run: str, reason: str | None, yes: bool, as_json: bool) -> None:
    """Cancel a running run: it stops, compensates what it did and ends cancelled."""
    saga, row = _engine_run(config_of(ctx), run)
    confirm(f"Cancel run {row['id']} ({row['workflow']}, {row['state']})?", yes)
    _done(ctx, "cancel", row, saga.cancel(str(row["id"]), reason), as_json)


@click.command()
@click.argument("run")
@click.option("--reason", required=True, help="What the operator did (kept in the history).")
@yes_option
@json_option
@app_option
@db_options
@click.pass_context
def resolve(ctx: click.Context, run: str, reason: str, yes: bool, as_json: bool) -> None:
    """Mark a compensation_failed run resolved by hand."""
    saga, row = _engine_run(config_of(ctx), run)
    confirm(f"Mark run {row['id']} ({row['workflow']}, {row['state']}) resolved?", yes)
    _done(ctx, "resolve", row, saga.resolve(str(row["id"]), reason), as_json)


@click.command()
@click.argument("run")
@yes_option
@json_option
@app_option
@db_options
@click.pass_context
def rerun(ctx: click.Context, run: str, yes: bool, as_json: bool) -> None:
    """Start a finished run again as a new run of its workflow (newest version), with its
    input and business key; the key then names the new run ('saga list --key' shows both)."""
    saga, row = _engine_run(config_of(ctx), run)
    confirm(f"Start run {row['id']} ({row['workflow']}, {row['state']}) again as a new run?", yes)
    started = saga.rerun(str(row["id"]))
    out = output_of(ctx)
    if as_json:
        out.json({"run_id": started.run_id, "action": "rerun", "rerun_of": row["id"],
                  "workflow": row["workflow"], "key": row["business_key"]})
    else:
        out.line(f"run {row['id']} ({row['workflow']}, {row['state']}): "
                 f"started again as run {started.run_id}")


@click.group()
def db() -> None:
    """Migrate saga's tables in the configured database and schema."""


@contextlib.contextmanager
def _revision_errors(revision: str) -> Iterator[None]:
    """Alembic's errors about a revision (unknown, ambiguous, not reachable) as a usage error
    naming it."""
    from alembic.util.exc import CommandError

    try:
        yield
    except CommandError as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CliError(f"bad --revision {revision!r}: {detail}", ExitCode.USAGE) from None


@db.command()
@click.option("--revision", default="head", show_default=True)
@db_options
@click.pass_context
def upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate up to REVISION."""
    from saga.db import migrate

    config = config_of(ctx)
    config.tables()
    with _revision_errors(revision):
        migrate.upgrade(config.engine(), schema=config.schema, revision=revision)
    now = migrate.current(config.engine(), schema=config.schema)
    output_of(ctx).line(
        f"{mask_url(config.url())} schema {config.schema}: at revision {now or 'base'}"
    )


@db.command()
@click.option("--revision", default="base", show_default=True, help="'base' drops every table.")
@yes_option
@db_options
@click.pass_context
def downgrade(ctx: click.Context, revision: str, yes: bool) -> None:
    """Migrate down to REVISION (by default base: saga's tables and data are dropped).

    Data is lost: the tables and columns the downgrade removes go with what they hold."""
    from saga.db import migrate

    config = config_of(ctx)
    config.tables()
    dropped = "every saga table is" if revision == "base" else "newer tables and columns are"
    confirm(
        f"Downgrade schema {config.schema} of {mask_url(config.url())} to {revision}? "
        f"Data will be lost: {dropped} dropped with the runs' data in them.",
        yes,
    )
    with _revision_errors(revision):
        migrate.downgrade(config.engine(), schema=config.schema, revision=revision)
    now = migrate.current(config.engine(), schema=config.schema)
    output_of(ctx).line(
        f"{mask_url(config.url())} schema {config.schema}: at revision {now or 'base'}"
    )


@db.command()
@json_option
@db_options
@click.pass_context
def current(ctx: click.Context, as_json: bool) -> None:
    """Print the revision the schema is at and the newest one this saga ships."""
    from saga.db import migrate

    config = config_of(ctx)
    config.tables()
    now = migrate.current(config.engine(), schema=config.schema)
    head = migrate.head()
    doc = {"schema": config.schema, "current": now, "head": head, "up_to_date": now == head}
    out = output_of(ctx)
    if as_json:
        out.json(doc)
    else:
        note = "up to date" if now == head else "needs 'saga db upgrade'"
        out.line(f"schema {config.schema}: at {now or 'base (not migrated)'}, head {head} ({note})")


@click.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True)
@click.option(
    "--poll-interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
    help="Seconds between polls when no notification arrives.",
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
    help="Serve /metrics (Prometheus text format) on this port.",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option(
    "--retention", envvar="SAGA_RETENTION", metavar="DURATION",
    help="Also prune runs finished longer ago than this (30d, 12h...) [env SAGA_RETENTION].",
)
@app_option
@click.pass_context
def relay(
    ctx: click.Context,
    batch_size: int,
    poll_interval: float,
    metrics_port: int | None,
    metrics_host: str,
    retention: str | None,
) -> int:
    """Run the outbox relay (and sweeper) for the engine bound to --app, until SIGTERM."""
    config = config_of(ctx)
    app = config.require_app()
    celery_app, _ = load_app(app, database_url=config.database_url, schema=config.schema)
    if celery_app is None:
        raise CliError(
            f"{app!r} is not a Celery app: the relay publishes through one "
            "(pass --app module:celery_app, the app saga.install() was called on)",
            ExitCode.CONFIG,
        )
    from saga import relay as relay_module
    from saga.cli.admin import duration, start_metrics

    keep = duration(retention, "--retention")
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    if metrics_port is not None:
        start_metrics(metrics_port, metrics_host)
    return int(
        relay_module.main(
            app, batch_size=batch_size, poll_interval=poll_interval, retention=keep
        )
    )


@click.command()
@click.argument("run")
@click.argument("name")
@click.option("--data", "data", default="null", metavar="JSON",
              help="The signal's payload, a JSON document [default null].")
@json_option
@app_option
@db_options
@click.pass_context
def signal(ctx: click.Context, run: str, name: str, data: str, as_json: bool) -> None:
    """Send the run (id or business key) the signal NAME with a JSON payload: a step waiting
    for it completes; one sent early is kept for its wait; a duplicate is ignored. A run that
    is not running refuses it (exit 4)."""
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise CliError(f"--data is not JSON: {exc}", ExitCode.USAGE) from None
    saga, row = _engine_run(config_of(ctx), run)
    outcome = saga.signal_now(str(row["id"]), name, payload)
    out = output_of(ctx)
    if as_json:
        out.json({"run_id": row["id"], "signal": name, "outcome": outcome})
    else:
        out.line(f"run {row['id']} ({row['workflow']}): signal {name!r} {outcome}")


COMMANDS = (retry, rerun, cancel, resolve, signal, db, relay)
"""The commands this module adds to ``saga``."""
