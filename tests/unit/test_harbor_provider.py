"""The Harbor provider stand-in's choice of the orders that never get a capture webhook: by
order id, the same on every run, at about the configured share."""

from __future__ import annotations

import uuid

from examples.harbor_checkout.api import order_id_for
from examples.harbor_checkout.provider import withholds_webhook


def test_the_orders_without_a_webhook_are_picked_by_id_at_about_the_configured_share() -> None:
    ids = [str(uuid.UUID(int=n * 7919 + 1)) for n in range(2000)]
    picked = [i for i in ids if withholds_webhook(i, 0.1)]
    assert 150 < len(picked) < 250
    assert picked == [i for i in ids if withholds_webhook(i, 0.1)]  # the same every time
    assert set(picked) <= {i for i in ids if withholds_webhook(i, 0.2)}  # a larger share adds
    assert not any(withholds_webhook(i, 0.0) for i in ids)
    assert all(withholds_webhook(i, 1.0) for i in ids)


def test_an_orders_id_comes_from_its_idempotency_key() -> None:
    assert order_id_for("demo-1") == order_id_for("demo-1") != order_id_for("demo-2")
    assert uuid.UUID(order_id_for("demo-1")).version == 5
