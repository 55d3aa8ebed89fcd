"""The console in a real browser: Debian's headless Chromium, driven by Selenium through
chromedriver, against a real ``muster server`` process with a real ``muster agent``
process. Pages load, a submitted task appears and reaches SUCCEEDED, an output full of
markup stays text, the Content-Security-Policy is in force, the token never reaches a
page, a URL or a cookie. Screenshots go to ``$MUSTER_TEST_ARTIFACTS/console/<backend>/``
(default ``test-artifacts/console/<backend>/`` in the repository).

The server runs in its own process because Selenium's calls block: a server on this
test's event loop could not answer the browser while the test waits for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from muster import AsyncAdminClient, AsyncClient, ClientConfig
from muster.server.console.security import CSP
from muster.server.console.signin import COOKIE
from tests.conftest import BACKEND, FANOUT_SECRET
from tests.e2e import procs

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = (
    Path(os.environ.get("MUSTER_TEST_ARTIFACTS") or REPO / "test-artifacts") / "console" / BACKEND
)
XSS = (
    b'<script>document.title="pwned";alert("script")</script>'
    b"<img src=x onerror=\"document.title='pwned';alert('img')\">"
)
WAIT = 30.0

pytestmark = [
    pytest.mark.slow,  # processes and a browser: `make test`, not `make check`
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
        "/usr/bin/chromedriver): apt-get install chromium chromium-driver; CI installs them",
    ),
]


@dataclass
class Muster:
    url: str
    """The console, ``https://127.0.0.1:PORT``."""
    data: Path
    token: str
    client: ClientConfig
    log: Path
    """The server's standard error (its log)."""


@pytest.fixture
async def muster(tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Muster]:
    """A ``muster server`` process with its console on, and one ``muster agent``."""
    data = tmp_path / "data"
    settings = {
        "MUSTER_DATA_DIR": str(data),
        "MUSTER_API_ADDR": "127.0.0.1:0",
        "MUSTER_AGENT_ADDR": "127.0.0.1:0",
        "MUSTER_METRICS_ADDR": "",
        "MUSTER_CONSOLE_ADDR": "127.0.0.1:0",
        "MUSTER_POLL_INTERVAL": "0.2s",
        "MUSTER_SHUTDOWN_GRACE": "2s",
    }
    if backend:
        settings |= {
            "MUSTER_DATABASE_URL": str(backend["database_url"]),
            "MUSTER_REDIS_URL": str(backend["redis_url"]),
            "MUSTER_REDIS_PREFIX": str(backend["redis_prefix"]),
            "MUSTER_FANOUT_SECRET": FANOUT_SECRET,
            "MUSTER_MIGRATE": "yes",
        }
    server = await procs.spawn(
        "server", cwd=tmp_path, log=tmp_path / "server.log", environ=procs.env(**settings)
    )
    agent = None
    try:
        endpoints = await procs.wait_for_file(data / "endpoints.json")
        config = procs.admin_config(data, endpoints)
        async with AsyncAdminClient(config) as admin:
            agent = await procs.start_agent(
                admin, data, endpoints, "--executors", "echo", name="browser-agent", cwd=tmp_path
            )
        url = endpoints["console"].rstrip("/")
        yield Muster(url, data, config.token or "", config, tmp_path / "server.log")
    finally:
        if agent is not None:
            await procs.stop(agent)
        await procs.stop(server)


