"""kiln serve: the HTTP API over a trained model.

FastAPI's TestClient (as a context manager, so the lifespan runs) for the endpoints, limits and
errors; a real uvicorn subprocess on a free loopback port for concurrency, --max-wait-ms 0 and
SIGTERM; schemathesis for a bounded fuzz run against /openapi.json. The models are tiny random
runs (2 layers, hidden 32) trained for a step, compared in fp32.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY_PROFILE, sentiment_rows
from fastapi.testclient import TestClient

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.serve.app import create_app
from kiln.serve.batcher import RECENT_BATCHES, Full, MicroBatcher
from kiln.serve.metrics import Histogram, ServeMetrics
from kiln.serve.settings import ServeSettings

T5_TINY = """\
base: t5-tiny
model: {config: {d_model: 32, d_ff: 64, num_layers: 2, num_decoder_layers: 2, num_heads: 2, d_kv: 16}}
tokenizer: {vocab_size: 300}
optim: {lr: 1.0e-2}  # one step away from the init, which ends every output at once
schedule: {warmup_ratio: 0.0}
train: {batch_tokens: 256}
generate: {max_new_tokens: 8}
"""
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "jumps", "big", "small"]
NAMES = {"Alice": "PER", "Bob": "PER", "Paris": "LOC", "Berlin": "LOC", "Acme": "ORG"}
CITIES = ["Paris", "Berlin", "Rome", "Oslo", "Lisbon"]
TEXTS = ["the film is great .", "every scene is dull .", "the cast is superb and the plot is bland .",
         "this movie", "a", "the ending is wonderful , the cast is charming , the plot is tedious ."]


# -- tiny runs, trained once per module ------------------------------------------------------
def _write_data(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    folders = {task: root / task for task in ("sequence", "token", "qa", "generation")}
    for folder in folders.values():
        folder.mkdir()
    for name, seed in (("train", 1), ("dev", 2)):
        rows = sentiment_rows(40 if name == "train" else 8, seed)
        (folders["sequence"] / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
        lines = ["-DOCSTART- -X- -X- O", ""]
        for _ in range(40 if name == "train" else 8):
            for _ in range(rng.randint(3, 7)):
                word = rng.choice([*NAMES, "went", "to", "see", "the", "with"])
                lines.append(f"{word} NN O {'B-' + NAMES[word] if word in NAMES else 'O'}")
            lines.append("")
        (folders["token"] / f"{name}.txt").write_text("\n".join(lines) + "\n")
        qa_rows = []
        for i in range(40 if name == "train" else 8):
            city = rng.choice(CITIES)
            context = f"it was sunny . Anna lives in {city} . it was warm ."
            qa_rows.append({"id": str(i), "context": context, "question": "Where does Anna live ?",
                            "answers": {"text": [city], "answer_start": [context.index(city)]}})
        (folders["qa"] / f"{name if name == 'train' else 'validation'}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in qa_rows))
        sources = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(40 if name == "train" else 8)]
        (folders["generation"] / f"{name}.tsv").write_text("source\ttarget\n" + "".join(f"{s}\t{s}\n" for s in sources))
    return folders


class Trained(dict):
    """Run directories by task, each trained (one step) the first time a test asks for it."""

    def __init__(self, root: Path, cache: Path):
        super().__init__()
        self.root, self.cache = root, cache
        self.data = _write_data(root)
        (root / "tiny.yaml").write_text(TINY_PROFILE)
        (root / "t5.yaml").write_text(T5_TINY)

    def __missing__(self, task: str) -> Path:
        profile = self.root / ("t5.yaml" if task == "generation" else "tiny.yaml")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KILN_CACHE", str(self.cache))
            self[task] = kiln.train(task, self.data[task], name=task, profile=str(profile), max_steps=1,
                                    precision="fp32", output_dir=self.root / "runs").path
        return self[task]


class Loaded(dict):
    """Predictors (fp32) by task, loaded the first time a test asks for one."""

    def __init__(self, runs: Trained):
        super().__init__()
        self.runs = runs

    def __missing__(self, task: str) -> Any:
        self[task] = kiln.load(self.runs[task], precision="fp32")
        return self[task]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A one-step run directory per task: sequence, token, qa, generation (t5)."""
    return Trained(tmp_path_factory.mktemp("serve"), tmp_path_factory.getbasetemp() / "kiln-cache")


@pytest.fixture(scope="module")
def predictors(runs: Trained) -> Loaded:
    return Loaded(runs)


def client(predictor: Any, **settings: Any) -> TestClient:
    return TestClient(create_app(predictor, ServeSettings(**settings)))


