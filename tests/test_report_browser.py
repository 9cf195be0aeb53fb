"""The describe and report pages in a real browser: headless Chromium opens them from file://, every
plot must actually render (naturalWidth > 0), and the page may ask for nothing but itself and its
embedded data: URLs (it has to open offline).

Marked ``browser`` (not in the default run; ``make test-browser`` runs it). Needs Chromium and its
driver (Debian: ``apt-get install chromium chromium-driver``) and selenium (the ``dev`` extra); skips
without them. Selenium Manager never runs: the driver and the browser are given by path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import requested_urls, require_browser
from test_describe import write
from test_report import train_runs

from kiln.cli import main

pytestmark = pytest.mark.browser

WAIT = 60  # seconds; generous for a busy 2-core machine


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    require_browser()


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
    requested = requested_urls(driver)
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
