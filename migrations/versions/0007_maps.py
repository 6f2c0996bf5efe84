"""Maps over a list: an instance of a map is a step row of its own (``label[00042]``) holding
its item, made when the map expands. No constraint changes.

Revision ID: 0007_maps
Revises: 0006_schedules
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0007_maps"
down_revision = "0006_schedules"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("step_runs", sa.Column("item", pg.JSONB(), nullable=True), schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    # The instances' rows stay (an engine of the older version cannot run them: a worker of
    # this version is needed to finish a run that has them); only their items go.
    op.drop_column("step_runs", "item", schema=schema)
