"""The demo's checks and its summary: every order against its design, the provider's charges
and refunds, the webhooks, the stock (:func:`summarize`); the report a person reads
(:func:`report`)."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Connection, text

if TYPE_CHECKING:  # the demo imports this module
    from .demo import Run

def say(msg: str) -> None:
    """Print a line now."""
    print(msg, flush=True)



def pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]



def summarize(run: Run, finished: bool) -> dict[str, Any]:
    """Check every order against its design, the provider's charges and the stock."""
    by_id = {s.order_id: s for s in run.sent if s.order_id}
    with run.engine.connect() as conn:
        orders = {
            str(r.id): r
            for r in conn.execute(
                text(
                    "SELECT o.id, o.status, o.items, o.created_at, o.finished_at, o.run_id, "
                    "r.state AS run_state FROM orders o JOIN saga.runs r ON r.id = o.run_id"
                )
            )
        }
        stock = conn.execute(
            text(
                "SELECT i.sku, i.initial, i.on_hand, coalesce(sum(r.qty) FILTER "
                "(WHERE r.released_at IS NULL), 0) AS held "
                "FROM inventory i LEFT JOIN reservations r ON r.sku = i.sku "
                "GROUP BY i.sku, i.initial, i.on_hand ORDER BY i.sku"
            )
        ).all()
        held: dict[str, dict[str, int]] = {}
        for order_id, sku, qty in conn.execute(
            text("SELECT order_id, sku, qty FROM reservations WHERE released_at IS NULL")
        ):
            held.setdefault(str(order_id), {})[sku] = qty
        pay_retries = conn.execute(
            text(
                "SELECT coalesce(sum(attempt - first_attempt), 0) FROM saga.step_runs "
                "WHERE kind = 'step' AND step = 'charge_payment'"
            )
        ).scalar_one()
        labels = _labels(conn)
        reports = conn.execute(
            text(
                "SELECT count(*), coalesce(max(stale_count), 0), "
                "coalesce(sum(stale_count), 0) FROM reconcile_reports"
            )
        ).one()
        webhooks, timed_out = _captures(conn)
        # The schedule's runs, one per slot: as many distinct slot keys as runs.
        reconcile_runs = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT business_key) FROM saga.runs "
                "WHERE workflow = 'reconcile'"
            )
        ).one()
    provider = httpx.get(f"{run.provider}/v1/summary", timeout=10.0).json()
    charges = provider["by_order"]

    wrong: list[str] = []
    bad: set[str] = set()

    def flag(key: str, problem: str) -> None:
        bad.add(key)
        wrong.append(problem)

    for s in run.sent:
        if s.status != 202:
            flag(f"#{s.n}", f"order #{s.n}: POST answered {s.status or s.error}")
    outcome: Counter[str] = Counter()
    for order_id, s in by_id.items():
        row = orders.get(order_id)
        got = None if row is None else (row.status, row.run_state)
        want = (
            ("fulfilled", "completed") if s.expect == "fulfilled" else ("cancelled", "compensated")
        )
        outcome[row.run_state if row else "missing"] += 1
        if got != want:
            flag(order_id, f"order {order_id} ({s.why}): expected {want}, got {got}")
        c = charges.get(order_id, {"charges": 0, "refunds": 0, "net_cents": 0})
        timed = row is not None and str(row.run_id) in timed_out
        for problem in [
            *_capture_problems(s.why, webhooks.get(order_id, {}), timed, c),
            *_label_problems(s.expect, labels.get(order_id, (0, 0))[0], row),
        ]:
            flag(order_id, f"order {order_id}: {problem}")
        if s.expect == "fulfilled" and (c["charges"] != 1 or c["refunds"] != 0):
            flag(order_id, f"order {order_id}: {c['charges']} charge(s), {c['refunds']} refund(s)")
        if s.expect == "compensated" and c["net_cents"] != 0:
            flag(order_id, f"order {order_id} compensated but {c['net_cents']} cents still taken")
        reserved = held.get(order_id, {})
        if s.expect == "compensated" and reserved:
            flag(order_id, f"order {order_id} compensated but still holds stock {reserved}")
        if s.expect == "fulfilled" and row is not None:
            items = {i["sku"]: i["qty"] for i in row.items}
            if reserved != items:
                flag(order_id, f"order {order_id}: holds {reserved}, ordered {items}")
    duplicates = {o: c["charges"] for o, c in charges.items() if c["charges"] > 1}
    stock_bad = [r.sku for r in stock if r.on_hand + r.held != r.initial]
    wrong += [f"order {o}: {n} successful charges" for o, n in duplicates.items()]
    wrong += [f"stock of {sku}: on hand + held != initial" for sku in stock_bad]

    fulfil = [
        (orders[o].finished_at - orders[o].created_at).total_seconds()
        for o, s in by_id.items()
        if o in orders and orders[o].status == "fulfilled" and orders[o].finished_at
    ]
    latency_ms = [s.latency * 1000 for s in run.sent if s.status == 202]
    ok = finished and not wrong and run.args.validation_ok

    def r(x: float | None, nd: int) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "ok": ok,
        "orders": len(run.sent),
        "expected": dict(Counter(s.expect for s in run.sent)),
        "fulfilled": sum(1 for o in orders.values() if o.status == "fulfilled"),
        "compensated": sum(1 for o in orders.values() if o.run_state == "compensated"),
        "runs": dict(outcome),
        "as_designed": len(run.sent) - len(bad),
        "post_latency_ms": {"p50": r(pct(latency_ms, 50), 1), "p95": r(pct(latency_ms, 95), 1)},
        "fulfilment_s": {"p50": r(pct(fulfil, 50), 3), "p95": r(pct(fulfil, 95), 3)},
        "max_charges_per_order": max((c["charges"] for c in charges.values()), default=0),
        "duplicate_charges": len(duplicates),
        "refunds": sum(c["refunds"] for c in charges.values()),
        "webhooks_received": sum(sum(h.values()) for h in webhooks.values()),
        "webhook_signals": dict(
            sum((Counter(h) for h in webhooks.values()), Counter[str]())
        ),
        "capture_timeouts_compensated": sum(
            1 for o in orders.values() if str(o.run_id) in timed_out
            and o.run_state == "compensated"
        ),
        "parcels_labelled": sum(live for live, _ in labels.values()),
        "labels_voided": sum(voided for _, voided in labels.values()),
        "provider": provider["stats"],
        "payment_retries": int(pay_retries),
        "stock_consistent": not stock_bad,
        "invalid_carts_refused": run.args.validation_ok,
        "reconcile": {
            "reports": reports[0], "max_stale": reports[1], "runs": reconcile_runs[0],
            "slots": reconcile_runs[1],
        },
        "restarts": run.sup.restarts(),
        "finished": finished,
        "problems": wrong[:20],
    }


