"""The ``saga`` command: the group, its shared options and the error handling that turns every
failure into one ``saga: error: ...`` line and a named exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from saga.cli.config import CliError, Config, ExitCode, mask_url, scrub
from saga.cli.options import set_config
from saga.errors import (
    InvalidTransitionError,
    SagaError,
    SignalRefusedError,
    UnknownRunError,
    UnknownWorkflowError,
)


class SagaGroup(click.Group):
    """A group whose ``main`` reports errors as one line with a named exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; exit with an :class:`ExitCode`."""
        config = Config()
        extra.setdefault("obj", config)
        try:
            rv = super().main(
                args, prog_name, complete_var, standalone_mode=False, **extra
            )
            code = int(rv) if isinstance(rv, int) else ExitCode.OK
        except BaseException as exc:
            code = report(exc, config)
        finally:
            config.close()
        if standalone_mode:
            sys.exit(code)
        return code


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _error(message: str, config: Config) -> None:
    click.echo("saga: error: " + " ".join(scrub(message, config.database_url).split()), err=True)


def report(exc: BaseException, config: Config) -> ExitCode:
    """Print ``exc`` as one ``saga: error:`` line and return its exit code."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if isinstance(code, int) and code in {c.value for c in ExitCode}:
            return ExitCode(code)
        return ExitCode.OK if code is None else ExitCode.ERROR
    if isinstance(exc, click.exceptions.Exit):
        return ExitCode.OK if exc.exit_code == 0 else ExitCode.ERROR
    if isinstance(exc, click.ClickException):
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        _error(exc.format_message() + hint, config)
        return ExitCode.USAGE if isinstance(exc, click.UsageError) else ExitCode.ERROR
    if isinstance(exc, click.Abort | KeyboardInterrupt | EOFError):
        _error("aborted", config)
        return ExitCode.ERROR
    if isinstance(exc, CliError):
        _error(exc.message, config)
        return exc.code
    if isinstance(exc, UnknownRunError | UnknownWorkflowError):
        _error(str(exc), config)
        return ExitCode.NOT_FOUND
    if isinstance(exc, InvalidTransitionError | SignalRefusedError):
        _error(str(exc), config)
        return ExitCode.INVALID_STATE
    if isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        where = mask_url(config.url()) if config.database_url else "the database"
        _error(f"cannot reach {where}: {_first_line(exc)}", config)
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ProgrammingError) and "does not exist" in _first_line(exc):
        _error(
            f"{_first_line(exc)} (is schema {config.schema!r} migrated? run 'saga db upgrade')",
            config,
        )
        return ExitCode.CONFIG
    if isinstance(exc, DBAPIError):
        _error(f"database error: {_first_line(exc)}", config)
        return ExitCode.ERROR
    if isinstance(exc, SagaError):
        _error(str(exc), config)
        return ExitCode.ERROR
    if os.environ.get("SAGA_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    _error(f"unexpected {type(exc).__name__}: {exc} (set SAGA_DEBUG=1 for a traceback)", config)
    return ExitCode.ERROR


@click.group(cls=SagaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url", envvar="SAGA_DATABASE_URL", callback=set_config("database_url"),
    expose_value=False, metavar="URL", help="PostgreSQL URL [env SAGA_DATABASE_URL].",
)
@click.option(
    "--schema", envvar="SAGA_SCHEMA", callback=set_config("schema"), expose_value=False,
    help="Schema of saga's tables [env SAGA_SCHEMA; default saga].",
)
@click.option(
    "--app", "-A", envvar="SAGA_APP", callback=set_config("app"), expose_value=False,
    metavar="MODULE:ATTR", help="Celery app with saga installed [env SAGA_APP].",
)
@click.option(
    "--rich/--plain", "rich", default=None, callback=set_config("rich"), expose_value=False,
    help="Force terminal (rich) or plain output; by default rich only on a terminal.",
)
@click.version_option(package_name="saga", prog_name="saga")
def cli() -> None:
    """Operate saga: inspect runs, draw workflows, act on stuck runs, migrate the database.

    Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid state, 5 database
    unavailable, 6 configuration; 'saga status --check': 10-13, one per warning.
    """


def _register() -> None:
    from saga.cli import admin, graph, ops, reads, schedules

    cli.add_command(reads.status)
    cli.add_command(reads.list_)
    cli.add_command(schedules.schedules)
    cli.add_command(graph.graph)
    for cmd in (*ops.COMMANDS, *admin.COMMANDS):
        cli.add_command(cmd)


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``saga`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="saga")


if __name__ == "__main__":
    main()
