"""Real-PostgreSQL test databases: a migrated template made once per session, cloned per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# One template per pytest process: concurrent sessions must not drop each other's.
TEMPLATE = f"saga_test_template_{os.getpid()}"
PREFIX = "saga_test_"


def base_url() -> URL:
    """The SQLAlchemy URL of the server's maintenance database (``SAGA_TEST_DATABASE_URL``)."""
    return make_url(os.environ.get("SAGA_TEST_DATABASE_URL", DEFAULT_URL))


def sqlalchemy_url(dbname: str) -> str:
    """A ``postgresql+psycopg://`` URL of database ``dbname`` on the test server."""
    url = base_url().set(drivername="postgresql+psycopg", database=dbname)
    return url.render_as_string(hide_password=False)


def libpq_url(dbname: str) -> str:
    """The plain libpq form (``postgresql://...``) of database ``dbname``, for psycopg."""
    url = base_url().set(drivername="postgresql", database=dbname)
    return url.render_as_string(hide_password=False)


@contextmanager
def admin() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the maintenance database, for CREATE/DROP DATABASE."""
    dbname = base_url().database or "postgres"
    with psycopg.connect(libpq_url(dbname), autocommit=True) as conn:
        yield conn


def random_name() -> str:
    """A fresh database name, unlikely to collide with a parallel run."""
    return PREFIX + secrets.token_hex(6)


def create_database(name: str, template: str | None = None) -> None:
    """Create database ``name``, cloned from ``template`` when given."""
    with admin() as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )


def drop_database(name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting whoever still uses it."""
    with admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def create_template() -> str:
    """(Re)create the migrated template database and return its name."""
    from saga.db import migrate

    drop_database(TEMPLATE)
    create_database(TEMPLATE)
    from sqlalchemy import create_engine

    engine = create_engine(sqlalchemy_url(TEMPLATE))
    try:
        migrate.upgrade(engine, schema="saga")
    finally:
        engine.dispose()
    return TEMPLATE