def _labels(conn: Connection) -> dict[str, tuple[int, int]]:
    """Per order: its parcels' labels still valid, and those voided by a compensation."""
    found = conn.execute(
        text(
            "SELECT order_id, count(*) FILTER (WHERE voided_at IS NULL), "
            "count(*) FILTER (WHERE voided_at IS NOT NULL) FROM parcel_labels GROUP BY order_id"
        )
    )
    return {str(order_id): (live, voided) for order_id, live, voided in found}


def _label_problems(expect: str, live: int, row: Any) -> list[str]:
    """A fulfilled order has a valid label per parcel (cart line); a compensated one none."""
    if expect == "compensated" and live:
        return [f"compensated but {live} parcel label(s) not voided"]
    if expect == "fulfilled" and row is not None and live != len(row.items):
        return [f"{live} parcel label(s) for {len(row.items)} parcels"]
    return []


def _captures(conn: Connection) -> tuple[dict[str, dict[str, int]], set[str]]:
    """Per order, its recorded webhooks by what their signal did; the runs whose capture wait
    timed out (its only attempt failed with ``saga.SignalTimeout``)."""
    webhooks: dict[str, dict[str, int]] = {}
    for order_id, outcome, n in conn.execute(
        text("SELECT order_id, signal, count(*) FROM payment_webhooks GROUP BY 1, 2")
    ):
        webhooks.setdefault(str(order_id), {})[outcome] = n
    timed_out = {
        str(run_id)
        for (run_id,) in conn.execute(
            text(
                "SELECT run_id FROM saga.step_runs WHERE kind = 'step' "
                "AND step = 'wait_for_capture' AND state = 'failed' "
                "AND error->>'type' = 'saga.SignalTimeout'"
            )
        )
    }
    return webhooks, timed_out


def _capture_problems(
    why: str, hooks: dict[str, int], timed_out: bool, charges: dict[str, int]
) -> list[str]:
    """What is wrong with an order's capture: one the provider never confirmed got no
    webhook, timed out and had its charge refunded (one charge, one refund); a charged
    order's webhook signalled its run."""
    if why == "no_webhook":
        problems = [f"webhook(s) {hooks}, the provider sent none"] if hooks else []
        if not timed_out:
            problems.append("its capture wait did not time out")
        if (charges["charges"], charges["refunds"]) != (1, 1):
            problems.append(
                f"never captured: {charges['charges']} charge(s), {charges['refunds']} "
                "refund(s), want 1 and 1"
            )
        return problems
    if why in ("ok", "unshippable") and not hooks.keys() & {"delivered", "stored"}:
        return [f"its capture webhook did not signal it: {hooks}"]
    return []


