"""saga in a real (minimal) Django project, ``tests/django_project``, on a PostgreSQL database of
its own: runs start on Django's connection inside ``transaction.atomic()``, so the order and its
run commit together or not at all; ``manage.py saga_migrate`` makes saga's schema, and
``manage.py saga_relay`` with a Celery worker of the project runs the checkout."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from saga import KeyConflictError, KeyPolicy
from tests.support import db
from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

PROJECT = Path(__file__).resolve().parents[1] / "django_project"
BIN = Path(sys.executable).parent
QUEUE = f"shop_{secrets.token_hex(4)}"
RUN = "SELECT count(*) FROM saga.runs WHERE id = :id"
ORDER = "SELECT count(*) FROM shop_order WHERE id = :id"


class ViewFailedError(Exception):
    """The view failed after saving the order."""


@pytest.fixture(scope="module")
def shop_db() -> Iterator[str]:
    """The shop's database (empty at first): Django set up on it in this process, saga's
    schema made by ``manage.py saga_migrate`` and the shop's table by ``migrate``."""
    name = db.random_name()
    db.create_database(name)
    # Only for this module: other tests' worker processes inherit this process's environment,
    # and Celery sets Django up in any process that has DJANGO_SETTINGS_MODULE.
    env = pytest.MonkeyPatch()
    env.setenv("SHOP_DATABASE_URL", db.libpq_url(name))
    env.setenv("SHOP_QUEUE", QUEUE)
    env.setenv("DJANGO_SETTINGS_MODULE", "shopsite.settings")
    env.syspath_prepend(str(PROJECT))
    try:
        import django
        from django.core.management import call_command

        django.setup()
        call_command("saga_migrate", verbosity=0)
        call_command("migrate", run_syncdb=True, verbosity=0)
        yield name
    finally:
        from django.db import connections

        from saga.contrib import django as saga_django

        connections.close_all()
        saga_django.engine().engine.dispose()
        env.undo()
        db.drop_database(name)


def count(shop_db: str, sql: str, **params: Any) -> int:
    """A count read on a connection of its own (it sees only what was committed)."""
    engine = create_engine(db.sqlalchemy_url(shop_db))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one())
    finally:
        engine.dispose()


def test_an_order_and_its_run_commit_together_on_djangos_connection(shop_db: str) -> None:
    from django.db import transaction
    from shop.models import Order

    from saga.contrib import django as saga_django

    with transaction.atomic():
        order = Order.objects.create(email="ada@example.com")
        started = saga_django.start("shop.checkout", {"order_id": order.id}, key=f"o-{order.id}")
        # In Django's transaction: nobody else sees the order or the run yet.
        assert count(shop_db, RUN, id=started.run_id) == 0
        assert count(shop_db, ORDER, id=order.id) == 0
    assert started.created
    assert count(shop_db, ORDER, id=order.id) == 1
    assert count(shop_db, RUN, id=started.run_id) == 1
    assert count(shop_db, "SELECT count(*) FROM saga.outbox WHERE run_id = :id", id=started.run_id)
    run = saga_django.engine().get_run(f"o-{order.id}")
    assert (str(run["id"]), run["input"]) == (started.run_id, {"order_id": order.id})


def test_a_rolled_back_order_leaves_no_run(shop_db: str) -> None:
    from django.db import transaction
    from shop.models import Order

    from saga.contrib import django as saga_django

    runs_before = count(shop_db, "SELECT count(*) FROM saga.runs")
    with pytest.raises(ViewFailedError), transaction.atomic():
        order = Order.objects.create(email="bob@example.com")
        saga_django.start("shop.checkout", {"order_id": order.id}, key=f"o-{order.id}")
        raise ViewFailedError
    assert count(shop_db, ORDER, id=order.id) == 0
    assert count(shop_db, "SELECT count(*) FROM saga.runs") == runs_before
    assert count(shop_db, "SELECT count(*) FROM saga.runs WHERE business_key = :k",
                 k=f"o-{order.id}") == 0


def test_a_start_on_djangos_connection_follows_the_key_policy(shop_db: str) -> None:
    from django.db import transaction

    from saga.contrib import django as saga_django

    with transaction.atomic():
        first = saga_django.start("shop.checkout", {"order_id": 0}, key="o-policy")
        again = saga_django.start("shop.checkout", {"order_id": 0}, key="o-policy")
        with pytest.raises(KeyConflictError):
            saga_django.start(
                "shop.checkout", {"order_id": 1}, key="o-policy",
                key_policy=KeyPolicy.REFUSE_CHANGED_INPUT,
            )
    assert (again.run_id, again.created) == (first.run_id, False)


