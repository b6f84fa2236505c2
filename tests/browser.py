"""Headless Chromium through the system's chromedriver for the page's tests (no browser download). A test module
calls `skip_without_chromium()` before importing selenium, then takes the `chromium` context for its fixture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,2000", "--force-device-scale-factor=1")  # fmt: skip


def skip_without_chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (scripts/setup.sh --dev installs them as root: "
                    "apt-get install chromium chromium-driver)", allow_module_level=True)  # fmt: skip


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium (selenium's webdriver.Chrome) with its console log kept, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations, script errors
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
