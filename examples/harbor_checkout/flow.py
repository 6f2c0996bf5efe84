"""The ``fulfill_order`` saga and its steps.

::

    reserve_inventory -> charge_payment -> wait_for_capture -> pack_parcels -> create_labels[i]
                                                            -> send_receipt
    (create_labels[i], send_receipt) -> cooling_off -> mark_fulfilled

``wait_for_capture`` waits (no worker held) for the ``payment_captured`` signal the API sends
when the provider's webhook arrives (:func:`examples.harbor_checkout.api.payment_webhook`);
with no webhook within ``HARBOR_CAPTURE_TIMEOUT`` seconds it fails once and for all and the
order is compensated (the charge refunded). ``create_labels`` is a map: one label per parcel
that ``pack_parcels`` packed, at most two bought at a time, each voided if the order is undone.
``cooling_off`` is a durable timer
(``HARBOR_COOLING_OFF`` seconds) before the order is marked fulfilled.

``release_inventory`` undoes ``reserve_inventory``, ``refund_payment`` undoes
``charge_payment`` and ``send_cancellation`` follows up a receipt that went out. When a step
fails for good, saga runs the compensations of every step that started (completed, failed, or
of unknown outcome) in reverse order, so ``release_inventory`` is always the last one: it is
where the order becomes ``cancelled``.

Steps run at least once: each is idempotent (guarded inserts in the database, the idempotency
key at the payment provider). Payments run on the ``payments`` queue, notifications on
``notifications``, the rest on ``harbor``.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, create_engine, text

import saga
from saga import PermanentError, RetryableError, RetryPolicy, StepContext, Workflow
from saga.app import normalize_url

from .config import Config

if TYPE_CHECKING:  # the API's asyncio engine needs greenlet; the workers never import it
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("harbor.flow")

UNSERVED_COUNTRIES = frozenset({"AQ"})
"""No carrier ships there: every ``create_labels`` instance fails for good (the order is
refunded)."""

STEP_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=2.0, jitter=0.1)
PAYMENT_RETRY = RetryPolicy(
    max_attempts=5, initial_delay=0.2, multiplier=2.0, max_delay=3.0, jitter=0.1
)
"""Five attempts, 0.2 s, 0.4 s, 0.8 s, 1.6 s apart (plus up to 0.1 s of jitter)."""

CAPTURED = "payment_captured"
"""The signal the API sends a run when the provider's capture webhook for its order arrives."""
ONCE = RetryPolicy(max_attempts=1)
"""A capture that did not come in time is not waited for again: the order is compensated."""

registry = saga.Registry()
fulfill_order = Workflow(
    "fulfill_order", version=3, retry=STEP_RETRY, queue="harbor", time_limit=15
)
_config = Config.from_env()  # the waits' lengths: every process of the demo gets the same


@functools.cache
def engine() -> saga.Saga:
    """The process's saga engine; its SQLAlchemy engine also serves the example's tables."""
    url = normalize_url(Config.from_env().database_url)
    db = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    return saga.Saga(registry, engine=db)


def db() -> Engine:
    """The SQLAlchemy engine of :func:`engine`."""
    return engine().engine


