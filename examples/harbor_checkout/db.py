"""The example's own tables (public schema, beside saga's ``saga`` schema), its catalog, and
database setup: ``python -m examples.harbor_checkout.db --recreate harbor_demo``."""

from __future__ import annotations

import argparse
import sys

import psycopg
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from saga.app import normalize_url
from saga.db import migrate

SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

CATALOG: dict[str, tuple[str, int]] = {
    "MUG-01": ("Harbor mug", 1200),
    "TEE-M": ("Lighthouse tee, M", 2400),
    "TEE-L": ("Lighthouse tee, L", 2400),
    "CAP-01": ("Sailor cap", 1800),
    "MAP-XL": ("Nautical chart print", 3900),
    "KNOT-3": ("Knot-tying kit", 1500),
}
"""SKU -> (name, price in cents)."""

INITIAL_STOCK = 100_000

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS inventory (
    sku          text PRIMARY KEY,
    name         text NOT NULL,
    price_cents  integer NOT NULL CHECK (price_cents > 0),
    initial      integer NOT NULL,
    on_hand      integer NOT NULL CHECK (on_hand >= 0)
);
CREATE TABLE IF NOT EXISTS orders (
    id               uuid PRIMARY KEY,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'fulfilled', 'cancelled', 'rejected')),
    email            text NOT NULL,
    country          text NOT NULL,
    items            jsonb NOT NULL,
    amount_cents     integer NOT NULL,
    run_id           uuid,
    charge_id        text,
    tracking_number  text,
    failure_reason   text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz
);
CREATE INDEX IF NOT EXISTS ix_orders_pending ON orders (created_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS reservations (
    order_id     uuid NOT NULL REFERENCES orders (id),
    sku          text NOT NULL REFERENCES inventory (sku),
    qty          integer NOT NULL CHECK (qty > 0),
    reserved_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at  timestamptz,
    PRIMARY KEY (order_id, sku)
);
CREATE TABLE IF NOT EXISTS parcel_labels (
    order_id         uuid NOT NULL REFERENCES orders (id),
    parcel           integer NOT NULL CHECK (parcel >= 0),
    sku              text NOT NULL,
    tracking_number  text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    voided_at        timestamptz,
    PRIMARY KEY (order_id, parcel)
);
CREATE TABLE IF NOT EXISTS notifications (
    order_id  uuid NOT NULL REFERENCES orders (id),
    kind      text NOT NULL,
    email     text NOT NULL,
    sent_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (order_id, kind)
);
CREATE TABLE IF NOT EXISTS payment_webhooks (
    event_id     text PRIMARY KEY,
    order_id     uuid NOT NULL REFERENCES orders (id),
    charge_id    text NOT NULL,
    signal       text NOT NULL CHECK (signal IN ('delivered', 'stored', 'duplicate', 'refused')),
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS reconcile_reports (
    id           bigserial PRIMARY KEY,
    ran_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    stale_after  double precision NOT NULL,
    stale_count  integer NOT NULL,
    order_ids    jsonb NOT NULL
);
"""


def database_url(name: str, server_url: str = SERVER_URL) -> str:
    """The SQLAlchemy (psycopg 3) URL of database ``name`` on the server of ``server_url``."""
    url = make_url(normalize_url(server_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def recreate_database(name: str, server_url: str = SERVER_URL) -> None:
    """Drop database ``name`` (disconnecting its users) and create it empty."""
    admin = make_url(normalize_url(server_url)).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))


def setup(url: str) -> None:
    """Migrate saga's schema to head, create the example's tables and stock the catalog."""
    url = normalize_url(url)
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(SCHEMA_SQL)
            for sku, (name, price) in CATALOG.items():
                conn.execute(
                    text(
                        "INSERT INTO inventory (sku, name, price_cents, initial, on_hand) "
                        "VALUES (:sku, :name, :price, :n, :n) ON CONFLICT (sku) DO NOTHING"
                    ),
                    {"sku": sku, "name": name, "price": price, "n": INITIAL_STOCK},
                )
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Set up database ``name`` (recreating it first with ``--recreate``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="database name, e.g. harbor_demo")
    parser.add_argument("--recreate", action="store_true", help="drop and create it first")
    parser.add_argument("--server-url", default=SERVER_URL, help="any database on the server")
    args = parser.parse_args(argv)
    if args.recreate:
        recreate_database(args.name, args.server_url)
    setup(database_url(args.name, args.server_url))
    print(f"database {args.name}: saga migrated to {migrate.head()}, example tables ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
