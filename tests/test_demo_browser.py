"""The demo page in a real browser: `kiln serve` in a subprocess, headless Chromium through Selenium.

Marked ``browser`` (not in the default run; ``make test-browser`` runs it). Needs Chromium and its
driver (Debian: ``apt-get install chromium chromium-driver``) and selenium (the ``dev`` extra); skips
without them. Selenium Manager never runs: the driver and the browser are given by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import TINY_PROFILE, requested_urls, require_browser, sentiment_rows
from test_qa import make_examples
from test_token import sentences, write_conll

import kiln

pytestmark = pytest.mark.browser

# Seconds. Generous: on a busy 2-core machine loading torch alone can take minutes; a hang still fails.
WAIT = 120
START = 600


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    require_browser()
    pytest.importorskip("fastapi")


# -- runs, the server, the browser -------------------------------------------------------------
def train_tiny(tmp_path: Path, task: str, name: str, files: dict[str, str], epochs: int) -> Path:
    """A tiny run of ``task`` on ``files`` (file name -> text), trained in seconds."""
    data = tmp_path / name
    data.mkdir()
    for file, text in files.items():
        (data / file).write_text(text)
    (tmp_path / "tiny.yaml").write_text(TINY_PROFILE)
    return kiln.train(task, data, name=name, profile=str(tmp_path / "tiny.yaml"), epochs=epochs,
                      output_dir=tmp_path / "runs").path


def train_sequence(tmp_path: Path) -> Path:
    files = {name: "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows)
             for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2)))}
    return train_tiny(tmp_path, "sequence", "seq", files, epochs=3)


def train_token(tmp_path: Path) -> Path:
    scratch = tmp_path / "conll-src"
    scratch.mkdir()
    for file, count, seed in (("train.txt", 200, 1), ("valid.txt", 40, 2)):
        write_conll(scratch / file, sentences(count, seed))
    files = {file: (scratch / file).read_text() for file in ("train.txt", "valid.txt")}
    return train_tiny(tmp_path, "token", "ner", files, epochs=4)


def train_qa(tmp_path: Path) -> Path:
    files = {name: "".join(json.dumps(row) + "\n" for row in rows)
             for name, rows in (("train.jsonl", make_examples(200, 1)), ("validation.jsonl", make_examples(40, 2)))}
    return train_tiny(tmp_path, "qa", "qa", files, epochs=3)


def kiln_command() -> list[str]:
    """The installed ``kiln`` beside this Python (else ``python -m kiln``)."""
    script = Path(sys.executable).with_name("kiln")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kiln"]


def cli_prediction(run: Path, line: str) -> object:
    """What ``kiln predict RUN --json`` prints for one stdin line (its first prediction)."""
    done = subprocess.run([*kiln_command(), "predict", str(run), "--json"], input=line + "\n", text=True,
                          capture_output=True, timeout=START, check=True)
    return json.loads(done.stdout)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(run: Path, log: Path, api_key: str = "") -> Iterator[str]:
    """``kiln serve RUN`` on a free loopback port until the block ends; yields its base URL once
    /health says the model is loaded."""
    port = free_port()
    env = {**os.environ, "KILN_API_KEY": api_key}  # the environment, not --api-key: no key in `ps`
    with open(log, "w") as out:
        process = subprocess.Popen([*kiln_command(), "serve", str(run), "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START
        while True:
            if process.poll() is not None:
                pytest.fail(f"kiln serve exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"kiln serve never became healthy:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()  # SIGTERM: kiln serve drains and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def assert_same_origin(urls: list[str], base: str) -> None:
    origin = urlsplit(base)
    foreign = [url for url in urls if not url.startswith("data:")
               and (urlsplit(url).scheme, urlsplit(url).netloc) != (origin.scheme, origin.netloc)]
    assert urls and not foreign, f"the page asked for something other than {base}: {foreign}"


def open_page(driver: object, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.ID, "info").get_attribute("data-task") or d.find_element(By.ID, "error").text)


def run_input(driver: object) -> dict | list:
    """Click Run, wait for the answer, and return the prediction the page shows (its JSON)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "submit").click()
    result = driver.find_element(By.ID, "result")
    WebDriverWait(driver, WAIT).until(lambda d: result.get_attribute("data-state") in ("done", "error"))
    assert result.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
    return json.loads(result.get_attribute("data-prediction"))


