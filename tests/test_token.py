"""The token task: readers, sub-token alignment, windows, seqeval parity, pipeline output."""

import json
import random

import pytest
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

import kiln
from kiln.config import Config, TokenizerConfig, resolve_key
from kiln.errors import KilnError
from kiln.metrics.tagging import detect_scheme, entities, tagging_metrics
from kiln.tasks import get_task
from kiln.tasks.token import owner_window, windows
from kiln.tokenizers import train_tokenizer

NAMES = ["Alice", "Bob", "Paris", "Berlin", "Acme", "Globex"]
KINDS = {"Alice": "PER", "Bob": "PER", "Paris": "LOC", "Berlin": "LOC", "Acme": "ORG", "Globex": "ORG"}
FILLER = ["went", "to", "see", "the", "in", "and", "today", "with", "met"]


def sentences(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(3, 9)):
            if rng.random() < 0.3:
                name = rng.choice(NAMES)
                words.append(name)
                tags.append(f"B-{KINDS[name]}")
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path, rows):
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in rows:
        lines += [f"{w} NN O {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def conll_dir(tmp_path):
    folder = tmp_path / "conll"
    folder.mkdir()
    write_conll(folder / "train.txt", sentences(200, 1))
    write_conll(folder / "valid.txt", sentences(40, 2))
    return folder


def task(**data):
    return get_task("token", Config().with_settings({resolve_key(k): v for k, v in data.items()}))


def test_conll_reader_skips_docstart_and_takes_last_column(conll_dir):
    data = task().read(conll_dir / "valid.txt")
    assert len(data) == 40
    assert data.examples[0]["line"] == 3 and all(len(e["words"]) == len(e["tags"]) for e in data.examples)
    pos = task(columns="tag=1").read(conll_dir / "valid.txt")
    assert set(pos.examples[0]["tags"]) == {"NN"}


def test_readers_report_path_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a b c\tO O O\nd e\tO\n")
    with pytest.raises(KilnError, match="2 tokens but 1 labels") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:2:")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"tokens": ["a"], "ner_tags": [0]}\n')
    with pytest.raises(KilnError, match=r"data\.label_names"):
        task().read(path)
    good = task(label_names=["O", "B-PER"]).read(path)
    assert good.examples[0]["tags"] == ["O"]
    path = tmp_path / "bad.conll"
    path.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(KilnError) as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_windows_cover_everything_and_each_word_has_one_owner():
    spans = windows(23, 8)
    assert spans[0] == (0, 8) and spans[-1][1] == 23
    covered = set()
    for start, end in spans:
        assert end - start <= 8
        covered.update(range(start, end))
    assert covered == set(range(23))
    assert owner_window(6, spans) == 1  # position 6 is central in [4, 12), at the edge of [0, 8)
    assert windows(5, 8) == [(0, 5)]


def test_long_sentence_every_word_predicted_once(tmp_path):
    words = [f"w{i % 7}" for i in range(300)]
    tokenizer, _ = train_tokenizer(TokenizerConfig(vocab_size=300), [" ".join(words)], 64)
    t = task()
    t.state["labels"] = ["O", "B-X"]
    data = t.read(_write(tmp_path / "long.tsv", " ".join(words) + "\t" + " ".join(["O"] * 300) + "\n"))
    features = t.encode(data, tokenizer, max_length=32)
    assert len(features) > 10 and all(len(f["input_ids"]) <= 32 for f in features)
    owned = sorted(word for f in features for word, _ in f["words"])
    assert owned == list(range(300))
    for f in features:  # the label sits on each owned word's first sub-token
        assert sum(label != -100 for label in f["labels"]) == len(f["words"])


def test_word_split_into_many_subtokens_labels_first_only(tmp_path):
    # A vocabulary too small to hold the word whole: it is spelled in many ##pieces.
    spec = TokenizerConfig(vocab_size=40, pin_vocab=True)
    tokenizer, _ = train_tokenizer(spec, ["supercalifragilistic a"] * 5, 64)
    t = task()
    t.state["labels"] = ["O", "B-X"]
    data = t.read(_write(tmp_path / "x.tsv", "supercalifragilistic a\tB-X O\n"))
    feature = t.encode(data, tokenizer, max_length=64)[0]
    assert len(feature["input_ids"]) >= 8  # [CLS] + many pieces of the long word + a + [SEP]
    assert [label for label in feature["labels"] if label != -100] == [1, 0]
    assert feature["labels"][1] == 1 and feature["words"][0] == (0, 1)


def _write(path, text):
    path.write_text(text)
    return path


def test_metrics_equal_seqeval():
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in sentence] for sentence in gold]
    ours = tagging_metrics(gold, pred)
    assert ours["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert ours["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
    assert ours["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert ours["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)


def test_entities_and_scheme_detection():
    assert entities(["B-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert entities(["S-PER", "B-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert detect_scheme([["B-PER", "I-PER", "O"]]) == "iob2"
    assert detect_scheme([["I-PER", "I-PER", "O", "B-PER"]]) == "iob1"
    assert detect_scheme([["S-PER", "O"]]) == "bioes"


def test_train_evaluate_predict_and_transformers_parity(conll_dir, tiny_profile, tmp_path, capsys):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kiln.cli import main

    run = kiln.train("token", conll_dir, name="ner", profile=str(tiny_profile), epochs=8,
                     output_dir=tmp_path / "runs")
    assert run.metrics["f1"] > 0.8  # the toy tags are learnable
    assert main(["evaluate", str(run.path), str(conll_dir / "valid.txt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"precision", "recall", "f1", "accuracy", "loss", "n"}
    model = kiln.load(run.path, precision="fp32")
    assert set(metrics) == {*model.task.metric_names(), "n"}  # what train.metric is checked against
    [groups] = model.predict(["Alice went to Paris today"])
    assert [(g["entity_group"], g["word"], g["start"], g["end"]) for g in groups] == [
        ("PER", "Alice", 0, 5), ("LOC", "Paris", 14, 19)]
    out = tmp_path / "pred.txt"
    assert main(["predict", str(run.path), str(conll_dir / "valid.txt"), "-o", str(out)]) == 0
    first = out.read_text().splitlines()[0].split()
    assert len(first) == 5 and first[-1] in model.task.labels  # the input line plus the predicted tag

    hf = AutoModelForTokenClassification.from_pretrained(run.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    words = ["Bob", "met", "Globex", "in", "Berlin"]
    encoded = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = hf(**encoded).logits[0].argmax(-1).tolist()
    firsts = {}
    for position, word in enumerate(encoded.word_ids()):
        if word is not None:
            firsts.setdefault(word, position)
    hf_tags = [hf.config.id2label[ids[firsts[w]]] for w in range(len(words))]
    data = model.task.read(_write(tmp_path / "one.tsv", " ".join(words) + "\n"), labelled=False)
    assert [tag for tag, _ in model.predict_dataset(data)[0]] == hf_tags
