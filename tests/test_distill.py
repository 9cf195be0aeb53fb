"""kiln distill: the soft loss, the loss mix at its ends, the teacher's cached targets, tagging with the
student's own tokenizer, unlabelled inputs, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PROFILE, sentiment_rows
from safetensors.torch import load_file
from test_token import sentences, write_conll

import kiln
from kiln import distill
from kiln.cli import main
from kiln.distill import soft_loss
from kiln.errors import KilnError
from kiln.training import checkpoint as ckpt

# fp32: runs are compared for equal weights.
SETTINGS = {"train.precision": "fp32", "train.max_steps": 6, "train.eval_every": 3, "train.dropout": 0.0}


def write_sentiment(folder: Path, labels: dict[str, str] | None = None) -> Path:
    folder.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(120, 1)), ("dev.tsv", sentiment_rows(30, 2))):
        swapped = [(t, (labels or {}).get(label, label)) if name == "train.tsv" else (t, label) for t, label in rows]
        (folder / name).write_text("\n".join(["sentence\tlabel", *(f"{t}\t{y}" for t, y in swapped)]) + "\n")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sentiment and tagging data, a tiny profile, and a teacher trained on each."""
    import os

    root = tmp_path_factory.mktemp("distill")
    os.environ["KILN_CACHE"] = str(root / "cache")  # the autouse fixture's cache is per test; this is shared
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    data = write_sentiment(root / "sentiment")
    conll = root / "conll"
    conll.mkdir()
    write_conll(conll / "train.txt", sentences(120, 1))
    write_conll(conll / "valid.txt", sentences(30, 2))
    runs = root / "runs"
    kiln.train("sequence", data, name="teacher", profile=str(root / "tiny.yaml"), output_dir=runs, epochs=3)
    kiln.train("token", conll, name="tagger", profile=str(root / "tiny.yaml"), output_dir=runs, epochs=3)
    return {"root": root, "data": data, "conll": conll, "runs": runs, "profile": root / "tiny.yaml"}


def test_the_soft_loss_is_t_squared_kl_summed_over_rows():
    student = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.3, 2.0]])
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    t = 2.0
    p = np.exp(teacher.numpy() / t) / np.exp(teacher.numpy() / t).sum(-1, keepdims=True)
    q = np.exp(student.numpy() / t) / np.exp(student.numpy() / t).sum(-1, keepdims=True)
    expected = t * t * float((p * (np.log(p) - np.log(q))).sum())
    assert float(soft_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-6)
    assert float(soft_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def weights(run) -> dict:
    return load_file(str(ckpt.last_checkpoint(run.path / "checkpoints") / "model.safetensors"))


def test_alpha_0_is_plain_training_and_alpha_1_ignores_the_labels(world, tmp_path):
    common = dict(profile=str(world["profile"]), output_dir=tmp_path, **SETTINGS)
    plain = kiln.train("sequence", world["data"], name="plain", **common)
    hard = kiln.train("sequence", world["data"], name="hard", **common,
                      **{"distill.teacher": str(world["runs"] / "teacher"), "distill.alpha": 0.0,
                         "distill.student_init": "random", "distill.augment": 0})
    for key, value in weights(plain).items():
        assert torch.equal(value, weights(hard)[key]), key
    # alpha 1: the labels of the training split change nothing (the teacher's targets are all it learns).
    flipped = write_sentiment(tmp_path / "flipped", {"pos": "neg", "neg": "pos"})
    teacher = {"distill.teacher": str(world["runs"] / "teacher"), "distill.alpha": 1.0}
    a = kiln.train("sequence", world["data"], name="soft-a", **common, **teacher)
    b = kiln.train("sequence", flipped, name="soft-b", **common, **teacher)
    for key, value in weights(a).items():
        assert torch.equal(value, weights(b)[key]), key
    assert not torch.equal(weights(a)["classifier.weight"], weights(plain)["classifier.weight"])


def test_the_teacher_scores_once_and_the_student_is_an_ordinary_run(world, tmp_path, monkeypatch, capsys):
    args = ["distill", str(world["runs"] / "teacher"), str(world["data"]), "-n", "student", "--profile",
            str(world["profile"]), "--output-dir", str(tmp_path), "--epochs", "1", "--temperature", "3"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "student" / "run.json").read_text())
    assert meta["task"] == "sequence" and meta["config"]["distill"]["temperature"] == 3.0
    assert set(meta["teacher"]["metrics"]) >= {"accuracy", "f1"}
    teacher_eval = kiln.load(world["runs"] / "teacher", precision="auto").evaluate(
        kiln.load(world["runs"] / "teacher").read(world["data"] / "dev.tsv", labelled=True))
    assert meta["teacher"]["metrics"]["accuracy"] == pytest.approx(teacher_eval["accuracy"])
    err = capsys.readouterr().err
    assert "student   starts from the teacher's layers 0,1, 32 of its 32 dimensions, 2 of its heads" in err
    # A second student reads the cached targets: the teacher does not run again.
    monkeypatch.setattr(distill, "_teacher_rows", lambda *a: pytest.fail("the teacher ran again"))
    assert main([*args[:4], "student-2", *args[5:]]) == 0
    predictions = kiln.load(tmp_path / "student-2").predict(["the film is lovely ."])
    assert predictions[0]["label"] in ("pos", "neg")