def type_into(driver: object, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, element_id)
    box.clear()
    if all(ord(char) <= 0xFFFF for char in text):
        box.send_keys(text)
    else:  # ChromeDriver types only the Basic Multilingual Plane: an emoji goes in as the value
        driver.execute_script("arguments[0].value = arguments[1]", box, text)


def screenshot(driver: object, path: Path, record_property: object) -> None:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0
    record_property("screenshot", str(path))
    print(f"screenshot: {path}")


# -- the tests ---------------------------------------------------------------------------------
def test_sequence_demo_shows_what_kiln_predict_prints(tmp_path, browser, record_property):
    from selenium.webdriver.common.by import By

    run = train_sequence(tmp_path)
    examples = json.loads((run / "model" / "kiln.json").read_text())["examples"]
    text = "the ending is superb ."
    expected = cli_prediction(run, text)
    with served(run, tmp_path / "serve.log") as url:
        open_page(browser, url)
        info = browser.find_element(By.ID, "info")
        assert info.get_attribute("data-task") == "sequence"
        assert "test-tiny" in info.text and "neg" in info.text and "pos" in info.text and "fp32" in info.text
        chips = browser.find_elements(By.CSS_SELECTOR, "#examples .chip")
        assert [chip.get_attribute("title") for chip in chips] == examples  # the run's stored examples
        chips[1].click()
        assert browser.find_element(By.ID, "input-text").get_attribute("value") == examples[1]
        assert run_input(browser) == cli_prediction(run, examples[1])

        type_into(browser, "input-text", text)
        shown = run_input(browser)
        assert shown["label"] == expected["label"] and shown["score"] == pytest.approx(expected["score"], abs=1e-6)
        row = browser.find_element(By.CSS_SELECTOR, "#result [data-label]")
        assert row.get_attribute("data-label") == expected["label"]
        assert row.text.split() == [expected["label"], f"{expected['score']:.4f}"]  # as printed, 4 decimals
        assert browser.find_element(By.ID, "latency").text.endswith(" ms")
        assert browser.find_element(By.ID, "error").text == ""
        screenshot(browser, tmp_path / "demo-sequence.png", record_property)
        assert_same_origin(requested_urls(browser), url)
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_token_demo_with_an_api_key_highlights_the_entities(tmp_path, browser, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    run = train_token(tmp_path)
    text = "Alice met Bob in Paris with Acme today"
    expected = cli_prediction(run, text)
    with served(run, tmp_path / "serve.log", api_key="s3cret key") as url:
        open_page(browser, url)  # no key yet: /info answers 401, and the page says so
        error = browser.find_element(By.ID, "error")
        assert "HTTP 401" in error.text and "API key" in error.text
        type_into(browser, "api-key", "s3cret key")
        browser.find_element(By.ID, "api-key").send_keys(Keys.TAB)  # change: the page asks /info again
        WebDriverWait(browser, WAIT).until(
            lambda d: d.find_element(By.ID, "info").get_attribute("data-task") == "token")
        assert error.text == ""

        type_into(browser, "input-text", text)
        shown = run_input(browser)
        assert len(shown) == len(expected) and expected  # the tiny tagger finds entities here
        for got, want in zip(shown, expected, strict=True):
            assert {**got, "score": 0} == {**want, "score": 0}
            assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        marks = browser.find_elements(By.CSS_SELECTOR, "#result mark")
        assert [m.get_attribute("data-entity") for m in marks] == [e["entity_group"] for e in expected]
        assert all(m.text.startswith(e["word"]) for m, e in zip(marks, expected, strict=True))
        screenshot(browser, tmp_path / "demo-token.png", record_property)
        assert_same_origin(requested_urls(browser), url)


def test_qa_demo_highlights_the_answer_in_the_context(tmp_path, browser, record_property):
    from selenium.webdriver.common.by import By

    run = train_qa(tmp_path)
    example = json.loads((run / "model" / "kiln.json").read_text())["examples"][0]
    # An emoji before the answer: the page counts characters as Python does (code points, not UTF-16).
    context, question = "it was warm 😀 . Anna lives in Vienna . it was sunny .", "Where does Anna live ?"
    expected = cli_prediction(run, f"{context}\t{question}")
    with served(run, tmp_path / "serve.log") as url:
        open_page(browser, url)
        browser.find_elements(By.CSS_SELECTOR, "#examples .chip")[0].click()
        assert browser.find_element(By.ID, "input-context").get_attribute("value") == example["context"]
        assert browser.find_element(By.ID, "input-question").get_attribute("value") == example["question"]
        type_into(browser, "input-context", context)
        type_into(browser, "input-question", question)
        shown = run_input(browser)
        assert {**shown, "score": 0} == {**expected, "score": 0}
        assert shown["score"] == pytest.approx(expected["score"], abs=1e-6)
        if expected["answer"]:
            [mark] = browser.find_elements(By.CSS_SELECTOR, "#result mark")
            assert mark.text == expected["answer"] == context[expected["start"]:expected["end"]]
        screenshot(browser, tmp_path / "demo-qa.png", record_property)
        assert_same_origin(requested_urls(browser), url)


def test_demo_page_serves_an_int8_export(tmp_path, browser, record_property):
    """kiln serve on a `kiln export --quantize int8` directory: the same page, answering what
    `kiln predict EXPORT --json` prints."""
    pytest.importorskip("onnxruntime")
    from selenium.webdriver.common.by import By

    from kiln.export import export

    exported = tmp_path / "exports" / "seq"
    export(train_sequence(tmp_path), exported, quantize="int8")
    text = "the ending is superb ."
    expected = cli_prediction(exported, text)
    with served(exported, tmp_path / "serve.log") as url:
        open_page(browser, url)
        assert browser.find_element(By.ID, "info").get_attribute("data-task") == "sequence"
        type_into(browser, "input-text", text)
        shown = run_input(browser)
        assert shown["label"] == expected["label"] and shown["score"] == pytest.approx(expected["score"], abs=1e-6)
        assert browser.find_element(By.ID, "error").text == ""
        screenshot(browser, tmp_path / "demo-export.png", record_property)
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_multiple_choice_demo_picks_a_candidate(tmp_path, browser, record_property):
    """The page builds its form from what the task declares (/info's demo): a context, a question and
    one candidate per line."""
    from selenium.webdriver.common.by import By
    from test_multiple_choice import swag_rows

    files = {name: "".join(json.dumps(row) + "\n" for row in swag_rows(n, seed))
             for name, n, seed in (("train.jsonl", 120, 1), ("dev.jsonl", 20, 2))}
    run = train_tiny(tmp_path, "multiple-choice", "mc", files, epochs=2)
    example = json.loads((run / "model" / "kiln.json").read_text())["examples"][0]
    context, choices = "the fox is green .", ["it is red .", "it is green .", "it is blue ."]
    expected = cli_prediction(run, "\t".join([context, *choices]))
    with served(run, tmp_path / "serve.log") as url:
        open_page(browser, url)
        assert browser.find_element(By.ID, "info").get_attribute("data-task") == "multiple-choice"
        browser.find_elements(By.CSS_SELECTOR, "#examples .chip")[0].click()
        assert browser.find_element(By.ID, "input-context").get_attribute("value") == example["context"]
        assert browser.find_element(By.ID, "input-text").get_attribute("value") == "\n".join(example["choices"])
        type_into(browser, "input-context", context)
        type_into(browser, "input-question", "")
        type_into(browser, "input-text", "\n".join(choices))
        shown = run_input(browser)
        assert {**shown, "score": 0} == {**expected, "score": 0}
        assert shown["score"] == pytest.approx(expected["score"], abs=1e-6)
        row = browser.find_element(By.CSS_SELECTOR, "#result .row.top")
        assert row.get_attribute("data-label") == str(expected["label"]) and expected["answer"] in row.text
        screenshot(browser, tmp_path / "demo-mc.png", record_property)
        assert_same_origin(requested_urls(browser), url)
