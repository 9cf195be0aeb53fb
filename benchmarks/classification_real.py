"""Classification as real data comes: multi-label, imbalanced classes, long documents. Each from
all-MiniLM-L6-v2, beside its reference in one run.

Reproduce (from the repository root, after ``make pretrained``; about a quarter of an hour on 2 CPU
cores)::

    .venv/bin/python benchmarks/classification_real.py --out bench.json

Smoke test (a minute)::

    .venv/bin/python benchmarks/classification_real.py --limit 300

The sets, built from ../shared/data at run time (see that folder's README for where each comes from):

* **Multi-label: the entity types a CoNLL-2003 sentence mentions** (``PER``, ``ORG``, ``LOC``,
  ``MISC``; none for a sentence without entities), from its NER tags: train.txt to train, valid.txt
  to evaluate. kiln (``kiln train sequence``, pretrained-start recipe, ``--tune-thresholds``) against
  the floor, a one-vs-rest logistic regression on TF-IDF word 1-2-grams (scikit-learn). Micro-F1.
* **Imbalanced: SST-2 with the positive class subsampled to 5 % of the training set** (all negatives
  of the first ``--sst2-negatives``, positives to 5 %); dev.tsv unchanged. kiln unweighted against
  ``-c sequence.class_weights=auto``. Macro-F1 on dev.
* **Long documents (synthetic): SST-2 sentences concatenated into documents of 1,000+ tokens**, each
  drawn 65 % from its own class, labelled by the class; 400 documents to train, 100 to evaluate. The
  model reads 256 tokens at a time (``train.max_length 256``): kiln with ``sequence.long=truncate``
  (the first 256 tokens) against ``sequence.long=window`` (every window, logits averaged). Accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"


def conll_sentences(path: Path) -> list[tuple[str, list[str]]]:
    """``(sentence, entity types)`` per CoNLL-2003 sentence (document markers left out)."""
    sentences, words, types = [], [], set()
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append((" ".join(words), sorted(types)))
            words, types = [], set()
            continue
        words.append(parts[0])
        if parts[-1] != "O":
            types.add(parts[-1].split("-", 1)[1])
    return sentences


def sst2(path: Path) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [(text, label) for text, label in rows]


def write_tsv(path: Path, header: str, rows: list[tuple[str, str]]) -> None:
    path.write_text("\n".join([header, *(f"{a}\t{b}" for a, b in rows)]) + "\n", encoding="utf-8")


def build_sets(scratch: Path, limit: int | None, negatives: int) -> dict[str, Path]:
    """The three data sets, written as kiln reads them."""
    rng = random.Random(0)
    folders = {name: scratch / name for name in ("multilabel", "imbalanced", "long")}
    for folder in folders.values():
        folder.mkdir()
    conll = SHARED / "conll2003"
    for name, source in (("train", "train.txt"), ("dev", "valid.txt")):
        rows = conll_sentences(conll / source)[:limit]
        write_tsv(folders["multilabel"] / f"{name}.tsv", "text\tlabels", [(t, "|".join(ts)) for t, ts in rows])
    train = sst2(SHARED / "glue" / "SST-2" / "train.tsv")
    rng.shuffle(train)
    negative = [row for row in train if row[1] == "0"][:limit or negatives]
    positive = [row for row in train if row[1] == "1"][:max(1, round(len(negative) * 5 / 95))]
    write_tsv(folders["imbalanced"] / "train.tsv", "sentence\tlabel", negative + positive)
    dev = sst2(SHARED / "glue" / "SST-2" / "dev.tsv")
    write_tsv(folders["imbalanced"] / "dev.tsv", "sentence\tlabel", dev)
    by_class = {label: [text for text, lab in train if lab == label] for label in ("0", "1")}
    for name, count in (("train", limit or 400), ("dev", (limit or 400) // 4)):
        documents = []
        for _ in range(count):
            label = rng.choice(["0", "1"])
            other = "1" if label == "0" else "0"
            sentences = [rng.choice(by_class[label if rng.random() < 0.65 else other]) for _ in range(100)]
            documents.append((" ".join(sentences), label))
        write_tsv(folders["long"] / f"{name}.tsv", "text\tlabel", documents)
    return folders


def kiln_worker(spec: dict) -> dict:
    import kiln

    with tempfile.TemporaryDirectory() as scratch:
        run = kiln.train("sequence", spec["data"], name="run", init=spec["init"], output_dir=scratch,
                         **spec["settings"])
        return {"metrics": run.metrics, "train_seconds": last_train_log(run.path)["elapsed"]}


def tfidf_worker(spec: dict) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    def read(path: Path) -> tuple[list[str], list[list[str]]]:
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
        return [text for text, _ in rows], [tags.split("|") if tags else [] for _, tags in rows]

    texts, tags = read(Path(spec["data"]) / "train.tsv")
    dev_texts, dev_tags = read(Path(spec["data"]) / "dev.tsv")
    binarizer = MultiLabelBinarizer().fit(tags + dev_tags)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    model = OneVsRestClassifier(LogisticRegression(max_iter=1000, C=10.0))
    model.fit(vectorizer.fit_transform(texts), binarizer.transform(tags))
    predicted = model.predict(vectorizer.transform(dev_texts))
    gold = binarizer.transform(dev_tags)
    return {"metrics": {"micro_f1": float(f1_score(gold, predicted, average="micro", zero_division=0)),
                        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0))},
            "train_seconds": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2 (make pretrained)")
    parser.add_argument("--limit", type=int, default=None, help="rows per set (smoke test)")
    parser.add_argument("--sst2-negatives", type=int, default=12_000, help="negatives in the imbalanced set")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"kiln": kiln_worker, "tfidf": tfidf_worker})
        return
    init = str(args.init)
    with tempfile.TemporaryDirectory() as scratch:
        sets = build_sets(Path(scratch), args.limit, args.sst2_negatives)
        one_epoch = {"epochs": 1}
        # Windows of 256 tokens, 16 to a step: a document is 4 or 5 of them.
        long_texts = {"epochs": 2, "train.max_length": 256, "train.batch_tokens": 4096}
        runs = {
            "multi-label: TF-IDF + logistic regression": ("tfidf", sets["multilabel"], {}),
            "multi-label: kiln": ("kiln", sets["multilabel"], {**one_epoch, "tune_thresholds": True}),
            "imbalanced: kiln unweighted": ("kiln", sets["imbalanced"], {**one_epoch, "metric": "macro_f1"}),
            "imbalanced: kiln class_weights=auto": ("kiln", sets["imbalanced"], {
                **one_epoch, "metric": "macro_f1", "sequence.class_weights": "auto"}),
            "long: kiln truncate": ("kiln", sets["long"], long_texts),
            "long: kiln window": ("kiln", sets["long"], {**long_texts, "sequence.long": "window"}),
        }
        results = {}
        for label, (contender, data, settings) in runs.items():
            spec = {"contender": contender, "label": label, "data": str(data), "init": init, "settings": settings}
            results[label] = run_worker(__file__, spec)
    metric_of = {"multi-label": "micro_f1", "imbalanced": "macro_f1", "long": "accuracy"}
    print()
    for label, result in results.items():
        metric = metric_of[label.split(":")[0]]
        print(f"  {label:42s} {metric} {result['metrics'][metric]:.4f}   train {result['train_seconds']:7.1f} s")
    pairs = (("multi-label: kiln", "multi-label: TF-IDF + logistic regression", "micro_f1"),
             ("imbalanced: kiln class_weights=auto", "imbalanced: kiln unweighted", "macro_f1"),
             ("long: kiln window", "long: kiln truncate", "accuracy"))
    for ours, theirs, metric in pairs:
        print(f"  {ours} - {theirs}: {results[ours]['metrics'][metric] - results[theirs]['metrics'][metric]:+.4f} "
              f"{metric}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
