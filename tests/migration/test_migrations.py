"""saga's migrations on a real PostgreSQL: up, down, into another schema, and no drift from the
models."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from saga.db import migrate
from saga.db.models import Base

SAGA_TABLES = {
    "runs", "step_runs", "outbox", "history", "processes", "run_counts", "run_count_deltas",
    "run_waiters", "signals", "schedules",
}


def tables(url: str, schema: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names(schema=schema))
    finally:
        engine.dispose()


def test_an_unmigrated_database_has_no_current_revision(empty_db_url: str) -> None:
    assert migrate.current(empty_db_url) is None
    assert migrate.head() is not None


def test_upgrading_an_empty_database_reaches_head(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)

    assert migrate.current(empty_db_url) == migrate.head()
    assert tables(empty_db_url, "saga") == SAGA_TABLES | {migrate.VERSION_TABLE}
    assert "saga_alembic_version" not in tables(empty_db_url, "public")


def test_upgrading_twice_changes_nothing(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    migrate.upgrade(empty_db_url)

    assert migrate.current(empty_db_url) == migrate.head()


def test_downgrading_to_base_leaves_no_saga_tables(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)

    migrate.downgrade(empty_db_url, revision="base")

    assert tables(empty_db_url, "saga") - {migrate.VERSION_TABLE} == set()
    assert migrate.current(empty_db_url) is None
    engine = create_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            functions = (
                conn.execute(
                    text(
                        "SELECT p.proname FROM pg_proc p"
                        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'saga'"
                    )
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert functions == []


def test_migrations_can_go_down_and_up_again(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, revision="base")

    migrate.upgrade(empty_db_url)

    assert migrate.current(empty_db_url) == migrate.head()
    assert tables(empty_db_url, "saga") >= SAGA_TABLES


def test_upgrading_into_another_schema_touches_only_that_schema(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, schema="billing_saga")

    assert migrate.current(empty_db_url, schema="billing_saga") == migrate.head()
    assert migrate.current(empty_db_url, schema="saga") is None
    assert tables(empty_db_url, "billing_saga") == SAGA_TABLES | {migrate.VERSION_TABLE}
    assert tables(empty_db_url, "saga") == set()
    engine = create_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            fks = inspect(conn).get_foreign_keys("step_runs", schema="billing_saga")
    finally:
        engine.dispose()
    assert [fk["referred_schema"] for fk in fks] == ["billing_saga"]


def test_two_schemas_can_live_in_one_database(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, schema="saga")
    migrate.upgrade(empty_db_url, schema="other_saga")

    assert migrate.current(empty_db_url, schema="saga") == migrate.head()
    assert migrate.current(empty_db_url, schema="other_saga") == migrate.head()

    migrate.downgrade(empty_db_url, schema="other_saga", revision="base")

    assert tables(empty_db_url, "saga") >= SAGA_TABLES
    assert tables(empty_db_url, "other_saga") - {migrate.VERSION_TABLE} == set()


def test_a_bad_schema_name_is_refused(empty_db_url: str) -> None:
    with pytest.raises(ValueError, match="schema name"):
        migrate.upgrade(empty_db_url, schema='saga"; DROP TABLE x; --')


def test_the_history_is_append_only(engine: Any) -> None:
    import uuid

    from sqlalchemy.exc import DBAPIError

    run_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO saga.runs (id, workflow, version, definition_hash, input,"
                " steps_remaining) VALUES (:id, 'w', 1, 'h', '{}', 1)"
            ),
            {"id": run_id},
        )
        conn.execute(
            text("INSERT INTO saga.history (run_id, event) VALUES (:id, 'run_started')"),
            {"id": run_id},
        )
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("UPDATE saga.history SET event = 'run_failed'"))


def _include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    if type_ == "schema":
        return name == "saga"
    if type_ == "table":
        return name != migrate.VERSION_TABLE
    return True


def drift(url: str) -> list[Any]:
    """What autogenerate would change to make saga's schema match the models."""
    migrate.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": _include_name,
                    "compare_type": True,
                    "compare_server_default": True,
                },
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_the_migrations_match_the_models(empty_db_url: str) -> None:
    diff = drift(empty_db_url)

    assert diff == [], "models and migrations differ:\n" + "\n".join(map(repr, diff))


