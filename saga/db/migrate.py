"""Run saga's Alembic migrations against a database, in saga's own schema and version table."""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, inspect

if TYPE_CHECKING:  # alembic is imported when migrating, not on every `import saga`
    from alembic.config import Config

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
VERSION_TABLE = "saga_alembic_version"


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lower-case SQL identifier, else raise ``ValueError``."""
    if not _IDENT.match(schema):
        raise ValueError(f"schema name {schema!r} must match {_IDENT.pattern}")
    return schema


def _config(schema: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("saga.migrations")))
    cfg.attributes["schema"] = check_schema_name(schema)
    return cfg


def _engine(url_or_engine: str | Engine) -> Engine:
    return create_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine


def upgrade(url_or_engine: str | Engine, schema: str = "saga", revision: str = "head") -> None:
    """Migrate saga's schema up to ``revision``."""
    from alembic import command

    engine = _engine(url_or_engine)
    cfg = _config(schema)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(url_or_engine: str | Engine, schema: str = "saga", revision: str = "base") -> None:
    """Migrate saga's schema down to ``revision`` (``base`` removes every table)."""
    from alembic import command

    engine = _engine(url_or_engine)
    cfg = _config(schema)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current(url_or_engine: str | Engine, schema: str = "saga") -> str | None:
    """The revision saga's schema is at, or ``None`` when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url_or_engine)
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE, schema=check_schema_name(schema)):
            return None
        ctx = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
        )
        return ctx.get_current_revision()


def head() -> str | None:
    """The newest revision this version of saga ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("saga")).get_current_head()
