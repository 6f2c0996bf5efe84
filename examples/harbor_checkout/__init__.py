"""Harbor Checkout: the Harbor Commerce order flow on saga, end to end.

A FastAPI checkout API writes the order and starts the ``fulfill_order`` saga in one
transaction; Celery workers (one per queue group) run the steps; a payment-provider stand-in
answers over HTTP with latency, transient failures and idempotency keys; a saga schedule runs
the reconcile job. ``scripts/demo`` runs it all and checks the outcome.

Modules: :mod:`.config` (settings from the environment), :mod:`.db` (the example's tables),
:mod:`.flow` (the saga), :mod:`.reconcile` (the scheduled reconcile workflow),
:mod:`.tasks` (the Celery app), :mod:`.api` (the checkout API),
:mod:`.provider` (the payment-provider stand-in), :mod:`.supervisor` and :mod:`.demo` (the
orchestrator).
"""