def show_examples(run: Run) -> None:
    """One order of each outcome, as ``GET /orders/{id}`` shows it."""
    shown = set()
    with httpx.Client(base_url=run.api, timeout=10.0) as client:
        for s in run.sent:
            if s.order_id is None or s.why in shown:
                continue
            shown.add(s.why)
            doc = client.get(f"/orders/{s.order_id}").json()
            steps = ", ".join(
                f"{'undo ' if st['kind'] == 'compensation' else ''}{st['step']}={st['state']}"
                + (f"(x{st['attempt']})" if st["attempt"] > 1 else "")
                for st in doc["saga"]["steps"]
            )
            say(
                f"  GET /orders/{s.order_id}  [{s.why}] order {doc['order']['status']}, "
                f"saga {doc['saga']['state']}: {steps}"
            )
            # The API waits on the run's handle (woken when the run ends) for its outcome.
            outcome = client.get(f"/orders/{s.order_id}/outcome", params={"wait": 5}).json()
            what = outcome.get("result") or (outcome.get("error") or {}).get("message")
            say(f"      outcome (run handle): {outcome['state']}: {json.dumps(what)[:120]}")


def report(run: Run, summary: dict[str, Any]) -> None:
    """The human-readable summary."""
    say("")
    say("== Summary")
    say(f"  orders sent          {summary['orders']}  (designed: {summary['expected']})")
    say(f"  fulfilled            {summary['fulfilled']}")
    say(f"  compensated          {summary['compensated']}  (stock released, charges refunded)")
    say(f"  as designed          {summary['as_designed']}/{summary['orders']}")
    lat, ful = summary["post_latency_ms"], summary["fulfilment_s"]
    say(f"  POST /orders latency p50 {lat['p50']} ms, p95 {lat['p95']} ms")
    say(f"  time to fulfilment   p50 {ful['p50']} s, p95 {ful['p95']} s")
    prov = summary["provider"]
    say(
        f"  provider             {prov.get('charge_calls', 0)} charge calls, "
        f"{prov.get('injected_failures', 0)} answered 503 "
        f"({prov.get('lost_answers', 0)} after charging), {prov.get('replays', 0)} replayed "
        f"by idempotency key; {summary['payment_retries']} payment retries"
    )
    say(
        f"  charges per order    max {summary['max_charges_per_order']}, "
        f"duplicates {summary['duplicate_charges']}, refunds {summary['refunds']}"
    )
    say(
        f"  webhooks received    {summary['webhooks_received']}  (signals: "
        f"{summary['webhook_signals']}; withheld by the provider: "
        f"{prov.get('webhooks_withheld', 0)})"
    )
    say(
        f"  capture timeouts     {summary['capture_timeouts_compensated']} compensated "
        f"(no webhook within {run.args.capture_timeout:g}s: charge refunded)"
    )
    say(
        f"  parcels labelled     {summary['parcels_labelled']} (a map: a label per parcel); "
        f"{summary['labels_voided']} voided by compensations"
    )
    say(f"  stock consistent     {summary['stock_consistent']}")
    say(
        f"  invalid carts        refused with 422, nothing written: "
        f"{summary['invalid_carts_refused']}"
    )
    say(
        f"  reconcile (schedule) {summary['reconcile']['reports']} reports, at most "
        f"{summary['reconcile']['max_stale']} order(s) pending > {run.args.stale_after:.0f}s, "
        f"{summary['reconcile']['runs']} runs for {summary['reconcile']['slots']} slots"
    )
    say(f"  process restarts     {summary['restarts']}")
    for problem in summary["problems"]:
        say(f"  PROBLEM: {problem}")
    say(f"  result               {'OK' if summary['ok'] else 'FAILED'}")
    say("")
    compensated = next((s.order_id for s in run.sent if s.why == "declined" and s.order_id), None)
    env = f"SAGA_DATABASE_URL={run.db_url.replace('+psycopg', '')}"
    say("== Look further (the database is kept)")
    say(f"  {env} .venv/bin/saga status")
    if compensated:
        say(f"  {env} .venv/bin/saga status order-{compensated}")
    say(f"  {env} .venv/bin/saga list --state compensated")
    say(f"  process logs: {run.sup.log_dir}")
    say("")
