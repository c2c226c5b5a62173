"""The dashboard in a real headless browser (Debian's chromium and chromium-driver).

A lighthouse with a token serves quorums of two replicas (one restarts and
heals); the page must draw each group's step over time, list the events,
and its buttons must work: kill a group, change the outer lr, shut down --
each asking for the token the first time.  CI installs the browser
(.ci/run); elsewhere the test skips when it is absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from ftwire.messages import Member
from lighthouse.client import LighthouseClient
from lighthouse.server import LighthouseServer, ServerConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "s3cret"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser test: .ci/run installs chromium-driver")
    pytest.skip(
        "no /usr/bin/chromium or /usr/bin/chromedriver: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def lighthouse() -> Iterator[tuple[LighthouseServer, BackgroundLoop]]:
    loop = BackgroundLoop("dashboard-lighthouse")
    config = ServerConfig(min_replicas=2, join_timeout=10.0, heartbeat_timeout=120.0, token=TOKEN)

    async def start() -> LighthouseServer:
        server = LighthouseServer(config)
        await server.start()
        return server

    server = loop.run(start(), timeout=10)
    yield server, loop
    loop.run(server.stop(), timeout=10)
    loop.close()


@pytest.fixture
def browser() -> Iterator[object]:
    profile = tempfile.mkdtemp(prefix="ftdiloco-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and the browser it started
        shutil.rmtree(profile, ignore_errors=True)


def heartbeat(url: str, rid: str, incarnation: str) -> None:
    """What a restarted replica's liveness link does first: say it is alive, newly started."""
    body = protocol.encode_heartbeat(rid, protocol.Liveness(incarnation))
    headers = {"Content-Type": protocol.CONTENT_TYPE, **guard.authorization(TOKEN)}
    request = urllib.request.Request(url + "/v1/heartbeat", body, headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def form_quorums(url: str) -> None:
    """Three quorums of a and b; before the third, b restarts (new incarnation) at step 0."""
    rounds = [
        (
            Member("a", step=0, incarnation="a1"),
            Member("b", step=0, incarnation="b1"),
        ),
        (
            Member("a", step=1, incarnation="a1", data={"loss": 2.5}),
            Member("b", step=1, incarnation="b1", data={"loss": 2.75}),
        ),
        (
            # A DyLU / async group says its pace (rate, H, staleness) with its join.
            Member(
                "a",
                step=2,
                incarnation="a1",
                data={"loss": 2.25, "info": {"rate": 12.5, "h": 10, "staleness": 1}},
            ),
            Member("b", step=0, incarnation="b2"),
        ),
    ]
    with (
        LighthouseClient(url, TOKEN) as a,
        LighthouseClient(url, TOKEN) as b,
        ThreadPoolExecutor(2) as pool,
    ):
        for ma, mb in rounds:
            if mb.incarnation == "b2":
                heartbeat(url, "b", "b2")
            qa = pool.submit(a.join, ma, 10.0)
            qb = pool.submit(b.join, mb, 10.0)
            assert qa.result().replica_ids == qb.result().replica_ids == ("a", "b")


def answer_dialogs(driver, *texts: str | None) -> None:
    """Accept the next dialogs in order, typing ``text`` into each prompt (None: a confirm)."""
    for text in texts:
        alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
        if text is not None:
            alert.send_keys(text)
        alert.accept()


def events_text(driver) -> str:
    return driver.find_element(By.ID, "events").text


def test_the_dashboard_shows_a_live_job_and_its_buttons_work(lighthouse, browser) -> None:
    server, loop = lighthouse
    form_quorums(server.url)
    driver = browser
    wait = WebDriverWait(driver, 15)
    driver.get(server.url + "/")

    # Per-group step over time: one line per group, drawn from /status.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart polyline")) == 2)
    lines = driver.find_elements(By.CSS_SELECTOR, "#chart polyline")
    assert {line.get_attribute("data-replica") for line in lines} == {"a", "b"}
    assert all(len(line.get_attribute("points").split()) == 3 for line in lines)
    legend = driver.find_element(By.ID, "legend").text
    assert "a (step 2)" in legend and "b (step 0)" in legend
    # The timeline: b's restart and heal.
    wait.until(lambda d: "b restarted and rejoined at step 0" in events_text(d))
    assert "b heals from step 0 to step 2" in events_text(driver)
    rows = driver.find_element(By.ID, "replicas").text
    assert "a" in rows and "b" in rows
    assert "12.5/s 10 1" in rows  # a's rate, H and staleness; b says nothing of its pace
    # Loss per group over time, from the losses the groups report with their joins.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#loss-chart polyline")) == 2)
    losses = {
        line.get_attribute("data-replica"): len(line.get_attribute("points").split())
        for line in driver.find_elements(By.CSS_SELECTOR, "#loss-chart polyline")
    }
    assert losses == {"a": 2, "b": 1}
    assert "a (loss 2.250)" in driver.find_element(By.ID, "loss-legend").text

    # Checkpoint every group: these replicas have no liveness link, so none is connected.
    driver.find_element(By.ID, "checkpoint").click()
    answer_dialogs(driver, TOKEN)
    wait.until(lambda d: "no connected group" in d.find_element(By.ID, "control-result").text)

    # Kill b: confirm (the token was given for the checkpoint, and is remembered).
    driver.find_element(By.CSS_SELECTOR, 'button.kill[data-replica="b"]').click()
    answer_dialogs(driver, None)
    wait.until(lambda d: "killed b" in d.find_element(By.ID, "control-result").text)
    wait.until(lambda d: "b evicted: killed" in events_text(d))
    assert "b killed by operator: dashboard" in events_text(driver)
    assert "b" not in loop.run(_alive(server), timeout=5)

    # Change the outer lr and momentum: the token is remembered.
    driver.find_element(By.ID, "outer-lr").send_keys("0.3")
    driver.find_element(By.ID, "outer-momentum").send_keys("0.5")
    driver.find_element(By.ID, "apply-settings").click()
    wait.until(lambda d: "pending" in d.find_element(By.ID, "control-result").text)
    assert server.settings.pending == {"outer_lr": 0.3, "outer_momentum": 0.5}
    wait.until(lambda d: "settings changed: outer_lr 0.3, outer_momentum 0.5" in events_text(d))

    # Shut down.
    driver.find_element(By.ID, "shutdown").click()
    answer_dialogs(driver, None)
    loop.run(server.wait_stopped(), timeout=10)


def test_a_wrong_token_is_refused_and_asked_again(lighthouse, browser) -> None:
    server, _ = lighthouse
    form_quorums(server.url)
    driver = browser
    wait = WebDriverWait(driver, 15)
    driver.get(server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'button.kill[data-replica="a"]'))
    driver.find_element(By.ID, "outer-lr").send_keys("0.2")
    driver.find_element(By.ID, "apply-settings").click()
    answer_dialogs(driver, "wrong")
    wait.until(lambda d: "unauthorized" in d.find_element(By.ID, "control-result").text)
    assert server.settings.pending is None
    driver.find_element(By.ID, "apply-settings").click()
    answer_dialogs(driver, TOKEN)  # asked again, since the last one was refused
    wait.until(lambda d: "pending" in d.find_element(By.ID, "control-result").text)
    assert server.settings.pending == {"outer_lr": 0.2}


async def _alive(server: LighthouseServer) -> set[str]:
    return set(server.core.last_seen())
