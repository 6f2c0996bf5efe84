"""A business key names one unfinished run at most (finished ones stay, the newest is the key's
run), and the runs table notifies when a run ends, for callers waiting on it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNFINISHED = "state IN ('running', 'compensating', 'cancelling', 'compensation_failed')"
ENDED = (
    "'completed', 'compensated', 'failed', 'cancelled', 'resolved', 'compensation_failed'"
)


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_index(
        "ix_runs_workflow_business_key_created_at", "runs",
        ["workflow", "business_key", "created_at"],
        postgresql_where=sa.text("business_key IS NOT NULL"), schema=schema,
    )
    op.drop_index("uq_runs_workflow_business_key", table_name="runs", schema=schema)
    op.create_index(
        "uq_runs_workflow_business_key_unfinished", "runs", ["workflow", "business_key"],
        unique=True, postgresql_where=sa.text(f"business_key IS NOT NULL AND {UNFINISHED}"),
        schema=schema,
    )
    # Callers waiting on a run (RunHandle.wait) register in run_waiters and LISTEN on
    # "<schema>_runs"; the payload is the run's id. A run that ends notifies, in the transaction
    # that ends it, only if someone waits on it: every notification costs each listening
    # backend of the database (the relay's, too) a transaction to read it.
    op.create_table(
        "run_waiters",
        sa.Column("id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_run_waiters"),
        schema=schema,
    )
    op.create_index("ix_run_waiters_run_id", "run_waiters", ["run_id"], schema=schema)
    op.execute(
        f"""
        CREATE FUNCTION "{schema}".notify_run_ended() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM "{schema}".run_waiters WHERE run_id = NEW.id) THEN
                PERFORM pg_notify('{schema}_runs', NEW.id::text);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER runs_notify_ended AFTER UPDATE OF state ON "{schema}".runs
            FOR EACH ROW WHEN (NEW.state IN ({ENDED}) AND OLD.state IS DISTINCT FROM NEW.state)
            EXECUTE FUNCTION "{schema}".notify_run_ended();
        """
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.execute(f'DROP TRIGGER IF EXISTS runs_notify_ended ON "{schema}".runs')
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".notify_run_ended()')
    op.drop_table("run_waiters", schema=schema)
    op.drop_index("uq_runs_workflow_business_key_unfinished", table_name="runs", schema=schema)
    # Fails while a key names several runs of one workflow: delete (or re-key) the older ones
    # first, since the old schema allowed one run per key.
    op.create_index(
        "uq_runs_workflow_business_key", "runs", ["workflow", "business_key"], unique=True,
        postgresql_where=sa.text("business_key IS NOT NULL"), schema=schema,
    )
    op.drop_index("ix_runs_workflow_business_key_created_at", table_name="runs", schema=schema)
