"""The describe and report pages in a real browser: headless Chromium opens them from file://, every
plot must actually render (naturalWidth > 0), and the page may ask for nothing but itself and its
embedded data: URLs (it has to open offline).

Marked ``browser`` (not in the default run; ``make test-browser`` runs it). Needs Chromium and its
driver (Debian: ``apt-get install chromium chromium-driver``) and selenium (the ``dev`` extra); skips
without them. Selenium Manager never runs: the driver and the browser are given by path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_describe import write
from test_report import train_runs

from kiln.cli import main

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("KILN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("KILN_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 60  # seconds; generous for a busy 2-core machine


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    pytest.importorskip("selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            pytest.skip(f"{path} is absent (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium that records every request it makes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--hide-scrollbars"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_and_check(driver: object, page: Path, screenshot: Path, plots: int) -> None:
    """Open ``page``, wait until its images have loaded, check each rendered, and save a full-page
    screenshot."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && [...document.images].every(i => i.complete)"))
    widths = driver.execute_script("return [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
    assert len(widths) == plots
    assert all(width > 0 and height > 0 for _, width, height in widths), widths
    requested = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 12000))
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_report_page_renders_every_plot(browser: object, tmp_path: Path) -> None:
    from kiln.report import report

    runs = train_runs(tmp_path)
    page = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "-o", str(page)]) == 0
    open_and_check(browser, page, tmp_path / "report.png", plots=len(report(runs).curves()))


def test_describe_page_renders_every_plot(browser: object, tmp_path: Path) -> None:
    folder = tmp_path / "ner"
    sentence = ["Alice B-PER", "met O", "Bob B-PER", "in O", "Paris B-LOC", ""]
    write(folder / "train.txt", sentence * 20)
    write(folder / "valid.txt", sentence * 5)
    page = tmp_path / "describe.html"
    assert main(["describe", "token", str(folder), "-o", str(page)]) == 0
    # lengths, tags, entity types
    open_and_check(browser, page, tmp_path / "describe.png", plots=3)
