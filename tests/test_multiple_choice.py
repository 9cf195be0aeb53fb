"""The multiple-choice task: the data layouts of SWAG, HellaSwag, COPA and ARC, candidates padded per
batch, and transformers' AutoModelForMultipleChoice reproducing kiln's predictions."""

import io
import json
import random

import numpy as np
import pytest
import torch

import kiln
from kiln.cli import main
from kiln.config import Config
from kiln.errors import KilnError
from kiln.tasks import get_task
from kiln.tasks.multiple_choice import answer_index, numbered_columns

COLORS = ["red", "blue", "green", "black", "white", "brown"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "cow"]


def swag_rows(n, seed, choices=4):
    """The right ending repeats the context's colour; the others name other colours."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
        count = choices if choices else rng.choice([3, 4])
        others = rng.sample([c for c in COLORS if c != color], count - 1)
        label = rng.randrange(count)
        endings = [f"it is {c} ." for c in others]
        endings.insert(label, f"it is {color} .")
        rows.append({"context": f"the {animal} is {color} .", "question": "what colour is it ?",
                     "choices": endings, "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def mc_dir(tmp_path):
    folder = tmp_path / "mc"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", swag_rows(240, 1))
    write_jsonl(folder / "dev.jsonl", swag_rows(30, 2, choices=0))  # 3 or 4 candidates each
    return folder


def task():
    return get_task("multiple-choice", Config())


def test_answers_and_numbered_columns():
    choices = ["a", "b", "c"]
    assert [answer_index(x, choices) for x in (0, "2", "B", "c", "c ", 3, "D", "z", True)] == \
        [0, 2, 1, 2, 2, None, None, None, None]
    assert numbered_columns(["sent1", "ending1", "ending0", "ending10", "ending2", "label"]) == \
        ["ending0", "ending1", "ending2", "ending10"]
    assert numbered_columns(["premise", "choice1", "choice2", "question"]) == ["choice1", "choice2"]
    assert numbered_columns(["ctx", "ending0", "ending1", "answer"]) == ["ending0", "ending1"]


def test_layouts_read_alike(tmp_path):
    swag = tmp_path / "swag.tsv"  # SWAG: sent1, sent2, ending0..3, label (index from 0)
    swag.write_text("sent1\tsent2\tending0\tending1\tending2\tlabel\nthe cat sat .\tthen it\tran\tslept\tate\t1\n")
    copa = tmp_path / "copa.jsonl"  # COPA: premise, choice1, choice2, label; ARC: choices.text, answerKey letter
    copa.write_text(json.dumps({"premise": "it rained .", "question": "effect", "choice1": "wet", "choice2": "dry",
                                "label": 0}) + "\n"
                    + json.dumps({"question": "which is a colour ?", "context": "pick one",
                                  "choices": {"text": ["red", "cat"], "label": ["A", "B"]}, "answerKey": "A"}) + "\n"
                    + json.dumps({"ctx": "a dog", "endings": ["barks", "meows", "moos"], "label": "meows"}) + "\n")
    (first,) = task().read(swag).examples
    assert (first["context"], first["question"], first["choices"], first["label"]) == \
        ("the cat sat .", "then it", ["ran", "slept", "ate"], "1")
    rows = task().read(copa).examples
    assert [(r["choices"], r["label"]) for r in rows] == [(["wet", "dry"], "0"), (["red", "cat"], "0"),
                                                          (["barks", "meows", "moos"], "1")]
    assert task().parse_input("a dog\tbarks\tmeows", 1)["choices"] == ["barks", "meows"]


@pytest.mark.parametrize(("row", "message"), [
    ({"context": "x", "choices": ["only one"], "label": 0}, "1 candidate"),
    ({"context": "x", "choices": ["a", "b"], "label": 5}, "names none of the 2 candidates"),
    ({"context": "x", "choices": ["a", 3], "label": 0}, "list of strings"),
    ({"choices": ["a", "b"], "label": 0}, "no context"),
])
def test_bad_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "fine", "choices": ["a", "b"], "label": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(KilnError, match=message) as caught:
        task().read(path)
    assert caught.value.line == 2 and str(path) in str(caught.value)


def test_train_predict_and_transformers_reproduce_the_predictions(mc_dir, tiny_profile, tmp_path, capsys,
                                                                   monkeypatch):
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    run = kiln.train("multiple-choice", mc_dir, name="mc", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=6, precision="fp32")
    assert run.metrics["accuracy"] > 0.5  # chance is about 0.29 with 3 or 4 candidates
    model = kiln.load(run.path, precision="fp32")
    dev = [json.loads(line) for line in (mc_dir / "dev.jsonl").read_text().splitlines()]
    ours = model.predict([{k: row[k] for k in ("context", "question", "choices")} for row in dev])
    assert model.evaluate(mc_dir / "dev.jsonl")["accuracy"] == pytest.approx(
        np.mean([p["label"] == row["label"] for p, row in zip(ours, dev, strict=True)]))

    # transformers on the exported model, one example at a time (no padded candidates), gives the same.
    hf = AutoModelForMultipleChoice.from_pretrained(run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    for row, prediction in zip(dev, ours, strict=True):
        encoded = tokenizer([row["context"]] * len(row["choices"]),
                            [f"{row['question']} {c}" for c in row["choices"]], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = hf(**{k: v.unsqueeze(0) for k, v in encoded.items()}).logits[0]
        probs = torch.softmax(logits.double(), -1)
        assert int(probs.argmax()) == prediction["label"]
        assert prediction["answer"] == row["choices"][prediction["label"]]
        assert float(probs.max()) == pytest.approx(prediction["score"], abs=1e-5)

    card = (run.model_dir / "README.md").read_text()
    assert "pipeline_tag: multiple-choice" in card and "AutoModelForMultipleChoice" in card
    # The CLI: a tab-separated stdin line (context, then the candidates) and a file, as JSON.
    assert main(["predict", str(run.path), str(mc_dir / "dev.jsonl"), "--json"]) == 0
    assert [p["label"] for p in json.loads(capsys.readouterr().out)] == [p["label"] for p in ours]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{r['context']}\t" + "\t".join(r["choices"]) + "\n"
                                                         for r in dev if len(r["choices"]) == 3)))
    assert main(["predict", str(run.path), "--json"]) == 0
    alone = model.predict([{"context": r["context"], "choices": r["choices"]} for r in dev if len(r["choices"]) == 3])
    assert json.loads(capsys.readouterr().out) == alone
    assert main(["describe", "multiple-choice", str(mc_dir)]) == 0
    described = capsys.readouterr().out
    assert "240" in described and "30" in described  # the examples of each split
    assert main(["estimate", "--profile", "bert-mini", "--task", "multiple-choice", "--json"]) == 0


def test_serve_takes_the_object_form(mc_dir, tiny_profile, tmp_path):
    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app

    run = kiln.train("multiple-choice", mc_dir, name="mc", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     max_steps=2, precision="fp32")
    predictor = kiln.load(run.path, precision="fp32")
    item = {"context": "the cat is red .", "question": "what colour is it ?",
            "choices": ["it is red .", "it is blue ."]}
    with TestClient(create_app(predictor)) as api:
        answer = api.post("/predict", json={"inputs": [item]})
        assert answer.status_code == 200 and answer.json() == predictor.predict([item])
        refused = api.post("/predict", json={"inputs": [{"context": "x", "choices": "not a list"}]})
        assert refused.status_code == 422 and refused.json()["field"].startswith("inputs[0]")
        schema = api.get("/openapi.json").json()
        assert "MultipleChoiceInput" in json.dumps(schema)


def test_onnx_export_picks_as_the_run(mc_dir, tiny_profile, tmp_path):
    """One graph with dynamic batch, candidates and sequence axes; examples of 3 and 4 candidates
    batched together pick as the PyTorch run does."""
    pytest.importorskip("onnxruntime")
    from kiln.export import PARITY_TOLERANCE, export

    run = kiln.train("multiple-choice", mc_dir, name="mc", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     max_steps=20, precision="fp32")
    entry = export(run.path, tmp_path / "mc-onnx", eval_data=mc_dir / "dev.jsonl")
    assert entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE
    on_run, on_export = kiln.load(run.path, precision="fp32"), kiln.load(tmp_path / "mc-onnx")
    dev = [json.loads(line) for line in (mc_dir / "dev.jsonl").read_text().splitlines()]
    items = [{k: row[k] for k in ("context", "question", "choices")} for row in dev]
    ours, theirs = on_run.predict(items), on_export.predict(items)
    assert [p["label"] for p in ours] == [p["label"] for p in theirs]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], rtol=0, atol=1e-4)
    assert entry["metrics_fp32"]["accuracy"] == pytest.approx(on_run.evaluate(mc_dir / "dev.jsonl")["accuracy"])