def test_a_tagger_learns_from_a_teacher_with_another_tokenizer(world, tmp_path):
    run = kiln.train("token", world["conll"], name="student", profile=str(world["profile"]), output_dir=tmp_path,
                     **{**SETTINGS, "tokenizer.vocab_size": 50, "tokenizer.pin_vocab": True,
                        "distill.teacher": str(world["runs"] / "tagger"), "distill.augment": 0})
    teacher_vocab = json.loads((world["runs"] / "tagger" / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    student_vocab = json.loads((run.model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(student_vocab) != len(teacher_vocab)
    assert math.isfinite(run.metrics["loss"]) and "f1" in run.metrics
    # Every word of the training split carries the teacher's logits for it, whatever its sub-tokens.
    from kiln.config import config_from_dict
    from kiln.tasks import get_task
    from kiln.tokenizers import load_tokenizer

    meta = json.loads((run.model_dir / "kiln.json").read_text())
    student = distill.Distillation(get_task("token", config_from_dict(meta["config"]), meta["task_state"]),
                                   config_from_dict(meta["config"]).distill)
    train = student.read(world["conll"] / "train.txt")
    student.prepare(train)
    features = student.encode(train, load_tokenizer(run.model_dir), 64)
    assert sum(len(f["teacher"]) for f in features) == sum(len(ex["words"]) for ex in train.examples)
    rows = distill.teacher_targets(world["runs"] / "tagger" / "model", train)
    first = features[0]
    assert first["teacher"][0][1] == pytest.approx(rows[first["example"]][0].tolist())


def test_unlabeled_inputs_train_and_a_bad_line_is_refused_before_anything_is_written(world, tmp_path, capsys):
    unlabeled = tmp_path / "more.tsv"
    unlabeled.write_text("sentence\n" + "".join(f"{t}\n" for t, _ in sentiment_rows(50, 7)))
    args = ["distill", str(world["runs"] / "teacher"), str(world["data"]), "--profile", str(world["profile"]),
            "--output-dir", str(tmp_path / "runs"), "--max-steps", "2"]
    assert main([*args, "-n", "more", "--unlabeled", str(unlabeled)]) == 0
    assert "unlabeled 50 inputs labelled by the teacher" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine ."}\n{"text": \n')
    assert main([*args, "-n", "broken", "--unlabeled", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:2" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "broken").exists()


def test_augmented_copies_mask_words_and_sample_ngrams_the_same_way_each_time():
    from kiln.tasks.base import Dataset

    texts = ["a b c d e f g h", "i j k l"]
    data = Dataset("x.tsv", [{"texts": (t,), "label": "pos", "line": n} for n, t in enumerate(texts, 2)])
    made = distill.augmented(data, 20, "[MASK]", p_mask=0.3, p_ngram=0.5)
    assert made.examples == distill.augmented(data, 20, "[MASK]", p_mask=0.3, p_ngram=0.5).examples
    seen = [ex["texts"][0] for ex in made.examples]
    assert len(seen) == len(set(seen)) and not set(seen) & set(texts)  # each new, once
    assert all(ex["label"] is None for ex in made.examples)
    for example in made.examples:  # each copy: a run of one input's words, some masked
        words = example["texts"][0].split()
        source = texts[example["line"] - 2].split()
        assert any(all(w in ("[MASK]", source[i + k]) for k, w in enumerate(words))
                   for i in range(len(source) - len(words) + 1)), words
    assert any("[MASK]" in t for t in seen) and any(len(t.split()) <= 5 for t in seen)
    tagged = Dataset("x.txt", [{"words": ["Paris", "is", "nice"], "tags": ["B-LOC", "O", "O"], "line": 1}])
    copies = distill.augmented(tagged, 10, "[MASK]", p_mask=0.5, p_ngram=0.0).examples
    assert copies and all(len(ex["words"]) == 3 and ex["tags"] is None for ex in copies)


def test_augmented_inputs_train_on_the_teachers_targets(world, tmp_path, capsys):
    args = ["distill", str(world["runs"] / "tagger"), str(world["conll"]), "--profile", str(world["profile"]),
            "--output-dir", str(tmp_path), "--max-steps", "2", "-n", "more", "--augment", "2"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "perturbed copies of the training inputs (2 per input), labelled by the teacher" in err
    assert main([*args[:-4], "-n", "random", "--student-init", "random"]) == 0
    assert "student   starts from random weights (distill.student_init=random)" in capsys.readouterr().err


def test_refusals_are_one_line(world, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    with pytest.raises(KilnError, match="the teacher is a token model; a sequence student learns from a sequence"):
        kiln.train("sequence", world["data"], name="x", output_dir=runs,
                   **{"distill.teacher": str(world["runs"] / "tagger")})
    other = write_sentiment(tmp_path / "other", {"pos": "great"})
    assert main(["distill", str(world["runs"] / "teacher"), str(other), "-n", "x", "--output-dir", runs]) == 2
    assert "label 'great' is not one of the teacher's (neg, pos)" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nowhere"), str(world["data"]), "-n", "x", "--output-dir", runs]) == 2
    assert "no such teacher run" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()