def same(ours: Any, theirs: Any) -> bool:
    """Equal, floats to 1e-5 (a batch pads differently from a file's batches)."""
    if isinstance(ours, float) or isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs, strict=True))
    return ours == theirs


def cli_json(run: Path, lines: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
             *flags: str) -> Any:
    """What ``kiln predict RUN --json`` prints for these stdin lines."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert main(["predict", str(run), "--json", "--precision", "fp32", *flags]) == 0
    return json.loads(capsys.readouterr().out)


# -- endpoints -------------------------------------------------------------------------------
def test_every_endpoint(predictors):
    predictor = predictors["sequence"]
    with client(predictor, max_inputs=7) as api:
        assert api.get("/health").json() == {"status": "ok"}
        info = api.get("/info").json()
        assert info == {"task": "sequence", "labels": ["neg", "pos"], "profile": "test-tiny",
                        "num_parameters": sum(p.numel() for p in predictor.model.parameters()), "runtime": "torch",
                        "parameters": {},
                        "precision": "fp32", "device": "cpu", "kiln_version": kiln.__version__, "max_inputs": 7,
                        "examples": predictor.meta.get("examples", []),
                        "demo": {"input": "text", "label": "Text", "render": "labels"}}
        answer = api.post("/predict", json={"inputs": ["the film is great .", {"text": "a dull mess"}]})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert same(answer.json(), predictor.predict(["the film is great .", "a dull mess"]))
        assert same(api.post("/predict", json={"inputs": "a dull mess"}).json(), predictor.predict(["a dull mess"]))

        metrics = api.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'kiln_http_requests_total{path="/predict",status="200"} 2' in metrics.text
        assert "kiln_batch_requests_count 2" in metrics.text and "kiln_model_loaded 1" in metrics.text
        for name in ("kiln_queue_seconds", "kiln_http_request_duration_seconds", "kiln_batch_inputs"):
            assert f"# TYPE {name} histogram" in metrics.text

        schema = api.get("/openapi.json").json()
        body = schema["components"]["schemas"]["PredictRequest"]
        many, *one = body["properties"]["inputs"]["anyOf"]  # a list of inputs, or one on its own
        assert many["type"] == "array" and many["maxItems"] == 7 and many["minItems"] == 1
        assert one == many["items"]["anyOf"]  # a lone input has an input's shape
        assert set(schema["paths"]["/predict"]["post"]["responses"]) == {
            "200", "400", "401", "408", "413", "415", "422", "429", "503"}
        assert "swagger" in api.get("/docs").text.lower()
        page = api.get("/")
        if (Path(kiln.__file__).parent / "serve" / "static" / "index.html").is_file():
            assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        else:
            assert page.status_code == 404 and page.json()["error_type"] == "not_found"


@pytest.mark.parametrize("task", ["sequence", "token", "qa", "generation"])
def test_predictions_equal_kiln_predict_json(task, runs, predictors, capsys, monkeypatch):
    lines, items = {
        "sequence": (TEXTS, [TEXTS[0], *({"text": t} for t in TEXTS[1:])]),
        "token": (["Alice went to Paris", "the Acme with Bob to see Berlin", "Bob"],
                  ["Alice went to Paris", {"tokens": ["the", "Acme", "with", "Bob", "to", "see", "Berlin"]},
                   {"tokens": ["Bob"]}]),
        "qa": (["Anna lives in Oslo .\tWhere does Anna live ?", "it was warm . Anna lives in Rome .\tWho ?"],
               ["Anna lives in Oslo .\tWhere does Anna live ?",
                {"context": "it was warm . Anna lives in Rome .", "question": "Who ?"}]),
        "generation": (["red cat runs", "big blue dog", "small"],
                       ["red cat runs", {"source": "big blue dog"}, "small"]),
    }[task]
    expected = cli_json(runs[task], lines, capsys, monkeypatch)
    with client(predictors[task]) as api:
        answer = api.post("/predict", json={"inputs": items})
    assert answer.status_code == 200, answer.text
    assert same(answer.json(), expected), (answer.json(), expected)


def test_parameters_change_generation_as_predict_generate_does(runs, predictors, capsys, monkeypatch):
    sources = ["red cat runs", "big blue dog", "green bird jumps"]
    predictor = predictors["generation"]
    with client(predictor) as api:
        assert api.get("/info").json()["parameters"] == predictor.parameters()
        assert predictor.parameters()["num_beams"] == 1 and predictor.parameters()["max_new_tokens"] == 8

        def ask(**parameters: Any) -> list:
            answer = api.post("/predict", json={"inputs": sources, "parameters": parameters})
            assert answer.status_code == 200, answer.text
            return answer.json()

        default = ask()
        assert default == cli_json(runs["generation"], sources, capsys, monkeypatch)
        for parameters in ({"num_beams": 3}, {"max_new_tokens": 1}, {"num_beams": 2, "no_repeat_ngram_size": 1}):
            flags = [flag for name, value in parameters.items() for flag in ("--generate", f"{name}={value}")]
            assert ask(**parameters) == cli_json(runs["generation"], sources, capsys, monkeypatch, *flags), parameters
        short = ask(max_new_tokens=1)
        assert short != default and all(len(a["generated_text"]) <= len(b["generated_text"])
                                        for a, b in zip(short, default, strict=True))
        assert ask() == default  # an override never sticks to the shared config
        assert predictor.config.generate.num_beams == 1 and predictor.config.generate.max_new_tokens == 8

        for parameters, field, message in (
            ({"beams": 2}, "parameters.beams", "unknown parameter 'beams'"),
            ({"num_beams": 0}, "parameters.num_beams", "must be at least 1"),
            ({"num_beams": "2"}, "parameters.num_beams", "expects int"),
            ({"num_beams": True}, "parameters.num_beams", "expects int"),
            ({"temperature": 0, "do_sample": True}, "parameters.temperature", "must be above 0"),
            ({"num_beams": None}, "parameters.num_beams", "cannot be null"),
        ):
            answer = api.post("/predict", json={"inputs": sources, "parameters": parameters})
            assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
            assert message in answer.json()["error"]


JSON = {"content-type": "application/json"}


def test_limits_and_errors(predictors):
    predictor = predictors["sequence"]

    def refused(answer: httpx.Response, status: int, field: str | None = None, message: str = "") -> None:
        assert answer.status_code == status, answer.text
        body = answer.json()
        assert set(body) == {"error", "error_type", "field"} and body["field"] == field
        assert message in body["error"]

    with client(predictor, max_body_bytes=2000, max_inputs=3) as api:
        # JSON only: a cross-origin page can send text/plain or a form without a CORS preflight.
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            refused(api.post("/predict", headers={"content-type": kind}, content=b'{"inputs": ["a"]}'), 415,
                    message="application/json")
        refused(api.post("/predict", content=b'{"inputs": ["a"]}'), 415, message="Content-Type: none")
        assert api.post("/predict", headers={"content-type": "application/json; charset=utf-8"},
                        content=b'{"inputs": ["a"]}').status_code == 200
        refused(api.post("/predict", headers=JSON, content=b'{"inputs": ["a"'), 400, message="not valid JSON")
        refused(api.post("/predict", headers=JSON, content=b""), 400, message="empty body")
        refused(api.post("/predict", headers=JSON, content=b'{"inputs": [NaN]}'), 400, message="NaN is not JSON")
        refused(api.post("/predict", headers=JSON, content=b"\xff\xfe{}"), 400)
        refused(api.post("/predict", headers=JSON, content=b"[" * 5000), 413)
        refused(api.post("/predict", headers=JSON, content=b"[" * 1500), 400, message="nested too deeply")
        refused(api.post("/predict", headers=JSON, content=json.dumps({"inputs": ["x" * 3000]})), 413,
                message="at most 2000")

        def chunks():  # no Content-Length: the streamed size is what counts
            yield b'{"inputs": ["'
            for _ in range(30):
                yield b"x" * 100
            yield b'"]}'

        refused(api.post("/predict", headers=JSON, content=chunks()), 413, message="over 2000 bytes")
        refused(api.post("/predict", json={"inputs": ["a", "b", "c", "d"]}), 422, "inputs", "at most 3 inputs")
        refused(api.post("/predict", json={"inputs": []}), 422, "inputs", "at least one input")
        refused(api.post("/predict", json={"texts": ["a"]}), 422, "texts", "unknown field")
        refused(api.post("/predict", json={"parameters": {}}), 422, "inputs", "field required")
        refused(api.post("/predict", json=["a"]), 422, None, "expected a JSON object")
        refused(api.post("/predict", json={"inputs": ["a", 3]}), 422, "inputs[1]", "got a number")
        refused(api.post("/predict", json={"inputs": ["a", None]}), 422, "inputs[1]", "got null")
        refused(api.post("/predict", json={"inputs": [{"text": 1}]}), 422, "inputs[0].text", "expected a string")
        refused(api.post("/predict", json={"inputs": [{"txt": "a"}]}), 422, "inputs[0].txt", 'expected "text"')
        refused(api.post("/predict", headers=JSON, content=b'{"inputs": ["\\ud800"]}'), 422, "inputs[0]",
                "lone surrogate")
        refused(api.post("/predict", json={"inputs": ["a"], "parameters": [1]}), 422, "parameters")
        refused(api.post("/predict", json={"inputs": ["a"], "parameters": {"top_k": 2}}), 422, "parameters.top_k",
                "takes: none")
        refused(api.get("/nowhere"), 404)
        answer = api.put("/predict")
        refused(answer, 405)
        assert answer.headers["allow"] == "POST"
        assert api.post("/predict", json={"inputs": ["a", "b", "c"]}).status_code == 200  # still serving
        metrics = api.get("/metrics").text
        assert 'kiln_http_errors_total{path="/predict",status="413"} 3' in metrics
        assert 'kiln_http_errors_total{path="other",status="404"} 1' in metrics

    with client(predictors["qa"]) as api:  # the task's own checks: shapes, then parse_input, then encode
        good = {"context": "Anna lives in Oslo .", "question": "Where ?"}
        refused(api.post("/predict", json={"inputs": [good, good, good, {"context": "x"}]}), 422,
                "inputs[3].question", "field required")
        refused(api.post("/predict", json={"inputs": [good, "no tab here"]}), 422, "inputs[1]",
                "a context and a question separated by a tab")
        long_question = {"context": "Anna lives in Oslo .", "question": " ".join(["where"] * 200)}
        # A KilnError from encoding: about the request as a whole (the window), so no field.
        refused(api.post("/predict", json={"inputs": [good, long_question]}), 422, None, "leaves no room")
    with client(predictors["token"]) as api:
        refused(api.post("/predict", json={"inputs": [{"tokens": ["Bob", 2]}]}), 422, "inputs[0].tokens[1]")
        refused(api.post("/predict", json={"inputs": [{"tokens": "Bob"}]}), 422, "inputs[0].tokens", "an array")
        refused(api.post("/predict", json={"inputs": [{"tokens": []}]}), 422, "inputs[0]", "empty sentence")
        refused(api.post("/predict", json={"inputs": ["  "]}), 422, "inputs[0]", "empty sentence")


def test_api_key(predictors):
    with client(predictors["sequence"], api_key="s3cret-ключ") as api:
        for path in ("/info", "/metrics"):
            assert api.get(path).status_code == 401
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-ключ".encode()},
                        {"Authorization": "Bearer s3cret-клю".encode()}, {"Authorization": "Bearer s3cret"}):
            answer = api.post("/predict", json={"inputs": ["a"]}, headers=headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error_type"] == "unauthorized"
        key = {"Authorization": "Bearer s3cret-ключ".encode()}  # a non-ASCII key travels as its UTF-8 bytes
        assert api.post("/predict", json={"inputs": ["a"]}, headers=key).status_code == 200
        assert api.get("/info", headers=key).status_code == 200
        assert api.get("/health").status_code == 200  # probes need no key
        assert "HTTPBearer" in api.get("/openapi.json").json()["components"]["securitySchemes"]


def test_health_is_503_until_the_model_is_loaded(predictors):
    release = threading.Event()
    ready = []

    def load() -> Any:
        release.wait(30)
        return predictors["sequence"]

    with TestClient(create_app(load, ServeSettings(), on_ready=ready.append)) as api:
        answer = api.get("/health")
        assert answer.status_code == 503 and answer.json()["status"] == "loading"
        for request in (api.get("/info"), api.post("/predict", json={"inputs": ["a"]})):
            assert request.status_code == 503 and request.json()["error_type"] == "unavailable"
            assert request.headers["retry-after"] == "1"
        assert "kiln_model_loaded 0" in api.get("/metrics").text
        release.set()
        deadline = time.monotonic() + 30
        while api.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.get("/health").json() == {"status": "ok"} and ready[0].error is None
        assert api.post("/predict", json={"inputs": ["a"]}).status_code == 200

    def broken() -> Any:
        raise KilnError("no kiln.json: not a model kiln saved", "runs/x")

    with TestClient(create_app(broken, ServeSettings(), on_ready=ready.append)) as api:
        deadline = time.monotonic() + 10
        while len(ready) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(ready[1].error, KilnError)
        answer = api.get("/health")
        assert answer.status_code == 503 and answer.json()["status"] == "error"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``pretrained(task)``: a three-step mlm or clm run on a tiny corpus, loaded in fp32."""
    from test_pretrain import CRAMMED_TINY, GPT2_TINY, sentences

    root = tmp_path_factory.mktemp("serve-pretrain")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(sentences(300)) + "\n")
    (corpus / "valid.txt").write_text("\n".join(sentences(30, seed=1)) + "\n")
    loaded: dict[str, Any] = {}

    def load(task: str) -> Any:
        if task not in loaded:
            profile = root / f"{task}.yaml"
            profile.write_text({"mlm": CRAMMED_TINY, "clm": GPT2_TINY + "generate: {max_new_tokens: 12}\n"}[task])
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("KILN_CACHE", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
                run = kiln.train(task, corpus, name=task, profile=str(profile), output_dir=root / "runs",
                                 max_steps=3, lr=1e-4, precision="fp32")
            loaded[task] = kiln.load(run.path, precision="fp32")
        return loaded[task]

    return load


@pytest.mark.parametrize(("task", "inputs", "parameters"), [
    ("mlm", ["the cat [MASK] on a mat .", "a [MASK] ."], {"top_k": 2}),
    ("clm", ["the cat sat", "a big red dog ran"], {"max_new_tokens": 3, "return_full_text": False}),
])
def test_pretraining_runs_take_strings_and_their_parameters(task, inputs, parameters, pretrained):
    predictor = pretrained(task)
    with client(predictor) as api:
        assert api.get("/info").json()["parameters"] == predictor.parameters()
        for chosen in ({}, parameters):
            answer = api.post("/predict", json={"inputs": inputs, "parameters": chosen})
            assert answer.status_code == 200, answer.text
            assert same(answer.json(), predictor.predict(inputs, chosen))
        answer = api.post("/predict", json={"inputs": [{"text": inputs[0]}]})
        assert answer.status_code == 422 and answer.json()["error"] == "inputs[0]: expected a string, got an object"


# -- the predictor is safe to share -----------------------------------------------------------
def test_predictor_never_mutates_its_shared_config(runs, predictors, tmp_path):
    predictor = predictors["sequence"]
    data = tmp_path / "swapped.tsv"
    data.write_text("".join(f"{i}\t{text}\n" for i, text in enumerate(TEXTS)))
    dataset = predictor.read(data, labelled=False, columns="text=1")
    assert [ex["texts"][0] for ex in dataset.examples] == TEXTS and predictor.config.data.columns == ""
    generator = predictors["generation"]
    expected = {beams: generator.predict(["red cat runs", "big blue dog"], {"num_beams": beams}) for beams in (1, 3)}
    results: list = []

    def work(beams: int) -> None:
        for _ in range(3):
            results.append((beams, generator.predict(["red cat runs", "big blue dog"], {"num_beams": beams})))

    threads = [threading.Thread(target=work, args=(beams,)) for beams in (1, 3, 1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 12 and all(result == expected[beams] for beams, result in results)
    assert generator.config.generate.num_beams == 1
    with pytest.raises(KilnError, match="unknown parameter 'beams'"):
        generator.predict(["a"], {"beams": 2})


def test_batcher_gathers_by_parameters_and_isolates_a_failing_request():
    calls: list[tuple[list, dict]] = []

    def predict(examples: list, parameters: dict) -> list:
        calls.append((list(examples), parameters))
        if "bad" in examples:
            raise KilnError("bad input", "<input>", examples.index("bad") + 1)
        return [f"{e}:{parameters.get('p', 0)}" for e in examples]

    async def scenario() -> list:
        batcher = MicroBatcher(predict, max_batch_tokens=100, max_wait=0.2)
        batcher.start()
        jobs = [batcher.submit([f"a{i}"], {}, "{}", 10) for i in range(3)]
        jobs += [batcher.submit(["b"], {"p": 1}, '{"p": 1}', 10), batcher.submit(["bad", "c"], {}, "{}", 10)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results[:4] == [["a0:0"], ["a1:0"], ["a2:0"], ["b:1"]]
    assert isinstance(results[4], KilnError) and results[4].line == 1  # its own line, not the batch's
    assert calls[0] == (["a0", "a1", "a2", "bad", "c"], {})  # one batch: same parameters, within budget
    assert (["b"], {"p": 1}) in calls and (["bad", "c"], {}) in calls


def test_batcher_waits_only_for_as_many_as_came_together_recently():
    """A lone client is answered at once; clients that sent together are gathered again (up to max_wait),
    until a few batches have shown that they stopped."""
    calls: list[list] = []

    def predict(examples: list, parameters: dict) -> list:
        calls.append(list(examples))
        return examples

    async def scenario() -> list[float]:
        batcher = MicroBatcher(predict, max_batch_tokens=100, max_wait=0.2)
        batcher.start()
        loop = asyncio.get_running_loop()

        async def timed(name: str, delay: float = 0.0) -> float:
            await asyncio.sleep(delay)
            started = loop.time()
            await batcher.submit([name], {}, "{}", 1)
            return loop.time() - started

        took = [await timed("lone")]
        await asyncio.gather(*(timed(name) for name in "abc"))  # three together: one batch
        await asyncio.gather(*(timed(name, 0.05 * i) for i, name in enumerate("xyz")))  # gathered again
        took += [await timed(f"alone{i}") for i in range(RECENT_BATCHES + 1)]
        await batcher.close()
        return took

    took = asyncio.run(scenario())
    assert calls[:3] == [["lone"], ["a", "b", "c"], ["x", "y", "z"]] and len(calls) == 4 + RECENT_BATCHES
    assert took[0] < 0.1
    assert all(t >= 0.18 for t in took[1:-1])  # each waits for two more that never come
    assert took[-1] < 0.1  # the groups have left the recent batches


def test_metrics_text_format():
    histogram = Histogram("x_seconds", "Doc.", (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7):
        histogram.observe(value, path='/a"b')
    assert histogram.lines() == [
        "# HELP x_seconds Doc.", "# TYPE x_seconds histogram",
        'x_seconds_bucket{path="/a\\"b",le="0.1"} 2', 'x_seconds_bucket{path="/a\\"b",le="1"} 3',
        'x_seconds_bucket{path="/a\\"b",le="+Inf"} 4', 'x_seconds_sum{path="/a\\"b"} 7.65',
        'x_seconds_count{path="/a\\"b"} 4']
    text = ServeMetrics().render(loaded=True)
    assert text.endswith("\n") and all(line.startswith("#") or re.fullmatch(r"\w+(\{.*\})? \S+", line)
                                       for line in text.splitlines())


# -- the command -------------------------------------------------------------------------------
def test_cli_errors_are_one_line(runs, capsys, monkeypatch, tmp_path):
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("not a run or model directory (no config.json or "
                                                    "model/config.json)")
    assert main(["serve", str(runs["sequence"]), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "kiln: setting '--port' must be at most 65535, got 70000\n"
    assert main(["serve", str(runs["sequence"]), "--max-inputs", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        capsys.readouterr()
        assert main(["serve", str(runs["sequence"]), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: cannot listen on 127.0.0.1:") and err.count("\n") == 1, err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", str(runs["sequence"])]) == 2
    assert capsys.readouterr().err == "kiln: kiln serve needs uvicorn: pip install 'kiln-nlp[serve]'\n"


def test_help_imports_no_web_framework():
    code = ("import sys; from kiln.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


class Server:
    """``kiln serve RUN --port 0`` in a subprocess; the URL comes from its start-up line."""

    def __init__(self, run: Path, *flags: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kiln", "serve", str(run), "--port", "0", "--precision", "fp32", *flags],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 600  # a bound for a loaded machine; about 5 s on an idle one
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError(f"no start-up line: {self.log}") from None
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/predict; API docs \S+/docs, demo \S+/ ", line)
            if match:
                self.url = match.group(1)
                return
            assert self.process.poll() is None, self.log

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)

    def metric(self, text: str, name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, name
        return float(match.group(1))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(300)


def hammer(url: str, clients: int, requests: int, inputs: list[list[str]]) -> list[tuple[list[str], httpx.Response]]:
    """``clients`` threads, each sending ``requests`` requests one after another."""
    answers: list = []

    def work(number: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as session:
            for i in range(requests):
                chosen = inputs[(number * requests + i) % len(inputs)]
                answers.append((chosen, session.post("/predict", json={"inputs": chosen})))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def batch_histogram(server: Server) -> tuple[float, float]:
    """``(batches of one request, all batches)`` from the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    return (server.metric(text, 'kiln_batch_requests_bucket{le="1"}'), server.metric(text, "kiln_batch_requests_count"))


def test_concurrent_clients_share_batches(runs, predictors):
    inputs = [TEXTS[i:i + 1 + i % 3] for i in range(len(TEXTS))]
    expected = [predictors["sequence"].predict(chosen) for chosen in inputs]
    server = Server(runs["sequence"])
    try:
        answers = hammer(server.url, clients=20, requests=10, inputs=inputs)
        assert len(answers) == 200 and all(answer.status_code == 200 for _, answer in answers)
        assert all(same(answer.json(), expected[inputs.index(chosen)]) for chosen, answer in answers)
        single, batches = batch_histogram(server)
        assert batches < 200 and single < batches  # some batch carried more than one request
    finally:
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.log), server.log


def test_max_wait_zero_runs_each_request_alone(predictors):
    with client(predictors["sequence"], max_wait_ms=0) as api:
        statuses: list[int] = []

        def work(texts: list[str]) -> None:
            for text in texts:
                statuses.append(api.post("/predict", json={"inputs": [text]}).status_code)

        threads = [threading.Thread(target=work, args=(TEXTS,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 36
        text = api.get("/metrics").text
        assert 'kiln_batch_requests_bucket{le="1"} 36' in text and "kiln_batch_requests_count 36" in text


def test_sigterm_finishes_in_flight_requests(runs):
    # Batches wait up to 1.5 s for as many requests as recent batches held: after 24 clients at once
    # (batches of more than six), all six requests are in flight when SIGTERM comes.
    server = Server(runs["sequence"], "--max-wait-ms", "1500", "--max-batch-tokens", "100000")
    assert all(answer.status_code == 200 for _, answer in hammer(server.url, 24, 1, [[text] for text in TEXTS]))
    answers: list = []
    threads = [threading.Thread(target=lambda text=text: answers.append(
        httpx.post(f"{server.url}/predict", json={"inputs": [text]}, timeout=120))) for text in TEXTS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        in_flight = server.metric(httpx.get(f"{server.url}/metrics").text, "kiln_predict_in_flight")
        if in_flight == len(TEXTS):
            break
        time.sleep(0.02)
    assert in_flight == len(TEXTS)
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * len(TEXTS)
    assert server.process.wait(300) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
    assert not any("Traceback" in line for line in server.log), server.log


# -- fuzzing from the OpenAPI schema ------------------------------------------------------------
def fuzz(app: Any, max_examples: int, derandomize: bool, timeout: float = 60) -> int:
    """Every operation, with schema-valid and schema-violating requests: never a 5xx, and every
    answer as documented (status code, content type, body schema) within ``timeout`` seconds (a
    request that hangs fails). Returns the requests sent."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative cases need something to break: a body or parameters (not GET /health).
        negatable = operation.body or any(True for _ in operation.iter_parameters())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,):
            # No per-example deadline: the request's timeout is the bound (a loaded machine varies).
            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def check(case: Any) -> None:
                nonlocal sent
                response = case.call(timeout=timeout)
                sent += 1
                assert response.status_code < 500, (case.body, response.text)
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         content_type_conformance, response_schema_conformance])

            check()
    return sent


def test_fuzz_no_server_errors(predictors):
    app = create_app(predictors["sequence"], ServeSettings(max_inputs=8))
    assert fuzz(app, max_examples=25, derandomize=True) > 40  # 25 valid and 25 invalid bodies, 3 GETs


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sequence", "token", "qa", "generation"])
def test_fuzz_long(task, predictors):
    # Generation may be asked for 64 beams over the model's whole length: slow, but not a hang.
    fuzz(create_app(predictors[task], ServeSettings(max_inputs=4)), max_examples=150, derandomize=False,
         timeout=600)


def test_python_clients_read_the_413_of_an_oversized_body(runs):
    """A 5 MB body: the server reads it to the end before answering 413, so urllib, requests and httpx
    get the answer instead of a connection reset or broken pipe."""
    import urllib.error
    import urllib.request

    import requests

    body = json.dumps({"inputs": ["x" * (5 * 1024 * 1024)]}).encode()
    server = Server(runs["sequence"])
    try:
        url = f"{server.url}/predict"
        request = urllib.request.Request(url, data=body, headers=JSON, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 413
        assert requests.post(url, data=body, headers=JSON, timeout=60).status_code == 413
        assert httpx.post(url, content=body, headers=JSON, timeout=60).status_code == 413
        assert httpx.post(url, json={"inputs": ["a fine film ."]}, timeout=60).status_code == 200  # still serving
    finally:
        assert server.stop() == 0


def send_head_slowly(host: str, port: int, give_up: float = 8) -> float:
    """Send a request head a line every 0.2 s; the seconds until the server closes the connection."""
    import socket

    with socket.create_connection((host, port), timeout=10) as slow:
        started = time.monotonic()
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < give_up:
            time.sleep(0.2)
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                slow.setblocking(False)
                if slow.recv(1024) == b"":
                    break
            except BlockingIOError:
                pass
            except OSError:  # reset: closed as well
                break
            finally:
                slow.setblocking(True)
        return time.monotonic() - started


@pytest.mark.parametrize("base", ["h11", "httptools"])
def test_head_deadline_for_each_http_protocol(base):
    """The deadline works on both of uvicorn's HTTP implementations (kiln uses httptools where installed)."""
    import socket

    import uvicorn

    from kiln.serve.server import head_deadline_protocol

    if base == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol
    else:
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol

    async def app(scope, receive, send):  # answers anything with 204
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=head_deadline_protocol(0.5, protocol), lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        assert 0.4 < send_head_slowly(*sock.getsockname()) < 3
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_slow_clients_are_cut_off(runs):
    """A head sent a line at a time is cut off --read-timeout after connecting (uvicorn alone would wait
    for ever); a late body is answered 408; a keep-alive client's next request has its own deadline."""
    import socket

    server = Server(runs["sequence"], "--read-timeout", "1")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        assert 0.9 < send_head_slowly(host, int(port)) < 5
        with socket.create_connection((host, int(port)), timeout=10) as late:
            late.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"inputs\": ")
            answer = b""
            while chunk := late.recv(65536):  # to the end: the 408 closes the connection
                answer += chunk
            answer = answer.decode()
            assert answer.startswith("HTTP/1.1 408") and "--read-timeout" in answer, answer
        with httpx.Client(base_url=server.url, timeout=10) as keep_alive:
            for _ in range(2):
                assert keep_alive.post("/predict", json={"inputs": TEXTS}).status_code == 200
                time.sleep(0.6)  # more than half the deadline: the second request gets a new one
            assert keep_alive.post("/predict", json={"inputs": TEXTS}).status_code == 200
    finally:
        assert server.stop() == 0


def test_one_request_cannot_take_the_server(predictors):
    """Per-call work is bounded by the server's limits, floats must be finite, and a request that runs past
    --timeout is answered 503 with Retry-After while the server goes on."""
    generator = predictors["generation"]
    with client(generator, max_new_tokens=16, max_beams=2) as api:
        for parameters, field, message in (({"max_new_tokens": 10**30}, "parameters.max_new_tokens", "at most"),
                                           ({"max_new_tokens": 17}, "parameters.max_new_tokens", "--max-new-tokens"),
                                           ({"num_beams": 3}, "parameters.num_beams", "--max-beams")):
            answer = api.post("/predict", json={"inputs": ["a b c"], "parameters": parameters})
            assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
            assert message in answer.json()["error"]
        # 1e400 is valid JSON that Python reads as infinity.
        answer = api.post("/predict", content=b'{"inputs": ["a b c"], "parameters": {"temperature": 1e400}}',
                          headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "finite" in answer.json()["error"], answer.text
        assert api.post("/predict", json={"inputs": ["a b c"], "parameters": {"max_new_tokens": 16,
                                                                              "num_beams": 2}}).status_code == 200
    with client(predictors["sequence"], timeout_s=1e-6) as api:
        answer = api.post("/predict", json={"inputs": TEXTS})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and "--timeout" in answer.text
        assert api.get("/health").json() == {"status": "ok"}


def test_a_full_queue_is_refused():
    async def scenario() -> None:
        release = threading.Event()
        batcher = MicroBatcher(lambda examples, parameters: release.wait(10) and examples, max_batch_tokens=8,
                               max_wait=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(["a"], {}, "", 1))  # taken by the worker
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit([x], {}, "", 1)) for x in "bc"]
        await asyncio.sleep(0.05)
        with pytest.raises(Full):
            await batcher.submit(["d"], {}, "", 1)
        release.set()
        assert await running == ["a"] and [await w for w in waiting] == [["b"], ["c"]]
        await batcher.close()

    asyncio.run(scenario())


def test_the_nesting_bound_does_not_depend_on_the_recursion_limit():
    """torch.compile's import raises Python's recursion limit; the JSON nesting bound stays kiln's."""
    from kiln.serve.schemas import MAX_DEPTH, RequestError, parse_json

    def nested(depth: int) -> bytes:
        return b'{"inputs": ' + b"[" * (depth - 1) + b'"a"' + b"]" * (depth - 1) + b"}"

    limit = sys.getrecursionlimit()
    try:
        for recursion_limit in (limit, 100_000):
            sys.setrecursionlimit(recursion_limit)
            assert parse_json(nested(MAX_DEPTH))["inputs"]
            with pytest.raises(RequestError, match="nested too deeply"):
                parse_json(nested(MAX_DEPTH + 1))
    finally:
        sys.setrecursionlimit(limit)
    assert parse_json(b'{"inputs": ["[[[[ \\" {{{{"]}') == {"inputs": ['[[[[ " {{{{']}  # brackets in strings
