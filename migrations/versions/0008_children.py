"""Child sagas: a run may be the child of a step attempt of another run (its parent). A child
step's row waits ``suspended`` (no ``wake_at``: nothing but its child's end wakes it); the
relay finds finished children of suspended steps through the parent columns' partial index.

Revision ID: 0008_children
Revises: 0007_maps
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0008_children"
down_revision = "0007_maps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("runs", sa.Column("parent_run_id", pg.UUID(as_uuid=True)), schema=schema)
    op.add_column("runs", sa.Column("parent_step", sa.String(100)), schema=schema)
    op.add_column("runs", sa.Column("parent_attempt", sa.Integer()), schema=schema)
    op.create_foreign_key(
        "fk_runs_parent_run_id_runs", "runs", "runs", ["parent_run_id"], ["id"],
        source_schema=schema, referent_schema=schema, ondelete="SET NULL",
    )
    op.create_index(
        "ix_runs_parent", "runs", ["parent_run_id", "parent_step", "parent_attempt"],
        postgresql_where=sa.text("parent_run_id IS NOT NULL"), schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    # A step waiting for its child goes back to ready: the old engine cannot wait for it (a
    # worker of this version is needed to finish it); the children stay, as plain runs.
    op.execute(
        f"UPDATE \"{schema}\".step_runs SET state = 'ready' "
        "WHERE state = 'suspended' AND wake_at IS NULL"
    )
    op.drop_index("ix_runs_parent", table_name="runs", schema=schema)
    op.drop_constraint("fk_runs_parent_run_id_runs", "runs", type_="foreignkey", schema=schema)
    op.drop_column("runs", "parent_attempt", schema=schema)
    op.drop_column("runs", "parent_step", schema=schema)
    op.drop_column("runs", "parent_run_id", schema=schema)
