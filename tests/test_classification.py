"""Classification as real data needs it: multi-label, class weights and focal loss, long texts read
in windows, and the best checkpoint by any metric."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.cli import main
from kiln.config import Config
from kiln.errors import KilnError
from kiln.metrics.classification import multi_label_metrics
from kiln.tasks import get_task
from kiln.tasks.sequence import best_thresholds, class_weights_auto, weighted_cross_entropy

TOPICS = {"billing": ["invoice", "charge", "price"], "refund": ["refund", "money", "back"],
          "delivery": ["parcel", "courier", "late"]}
FILLER = ["please", "help", "today", "my", "the", "order", "thanks", "hello"]


def ticket_rows(n, seed):
    """Tickets whose words name their tags: one to three of billing, refund, delivery (or none)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = sorted(t for t in TOPICS if rng.random() < 0.4)
        words = [rng.choice(TOPICS[t]) for t in tags] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append((" ".join(words), tags))
    return rows


@pytest.fixture
def tickets(tmp_path):
    folder = tmp_path / "tickets"
    folder.mkdir()
    for name, n, seed in (("train", 400, 1), ("dev", 60, 2)):
        lines = ["text\tlabels", *(f"{text}\t{'|'.join(tags)}" for text, tags in ticket_rows(n, seed))]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def task(**settings):
    return get_task("sequence", Config().with_settings(settings))


# -- the arithmetic ------------------------------------------------------------------------------
def test_class_weights_auto_is_inverse_frequency():
    assert class_weights_auto([90, 10]) == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert class_weights_auto([5, 0, 5]) == pytest.approx([1.0, 1.0, 1.0])  # an absent class weighs 1


def test_weighted_cross_entropy_against_torch_and_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [1.0, 1.0, -2.0]])
    labels = torch.tensor([0, 2, -100])
    weights = torch.tensor([0.5, 2.0, 3.0])
    for smoothing in (0.0, 0.1):
        ours = weighted_cross_entropy(logits, labels, weights, smoothing=smoothing)
        theirs = F.cross_entropy(logits, labels, weight=weights, label_smoothing=smoothing, reduction="sum",
                                 ignore_index=-100)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    # Focal: each term times (1 - p_true)^gamma, by hand.
    probs = torch.softmax(logits, -1)
    hand = sum(float(w * (1 - probs[i, y]) ** 2 * -torch.log(probs[i, y]))
               for i, (y, w) in enumerate(((0, 0.5), (2, 3.0))))
    assert float(weighted_cross_entropy(logits, labels, weights, gamma=2.0)) == pytest.approx(hand, rel=1e-6)


def test_class_weights_auto_changes_the_loss_as_stated(tmp_path):
    """`-c sequence.class_weights=auto` on 9 neg : 1 pos: the summed loss is each example's
    cross-entropy times its class's n / (2 * count)."""
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"t{i}\t{'pos' if i % 10 == 0 else 'neg'}\n" for i in range(100)))
    t = task(**{"sequence.class_weights": "auto"})
    t.fit(t.read(data))
    assert t.state["class_weights"] == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])  # labels: neg, pos
    logits = torch.tensor([[0.3, -0.2], [1.5, 0.5], [-1.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    loss = t.loss(type("Out", (), {"logits": logits})(), {"labels": labels})
    log_p = torch.log_softmax(logits, -1)
    hand = -(100 / 180) * log_p[0, 0] - (100 / 20) * log_p[1, 1] - (100 / 20) * log_p[2, 1]
    assert float(loss) == pytest.approx(float(hand), rel=1e-6)
    unweighted = task()
    unweighted.fit(unweighted.read(data))
    assert "class_weights" not in unweighted.state
    assert float(unweighted.loss(type("Out", (), {"logits": logits})(), {"labels": labels})) == \
        pytest.approx(float(-(log_p[0, 0] + log_p[1, 1] + log_p[2, 1])), rel=1e-6)
    # 9:1 is below the 10:1 line: accuracy still picks the best checkpoint; 19:1 is above it.
    assert ("imbalance" in t.state, t.main_metric) == (False, "accuracy")
    data.write_text("text\tlabel\n" + "".join(f"t{i}\t{'pos' if i % 20 == 0 else 'neg'}\n" for i in range(100)))
    skewed = task()
    skewed.fit(skewed.read(data))
    assert (skewed.state["imbalance"], skewed.main_metric) == (19, "macro_f1")
    assert any(line.startswith("imbalance 19:1") for line in skewed.notes())
    assert skewed.notes()[0] == "labels    neg 95.0% (95), pos 5.0% (5)"


def test_best_thresholds_and_multi_label_metrics():
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.45], [0.1, 0.05]])
    gold = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    # label 0: 0.5 already separates (F1 1); label 1: only a threshold of at most 0.4 finds both.
    assert best_thresholds(probs, gold, 0.5) == pytest.approx([0.5, 0.4])
    predicted = probs >= 0.5
    found = multi_label_metrics(gold, predicted, ["a", "b"])
    # a: tp 2, fp 0, fn 0 -> F1 1; b: tp 0, fn 2 -> F1 0; micro: tp 2, fp 0, fn 2 -> 2*2/(2*2+0+2)
    assert found["f1/a"] == 1.0 and found["f1/b"] == 0.0
    assert found["macro_f1"] == 0.5 and found["micro_f1"] == pytest.approx(4 / 6)
    assert found["subset_accuracy"] == pytest.approx(2 / 4)


