"""The one browser setup of every browser test: Debian's Chromium driven by Playwright for Python.

`make test` installs both when they are missing (the Makefile's `browser` target:
Debian's `chromium` package, Playwright from the dev extra); Playwright cannot
download its own browsers on this project's machines. Tests save their
screenshots in SCREENSHOTS, one folder for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Headless as root, without the background traffic Chromium tries at start: these
# machines refuse it (many refused connections a start) and it is nothing a test needs.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).with_name("screenshots")
VIEWPORT = {"width": 1400, "height": 1000}


@contextmanager
def chromium() -> Iterator:
    """A Playwright `Browser` on Debian's Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
