"""Extractive QA: readers, windows over long contexts, span decoding, official SQuAD scoring."""

import io
import itertools
import json
import random

import pytest

import kiln
from kiln.config import Config, TokenizerConfig
from kiln.errors import KilnError
from kiln.metrics.squad import f1_score, normalize_answer, squad_metrics
from kiln.tasks import get_task
from kiln.tasks.base import Dataset
from kiln.tokenizers import train_tokenizer

CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Lisbon", "Oslo", "Prague"]


def make_examples(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        city = rng.choice(CITIES)
        filler = " ".join(rng.choice(["it", "was", "sunny", "and", "warm", "there"]) for _ in range(rng.randint(2, 8)))
        context = f"{filler} . Anna lives in {city} . {filler} ."
        rows.append({"id": str(i), "context": context, "question": "Where does Anna live ?",
                     "answers": {"text": [city], "answer_start": [context.index(f"in {city}") + 3]}})
    return rows


@pytest.fixture
def qa_dir(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    for name, rows in (("train.jsonl", make_examples(200, 1)), ("validation.jsonl", make_examples(40, 2))):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def task(**data):
    return get_task("qa", Config().with_settings({f"qa.{k}": v for k, v in data.items()}))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["context"] + " " + r["question"] for r in make_examples(50)] + ["Café 東京 😀 naïve"] * 3
    return train_tokenizer(TokenizerConfig(vocab_size=400), texts, 64)[0]


# -- the official scoring rules, on hand-computed cases ------------------------------------------
def test_normalisation_and_f1_follow_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert f1_score("Denver Broncos", "the Denver Broncos") == 1.0
    # overlap 1 ("broncos"): precision 1/2, recall 1/3 -> F1 0.4
    assert f1_score("Carolina Broncos", "Broncos of Denver") == pytest.approx(0.4)
    assert f1_score("", "Denver") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: v1.1 scores no overlap as 0


def test_metrics_take_the_max_over_gold_answers():
    scores = squad_metrics(["Denver Broncos", "in 1990"], [["Broncos", "Denver Broncos"], ["1990", "1991"]])
    # EM: 1 + 0 -> 50%; F1: 1 + (2 * 1/2 * 1 / 1.5 = 2/3) -> (1 + 2/3) / 2
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_v2_breakdown_and_unanswerable():
    scores = squad_metrics(["", "Paris", "x"], [[], ["Paris"], []])
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["HasAns_exact"] == 100.0 and scores["NoAns_exact"] == 50.0 and scores["NoAns_total"] == 2


# -- readers -------------------------------------------------------------------------------------
def test_squad_json_v2_and_mismatch_error(tmp_path):
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Anna lives in Paris.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 14}]},
        {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Anna", "answer_start": 0}]}]}]}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(squad, indent=1))
    data = task().read(path)
    assert [ex["answers"] for ex in data.examples] == [[("Paris", 14)], []]
    assert data.examples[1]["impossible"]
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 13
    path.write_text(json.dumps(squad, indent=1))
    with pytest.raises(KilnError, match="does not match the context") as err:
        task().read(path)
    line = next(i for i, text in enumerate(json.dumps(squad, indent=1).splitlines(), 1) if '"q1"' in text)
    assert str(err.value).startswith(f"{path}:{line}:")
    del squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"]
    path.write_text(json.dumps(squad, indent=1))
    with pytest.raises(KilnError, match="'Paris' has no answer_start"):
        task().read(path)


def test_classy_tsv_and_jsonl_start_end(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("Anna lives in Paris.\tWhere?\t14\t19\n")
    assert task().read(path).examples[0]["answers"] == [("Paris", 14)]
    path.write_text("Anna lives in Paris.\tWhere?\t14\t99\n")
    with pytest.raises(KilnError, match="outside the context"):
        task().read(path)
    path.write_text("context\tquestion\tstart\tend\nAnna lives in Paris.\tWhere?\t14\t19\n")  # a header is fine
    data = task().read(path)
    assert len(data.examples) == 1 and data.examples[0]["answers"] == [("Paris", 14)]
    out = io.StringIO()
    task().write(data, [{"answer": "Paris"}], out)
    assert out.getvalue().splitlines()[0] == "context\tquestion\tstart\tend\tanswer"
    path = tmp_path / "a.jsonl"
    path.write_text('{"context": "Anna lives in Paris.", "question": "Where?", "answer_start": 14, "answer_end": 19}\n')
    assert task().read(path).examples[0]["answers"] == [("Paris", 14)]


# -- windows and decoding ------------------------------------------------------------------------
def _dataset(context, answer, question="Where does Anna live ?"):
    start = context.index(answer) if answer else 0
    answers = [(answer, start)] if answer else []
    return Dataset("<test>", [{"context": context, "question": question, "answers": answers, "line": 1,
                               "id": "1", "title": "", "impossible": not answers}])


def _oracle(t, dataset, features):
    """Logits that put all mass on each window's labelled span: decoding must recover the answer."""
    import numpy as np

    outputs = []
    for feature in features:
        n = len(feature["input_ids"])
        start, end = np.full(n, -10.0), np.full(n, -10.0)
        start[feature["start_positions"]] += 20 if feature["start_positions"] else 5
        end[feature["end_positions"]] += 20 if feature["end_positions"] else 5
        outputs.append((start, end))
    return t.decode(outputs, features, dataset)


def test_long_context_fully_covered_by_windows(tokenizer):
    t = task(window=32, stride=8)
    context = " ".join(f"it was sunny and warm there {i} ." for i in range(30)) + " Anna lives in Oslo ."
    dataset = _dataset(context, "Oslo")
    features = t.encode(dataset, tokenizer, 64)
    assert len(features) > 3 and all(len(f["input_ids"]) <= 32 for f in features)
    covered = set()
    for f in features:
        covered.update(o for o in f["offsets"] if o is not None)
    spans = sorted(covered)
    assert spans[0][0] == 0 and spans[-1][1] == len(context)
    assert all(a[1] <= b[0] or a == b for a, b in itertools.pairwise(spans))  # ordered, non-overlapping
    text = "".join(context[s:e] for s, e in spans).replace(" ", "")
    assert text == context.replace(" ", "")  # every character of the context is in some window
    assert sum(f["start_positions"] > 0 for f in features) >= 1  # answer at the very end is kept
    assert _oracle(t, dataset, features)[0]["answer"] == "Oslo"


def test_a_long_question_shrinks_the_overlap_and_too_long_a_one_is_an_error(tokenizer):
    # window 32 with stride 16 (its half): a 20-token question leaves ~9 context tokens, fewer than
    # the stride, which the tokenizer would refuse with a Rust truncation error.
    t = task(window=32, stride=16, max_query_length=20)
    question = " ".join(["where"] * 20) + " ?"
    context = " ".join(f"it was sunny {i} ." for i in range(20)) + " Anna lives in Oslo ."
    dataset = _dataset(context, "Oslo", question=question)
    features = t.encode(dataset, tokenizer, 64)
    assert len(features) > 3 and all(len(f["input_ids"]) <= 32 for f in features)
    assert _oracle(t, dataset, features)[0]["answer"] == "Oslo"
    with pytest.raises(KilnError, match="leaves no room for the context after questions of 30 tokens"):
        task(window=32, max_query_length=30).encode(_dataset(context, "Oslo", question=question * 2), tokenizer, 64)


def test_answer_crossing_a_window_boundary(tokenizer):
    t = task(window=24, stride=8)
    context = "it was sunny and warm there . " * 3 + "Anna lives in Paris Berlin Rome Madrid ."
    dataset = _dataset(context, "Paris Berlin Rome Madrid")
    features = t.encode(dataset, tokenizer, 64)
    labelled = [f for f in features if f["start_positions"] > 0]
    unlabelled = [f for f in features if f["start_positions"] == 0]
    assert labelled and unlabelled  # windows cutting the answer train toward the null position
    assert _oracle(t, dataset, features)[0]["answer"] == "Paris Berlin Rome Madrid"


def test_unicode_offsets_and_empty_context(tokenizer):
    t = task()
    context = "Café 東京 naïve 😀 Anna lives in Rome ."
    dataset = _dataset(context, "Rome")
    features = t.encode(dataset, tokenizer, 64)
    prediction = _oracle(t, dataset, features)[0]
    assert prediction["answer"] == "Rome" and context[prediction["start"]:prediction["end"]] == "Rome"
    empty = _dataset("", "")
    assert _oracle(t, empty, t.encode(empty, tokenizer, 64))[0]["answer"] == ""


# -- end to end ----------------------------------------------------------------------------------
def test_train_evaluate_predict_and_transformers_parity(qa_dir, tiny_profile, tmp_path, capsys):
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from kiln.cli import main

    run = kiln.train("qa", qa_dir, name="qa", profile=str(tiny_profile), epochs=10, output_dir=tmp_path / "runs")
    assert run.metrics["exact_match"] > 80  # the toy questions are learnable
    assert main(["evaluate", str(run.path), str(qa_dir / "validation.jsonl"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"exact_match", "f1", "loss", "n"} and metrics["loss"] > 0
    model = kiln.load(run.path, precision="fp32")
    assert set(metrics) == {*model.task.metric_names(), "n"}  # what train.metric is checked against
    context = "it was warm . Anna lives in Vienna . it was sunny ."
    [answer] = model.predict([(context, "Where does Anna live ?")])
    assert set(answer) == {"answer", "score", "start", "end"}
    assert context[answer["start"]:answer["end"]] == answer["answer"] == "Vienna"

    hf = AutoModelForQuestionAnswering.from_pretrained(run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    encoded = tokenizer("Where does Anna live ?", context, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")[0]
    with torch.no_grad():
        out = hf(**encoded)
    start, end = int(out.start_logits[0].argmax()), int(out.end_logits[0].argmax())
    assert context[int(offsets[start][0]):int(offsets[end][1])] == "Vienna"


def test_single_squad_file_is_split_by_article(tmp_path, tiny_profile):
    articles = []
    for a in range(10):
        rows = make_examples(6, seed=a)
        articles.append({"title": f"article-{a}", "paragraphs": [
            {"context": r["context"], "qas": [{"id": f"{a}-{r['id']}", "question": r["question"], "answers": [
                {"text": r["answers"]["text"][0], "answer_start": r["answers"]["answer_start"][0]}]}]}
            for r in rows]})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": articles}))
    run = kiln.train("qa", path, name="split", profile=str(tiny_profile), max_steps=1, output_dir=tmp_path / "runs")
    assert run.metrics["n"] == 6  # one whole article of six questions


def test_null_threshold_tuning_picks_the_best_cut():
    from kiln.metrics.squad import best_null_threshold

    spans = ["Paris", "Rome", "Oslo", "Bern"]
    gold = [["Paris"], [], ["Oslo"], []]
    margins = [-3.0, 2.0, -1.0, 0.5]  # answerable ones have low margins: a cut in (-1, 0.5) is perfect
    tuned = best_null_threshold(spans, margins, gold)
    assert tuned["best_exact"] == 100.0 and tuned["best_f1"] == 100.0
    assert -1.0 <= tuned["best_exact_threshold"] < 0.5
    chosen = ["" if m > tuned["best_f1_threshold"] else a for a, m in zip(spans, margins, strict=True)]
    assert squad_metrics(chosen, gold)["f1"] == 100.0
