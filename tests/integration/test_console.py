"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The screenshot is kept as a test artifact: ``$LORAPLEX_TEST_ARTIFACTS/console.png`` (default
``test-artifacts/``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from loraplex.testing.launcher import RunningServer

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LORAPLEX_TEST_ARTIFACTS", "test-artifacts"))
WAIT_MS = 120_000
"""How long an ``expect`` polls: the page shows what the server answers to a poll every 2 s,
and a busy server (the traffic below, a loaded machine) may answer later than Playwright's
default 5 s."""


@pytest.fixture(scope="module", autouse=True)
def patient_expect() -> Iterator[None]:
    expect.set_options(timeout=WAIT_MS)
    yield
    expect.set_options(timeout=5_000)  # Playwright's default


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


def traffic(server: RunningServer, stop: threading.Event) -> None:
    """Small requests to both adapters and one unknown model until ``stop``."""
    models = ["pirate", "shout", "pirate", "no-such-adapter"]
    i = 0
    while not stop.is_set():
        body = {"model": models[i % len(models)], "prompt": "Hi", "max_tokens": 4}
        httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        i += 1


def open_console(browser: Browser, server: RunningServer) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(server.url + "/ui")
    return page


def test_console_refuses_without_the_admin_key(browser: Browser, server: RunningServer) -> None:
    page = open_console(browser, server)
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#console")).to_be_hidden()
    status = page.evaluate("fetch('/admin/console').then(r => r.status)")
    assert status == 401
    page.fill("#key", "not-the-key")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("admin key")
    expect(page.locator("#console")).to_be_hidden()
    page.close()


def test_console_shows_adapters_and_live_charts(browser: Browser, server: RunningServer) -> None:
    page = open_console(browser, server)
    page.fill("#key", server.admin_key)  # type: ignore[attr-defined]
    page.click("button[type=submit]")
    for name in ("pirate", "shout"):
        expect(page.locator(f"#adapters tr[data-adapter={name}]")).to_be_visible()
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(server, stop), daemon=True)
    sender.start()
    try:
        page.wait_for_function(
            "Number(document.getElementById('rate-chart').dataset.points) >= 3 && "
            "Number(document.getElementById('latency-chart').dataset.points) >= 3",
            timeout=WAIT_MS,
        )
        expect(page.locator("#errors")).to_contain_text("no-such-adapter")
    finally:
        stop.set()
        sender.join(timeout=120)
    expect(page.locator("#adapters tr[data-adapter=pirate]")).to_contain_text("cpu")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
    page.close()
