"""A payment-provider stand-in: charges and refunds over HTTP, kept in memory.

It behaves like a real provider where it matters to the saga:

* every call needs an ``Idempotency-Key`` header; a key seen before gets the first answer
  again (``"replayed": true``), so a retried charge never charges twice;
* it is slow (``PROVIDER_LATENCY_MS="20,150"``: a uniform delay per call) and flaky
  (``PROVIDER_FAILURE_RATE=0.2``: that share of calls answers 503; half of those *after* the
  charge was made, as when the answer is lost on the way back);
* card token ``tok_declined`` is declined with 402;
* it tells the shop a payment was captured with a webhook, not in the charge's answer: with
  ``PROVIDER_WEBHOOK_URL`` set, each charge is followed ``PROVIDER_WEBHOOK_DELAY_MS="200,1500"``
  later by ``POST <url>`` ``{"type": "payment.captured", ...}`` (retried a few times if the
  shop does not answer 2xx), except for a share ``PROVIDER_NO_WEBHOOK_RATE`` of the orders,
  picked by their id (:func:`withholds_webhook`: the same orders on every run), which never
  get one.

``PROVIDER_MAX_FAILURES_PER_KEY`` (default 3) caps the injected failures per idempotency key,
so that, with five attempts, a demo order is never failed by bad luck alone; 0 lifts the cap.
``GET /v1/summary`` reports every charge and the totals per order.

Run: ``uvicorn examples.harbor_checkout.provider:app --port 8766``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

DECLINED_TOKEN = "tok_declined"
log = logging.getLogger("harbor.provider")


def withholds_webhook(order_id: str, rate: float) -> bool:
    """Whether the provider never sends the capture webhook for ``order_id``, at a share
    ``rate`` of the orders: decided by a hash of the id, so the demo knows it too."""
    digest = hashlib.sha256(order_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < rate


@dataclass(frozen=True)
class Knobs:
    """How slow and how flaky the provider is."""

    failure_rate: float = 0.2
    latency_ms: tuple[int, int] = (20, 150)
    max_failures_per_key: int = 3
    seed: int | None = None
    webhook_url: str | None = None
    webhook_delay_ms: tuple[int, int] = (200, 1500)
    no_webhook_rate: float = 0.0

    @classmethod
    def from_env(cls) -> Knobs:
        """Knobs from ``PROVIDER_FAILURE_RATE``, ``PROVIDER_LATENCY_MS`` ("lo,hi"),
        ``PROVIDER_MAX_FAILURES_PER_KEY``, ``PROVIDER_SEED``, ``PROVIDER_WEBHOOK_URL``,
        ``PROVIDER_WEBHOOK_DELAY_MS`` ("lo,hi") and ``PROVIDER_NO_WEBHOOK_RATE``."""
        env = os.environ
        seed = env.get("PROVIDER_SEED")
        return cls(
            failure_rate=float(env.get("PROVIDER_FAILURE_RATE", "0.2")),
            latency_ms=_range(env.get("PROVIDER_LATENCY_MS", "20,150")),
            max_failures_per_key=int(env.get("PROVIDER_MAX_FAILURES_PER_KEY", "3")),
            seed=int(seed) if seed else None,
            webhook_url=env.get("PROVIDER_WEBHOOK_URL") or None,
            webhook_delay_ms=_range(env.get("PROVIDER_WEBHOOK_DELAY_MS", "200,1500")),
            no_webhook_rate=float(env.get("PROVIDER_NO_WEBHOOK_RATE", "0")),
        )


def _range(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition(",")
    return int(lo), int(hi or lo)


@dataclass
class Charge:
    """One successful charge."""

    id: str
    order_id: str
    amount_cents: int
    idempotency_key: str
    refunded: bool = False
    refund_id: str | None = None


@dataclass
class Ledger:
    """Everything the provider remembers. The event loop is its only thread, and no ``await``
    separates a look-up from the write that follows it, so each call is atomic."""

    knobs: Knobs
    rng: random.Random
    charges: dict[str, Charge] = field(default_factory=dict)
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    declined: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    deliveries: set[asyncio.Task[None]] = field(default_factory=set)
    """Webhooks on their way (held here so that the event loop does not drop them)."""

    def flaky(self, key: str) -> bool:
        """Whether this call should fail (at most ``max_failures_per_key`` times per key)."""
        cap = self.knobs.max_failures_per_key
        if self.rng.random() >= self.knobs.failure_rate:
            return False
        if cap and self.failures[key] >= cap:
            return False
        self.failures[key] += 1
        return True

    def summary(self) -> dict[str, Any]:
        """Totals and, per order, successful charges, refunds and the net amount taken."""
        by_order: dict[str, dict[str, int]] = {}
        for c in self.charges.values():
            o = by_order.setdefault(
                c.order_id, {"charges": 0, "refunds": 0, "declined": 0, "net_cents": 0}
            )
            o["charges"] += 1
            o["net_cents"] += c.amount_cents
            if c.refunded:
                o["refunds"] += 1
                o["net_cents"] -= c.amount_cents
        for order_id, n in self.declined.items():
            o = by_order.setdefault(
                order_id, {"charges": 0, "refunds": 0, "declined": 0, "net_cents": 0}
            )
            o["declined"] = n
        return {
            "knobs": asdict(self.knobs),
            "stats": dict(self.stats),
            "charges": [asdict(c) for c in self.charges.values()],
            "by_order": by_order,
        }


class ChargeIn(BaseModel):
    """A charge request."""

    order_id: str
    amount_cents: int = Field(gt=0)
    card_token: str


class RefundIn(BaseModel):
    """A refund request for one charge, in full."""

    charge_id: str


app = FastAPI(title="Payment provider stand-in")
ledger = Ledger(knobs=Knobs.from_env(), rng=random.Random(Knobs.from_env().seed))
IdempotencyKey = Annotated[str, Header(alias="Idempotency-Key", min_length=1)]


async def _latency() -> None:
    lo, hi = ledger.knobs.latency_ms
    await asyncio.sleep(ledger.rng.uniform(lo, hi) / 1000)


def _busy() -> JSONResponse:
    ledger.stats["injected_failures"] += 1
    return JSONResponse({"error": "provider_unavailable"}, status_code=503)


def _replay(key: str) -> JSONResponse | None:
    answer = ledger.answers.get(key)
    if answer is None:
        return None
    ledger.stats["replays"] += 1
    status, body = answer
    return JSONResponse({**body, "replayed": True}, status_code=status)


def _answer(key: str, status: int, body: dict[str, Any]) -> JSONResponse:
    """Remember the answer for ``key``, then give it (or lose it on the way back)."""
    ledger.answers[key] = (status, body)
    if ledger.rng.random() < 0.5 and ledger.flaky(key):
        ledger.stats["lost_answers"] += 1
        return _busy()
    return JSONResponse(body, status_code=status)


@app.post("/v1/charges")
async def create_charge(req: ChargeIn, key: IdempotencyKey) -> JSONResponse:
    """Charge the card once per idempotency key; 402 for a declined card, 503 when flaky."""
    ledger.stats["charge_calls"] += 1
    await _latency()
    replay = _replay(key)
    if replay is not None:
        return replay
    if ledger.rng.random() < 0.5 and ledger.flaky(key):
        return _busy()
    if req.card_token == DECLINED_TOKEN:
        ledger.declined[req.order_id] += 1
        return _answer(key, 402, {"error": "card_declined", "order_id": req.order_id})
    charge = Charge(
        id="ch_" + uuid.uuid4().hex[:16],
        order_id=req.order_id,
        amount_cents=req.amount_cents,
        idempotency_key=key,
    )
    ledger.charges[charge.id] = charge
    _schedule_webhook(charge)
    return _answer(key, 201, {"charge_id": charge.id, "amount_cents": charge.amount_cents})


def _schedule_webhook(charge: Charge) -> None:
    """Send the capture webhook of ``charge`` later, unless its order is one that gets none."""
    url = ledger.knobs.webhook_url
    if url is None:
        return
    if withholds_webhook(charge.order_id, ledger.knobs.no_webhook_rate):
        ledger.stats["webhooks_withheld"] += 1
        return
    lo, hi = ledger.knobs.webhook_delay_ms
    task = asyncio.get_running_loop().create_task(
        _deliver(url, charge, ledger.rng.uniform(lo, hi) / 1000)
    )
    ledger.deliveries.add(task)
    task.add_done_callback(ledger.deliveries.discard)


async def _deliver(url: str, charge: Charge, delay: float, tries: int = 5) -> None:
    """POST the ``payment.captured`` event, retried (same event id) until the shop answers
    2xx, ``tries`` times at most."""
    await asyncio.sleep(delay)
    event = {
        "event_id": "evt_" + charge.id,
        "type": "payment.captured",
        "order_id": charge.order_id,
        "charge_id": charge.id,
        "amount_cents": charge.amount_cents,
    }
    async with httpx.AsyncClient(timeout=5.0) as client:
        for attempt in range(1, tries + 1):
            try:
                resp = await client.post(url, json=event)
                if resp.is_success:
                    ledger.stats["webhooks_sent"] += 1
                    return
                problem = f"answered {resp.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            ledger.stats["webhook_failures"] += 1
            log.warning("webhook %s to %s: %s (try %d)", event["event_id"], url, problem, attempt)
            await asyncio.sleep(0.5 * attempt)


@app.post("/v1/refunds")
async def create_refund(req: RefundIn, key: IdempotencyKey) -> JSONResponse:
    """Refund a charge in full, once (by key, and by charge); 404 for an unknown charge."""
    ledger.stats["refund_calls"] += 1
    await _latency()
    replay = _replay(key)
    if replay is not None:
        return replay
    if ledger.rng.random() < 0.5 and ledger.flaky(key):
        return _busy()
    charge = ledger.charges.get(req.charge_id)
    if charge is None:
        return _answer(key, 404, {"error": "no_such_charge", "charge_id": req.charge_id})
    if not charge.refunded:
        charge.refunded = True
        charge.refund_id = "re_" + uuid.uuid4().hex[:16]
    body = {"refund_id": charge.refund_id, "charge_id": charge.id}
    return _answer(key, 201, body)


@app.get("/v1/charges")
async def find_charge(idempotency_key: str) -> JSONResponse:
    """The charge made with ``idempotency_key``, or 404: what a refund looks up when it cannot
    know whether the charge went through (its answer was lost, or its worker died)."""
    await _latency()
    for charge in ledger.charges.values():
        if charge.idempotency_key == idempotency_key:
            return JSONResponse({"charge_id": charge.id, "amount_cents": charge.amount_cents})
    return JSONResponse({"error": "no_such_charge"}, status_code=404)


@app.get("/v1/summary")
async def summary() -> dict[str, Any]:
    """Every charge, and per order: charges, refunds, declines and the net amount taken."""
    return ledger.summary()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}
