"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from saga.cli.config import Config
from saga.cli.output import Output

F = TypeVar("F", bound=Callable[..., Any])


def set_config(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """An option callback storing a given value as the :class:`Config` attribute ``name``."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(ctx.ensure_object(Config), name, value)

    return callback


def db_options(fn: F) -> F:
    """Add ``--database-url`` and ``--schema`` to a subcommand (they override the group's)."""
    fn = click.option(
        "--schema", callback=set_config("schema"), expose_value=False, is_eager=True,
        help="Schema of saga's tables [env SAGA_SCHEMA; default saga].",
    )(fn)
    fn = click.option(
        "--database-url", callback=set_config("database_url"), expose_value=False, is_eager=True,
        metavar="URL", help="PostgreSQL URL [env SAGA_DATABASE_URL].",
    )(fn)
    return fn


def app_option(fn: F) -> F:
    """Add ``--app module:celery_app`` (env ``SAGA_APP``) to a subcommand."""
    return click.option(
        "--app", "-A", callback=set_config("app"), expose_value=False, is_eager=True,
        envvar="SAGA_APP", metavar="MODULE:ATTR",
        help="Celery app with saga installed (or a Saga / Registry) [env SAGA_APP].",
    )(fn)


def json_option(fn: F) -> F:
    """Add ``--json`` to a read command."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def config_of(ctx: click.Context) -> Config:
    """The command line's :class:`Config`."""
    return ctx.ensure_object(Config)


def output_of(ctx: click.Context) -> Output:
    """An :class:`Output` honouring ``--rich/--plain``."""
    return Output(config_of(ctx).rich)
