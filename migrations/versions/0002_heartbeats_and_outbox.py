"""Outbox rows back off when published again, and count deferrals by workers without the run's
definition.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("outbox", sa.Column("republish_at", TZ), schema=schema)
    op.add_column(
        "outbox",
        sa.Column("deferrals", sa.Integer(), server_default="0", nullable=False),
        schema=schema,
    )
    op.execute(
        f'UPDATE "{schema}".outbox SET republish_at = published_at + interval \'300 seconds\' '
        "WHERE published_at IS NOT NULL"
    )
    op.drop_index("ix_outbox_published", table_name="outbox", schema=schema)
    op.create_index(
        "ix_outbox_republish", "outbox", ["republish_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"), schema=schema,
    )
    # Runs completed under the old two-statement finish by a worker that died in between:
    # a run is finished when it says so.
    op.execute(
        f'UPDATE "{schema}".runs SET finished_at = updated_at '
        "WHERE state = 'completed' AND finished_at IS NULL"
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_index("ix_outbox_republish", table_name="outbox", schema=schema)
    op.create_index(
        "ix_outbox_published", "outbox", ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"), schema=schema,
    )
    op.drop_column("outbox", "deferrals", schema=schema)
    op.drop_column("outbox", "republish_at", schema=schema)