@pytest.mark.slow
def test_the_relay_command_and_a_project_worker_run_the_checkout(
    shop_db: str, redis_url: str, supervisor: Supervisor
) -> None:
    from django.db import transaction
    from shop.models import Order

    from saga.contrib import django as saga_django

    env = {
        "SHOP_DATABASE_URL": db.libpq_url(shop_db),
        "SHOP_BROKER_URL": redis_url,
        "SHOP_QUEUE": QUEUE,
        "PYTHONPATH": str(PROJECT),
        "DJANGO_SETTINGS_MODULE": "shopsite.settings",
    }
    supervisor.start(
        "worker",
        [str(BIN / "celery"), "-A", "shopsite.celery", "worker", "-Q", QUEUE, "-c", "1",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"],
        env=env, cwd=PROJECT,
    )
    supervisor.start("relay", [sys.executable, "manage.py", "saga_relay"], env=env, cwd=PROJECT)
    wait_until(lambda: " ready." in supervisor.log("worker"), timeout=60, message="worker")
    wait_until(lambda: "relay started" in supervisor.log("relay"), timeout=60, message="relay")

    with transaction.atomic():
        order = Order.objects.create(email="cy@example.com")
        started = saga_django.start("shop.checkout", {"order_id": order.id})
    assert started.wait(timeout=60) == {"pay": {"paid": order.id}}
    order.refresh_from_db()
    assert order.status == "paid"
    assert "saga: this worker serves saga queues" not in supervisor.log("worker")


class Recording:
    """A publisher that keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def publish(self, envelope: Any) -> None:
        self.sent.append(envelope.message.as_body())


def test_a_run_started_in_djangos_transaction_goes_out_when_it_commits(shop_db: str) -> None:
    from django.db import transaction
    from shop.models import Order

    from saga.contrib import django as saga_django

    engine = saga_django.engine()
    recording = Recording()
    engine.use_publisher(lambda: recording)
    try:
        with transaction.atomic():
            order = Order.objects.create(email="dee@example.com")
            started = saga_django.start("shop.checkout", {"order_id": order.id})
            assert recording.sent == [], "nothing goes out before the commit"
        assert [(m["run_id"], m["attempt"]) for m in recording.sent] == [(started.run_id, 1)]
        with pytest.raises(ViewFailedError), transaction.atomic():
            saga_django.start("shop.checkout", {"order_id": -1})
            raise ViewFailedError
        assert len(recording.sent) == 1, "a rolled-back start publishes nothing"
    finally:
        engine.dispatcher = None


def test_a_signal_in_djangos_transaction_is_delivered_when_it_commits_and_never_if_not(
    shop_db: str,
) -> None:
    from django.db import transaction
    from shop.models import Order

    from saga.contrib import django as saga_django
    from saga.testing import drain

    engine = saga_django.engine()
    run_id = engine.start_now("shop.delivery", {}, key="delivery-1").run_id
    drain(engine)

    def waiting() -> str:
        return next(s["state"] for s in engine.get_run(run_id)["steps"])

    assert waiting() == "suspended"
    with pytest.raises(ViewFailedError), transaction.atomic():
        Order.objects.create(email="rolled@example.com")
        assert saga_django.signal("delivery-1", "parcel_delivered", {"n": 1}) == "delivered"
        raise ViewFailedError
    assert waiting() == "suspended"
    assert count(shop_db, "SELECT count(*) FROM saga.signals WHERE run_id = :id", id=run_id) == 0

    with transaction.atomic():
        order = Order.objects.create(email="kept@example.com")
        assert saga_django.signal("delivery-1", "parcel_delivered", {"n": 2}) == "delivered"
        # In Django's transaction: nobody else sees the signal yet.
        assert count(shop_db, "SELECT count(*) FROM saga.signals WHERE run_id = :id",
                     id=run_id) == 0
    assert count(shop_db, ORDER, id=order.id) == 1
    drain(engine)
    run = engine.get_run(run_id)
    assert (run["state"], run["result"]) == ("completed", {"delivered": {"n": 2}})
