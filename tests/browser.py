"""Headless Chromium for the UI tests, and where their screenshots are kept.

The browser is Debian's chromium (`make chromium`): Playwright's own browser builds are downloads,
which this setup never makes. Screenshots are test artifacts: `test-artifacts/<test>/` in the
repository (ignored by git), kept after the run whatever its outcome.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# --disable-background-networking: no calls home (a closed network refuses them, slowly).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (Debian's chromium package)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def ui_page(browser: Browser, url: str, timeout_ms: float) -> Iterator[Page]:
    """A fresh browser context (no cookies, no local storage) on the Dagster UI at `url`."""
    context = browser.new_context(base_url=url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(timeout_ms)
    # `dagster dev` on localhost opens a "Join the Dagster community" dialog over whatever page is
    # shown, a second after load; its Skip button stores this, so a returning user never sees it.
    context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
    try:
        yield context.new_page()
    finally:
        context.close()


def artifacts_of(request: pytest.FixtureRequest) -> Path:
    """The test's own folder of artifacts, emptied of an earlier run's."""
    folder = ARTIFACTS / request.node.name
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
