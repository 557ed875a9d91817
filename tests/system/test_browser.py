"""/docs and /redoc in a real headless Chromium, with every request off 127.0.0.1 counted as a failure.

Needs Debian's `chromium` (driven by the PyPI `playwright` package, never `playwright install`).
Without it the suite skips on a laptop; under CI=true it fails instead, and `.ci/run` installs it.
Set UPDATE_SCREENSHOT=1 to rewrite the README's screenshot of /docs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "openapi" / "docs.png"
SCREENSHOT_SPEC = ROOT / "openapi" / "docs.png.spec-sha256"  # the spec the screenshot shows (tests/api/test_spec.py)
# Chromium, as root and on a closed network: no sandbox, and none of its own background traffic.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium (.ci/run does)", pytrace=False)
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402 - only once chromium is known


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class Watched:
    """A page whose requests to other hosts, page errors and console errors are all recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.outside: list[str] = []
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    def _request(self, request: Any) -> None:
        host = urlsplit(request.url).hostname
        if request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            return
        self.outside.append(request.url)

    def assert_clean(self) -> None:
        assert self.outside == [], f"requests that left 127.0.0.1: {self.outside}"
        assert self.errors == [], self.errors


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def _try_it_out(page: Page, operation: str, body: dict[str, Any] | None = None) -> tuple[str, Any]:
    """Expand an operation in Swagger UI, put a body in (or keep the example), Execute; status and response."""
    block = page.locator(f"#operations-v1-{operation}")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    if body is not None:
        block.locator("textarea.body-param__text").fill(json.dumps(body))
    block.get_by_role("button", name="Execute").click()
    live = block.locator(".live-responses-table .response")
    live.wait_for()
    status = live.locator(".response-col_status").inner_text().strip()
    text = live.locator(".response-col_description .microlight").first.inner_text()
    return status, json.loads(text)


def test_swagger_ui_runs_the_vae_and_the_autoencoder_offline(live: Server, page: Watched) -> None:
    page.page.goto(f"{live.url}/docs")
    page.page.locator("#operations-v1-encode_vae").wait_for()
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        page.page.screenshot(path=str(SCREENSHOT), full_page=True)
        spec = hashlib.sha256((ROOT / "openapi" / "openapi.json").read_bytes()).hexdigest()
        SCREENSHOT_SPEC.write_text(f"{spec}  openapi/openapi.json\n")
    landing = page.page.locator(".information-container").inner_text()
    assert "Reproducing a VAE sample" in landing
    assert "fingerprint" in landing

    body = {"inputs": [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], "samples": 3, "seed": 1234}
    status, shown = _try_it_out(page.page, "encode_vae", body)
    direct = httpx.post(f"{live.url}/v1/vae/encode", json=body).json()
    assert status == "200"
    assert shown["z"] == direct["z"]
    assert shown["seed"] == 1234

    body = {"inputs": [[1, 1, 0, 0, 1]]}
    status, shown = _try_it_out(page.page, "encode_autoencoder", body)
    assert status == "200"
    assert shown == httpx.post(f"{live.url}/v1/autoencoder/encode", json=body).json()

    page.assert_clean()


def test_the_examples_run_as_they_stand(live: Server, page: Watched) -> None:
    page.page.goto(f"{live.url}/docs")
    status, shown = _try_it_out(page.page, "encode_vae")
    assert status == "200"
    assert shown["seed"] == 42
    assert len(shown["z"][0]) == 2  # the example asks for two samples
    status, shown = _try_it_out(page.page, "encode_autoencoder")
    assert status == "200"
    assert len(shown["codes"]) == 2
    page.assert_clean()


def test_redoc_renders_every_operation_offline(live: Server, page: Watched) -> None:
    page.page.goto(f"{live.url}/redoc")
    page.page.get_by_role("heading", name="VAE posterior and samples of binary rows").first.wait_for()
    text = page.page.locator("body").inner_text()
    summaries = ("Autoencoder codes of binary rows", "The served model", "Liveness", "Readiness")
    for summary in (*summaries, "Every model served", "Load a model", "Repository index"):
        assert summary in text
    page.assert_clean()
