"""The checkout API.

``POST /orders`` validates the cart, writes the order as ``pending`` and starts its
``fulfill_order`` saga in the same transaction (an ``AsyncSession``: the async start), then
answers 202: the order and its saga exist together or not at all. ``GET /orders/{id}`` shows
the order and where its saga stands; ``GET /orders/{id}/outcome`` waits for the saga to end.
``POST /webhooks/payment`` takes the provider's capture webhook: it records the event and
signals the order's run (``payment_captured``) in one transaction.

Run: ``uvicorn examples.harbor_checkout.api:app --port 8765``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from saga import RunFailedError, SignalRefusedError, UnknownRunError, WaitTimeoutError

from . import flow

_ORDER_NS = uuid.UUID("6b1d3c52-8f0e-4c1e-9a57-0f3a5e1c2d70")


class Item(BaseModel):
    """One cart line."""

    sku: str = Field(min_length=1, max_length=32)
    qty: int = Field(gt=0, le=100)


class OrderIn(BaseModel):
    """A cart to check out. ``card_token`` comes from the payment provider's card form."""

    items: list[Item] = Field(min_length=1, max_length=50)
    card_token: str = Field(pattern=r"^tok_[A-Za-z0-9_]{1,64}$")
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=200)
    country: str = Field(default="US", pattern=r"^[A-Z]{2}$")

    @field_validator("items")
    @classmethod
    def _one_line_per_sku(cls, items: list[Item]) -> list[Item]:
        skus = [i.sku for i in items]
        twice = sorted({s for s in skus if skus.count(s) > 1})
        if twice:
            raise ValueError(f"each SKU may appear once; listed more than once: {twice}")
        return items


class PaymentWebhook(BaseModel):
    """The provider's ``payment.captured`` event (sent again, same ``event_id``, until 2xx)."""

    event_id: str = Field(min_length=1, max_length=100)
    type: Literal["payment.captured"]
    order_id: uuid.UUID
    charge_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0)


app = FastAPI(title="Harbor Checkout")


def saga_key(order_id: str) -> str:
    """The business key of an order's saga run: ``saga status order-<id>`` finds it."""
    return f"order-{order_id}"


def order_id_for(idempotency_key: str) -> str:
    """The id of the order ``POST /orders`` creates under ``idempotency_key`` (the same every
    time: a resent request finds its order)."""
    return str(uuid.uuid5(_ORDER_NS, idempotency_key))


def _unprocessable(problems: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status_code=422, detail=problems)


