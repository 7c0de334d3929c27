"""The playground page in a real headless Chromium against `ldserve serve` (real uvicorn, Redis, model)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from .browser import Browser, find_chromium
from .conftest import API_KEY, Proc

SUMMARY = """JSON.stringify({
  state: document.body.dataset.state || null,
  status: document.getElementById('status').textContent,
  previews: [...document.querySelectorAll('#previews img')].map(i => [i.naturalWidth, i.naturalHeight]),
  results: [...document.querySelectorAll('#results img')].map(i => [i.naturalWidth, i.naturalHeight]),
  stats: [...document.querySelectorAll('#results dd')].map(d => d.textContent),
  model: document.getElementById('model').textContent})"""


@pytest.fixture(scope="module")
def browser() -> Browser:
    binary = find_chromium()
    if binary is None:
        if os.environ.get("LDSERVE_REQUIRE_BROWSER"):  # set by .ci/run, which installs chromium
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    b = Browser(binary)
    yield b
    b.close()


def run_page(browser: Browser, url: str) -> dict:
    session = browser.open(url)
    browser.wait_for(session, "['done', 'error'].includes(document.body.dataset.state)", timeout=90)
    return json.loads(browser.evaluate(session, SUMMARY))


def test_playground_generates_with_live_previews(serve: Proc, browser: Browser) -> None:
    page = httpx.get(f"{serve.url}/")  # public: holds no secret
    assert page.status_code == 200 and "script-src 'unsafe-inline'" in page.headers["content-security-policy"]
    got = run_page(browser, f"{serve.url}/?autostart=1&seed=5&n=2&partial_images=2&api_key={API_KEY}")
    assert got["state"] == "done", got
    assert got["status"].startswith("done: 256×256"), got
    assert got["previews"] == [[256, 256]] * 4 and got["results"] == [[256, 256]] * 2
    assert got["stats"][0] == "5" and "/" in got["stats"][1] and got["model"] == "model: tiny-2b"


def test_playground_shows_the_error_envelope(serve: Proc, browser: Browser) -> None:
    got = run_page(browser, f"{serve.url}/?autostart=1&api_key=not-the-key")
    assert got["state"] == "error" and got["status"].startswith("401 invalid_api_key"), got
    assert got["previews"] == [] and got["results"] == []
