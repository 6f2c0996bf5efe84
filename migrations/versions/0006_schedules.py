"""Schedules: one row per declared schedule, holding its next unfired slot. A relay fires a
slot by starting its run and advancing the row in one transaction (the row locked, the update
guarded on the slot it read), so a slot starts one run whatever the number of relays.

Revision ID: 0006_schedules
Revises: 0005_waits
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0006_schedules"
down_revision = "0005_waits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("catch_up", sa.String(8), nullable=False),
        sa.Column("next_slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_id", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("fired", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("skipped", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.CheckConstraint("catch_up IN ('skip', 'all')", name="ck_schedules_catch_up"),
        sa.CheckConstraint(
            "fired >= 0 AND skipped >= 0 AND (last_slot IS NULL OR last_slot < next_slot)",
            name="ck_schedules_slots",
        ),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
        schema=schema,
    )
    # The relays' "what is due" query.
    op.create_index("ix_schedules_next_slot", "schedules", ["next_slot"], schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_index("ix_schedules_next_slot", table_name="schedules", schema=schema)
    op.drop_table("schedules", schema=schema)
