"""The demo orchestrator: runs the whole Harbor Checkout stack, sends orders, checks the outcome.

It starts, as supervised subprocesses (a child that exits is restarted), the payment-provider
stand-in, the checkout API, saga's relay (which also fires the reconcile schedule) and one
Celery worker per queue group (``payments``, ``notifications``, ``harbor``). Then it sends
``--orders`` carts to ``POST /orders`` (a share with the declined card ``tok_declined``, a
share shipped to a country no carrier serves), prints progress every second, and ends with a
summary. The provider sends each charge's capture webhook to ``POST /webhooks/payment`` a
moment later, which signals the order's run, except for a share ``--no-webhook`` of the
orders (picked by order id), which wait ``--capture-timeout`` seconds and are compensated; a
``--cooling-off`` timer delays ``mark_fulfilled``. The checks:

* every order ended as designed: declined, unshippable and never-captured orders
  ``compensated`` (stock released, the charge refunded: by the capture timeout for those
  that got no webhook), all others ``fulfilled``, each with its webhook recorded;
* never more than one successful charge per order at the provider;
* stock is consistent: on hand + still reserved = initial, for every SKU.

The last line is ``SUMMARY {...}`` (JSON). Exit status 0 only if every check passed. Everything
it started is stopped at the end, on Ctrl-C and on error; the database is kept for a look with
the ``saga`` CLI. ``python -m examples.harbor_checkout.demo --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis
from celery import Celery
from sqlalchemy import Engine, create_engine, text

from . import db as harbor_db
from .api import order_id_for
from .checks import report, say, show_examples, summarize
from .provider import DECLINED_TOKEN, withholds_webhook
from .supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
APP_SPEC = "examples.harbor_checkout.tasks:app"
WORKERS = {"payments": 6, "notifications": 2, "harbor": 4}
"""Queue group -> worker concurrency (processes)."""
TERMINAL_RUN_STATES = (
    "completed",
    "compensated",
    "failed",
    "cancelled",
    "compensation_failed",
    "resolved",
)
UNSHIPPABLE_COUNTRY = "AQ"


class StopSignalError(Exception):
    """SIGINT or SIGTERM arrived: stop everything and leave."""


class DemoError(Exception):
    """The stack could not be brought up (a port, the database, a process)."""


@dataclass
class Sent:
    """One order the demo sent."""

    n: int
    expect: str  # "fulfilled" or "compensated"
    why: str  # "ok", "declined", "unshippable", "no_webhook" (charged, never captured)
    status: int = 0
    order_id: str | None = None
    latency: float = 0.0
    error: str | None = None


@dataclass
class Run:
    """Everything one demo run needs to know."""

    args: argparse.Namespace
    db_url: str
    engine: Engine
    api: str
    provider: str
    sup: Supervisor
    dashboard_port: int = 0
    sent: list[Sent] = field(default_factory=list)
    sending_done: threading.Event = field(default_factory=threading.Event)
    stop_sending: threading.Event = field(default_factory=threading.Event)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="scripts/demo", description="Run the Harbor Checkout demo end to end."
    )
    p.add_argument("--orders", type=int, default=200, help="orders to send (200)")
    p.add_argument(
        "--declined",
        type=float,
        default=0.10,
        help="share of orders paid with the declined card tok_declined (0.10)",
    )
    p.add_argument(
        "--unshippable",
        type=float,
        default=0.05,
        help=f"share of orders shipped to {UNSHIPPABLE_COUNTRY}, where no carrier "
        "goes: charged, then refunded (0.05)",
    )
    p.add_argument("--concurrency", type=int, default=10, help="parallel POSTs at most (10)")
    p.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="orders sent per second at most, like a busy shop; 0 sends them all at once (20)",
    )
    p.add_argument(
        "--database",
        default="harbor_demo",
        help="database name; dropped and recreated (harbor_demo)",
    )
    p.add_argument(
        "--server-url",
        default=harbor_db.SERVER_URL,
        help="URL of any database on the PostgreSQL server",
    )
    p.add_argument(
        "--no-setup",
        action="store_true",
        help="the database is set up already (scripts/demo does it)",
    )
    p.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/3",
        help="Redis broker; this Redis database is emptied first",
    )
    p.add_argument(
        "--failure-rate",
        type=float,
        default=0.2,
        help="share of provider calls answering 503 (0.2)",
    )
    p.add_argument("--latency-ms", default="20,150", help="provider latency range (20,150)")
    p.add_argument(
        "--no-webhook",
        type=float,
        default=0.1,
        help="share of orders whose capture webhook never comes, picked by order id: "
        "compensated when the wait times out (0.1)",
    )
    p.add_argument(
        "--webhook-delay-ms",
        default="200,1500",
        help="how long after a charge the provider sends its webhook (200,1500)",
    )
    p.add_argument(
        "--capture-timeout",
        type=float,
        default=5.0,
        help="seconds an order waits for its capture webhook (5)",
    )
    p.add_argument(
        "--cooling-off",
        type=float,
        default=2.0,
        help="seconds of the durable timer before mark_fulfilled (2; must be > 0)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=10.0,
        help="reconcile reports orders pending longer than this (10 s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="give up waiting for the orders after this many seconds (180)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for carts and faults")
    p.add_argument(
        "--kill-worker",
        action="store_true",
        help="kill the payments worker mid-run to watch it restart and recover",
    )
    p.add_argument("--log-dir", default=None, help="where process logs go (a temp dir)")
    args = p.parse_args(argv)
    if args.orders < 1 or not 0 <= args.declined + args.unshippable <= 1:
        p.error("--orders must be >= 1 and --declined + --unshippable between 0 and 1")
    if not 0 <= args.no_webhook <= 1 or args.capture_timeout <= 0 or args.cooling_off <= 0:
        p.error("--no-webhook must be between 0 and 1, --capture-timeout and --cooling-off > 0")
    return args


# -- bringing the stack up ----------------------------------------------------------------------


def child_env(args: argparse.Namespace, db_url: str, provider: str, api: str) -> dict[str, str]:
    """The environment every child gets."""
    env = {
        "HARBOR_DATABASE_URL": db_url,
        "SAGA_DATABASE_URL": db_url,
        "HARBOR_BROKER_URL": args.broker_url,
        "HARBOR_PAYMENTS_URL": provider,
        "HARBOR_STALE_AFTER": str(args.stale_after),
        "HARBOR_RECONCILE_EVERY": "5",
        "PROVIDER_FAILURE_RATE": str(args.failure_rate),
        "PROVIDER_LATENCY_MS": args.latency_ms,
        "PROVIDER_WEBHOOK_URL": f"{api}/webhooks/payment",
        "PROVIDER_WEBHOOK_DELAY_MS": args.webhook_delay_ms,
        "PROVIDER_NO_WEBHOOK_RATE": str(args.no_webhook),
        "HARBOR_CAPTURE_TIMEOUT": str(args.capture_timeout),
        "HARBOR_COOLING_OFF": str(args.cooling_off),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # Recover within the demo's time frame: a step whose worker died is retried 10 s past
        # its time limit, a message the broker lost (an outage) is published again after 20 s.
        "SAGA_LEASE_GRACE": "10",
        "SAGA_REPUBLISH_AFTER": "20",
    }
    if args.seed is not None:
        env["PROVIDER_SEED"] = str(args.seed)
    return env


def relay_argv() -> list[str]:
    """``saga relay --app ...`` when the CLI has it, else saga's relay entry point directly."""
    try:
        from saga.cli.main import cli

        has_relay = "relay" in cli.commands
    except Exception:  # the CLI is optional: fall back to the relay's entry point
        has_relay = False
    if not has_relay:
        code = (
            "import logging, sys; from saga.relay import main; "
            "logging.basicConfig(level=logging.INFO, "
            "format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
            f"sys.exit(main({APP_SPEC!r}))"
        )
        return [sys.executable, "-c", code]
    return [sys.executable, "-m", "saga.cli.main", "relay", "--app", APP_SPEC]


