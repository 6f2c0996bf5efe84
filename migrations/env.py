"""Alembic environment for saga's own schema. It is run through :mod:`saga.db.migrate`, which
passes the connection and the schema name; saga's version table lives in that schema, so these
migrations never meet the application's own."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

config = context.config
connection = config.attributes["connection"]
schema: str = config.attributes["schema"]

connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
context.configure(
    connection=connection,
    version_table="saga_alembic_version",
    version_table_schema=schema,
    include_schemas=False,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
