"""The Harbor Checkout demo, end to end at a small size: API, relay (firing the reconcile
schedule), one worker per queue group and the payment-provider stand-in as real processes, run
by the demo's own orchestrator (``python -m examples.harbor_checkout.demo``) on a database of
its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import db

REPO = Path(__file__).resolve().parents[2]
ORDERS = 20
BROKER = os.environ.get("HARBOR_TEST_BROKER_URL", "redis://127.0.0.1:6379/12")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_orders_end_as_designed(tmp_path: Path) -> None:
    name = db.random_name()
    server = db.sqlalchemy_url(db.base_url().database or "postgres")
    argv = [
        sys.executable,
        "-m",
        "examples.harbor_checkout.demo",
        "--orders",
        str(ORDERS),
        "--declined",
        "0.1",
        "--unshippable",
        "0.1",
        "--database",
        name,
        "--server-url",
        server,
        "--broker-url",
        BROKER,
        "--timeout",
        "100",
        "--seed",
        "7",
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    try:
        proc = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=220, check=False
        )
    finally:
        db.drop_database(name)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert lines, f"no SUMMARY line (exit {proc.returncode}):\n{out[-6000:]}"
    summary = json.loads(lines[-1].removeprefix("SUMMARY "))

    assert summary["finished"], out[-6000:]
    assert summary["problems"] == [], summary["problems"]
    assert summary["expected"] == {"fulfilled": 16, "compensated": 4}
    assert summary["as_designed"] == ORDERS
    assert summary["fulfilled"] == 16
    assert summary["compensated"] == 4
    assert summary["runs"] == {"completed": 16, "compensated": 4}
    assert summary["max_charges_per_order"] <= 1
    assert summary["duplicate_charges"] == 0
    assert summary["refunds"] == 2  # the unshippable orders were charged, then refunded
    assert summary["stock_consistent"]
    assert summary["invalid_carts_refused"]
    assert summary["reconcile"]["reports"] >= 1
    assert summary["reconcile"]["runs"] == summary["reconcile"]["slots"] >= 1
    assert summary["ok"]
    assert proc.returncode == 0, out[-6000:]