def spki_hash(chain_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the leaf: what Chromium's
    --ignore-certificate-errors-spki-list takes."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def browser(muster: Muster, tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
        # Trust exactly the server's key (Muster's test CA is not in Chromium's store),
        # not every certificate: the page is then a secure context, so the Secure cookie
        # is set and sent as it would be with a trusted CA.
        "--ignore-certificate-errors-spki-list="
        + spki_hash((muster.data / "server" / "server.pem").read_bytes()),
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Visit:
    """The browser on the console: every page it shows is checked for the token."""

    def __init__(self, driver: object, muster: Muster) -> None:
        from selenium.webdriver.remote.webdriver import WebDriver

        assert isinstance(driver, WebDriver)
        self.driver = driver
        self.muster = muster
        self.shots: list[Path] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def go(self, path: str) -> None:
        self.driver.get(self.muster.url + path)
        self.clean()

    def clean(self) -> None:
        """The token is in no page, no URL and no cookie; no dialog was opened."""
        from selenium.common.exceptions import NoAlertPresentException

        token, secret = self.muster.token, self.muster.token.split(".")[1]
        for text in (self.driver.page_source, self.driver.current_url):
            assert token not in text and secret not in text
        for cookie in self.driver.get_cookies():
            assert secret not in cookie["value"] and secret not in cookie["name"]
        with pytest.raises(NoAlertPresentException):
            _ = self.driver.switch_to.alert.text

    def text(self, element_id: str) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.ID, element_id).text)

    def until(self, path: str, element_id: str, expected: str) -> None:
        """Reload ``path`` until #element_id says ``expected`` (a deadline, no sleeps)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def shows(driver: object) -> bool:
            self.go(path)
            found = self.driver.find_elements(By.ID, element_id)
            return bool(found) and expected in found[0].text

        WebDriverWait(self.driver, WAIT, poll_frequency=0.2).until(shows)

    def shot(self, name: str) -> None:
        path = ARTIFACTS / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        self.shots.append(path)


async def test_the_console_in_a_real_browser(muster: Muster, browser: object) -> None:
    from selenium.webdriver.common.by import By

    visit = Visit(browser, muster)
    driver = visit.driver
    async with AsyncClient(muster.client) as client:
        stuck = await client.submit("render", {"scene": 1}, pool="gpu")  # no agent there

    # Signed out, every page sends the browser to the login form.
    visit.go("/tasks")
    assert driver.current_url == muster.url + "/login"
    visit.shot("01-login")
    driver.find_element(By.ID, "token").send_keys("mat_0000000000000000." + "x" * 43)
    driver.find_element(By.ID, "sign-in").click()
    visit.clean()
    assert visit.text("message") == "That API token was not accepted."
    assert "x" * 43 not in driver.page_source

    driver.find_element(By.ID, "token").send_keys(muster.token)
    driver.find_element(By.ID, "sign-in").click()
    visit.clean()
    assert driver.current_url == muster.url + "/"
    (cookie,) = driver.get_cookies()
    assert cookie["name"] == COOKIE
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert cookie["path"] == "/" and "expiry" not in cookie  # a session cookie
    assert driver.execute_script("return document.cookie") == ""  # HttpOnly: script sees none
    assert "default" in visit.text("pools")
    assert "NO_AGENT_IN_POOL \u00d7 1: no enabled agent is enrolled in pool gpu" in visit.text(
        "queues"
    )
    visit.shot("02-overview")

    visit.until("/agents", "agents", "connected")
    assert "browser-agent" in visit.text("agents") and "echo" in visit.text("agents")
    visit.shot("03-agents")

    async with AsyncClient(muster.client) as client:
        echo = await client.submit("echo", {"hello": "console"})
        xss = await client.submit("echo", XSS)
    visit.until("/tasks?kind=echo", "tasks", xss.task_id)
    assert echo.task_id in visit.text("tasks")
    driver.find_element(By.LINK_TEXT, echo.task_id).click()
    visit.until(f"/tasks/{echo.task_id}", "state", "SUCCEEDED")
    assert '"hello": "console"' in visit.text("output")
    visit.go(f"/tasks/{stuck.task_id}")
    assert visit.text("state") == "QUEUED" and "no enabled agent" in visit.text("task")
    visit.go(f"/tasks/{echo.task_id}")
    assert "task.finish" in visit.text("history")
    visit.shot("04-task-succeeded")

    # Markup in an output is shown as the text it is, and nothing of it runs.
    visit.until(f"/tasks/{xss.task_id}", "state", "SUCCEEDED")
    shown = visit.text("output")
    assert '<script>document.title="pwned";alert("script")</script>' in shown
    assert "<img src=x onerror=" in shown
    assert driver.find_elements(By.CSS_SELECTOR, "main script, main img") == []
    assert driver.title != "pwned" and driver.title.startswith("Task ")
    visit.shot("05-task-output-with-markup")

    visit.go("/tasks?state=succeeded&tenant=admin")
    assert {echo.task_id, xss.task_id} <= set(visit.text("tasks").split())
    visit.shot("06-tasks-filtered")
    visit.go("/tasks?state=bogus")
    assert visit.text("message").startswith("state: 'bogus' is not a task state")
    visit.go("/budgets")
    assert "No budget is set" in driver.page_source
    visit.until("/audit", "chain-status", "Chains verified: OK")
    assert "console.login" in visit.text("audit")
    visit.shot("07-audit")

    # No page needed anything the Content-Security-Policy forbids...
    logs = driver.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs
    # ...and the policy is in force: an inline script added to a page does not run.
    ran = driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        "document.body.appendChild(s); return window.ran === 1;"
    )
    assert ran is False
    assert any("Content Security Policy" in e["message"] for e in driver.get_log("browser"))

    # The headers as sent (Selenium cannot read them): a plain HTTPS request.
    context = ssl.create_default_context(cafile=muster.data / "ca" / "bundle.pem")
    with urllib.request.urlopen(muster.url + "/login", context=context) as response:
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["Cache-Control"] == "no-store"

    driver.find_element(By.CSS_SELECTOR, "form.who button").click()
    visit.clean()
    assert driver.current_url == muster.url + "/login"
    assert driver.get_cookies() == []
    visit.go("/agents")
    assert driver.current_url == muster.url + "/login"
    log = muster.log.read_text()
    assert "aiohttp.access" in log and "POST /login" in log  # the console's requests...
    assert muster.token.split(".")[1] not in log  # ...and never the token
    (ARTIFACTS / "screenshots.json").write_text(
        json.dumps([str(p.relative_to(ARTIFACTS)) for p in visit.shots], indent=2) + "\n"
    )
