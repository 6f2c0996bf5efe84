"""The Harbor API's payment webhook in process (FastAPI's test client) on the real PostgreSQL:
the event row and the run's signal are written in one transaction; a resent event is a
duplicate, a stopped run refuses the signal (recorded, answered 200), an unknown order is 404.
The webhook waking a waiting capture runs in the demo (tests/acceptance/test_harbor_demo.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from examples.harbor_checkout import db as harbor_db
from examples.harbor_checkout import flow

CART = {"items": [{"sku": "MUG-01", "qty": 1}], "card_token": "tok_visa",
        "email": "a@example.com"}


@pytest.fixture
def api(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from examples.harbor_checkout.api import app

    harbor_db.setup(db_url)
    monkeypatch.setenv("HARBOR_DATABASE_URL", db_url)
    flow.engine.cache_clear()
    flow.async_db.cache_clear()
    try:
        with TestClient(app) as client:
            yield client
            client.portal.call(flow.async_db().dispose)  # on the loop its connections use
    finally:
        flow.engine().engine.dispose()
        flow.engine.cache_clear()
        flow.async_db.cache_clear()


def event(order_id: str, n: int = 1) -> dict[str, Any]:
    return {"event_id": f"evt_{n}", "type": "payment.captured", "order_id": order_id,
            "charge_id": f"ch_{n}", "amount_cents": 1200}


def recorded() -> list[tuple[str, str]]:
    with flow.db().connect() as conn:
        rows = conn.execute(text("SELECT event_id, signal FROM payment_webhooks ORDER BY 1"))
        return [(r[0], r[1]) for r in rows]


def test_a_webhook_is_recorded_with_its_signal_once_and_a_stopped_run_refuses_it(
    api: Any,
) -> None:
    order_id = api.post("/orders", json=CART).json()["order_id"]
    # No worker: the run has not reached its capture wait, so the signal is kept for it.
    assert api.post("/webhooks/payment", json=event(order_id)).json()["signal"] == "stored"
    assert api.post("/webhooks/payment", json=event(order_id)).json()["signal"] == "duplicate"
    assert recorded() == [("evt_1", "stored")]
    with flow.db().connect() as conn:
        signals = conn.execute(text("SELECT name, payload FROM saga.signals")).all()
    assert [(s[0], s[1]) for s in signals] == [
        ("payment_captured", {"charge_id": "ch_1", "amount_cents": 1200})
    ]

    flow.engine().cancel(f"order-{order_id}", "customer asked")
    late = api.post("/webhooks/payment", json=event(order_id, 2))
    assert (late.status_code, late.json()["signal"]) == (200, "refused")
    assert recorded() == [("evt_1", "stored"), ("evt_2", "refused")]

    unknown = api.post("/webhooks/payment", json=event("6b1d3c52-0000-4c1e-9a57-0f3a5e1c2d70"))
    assert unknown.status_code == 404
    bad = api.post("/webhooks/payment", json={**event(order_id, 3), "type": "refund.created"})
    assert bad.status_code == 422
    assert len(recorded()) == 2
