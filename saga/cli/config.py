"""What every command shares: exit codes, the CLI's error type, database settings and
loading the user's app (``module:attribute``)."""

from __future__ import annotations

import enum
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from saga.app import Saga, normalize_url
from saga.db.migrate import check_schema_name
from saga.registry import Registry
from saga.store.base import Tables

CONNECT_TIMEOUT = 5
"""Seconds to wait for the database server before giving up (``SAGA_CONNECT_TIMEOUT``)."""


class ExitCode(enum.IntEnum):
    """The exit statuses of ``saga``; scripts may rely on them."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    INVALID_STATE = 4
    UNAVAILABLE = 5
    CONFIG = 6


class CliError(Exception):
    """An error reported as one ``saga: error: ...`` line and a named exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (safe to print)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def scrub(message: str, url: str | None) -> str:
    """``message`` with the password of ``url`` (if any) replaced by ``***``."""
    if url:
        try:
            password = make_url(url).password
        except ArgumentError:
            password = None
        if password:
            message = message.replace(str(password), "***")
    return message


@dataclass
class Config:
    """Database URL, schema and app spec, from flags or the environment."""

    database_url: str | None = None
    schema: str = "saga"
    app: str | None = None
    rich: bool | None = None
    _engine: Engine | None = field(default=None, repr=False)

    def url(self) -> str:
        """The database URL, or a ``CONFIG`` error when none is configured."""
        if not self.database_url:
            raise CliError(
                "no database configured: set SAGA_DATABASE_URL or pass --database-url",
                ExitCode.CONFIG,
            )
        return normalize_url(self.database_url)

    def tables(self) -> Tables:
        """Schema-qualified table names for the configured schema."""
        try:
            return Tables(check_schema_name(self.schema))
        except ValueError as exc:
            raise CliError(f"bad schema name: {exc}", ExitCode.CONFIG) from None

    def engine(self) -> Engine:
        """An engine on the configured database (no pool: the CLI makes a few queries)."""
        if self._engine is None:
            url = self.url()
            timeout = int(os.environ.get("SAGA_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
            try:
                self._engine = create_engine(
                    url,
                    poolclass=NullPool,
                    connect_args={
                        "connect_timeout": timeout,
                        "application_name": "saga-cli",
                    },
                )
            except ArgumentError as exc:
                raise CliError(f"bad database URL: {exc}", ExitCode.CONFIG) from None
            except ImportError as exc:
                raise CliError(f"database driver missing: {exc}", ExitCode.CONFIG) from None
        return self._engine

    def close(self) -> None:
        """Dispose of the engine, if one was made."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def require_app(self) -> str:
        """The ``--app`` spec, or a ``CONFIG`` error naming the flag."""
        if not self.app:
            raise CliError(
                "this command needs the workflow registry: pass --app module:celery_app "
                "or set SAGA_APP",
                ExitCode.CONFIG,
            )
        return self.app


def _import_attr(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--app must look like module:attribute, got {spec!r}", ExitCode.CONFIG)
    if os.getcwd() not in sys.path and "" not in sys.path:
        # Like `celery -A`, find modules in the current directory.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}", ExitCode.CONFIG) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(
                f"module {module_name!r} has no attribute {attr!r}", ExitCode.CONFIG
            ) from None
    return obj


def load_app(
    spec: str, *, database_url: str | None = None, schema: str | None = None
) -> tuple[Any, Saga]:
    """Import ``module:attribute`` and return ``(celery_app, saga)``.

    The attribute may be a Celery app with a saga engine installed (the engine comes from
    :func:`saga.celery_adapter.engine_of`), a :class:`~saga.app.Saga`, or a
    :class:`~saga.registry.Registry` (then an engine is made on ``database_url`` and
    ``schema``). ``celery_app`` is ``None`` unless the attribute is a Celery app.
    """
    obj = _import_attr(spec)
    if isinstance(obj, Saga):
        return None, obj
    if isinstance(obj, Registry):
        from saga.settings import Settings

        if not database_url:
            raise CliError(
                "no database configured: set SAGA_DATABASE_URL or pass --database-url",
                ExitCode.CONFIG,
            )
        settings = Settings.from_env(**({"schema": schema} if schema else {}))
        return None, Saga(obj, database_url=database_url, settings=settings)
    try:
        from celery import Celery
    except ImportError:  # pragma: no cover - celery is a dependency
        Celery = None  # noqa: N806
    if Celery is not None and isinstance(obj, Celery):
        from saga.celery_adapter import engine_of
        from saga.errors import SagaError

        try:
            return obj, engine_of(obj)
        except SagaError as exc:
            raise CliError(f"{spec}: {exc}", ExitCode.CONFIG) from None
    raise CliError(
        f"{spec!r} is a {type(obj).__name__}, not a Celery app, a Saga or a Registry",
        ExitCode.CONFIG,
    )


def load_registry(spec: str, config: Config) -> tuple[Registry, Saga | None]:
    """The workflow registry named by ``spec``, and its engine unless ``spec`` names a bare
    :class:`~saga.registry.Registry` and no database is configured."""
    if not config.database_url:
        obj = _import_attr(spec)
        if isinstance(obj, Registry):
            return obj, None
    _, saga = load_app(spec, database_url=config.database_url, schema=config.schema)
    return saga.registry, saga