def test_the_template_database_is_migrated(engine: Any) -> None:
    assert migrate.current(engine) == migrate.head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM saga.runs")).scalar_one() == 0


def test_downgrading_below_waits_takes_suspended_steps_and_signals_away(empty_db_url: str) -> None:
    import uuid

    migrate.upgrade(empty_db_url)
    run_id = uuid.uuid4()
    engine = create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            _insert_run(conn, run_id)
            conn.execute(text(
                "INSERT INTO saga.step_runs (run_id, kind, step, state, attempt, pending_deps,"
                " wake_at, signal) VALUES (:id, 'step', 'paid', 'suspended', 1, 0,"
                " now() + interval '1 hour', 'paid')"), {"id": run_id})
            conn.execute(text("INSERT INTO saga.signals (run_id, name) VALUES (:id, 'other')"),
                         {"id": run_id})
            conn.execute(text("INSERT INTO saga.history (run_id, event) VALUES"
                              " (:id, 'step_suspended')"), {"id": run_id})
        migrate.downgrade(empty_db_url, revision="0004")
        with engine.connect() as conn:
            state = conn.execute(text("SELECT state FROM saga.step_runs")).scalar_one()
            events = conn.execute(text("SELECT count(*) FROM saga.history")).scalar_one()
        assert (state, events) == ("ready", 0)
        assert "signals" not in tables(empty_db_url, "saga")
        migrate.upgrade(empty_db_url)
        assert migrate.current(empty_db_url) == migrate.head()
    finally:
        engine.dispose()


def test_downgrading_below_maps_keeps_the_instances_rows_without_their_items(
    empty_db_url: str,
) -> None:
    import uuid

    migrate.upgrade(empty_db_url)
    run_id = uuid.uuid4()
    engine = create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            _insert_run(conn, run_id)
            conn.execute(text(
                "INSERT INTO saga.step_runs (run_id, kind, step, state, attempt, pending_deps,"
                " item) VALUES (:id, 'step', 'each[00000]', 'ready', 1, 0, '{\"n\": 1}')"),
                {"id": run_id})
        migrate.downgrade(empty_db_url, revision="0006_schedules")
        with engine.connect() as conn:
            step = conn.execute(text("SELECT step FROM saga.step_runs")).scalar_one()
            columns = {c["name"] for c in inspect(conn).get_columns("step_runs", schema="saga")}
        assert step == "each[00000]" and "item" not in columns
        migrate.upgrade(empty_db_url)
        assert migrate.current(empty_db_url) == migrate.head()
    finally:
        engine.dispose()


def _insert_run(conn: Any, run_id: Any) -> None:
    conn.execute(text(
        "INSERT INTO saga.runs (id, workflow, version, definition_hash, input,"
        " steps_remaining) VALUES (:id, 'w', 1, 'h', '{}', 1)"), {"id": run_id})

def test_downgrading_below_children_frees_a_step_waiting_for_its_child(empty_db_url: str) -> None:
    import uuid

    migrate.upgrade(empty_db_url)
    parent, child = uuid.uuid4(), uuid.uuid4()
    engine = create_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            for run_id, of in ((parent, None), (child, parent)):
                conn.execute(text(
                    "INSERT INTO saga.runs (id, workflow, version, definition_hash, input,"
                    " steps_remaining, parent_run_id, parent_step, parent_attempt)"
                    " VALUES (:id, 'w', 1, 'h', '{}', 1, :of, 'kid', 1)"),
                    {"id": run_id, "of": of})
            conn.execute(text(
                "INSERT INTO saga.step_runs (run_id, kind, step, state, attempt, pending_deps)"
                " VALUES (:id, 'step', 'kid', 'suspended', 1, 0)"), {"id": parent})
        migrate.downgrade(empty_db_url, revision="0007_maps")
        with engine.connect() as conn:
            state = conn.execute(text("SELECT state FROM saga.step_runs")).scalar_one()
            runs = conn.execute(text("SELECT count(*) FROM saga.runs")).scalar_one()
            columns = {c["name"] for c in inspect(conn).get_columns("runs", schema="saga")}
        assert (state, runs) == ("ready", 2)
        assert "parent_run_id" not in columns
        migrate.upgrade(empty_db_url)
        assert migrate.current(empty_db_url) == migrate.head()
    finally:
        engine.dispose()
