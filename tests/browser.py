"""Headless Chromium for dashboard tests (Playwright driving the system's Chromium).

Playwright's own browser download does not work offline, so tests launch the Debian package's
``/usr/bin/chromium`` (installed by ``.ci/run``). Without it a test skips on a user's machine and
fails under CI=true.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.services import need

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


@contextmanager
def chromium_page(http_credentials: dict[str, str] | None = None) -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        need("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1800},
                                          http_credentials=http_credentials)
            yield context.new_page()
        finally:
            browser.close()
