"""The test supervisor restarts what dies unexpectedly and leaves stopped processes alone."""

from __future__ import annotations

import signal
import sys

from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

READY = "ready"
SLEEPER = [
    sys.executable,
    "-u",
    "-c",
    "import time; print('rea' + 'dy', flush=True); time.sleep(60)",
]


def test_a_killed_process_is_restarted_and_its_log_kept(supervisor: Supervisor) -> None:
    first = supervisor.start("sleeper", SLEEPER)
    wait_until(lambda: READY in supervisor.log("sleeper"), message="sleeper never started")

    supervisor.kill("sleeper")

    wait_until(lambda: supervisor.restarts("sleeper") == 1, message="no restart")
    wait_until(lambda: supervisor.pid("sleeper") not in (None, first), message="no new pid")
    wait_until(lambda: supervisor.log("sleeper").count(READY) == 2, message="no second start")
    assert supervisor.exit_codes("sleeper") == [-signal.SIGKILL]


def test_a_process_that_exits_by_itself_is_restarted(supervisor: Supervisor) -> None:
    supervisor.start("crasher", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])

    wait_until(lambda: supervisor.restarts("crasher") >= 2, message="crasher not restarted")
    assert supervisor.exit_codes("crasher")[:2] == [3, 3]
    assert supervisor.log("crasher").count("boom") >= 2


def test_a_stopped_process_is_not_restarted() -> None:
    with Supervisor(backoff=0.05) as sup:
        sup.start("sleeper", SLEEPER)
        wait_until(lambda: READY in sup.log("sleeper"), message="sleeper never started")

        code = sup.stop("sleeper")

        assert code == -signal.SIGTERM
        assert sup.pid("sleeper") is None
        assert sup.restarts("sleeper") == 0
        assert "restarting" not in sup.log("sleeper")