@app.post("/orders", status_code=202)
async def create_order(
    order: OrderIn,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JSONResponse:
    """Check the cart against the catalog, write the order and start its saga in one
    transaction (SQLAlchemy's asyncio API: the event loop never waits on the database). With
    an ``Idempotency-Key`` header, sending the same request again answers with the order it
    created the first time (200) instead of creating another."""
    order_id = order_id_for(idempotency_key) if idempotency_key else str(uuid.uuid4())
    engine = flow.engine()
    async with AsyncSession(flow.async_db()) as session, session.begin():
        skus = [i.sku for i in order.items]
        found = await session.execute(
            text("SELECT sku, price_cents FROM inventory WHERE sku = ANY(:skus)"),
            {"skus": skus},
        )
        prices: dict[str, int] = {sku: price for sku, price in found.all()}
        unknown = [
            {
                "loc": ["body", "items", n, "sku"],
                "msg": f"unknown SKU {i.sku!r}",
                "type": "unknown_sku",
            }
            for n, i in enumerate(order.items)
            if i.sku not in prices
        ]
        if unknown:
            raise _unprocessable(unknown)
        lines = [{"sku": i.sku, "qty": i.qty} for i in order.items]
        amount = sum(prices[i.sku] * i.qty for i in order.items)
        saga_input = {
            "order_id": order_id,
            "items": lines,
            "amount_cents": amount,
            "card_token": order.card_token,
            "email": order.email,
            "country": order.country,
        }
        started = await engine.start_async(
            session, flow.fulfill_order, saga_input, key=saga_key(order_id)
        )
        if not started.created:
            return JSONResponse(
                {"order_id": order_id, "run_id": started.run_id, "replayed": True},
                status_code=200,
            )
        await session.execute(
            text(
                "INSERT INTO orders (id, email, country, items, amount_cents, run_id) "
                "VALUES (:id, :email, :country, CAST(:items AS jsonb), :amount, :run)"
            ),
            {
                "id": order_id,
                "email": order.email,
                "country": order.country,
                "items": json.dumps(lines),
                "amount": amount,
                "run": started.run_id,
            },
        )
    return JSONResponse(
        {
            "order_id": order_id,
            "run_id": started.run_id,
            "status": "pending",
            "amount_cents": amount,
            "links": {"self": f"/orders/{order_id}", "outcome": f"/orders/{order_id}/outcome"},
        },
        status_code=202,
    )


@app.post("/webhooks/payment")
async def payment_webhook(event: PaymentWebhook) -> JSONResponse:
    """Record the capture webhook and signal the order's run (``payment_captured``, the charge
    as payload) in one transaction: the event is kept exactly when the run got its signal. A
    resent event is answered again (the signal is then a ``duplicate``); a run that stopped
    waiting (the capture timed out, the order was compensated) refuses it, which is
    recorded, and the provider gets its 200 all the same: there is nothing to retry."""
    order_id = str(event.order_id)
    payload = {"charge_id": event.charge_id, "amount_cents": event.amount_cents}
    async with AsyncSession(flow.async_db()) as session, session.begin():
        known = await session.execute(
            text("SELECT 1 FROM orders WHERE id = :id"), {"id": order_id}
        )
        if known.first() is None:
            raise HTTPException(status_code=404, detail=f"no order {order_id}")
        try:
            outcome = await flow.engine().signal_async(
                session, saga_key(order_id), flow.CAPTURED, payload
            )
        except SignalRefusedError:
            outcome = "refused"
        await session.execute(
            text(
                "INSERT INTO payment_webhooks (event_id, order_id, charge_id, signal) "
                "VALUES (:e, :o, :c, :s) ON CONFLICT (event_id) DO NOTHING"
            ),
            {"e": event.event_id, "o": order_id, "c": event.charge_id, "s": outcome},
        )
    return JSONResponse({"event_id": event.event_id, "signal": outcome})


@app.get("/orders/{order_id}/outcome")
async def order_outcome(
    order_id: uuid.UUID, wait: Annotated[float, Query(ge=0, le=60)] = 10.0
) -> JSONResponse:
    """Wait up to ``wait`` seconds for the order's saga to end (a run handle, woken when the
    run ends): 200 with its result, or with its end state and error; 202 if it is still on
    its way."""
    engine = flow.engine()
    try:
        handle = await asyncio.to_thread(engine.handle, saga_key(str(order_id)))
        result = await handle.wait_async(timeout=wait)
    except UnknownRunError:
        raise HTTPException(status_code=404, detail=f"no order {order_id}") from None
    except RunFailedError as exc:
        return JSONResponse({"order_id": str(order_id), "state": exc.state, "error": exc.error})
    except WaitTimeoutError as exc:
        return JSONResponse({"order_id": str(order_id), "state": exc.state}, status_code=202)
    return JSONResponse({"order_id": str(order_id), "state": "completed", "result": result})


@app.get("/orders/{order_id}")
def get_order(order_id: uuid.UUID) -> dict[str, Any]:
    """The order, and its saga run: state, error and each step's (and compensation's) state."""
    engine = flow.engine()
    with engine.engine.connect() as conn:
        row = (
            conn.execute(
                text(
                    "SELECT id, status, email, country, items, amount_cents, run_id, charge_id, "
                    "tracking_number, failure_reason, created_at, finished_at "
                    "FROM orders WHERE id = :id"
                ),
                {"id": str(order_id)},
            )
            .mappings()
            .first()
        )
    if row is None:
        raise HTTPException(status_code=404, detail=f"no order {order_id}")
    run = engine.get_run(str(row["run_id"]))
    return {
        "order": dict(row),
        "saga": {
            "run_id": str(run["id"]),
            "workflow": run["workflow"],
            "state": run["state"],
            "error": run["error"],
            "steps": [
                {
                    "kind": s["kind"],
                    "step": s["step"],
                    "state": s["state"],
                    "attempt": s["attempt"],
                    "error": s["error"],
                }
                for s in run["steps"]
            ],
        },
    }


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness, and the database is reachable."""
    with flow.db().connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok"}
