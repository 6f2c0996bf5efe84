"""The dashboard in a real headless browser (Debian's chromium and chromium-driver, driven by
Selenium; nothing is downloaded): against a ``saga dashboard`` process, a real worker and
relay. Screenshots go to the test's directory (and to ``$SAGA_SCREENSHOTS`` when set)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from sqlalchemy import text

from tests.acceptance.conftest import BIN, REPO, System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "operator-s3cret"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless chromium with a fresh profile."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "needs Debian's chromium and chromium-driver (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(system: System) -> str:
    """``saga dashboard --app <the system's app>`` with an operator token; its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**system.env, "SAGA_DASHBOARD_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    argv = [str(BIN / "saga"), "dashboard", "--app", system.app, "--port", str(port)]
    system.supervisor.start("dashboard", argv, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, interval=0.2, message="the dashboard did not start")
    return url


def screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> Path:
    """Save a screenshot; copy it to ``$SAGA_SCREENSHOTS`` too when that is set."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    if os.environ.get("SAGA_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["SAGA_SCREENSHOTS"]) / f"{name}.png")
    return path


def step_states(driver: webdriver.Chrome) -> dict[str, str]:
    """The graph's boxes and their states, read in one go (the page replaces them live)."""
    pairs = driver.execute_script(
        "return Array.from(document.querySelectorAll('#graph g.step'))"
        ".map(g => [g.getAttribute('data-step'), g.getAttribute('data-state')])"
    )
    return {step: state for step, state in pairs}


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    """The text of the element ``element_id`` now (``''`` if there is none)."""
    found = driver.execute_script(
        "var e = document.getElementById(arguments[0]); return e ? e.textContent : ''",
        element_id,
    )
    return str(found)


def test_the_overview_loads_and_a_run_page_draws_its_graph_and_follows_the_run_to_its_end(
    system: System, dashboard: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    system.start_relay()
    system.start_worker()
    browser.get(dashboard + "/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
    wait_until(lambda: "worker" in browser.find_element(By.ID, "processes").text
               or browser.refresh(), timeout=20, interval=0.5, message="no worker listed")
    screenshot(browser, tmp_path, "dashboard-overview")

    [run_id] = system.start_runs("test.linear", {"sleep": {"second": 4}})
    browser.get(f"{dashboard}/runs/{run_id[:8]}")
    assert text_of(browser, "run-state") == "running"
    assert set(step_states(browser)) == {"first", "second", "third"}
    assert step_states(browser)["third"] != "completed"
    wait_until(lambda: step_states(browser).get("second") == "running", timeout=20,
               interval=0.2, message="the graph did not show the running step")
    screenshot(browser, tmp_path, "dashboard-run")

    # No reload: the page follows the run by itself.
    wait_until(lambda: text_of(browser, "run-state") == "completed",
               timeout=40, interval=0.2, message="the page did not follow the run")
    assert step_states(browser) == dict.fromkeys(("first", "second", "third"), "completed")
    assert '"step": "third"' in text_of(browser, "result")
    assert "run_completed" in text_of(browser, "history")


def test_an_action_without_the_operator_token_is_refused(
    system: System, dashboard: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    [run_id] = system.start_runs("test.linear", {})  # no worker: it stays running
    browser.get(f"{dashboard}/runs/{run_id}")
    form = browser.find_element(By.ID, "cancel")
    form.find_element(By.NAME, "reason").send_keys("no token")
    form.find_element(By.TAG_NAME, "button").click()
    # The answer is a new page: wait for it rather than read the one the click left.
    title = wait_until(lambda: text_of(browser, "message-title"), timeout=20, interval=0.2,
                       message="no answer to the action without a token")
    assert title == "Refused"
    assert "operator token" in text_of(browser, "message")
    assert system.states([run_id])[run_id] == "running"

    browser.get(f"{dashboard}/runs/{run_id}")
    form = browser.find_element(By.ID, "cancel")
    form.find_element(By.NAME, "reason").send_keys("customer asked")
    form.find_element(By.NAME, "token").send_keys(TOKEN)
    form.find_element(By.TAG_NAME, "button").click()
    shown = wait_until(lambda: text_of(browser, "done") or text_of(browser, "message"),
                       timeout=20, interval=0.2, message="no answer to the action")
    assert "cancel: the run is now" in shown
    assert system.states([run_id])[run_id] in ("cancelling", "cancelled")

    # The dashboard's /metrics (a process of its own: its own meter provider).
    metrics = httpx.get(dashboard + "/metrics", timeout=10).text
    assert 'saga_state="cancell' in metrics and "saga_runs" in metrics


def _waiting_workflows(queue: str) -> list[Any]:
    from tests.apps import waiting

    return waiting.workflows(queue)


@pytest.mark.parametrize(
    "system_app", [("tests.apps.waiting:app", _waiting_workflows)], ids=["waiting"]
)
def test_a_signal_sent_from_the_run_page_completes_the_waiting_step_and_needs_the_token(
    system: System, dashboard: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    system.start_relay()
    system.start_worker()
    [run_id] = system.start_runs("w.signalled", {})

    def paid() -> str:
        return next(s["state"] for s in system.engine.get_run(run_id)["steps"]
                    if s["step"] == "paid")

    wait_until(lambda: paid() == "suspended", timeout=30, interval=0.2,
               message="the signal wait did not begin")

    def send(token: str | None) -> None:
        browser.get(f"{dashboard}/runs/{run_id}")
        form = browser.find_element(By.ID, "signal-paid")
        assert form.find_element(By.NAME, "name").get_attribute("value") == "payment_captured"
        data = form.find_element(By.NAME, "data")
        data.clear()
        data.send_keys('{"amount": 12}')
        if token:
            form.find_element(By.NAME, "token").send_keys(token)
        form.find_element(By.TAG_NAME, "button").click()

    send(None)
    title = wait_until(lambda: text_of(browser, "message-title"), timeout=20, interval=0.2,
                       message="no answer to the signal without a token")
    assert title == "Refused"
    assert "operator token" in text_of(browser, "message")
    assert paid() == "suspended"

    send(TOKEN)
    shown = wait_until(lambda: text_of(browser, "done") or text_of(browser, "message"),
                       timeout=20, interval=0.2, message="no answer to the signal")
    assert "signal 'payment_captured': delivered" in shown
    wait_until(lambda: text_of(browser, "run-state") == "completed", timeout=30, interval=0.2,
               message="the run did not complete after its signal")
    assert paid() == "completed"
    assert system.engine.get_run(run_id)["result"]["end"] == {"after": ["paid"]}
    screenshot(browser, tmp_path, "dashboard-signalled")


def test_a_script_in_a_step_name_an_input_or_a_key_is_shown_as_text(
    system: System, dashboard: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    hostile = "<script>window.pwned = 1</script>"
    with system.engine.engine.begin() as conn:
        run_id = system.engine.start(
            conn, "test.linear", {"note": hostile}, key="<img src=x onerror='window.pwned=2'>"
        ).run_id
        conn.execute(
            text("INSERT INTO saga.step_runs (run_id, kind, step, state, pending_deps)"
                 " VALUES (:id, 'step', '<script>window.pwned = 3</script>', 'waiting', 1)"),
            {"id": run_id},
        )
    for path in (f"/runs/{run_id}", "/runs"):
        browser.get(dashboard + path)
        assert browser.execute_script("return window.pwned") is None
    browser.get(f"{dashboard}/runs/{run_id}")
    assert hostile in browser.find_element(By.ID, "input").text
    assert "<script>window.pwned = 3</script>" in text_of(browser, "steps")
    screenshot(browser, tmp_path, "dashboard-escaped")