@functools.cache
def async_db() -> AsyncEngine:
    """The API's asyncio engine on the same database (psycopg's async driver)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url = normalize_url(Config.from_env().database_url)
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


@functools.cache
def _http() -> httpx.Client:
    return httpx.Client(base_url=Config.from_env().payments_url, timeout=5.0)


def _order_id(ctx: StepContext) -> str:
    return str(ctx.input["order_id"])


def _note_failure(order_id: str, reason: str) -> None:
    with db().begin() as conn:
        conn.execute(
            text("UPDATE orders SET failure_reason = :r WHERE id = :id"),
            {"r": reason, "id": order_id},
        )


# -- steps ------------------------------------------------------------------------------------


@fulfill_order.step()
def reserve_inventory(ctx: StepContext) -> dict[str, Any]:
    """Take the items out of stock, once per order (a reservation row per SKU guards it)."""
    order_id = _order_id(ctx)
    items = sorted(ctx.input["items"], key=lambda i: i["sku"])  # one lock order: no deadlocks
    try:
        with db().begin() as conn:
            for item in items:
                new = conn.execute(
                    text(
                        "INSERT INTO reservations (order_id, sku, qty) VALUES (:o, :s, :q) "
                        "ON CONFLICT (order_id, sku) DO NOTHING RETURNING sku"
                    ),
                    {"o": order_id, "s": item["sku"], "q": item["qty"]},
                ).first()
                if new is None:
                    continue  # reserved by an earlier attempt
                taken = conn.execute(
                    text(
                        "UPDATE inventory SET on_hand = on_hand - :q "
                        "WHERE sku = :s AND on_hand >= :q RETURNING sku"
                    ),
                    {"s": item["sku"], "q": item["qty"]},
                ).first()
                if taken is None:
                    raise PermanentError(f"out of stock: {item['sku']}")
    except PermanentError as exc:
        with db().begin() as conn:
            conn.execute(
                text(
                    "UPDATE orders SET status = 'rejected', failure_reason = :r, "
                    "finished_at = clock_timestamp() WHERE id = :id AND status = 'pending'"
                ),
                {"r": str(exc), "id": order_id},
            )
        raise
    return {"reserved": [{"sku": i["sku"], "qty": i["qty"]} for i in items]}


def release_inventory(ctx: StepContext) -> dict[str, Any]:
    """Put reserved stock back (once: each reservation row is released once) and cancel the
    order. The last compensation to run, so the order is ``cancelled`` as the run ends."""
    order_id = _order_id(ctx)
    with db().begin() as conn:
        released = conn.execute(
            text(
                "UPDATE reservations SET released_at = clock_timestamp() "
                "WHERE order_id = :o AND released_at IS NULL RETURNING sku, qty"
            ),
            {"o": order_id},
        ).all()
        for sku, qty in sorted(released):
            conn.execute(
                text("UPDATE inventory SET on_hand = on_hand + :q WHERE sku = :s"),
                {"s": sku, "q": qty},
            )
        conn.execute(
            text(
                "UPDATE orders SET status = 'cancelled', finished_at = clock_timestamp(), "
                "failure_reason = coalesce(failure_reason, 'cancelled') "
                "WHERE id = :id AND status = 'pending'"
            ),
            {"id": order_id},
        )
    log.info("order %s cancelled, stock released: %s", order_id, dict(released))
    return {"released": [{"sku": s, "qty": q} for s, q in released]}


fulfill_order.compensation(reserve_inventory)(release_inventory)


def _provider_call(path: str, body: dict[str, Any], key: str) -> httpx.Response:
    try:
        resp = _http().post(path, json=body, headers={"Idempotency-Key": key})
    except httpx.TransportError as exc:
        raise RetryableError(f"payment provider unreachable: {type(exc).__name__}") from exc
    if resp.status_code >= 500:
        raise RetryableError(f"payment provider answered {resp.status_code} on {path}")
    return resp


@fulfill_order.step(
    after=[reserve_inventory],
    queue="payments",
    retry=PAYMENT_RETRY,
    compensation_retry=PAYMENT_RETRY,
    time_limit=10,
)
def charge_payment(ctx: StepContext) -> dict[str, Any]:
    """Charge the card at the provider with this step's idempotency key: a retry (or a
    re-delivered message) gets the same charge back, never a second one. A decline is final."""
    order_id = _order_id(ctx)
    body = {
        "order_id": order_id,
        "amount_cents": ctx.input["amount_cents"],
        "card_token": ctx.input["card_token"],
    }
    resp = _provider_call("/v1/charges", body, ctx.idempotency_key)
    if resp.status_code == 402:
        _note_failure(order_id, "card declined")
        raise PermanentError(f"card declined for order {order_id}")
    if resp.status_code not in (200, 201):
        raise PermanentError(f"payment provider refused the charge: {resp.status_code}")
    charge = resp.json()
    with db().begin() as conn:
        conn.execute(
            text("UPDATE orders SET charge_id = :c WHERE id = :id"),
            {"c": charge["charge_id"], "id": order_id},
        )
    return {"charge_id": charge["charge_id"], "amount_cents": charge["amount_cents"]}


def _charge_made_with(key: str) -> str | None:
    """The id of the charge the provider made under idempotency key ``key``, if any."""
    try:
        resp = _http().get("/v1/charges", params={"idempotency_key": key})
    except httpx.TransportError as exc:
        raise RetryableError(f"payment provider unreachable: {type(exc).__name__}") from exc
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise RetryableError(f"payment provider answered {resp.status_code} on a look-up")
    return str(resp.json()["charge_id"])


def refund_payment(ctx: StepContext) -> dict[str, Any]:
    """Refund the charge ``charge_payment`` made. When the charge completed, its result names
    it; when saga cannot know (``ctx.outcome`` is ``failed`` or ``unknown``: the card was
    declined, the answer was lost, the worker died), the charge is looked up by the key the
    charge step used, and refunded if it went through after all."""
    if ctx.outcome == "completed":
        charge_id: str | None = ctx.step_result["charge_id"]
    else:
        assert ctx.step_idempotency_key is not None
        charge_id = _charge_made_with(ctx.step_idempotency_key)
    if charge_id is None:
        return {"refund_id": None, "charge_id": None}  # nothing was charged
    resp = _provider_call("/v1/refunds", {"charge_id": charge_id}, ctx.idempotency_key)
    if resp.status_code == 404:
        return {"refund_id": None, "charge_id": charge_id}
    if resp.status_code not in (200, 201):
        raise PermanentError(f"payment provider refused the refund: {resp.status_code}")
    log.info("order %s refunded (charge %s)", _order_id(ctx), charge_id)
    return {"refund_id": resp.json()["refund_id"], "charge_id": charge_id}


fulfill_order.compensation(charge_payment)(refund_payment)


fulfill_order.wait_for_signal(
    "wait_for_capture", signal=CAPTURED, timeout=_config.capture_timeout,
    after=[charge_payment], retry=ONCE,
)


@fulfill_order.step(after=["wait_for_capture"])
def pack_parcels(ctx: StepContext) -> list[dict[str, Any]]:
    """Pack the order: one parcel per line of the cart (the list the labels are mapped over)."""
    items = sorted(ctx.input["items"], key=lambda i: i["sku"])
    return [{"parcel": n, "sku": i["sku"], "qty": i["qty"]} for n, i in enumerate(items)]


def label_parcel(ctx: StepContext) -> dict[str, Any]:
    """Buy a shipping label for one parcel from the carrier (simulated: a short pause and a
    tracking number), once per parcel (a guarded insert)."""
    order_id = _order_id(ctx)
    country = ctx.input["country"]
    if country in UNSERVED_COUNTRIES:
        _note_failure(order_id, f"no carrier ships to {country}")
        raise PermanentError(f"no carrier ships to {country}")
    time.sleep(random.uniform(0.01, 0.05))
    parcel = int(ctx.item["parcel"])
    tracking = f"HBR{order_id.replace('-', '')[:12].upper()}-{parcel + 1}"
    with db().begin() as conn:
        conn.execute(
            text(
                "INSERT INTO parcel_labels (order_id, parcel, sku, tracking_number) "
                "VALUES (:o, :p, :s, :t) ON CONFLICT (order_id, parcel) DO NOTHING"
            ),
            {"o": order_id, "p": parcel, "s": ctx.item["sku"], "t": tracking},
        )
    return {"parcel": parcel, "tracking_number": tracking}


def void_label(ctx: StepContext) -> dict[str, Any]:
    """Void a parcel's label (once; a label that was never bought is nothing to void)."""
    with db().begin() as conn:
        voided = conn.execute(
            text(
                "UPDATE parcel_labels SET voided_at = clock_timestamp() "
                "WHERE order_id = :o AND parcel = :p AND voided_at IS NULL RETURNING parcel"
            ),
            {"o": _order_id(ctx), "p": int(ctx.item["parcel"])},
        ).first()
    return {"voided": voided is not None}