def start_stack(run: Run, env: dict[str, str], api_port: int, provider_port: int) -> None:
    """Start every process of the stack under the supervisor."""
    py = sys.executable
    sup = run.sup
    uvicorn = [
        py,
        "-m",
        "uvicorn",
        "--host",
        "127.0.0.1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    sup.start(
        "provider",
        [*uvicorn, "--port", str(provider_port), "examples.harbor_checkout.provider:app"],
        env,
    )
    sup.start("api", [*uvicorn, "--port", str(api_port), "examples.harbor_checkout.api:app"], env)
    sup.start("relay", relay_argv(), env)
    # The dashboard, read-only unless SAGA_DASHBOARD_TOKEN is set in the demo's environment.
    dashboard = [py, "-m", "saga.cli.main", "dashboard", "--app", APP_SPEC]
    sup.start("dashboard", [*dashboard, "--port", str(run.dashboard_port)], env)
    for queue, concurrency in WORKERS.items():
        sup.start(
            f"worker-{queue}",
            [
                py,
                "-m",
                "celery",
                "-A",
                APP_SPEC,
                "worker",
                "-Q",
                queue,
                "-n",
                f"{queue}@%h",
                "-c",
                str(concurrency),
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
        )


def wait_ready(run: Run, broker_url: str, timeout: float = 60.0) -> None:
    """Wait until the API and the provider answer and every worker answers a ping."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        for name, url in (("provider", run.provider), ("api", run.api)):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/healthz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise DemoError(f"{name} did not come up; see {run.sup.log_dir}/{name}.log")
                time.sleep(0.2)
    control = Celery("harbor-demo-control", broker=broker_url)
    want = set(WORKERS)
    try:
        while True:
            replies = control.control.ping(timeout=1.0) or []
            up = {name.split("@", 1)[0] for reply in replies for name in reply}
            if want <= up:
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"workers not answering: {sorted(want - up)}; "
                    f"see {run.sup.log_dir}/worker-*.log"
                )
    finally:
        control.close()


# -- sending orders -----------------------------------------------------------------------------


def plan_orders(args: argparse.Namespace, rng: random.Random) -> list[Sent]:
    """Which orders are built to fail: ``--declined`` and ``--unshippable`` shares."""
    n = args.orders
    declined = round(n * args.declined)
    unshippable = round(n * args.unshippable)
    kinds = ["declined"] * declined + ["unshippable"] * unshippable
    kinds += ["ok"] * (n - len(kinds))
    rng.shuffle(kinds)
    planned = []
    for i, kind in enumerate(kinds):
        # The order's id comes from its idempotency key, so the demo knows which charged
        # orders the provider sends no capture webhook for (a decline is never charged).
        silent = withholds_webhook(order_id_for(idempotency_key(i)), args.no_webhook)
        why = "no_webhook" if silent and kind != "declined" else kind
        planned.append(Sent(i, "fulfilled" if why == "ok" else "compensated", why))
    return planned


def idempotency_key(n: int) -> str:
    """The ``Idempotency-Key`` of the demo's order number ``n``."""
    return f"demo-{n}"


def cart(sent: Sent, rng: random.Random) -> dict[str, Any]:
    """A random cart for ``sent``."""
    skus = rng.sample(sorted(harbor_db.CATALOG), rng.randint(1, 3))
    return {
        "items": [{"sku": s, "qty": rng.randint(1, 3)} for s in skus],
        "card_token": DECLINED_TOKEN if sent.why == "declined" else "tok_visa_4242",
        "email": f"customer{sent.n}@example.com",
        "country": UNSHIPPABLE_COUNTRY
        if sent.why == "unshippable"
        else rng.choice(["US", "GB", "DE", "NL", "CA"]),
    }


def check_validation(run: Run) -> dict[str, Any]:
    """Bad carts are refused with 422 and a clear message, and nothing is written."""
    bad = {
        "unknown SKU": {
            "items": [{"sku": "NOPE-1", "qty": 1}],
            "card_token": "tok_visa",
            "email": "a@example.com",
        },
        "qty 0": {
            "items": [{"sku": "MUG-01", "qty": 0}],
            "card_token": "tok_visa",
            "email": "a@example.com",
        },
        "no items": {"items": [], "card_token": "tok_visa", "email": "a@example.com"},
        "no card": {"items": [{"sku": "MUG-01", "qty": 1}], "email": "a@example.com"},
    }
    before = count_rows(run.engine)
    results = {}
    with httpx.Client(base_url=run.api, timeout=10.0) as client:
        for label, body in bad.items():
            resp = client.post("/orders", json=body)
            detail = resp.json().get("detail")
            msg = detail[0]["msg"] if isinstance(detail, list) and detail else detail
            results[label] = {"status": resp.status_code, "msg": msg}
    ok = all(r["status"] == 422 for r in results.values()) and count_rows(run.engine) == before
    for label, r in results.items():
        say(f"  invalid cart ({label}): {r['status']} {r['msg']}")
    return {"ok": ok, "cases": len(bad)}


def count_rows(engine: Engine) -> tuple[int, int]:
    """Orders and their saga runs in the database."""
    with engine.connect() as conn:
        orders = conn.execute(text("SELECT count(*) FROM orders")).scalar_one()
        runs = conn.execute(
            text("SELECT count(*) FROM saga.runs WHERE workflow = 'fulfill_order'")
        ).scalar_one()
    return int(orders), int(runs)


def send_orders(run: Run, rng: random.Random) -> None:
    """POST every planned order, ``--concurrency`` at a time and ``--rate`` a second at most
    (in a thread; :attr:`Run.stop_sending` stops it)."""
    carts = [(s, cart(s, rng)) for s in run.sent]
    limits = httpx.Limits(max_connections=run.args.concurrency)

    def post(client: httpx.Client, sent: Sent, body: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            headers = {"Idempotency-Key": idempotency_key(sent.n)}
            resp = client.post("/orders", json=body, headers=headers)
            sent.latency = time.perf_counter() - t0
            sent.status = resp.status_code
            if resp.status_code == 202:
                sent.order_id = resp.json()["order_id"]
            else:
                sent.error = resp.text[:200]
        except httpx.HTTPError as exc:
            sent.error = f"{type(exc).__name__}: {exc}"

    try:
        with (
            httpx.Client(base_url=run.api, timeout=30.0, limits=limits) as client,
            concurrent.futures.ThreadPoolExecutor(run.args.concurrency) as pool,
        ):
            futures = []
            t0 = time.monotonic()
            for i, (s, body) in enumerate(carts):
                if run.args.rate > 0:
                    pause = t0 + i / run.args.rate - time.monotonic()
                    if pause > 0 and run.stop_sending.wait(pause):
                        break
                if run.stop_sending.is_set():
                    break
                futures.append(pool.submit(post, client, s, body))
            for f in futures:
                f.result()
    finally:
        run.sending_done.set()


# -- watching -----------------------------------------------------------------------------------


def progress(run: Run) -> dict[str, int]:
    """Orders by status and runs not yet finished."""
    with run.engine.connect() as conn:
        by_status: dict[str, int] = dict(
            conn.execute(text("SELECT status, count(*) FROM orders GROUP BY status")).all()
        )
        live = conn.execute(
            # The orders' runs: the reconcile schedule starts a run every few seconds.
            text(
                "SELECT count(*) FROM saga.runs "
                "WHERE workflow = 'fulfill_order' AND NOT state = ANY(:t)"
            ),
            {"t": list(TERMINAL_RUN_STATES)},
        ).scalar_one()
        # Suspended steps hold no worker: the waits for a webhook, the cooling-off timers.
        waiting: dict[str, int] = dict(
            conn.execute(
                text(
                    "SELECT step, count(*) FROM saga.step_runs "
                    "WHERE state = 'suspended' AND kind = 'step' GROUP BY step"
                )
            ).all()
        )
    return {
        **{k: int(v) for k, v in by_status.items()},
        "live_runs": int(live),
        "awaiting_capture": int(waiting.get("wait_for_capture", 0)),
        "cooling_off": int(waiting.get("cooling_off", 0)),
    }


def watch(run: Run, started: float) -> bool:
    """Print a progress line every second until every order's run has finished; ``False`` on
    timeout."""
    deadline = started + run.args.timeout
    killed = False
    while True:
        time.sleep(1.0)
        p = progress(run)
        sent = sum(1 for s in run.sent if s.status)
        restarts = sum(run.sup.restarts().values())
        say(
            f"[{time.monotonic() - started:5.1f}s] sent {sent}/{len(run.sent)}  "
            f"fulfilled {p.get('fulfilled', 0)}  compensated {p.get('cancelled', 0)}  "
            f"pending {p.get('pending', 0)}  other {p.get('rejected', 0)}  "
            f"runs in flight {p['live_runs']} (awaiting capture {p['awaiting_capture']}, "
            f"cooling off {p['cooling_off']})  restarts {restarts}"
        )
        if run.args.kill_worker and not killed and p.get("fulfilled", 0) >= len(run.sent) // 4:
            say("demo: killing the payments worker (SIGKILL); the supervisor restarts it")
            run.sup.kill("worker-payments")
            killed = True
        if run.sending_done.is_set() and p["live_runs"] == 0 and p.get("pending", 0) == 0:
            return True
        if time.monotonic() > deadline:
            say(f"demo: gave up waiting after {run.args.timeout:.0f}s")
            return False


def wait_for_reconcile(run: Run, timeout: float = 12.0) -> None:
    """Give the reconcile schedule the time to report at least once (every 5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with run.engine.connect() as conn:
            if conn.execute(text("SELECT count(*) FROM reconcile_reports")).scalar_one():
                return
        time.sleep(0.5)


# -- main ---------------------------------------------------------------------------------------


def run_orders(run: Run, rng: random.Random) -> dict[str, Any]:
    """With the stack up: try invalid carts, send the orders, watch them, check the outcome."""
    args = run.args
    say("== Invalid carts")
    args.validation_ok = check_validation(run)["ok"]
    run.sent = plan_orders(args, rng)
    pace = f"{args.rate:g} a second" if args.rate > 0 else "all at once"
    say(f"== Sending {args.orders} orders ({pace}, {args.concurrency} in parallel at most)")
    started = time.monotonic()
    sender = threading.Thread(target=send_orders, args=(run, rng), daemon=True)
    sender.start()
    finished = watch(run, started)
    sender.join(timeout=30)
    wait_for_reconcile(run)
    say("== Some orders, as the API shows them")
    show_examples(run)
    return summarize(run, finished)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise StopSignalError(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 only if every order ended as designed with no duplicate charge."""
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    rng = random.Random(args.seed)
    db_url = harbor_db.database_url(args.database, args.server_url)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="harbor-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(log_dir, cwd=str(REPO), say=say)
    engine = create_engine(db_url, pool_size=2)
    summary: dict[str, Any] | None = None
    run: Run | None = None
    try:
        if not args.no_setup:
            say(f"== Database {args.database}: recreating, migrating saga, creating tables")
            harbor_db.recreate_database(args.database, args.server_url)
            harbor_db.setup(db_url)
        redis.Redis.from_url(args.broker_url).flushdb()
        api_port, provider_port = free_port(), free_port()
        run = Run(
            args,
            db_url,
            engine,
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{provider_port}",
            sup,
            dashboard_port=free_port(),
        )
        say(f"== Starting the stack (logs in {log_dir})")
        start_stack(run, child_env(args, db_url, run.provider, run.api), api_port, provider_port)
        wait_ready(run, args.broker_url)
        say(
            f"  api {run.api}, provider {run.provider}, relay (+ reconcile schedule), workers "
            + ", ".join(f"{q} (x{c})" for q, c in WORKERS.items())
        )
        say(f"  dashboard http://127.0.0.1:{run.dashboard_port}/ (up while the demo runs)")
        summary = run_orders(run, rng)
        report(run, summary)
    except StopSignalError as exc:
        say(f"\ndemo: {exc}: stopping everything")
        return 130
    except DemoError as exc:
        say(f"demo: {exc}")
        return 1
    finally:
        if run is not None:
            run.stop_sending.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("== Stopping the stack")
        sup.stop_all()
        engine.dispose()
        if summary is not None:
            say("SUMMARY " + json.dumps(summary, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
