"""The checkout workflow: its step marks the order paid through Django's ORM on the worker. The
delivery workflow waits for the signal ``parcel_delivered``."""

from __future__ import annotations

import os
from typing import Any

from saga import Registry, StepContext, Workflow

checkout = Workflow("shop.checkout", queue=os.environ.get("SHOP_QUEUE", "saga"), time_limit=20)


@checkout.step()
def pay(ctx: StepContext) -> dict[str, Any]:
    """Mark the order paid (once: the update is idempotent)."""
    from shop.models import Order

    Order.objects.filter(id=ctx.input["order_id"]).update(status="paid")
    return {"paid": ctx.input["order_id"]}


delivery = Workflow("shop.delivery", queue=os.environ.get("SHOP_QUEUE", "saga"))
delivery.wait_for_signal("delivered", signal="parcel_delivered", timeout=600)

registry = Registry(checkout, delivery)