# -- reading -------------------------------------------------------------------------------------
def test_multi_label_layouts_read_alike(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabels\ncheap refund\tbilling|refund\nhello\t\nlate parcel\tdelivery\n")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "labels": ls}) + "\n" for t, ls in
                             (("cheap refund", ["refund", "billing"]), ("hello", []), ("late parcel", ["delivery"]))))
    columns = tmp_path / "c.tsv"
    columns.write_text("text\tbilling\trefund\tdelivery\ncheap refund\t1\t1\t0\nhello\t0\t0\t0\nlate parcel\t0\t0\t1\n")
    read = [task().read(tsv), task().read(jsonl),
            task(**{"data.columns": "text=text,labels=billing,refund,delivery"}).read(columns)]
    for dataset in read:
        assert [ex["labels"] for ex in dataset.examples] == [("billing", "refund"), (), ("delivery",)]
    t = task()
    t.fit(read[0])
    assert (t.multi_label, t.labels, t.main_metric) == (True, ["billing", "delivery", "refund"], "micro_f1")


@pytest.mark.parametrize(("name", "text", "settings", "message", "line"), [
    ("mixed.jsonl", '{"text": "a", "labels": ["x", "y"]}\n{"text": "b", "labels": "x"}\n', {},
     "is a single label, but other rows hold lists", 2),
    ("single.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n',
     {"sequence.problem_type": "classification"}, "is a list of labels, but the labels are single", 2),
    ("flags.tsv", "text\tx\ty\na\t1\t0\nb\t1\tmaybe\n", {"data.columns": "text=text,labels=x,y"},
     "is not 0 or 1", 3),
])
def test_bad_labels_name_the_line(tmp_path, name, text, settings, message, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(KilnError, match=message) as err:
        task(**settings).read(path)
    assert err.value.line == line


def test_a_weights_file_naming_an_unknown_label_is_refused_before_training(tmp_path, sentiment_dir, tiny_profile,
                                                                           capsys):
    weights = tmp_path / "weights.tsv"
    weights.write_text("pos\t2\nneutral\t1.5\n")
    code = main(["train", "sequence", str(sentiment_dir), "-n", "w", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path / "runs"), "-c", f"sequence.class_weights={weights}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{weights}:2:" in err[0] and "neutral" in err[0]
    assert not (tmp_path / "runs" / "w").exists()  # nothing half-written


# -- end to end ----------------------------------------------------------------------------------
def test_multi_label_trains_predicts_every_label_and_transformers_reproduces_it(tickets, tiny_profile, tmp_path,
                                                                                capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = kiln.train("sequence", tickets, name="ml", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=10, precision="fp32", tune_thresholds=True, **{"optim.lr": 2e-3})
    assert run.metrics["micro_f1"] > 0.8 and {"macro_f1", "subset_accuracy", "f1/refund"} <= set(run.metrics)
    meta = json.loads((run.model_dir / "kiln.json").read_text())
    assert len(meta["task_state"]["thresholds"]) == 3  # tuned on validation, saved with the model
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"

    model = kiln.load(run.path, precision="fp32")
    texts = [text for text, _ in ticket_rows(10, 3)]
    ours = model.predict(texts)
    assert all(len(p["scores"]) == 3 for p in ours)  # every label, with its score
    hf = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    with torch.no_grad():
        probs = torch.sigmoid(hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits).numpy()
    thresholds = np.array(meta["task_state"]["thresholds"])
    for prediction, row in zip(ours, probs, strict=True):
        by_label = {s["label"]: s["score"] for s in prediction["scores"]}
        assert [by_label[hf.config.id2label[i]] for i in range(3)] == pytest.approx(list(row), abs=1e-5)
        assert prediction["labels"] == [hf.config.id2label[i] for i in range(3) if row[i] >= thresholds[i]]
    assert model.evaluate(tickets / "dev.tsv")["micro_f1"] == pytest.approx(run.metrics["micro_f1"], abs=1e-9)
    assert main(["predict", str(run.path), str(tickets / "dev.tsv")]) == 0
    written = capsys.readouterr().out.splitlines()
    assert written[0] == "text\tlabels\tprediction" and len(written) == 61


def test_long_texts_are_predicted_from_their_windows(tmp_path, tiny_profile):
    """`sequence.long=window`: a text longer than the model's limit is read in overlapping windows,
    whose logits are averaged; checked against the windows run one by one through transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rng = random.Random(0)
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, n in (("train", 120), ("dev", 20)):
        rows = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = [rng.choice(FILLER) for _ in range(rng.randint(20, 60))]
            words.insert(rng.randrange(len(words)), "great" if label == "pos" else "awful")  # anywhere in the text
            rows.append(f"{' '.join(words)}\t{label}")
        (folder / f"{name}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    settings = {"sequence.long": "window", "train.max_length": 16, "sequence.stride": 4, "optim.lr": 2e-3}
    run = kiln.train("sequence", folder, name="long", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=6, precision="fp32", **settings)
    truncated = kiln.train("sequence", folder, name="short", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                           epochs=6, precision="fp32", **{**settings, "sequence.long": "truncate"})
    assert run.metrics["accuracy"] > truncated.metrics["accuracy"]  # the cue is often past the first window

    model = kiln.load(run.path, precision="fp32")
    text = " ".join(FILLER * 6) + " great"
    ours = model.predict([text])[0]
    hf = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    windows = tokenizer(text, truncation=True, max_length=16, stride=4, return_overflowing_tokens=True,
                        padding=True, return_tensors="pt")
    assert len(windows["input_ids"]) > 3
    with torch.no_grad():
        logits = hf(input_ids=windows["input_ids"], attention_mask=windows["attention_mask"]).logits
    probs = torch.softmax(logits.double().mean(0), -1)
    assert ours["label"] == hf.config.id2label[int(probs.argmax())]
    assert ours["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_a_stride_that_does_not_fit_the_window_is_refused(tmp_path, sentiment_dir, tiny_profile, capsys):
    code = main(["train", "sequence", str(sentiment_dir), "-n", "s", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path / "runs"), "-c", "sequence.long=window", "-c", "sequence.window=32",
                 "-c", "sequence.stride=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sequence.stride" in err[0]


def test_metric_picks_and_exports_the_best_checkpoint(sentiment_dir, tiny_profile, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="m", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=4, precision="fp32", metric="mcc", eval_every=3)
    evals = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("split") == "validation"]
    best = max(evals, key=lambda e: (e["eval_mcc"], -e["eval_loss"]))  # a tie goes to the lower loss
    exported = json.loads((run.model_dir / "kiln.json").read_text())
    assert exported["step"] == best["step"] and exported["metrics"]["mcc"] == pytest.approx(best["eval_mcc"])
    assert math.isfinite(run.metrics["mcc"])


def test_a_pair_file_read_as_one_text_points_to_the_sentence_pair_task(tmp_path):
    from kiln.tasks import get_task

    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man eats.\tSomeone eats.\tentailment\n")
    with pytest.raises(KilnError, match="the columns sentence1, sentence2 hold pairs of texts: train them with the "
                                        "sentence-pair task"):
        get_task("sequence", Config()).read(path)
    assert len(get_task("sentence-pair", Config()).read(path).examples) == 1