# A label per parcel, at most two bought at a time; a parcel that cannot be labelled fails the
# order, and the labels already bought are voided.
fulfill_order.map(
    "create_labels", label_parcel, over=pack_parcels, max_parallel=2, compensate=void_label
)


def _notify(order_id: str, kind: str, email: str) -> bool:
    with db().begin() as conn:
        row = conn.execute(
            text(
                "INSERT INTO notifications (order_id, kind, email) VALUES (:o, :k, :e) "
                "ON CONFLICT (order_id, kind) DO NOTHING RETURNING order_id"
            ),
            {"o": order_id, "k": kind, "e": email},
        ).first()
    return row is not None


def send_cancellation(ctx: StepContext) -> dict[str, Any]:
    """An email cannot be unsent: tell the customer the order was cancelled after all, if the
    receipt went out (when saga cannot know, the notifications table does)."""
    order_id = _order_id(ctx)
    if ctx.outcome != "completed":
        with db().connect() as conn:
            receipt = conn.execute(
                text("SELECT 1 FROM notifications WHERE order_id = :o AND kind = 'receipt'"),
                {"o": order_id},
            ).first()
        if receipt is None:
            return {"sent": False}
    sent = _notify(order_id, "cancellation", ctx.input["email"])
    return {"sent": sent}


@fulfill_order.step(after=["wait_for_capture"], queue="notifications", compensate=send_cancellation)
def send_receipt(ctx: StepContext) -> dict[str, Any]:
    """Email the receipt (simulated: a row in ``notifications``, written once)."""
    sent = _notify(_order_id(ctx), "receipt", ctx.input["email"])
    return {"sent": sent, "to": ctx.input["email"]}


fulfill_order.sleep(
    "cooling_off", for_=_config.cooling_off, after=["create_labels", send_receipt]
)


# After create_labels too: a step's ctx.results holds the steps it runs after, and this one
# needs the tracking numbers (the map's results, in parcel order).
@fulfill_order.step(after=["create_labels", "cooling_off"])
def mark_fulfilled(ctx: StepContext) -> dict[str, Any]:
    """The order is paid, captured, labelled and confirmed, and its cooling-off time is over:
    mark it ``fulfilled``."""
    with db().begin() as conn:
        conn.execute(
            text(
                "UPDATE orders SET status = 'fulfilled', finished_at = clock_timestamp(), "
                "tracking_number = :t WHERE id = :id AND status = 'pending'"
            ),
            {
                "t": ",".join(p["tracking_number"] for p in ctx.results["create_labels"]),
                "id": _order_id(ctx),
            },
        )
    return {"status": "fulfilled"}


registry.register(fulfill_order)
