"""End to end through the CLI: train -> evaluate -> predict -> transformers reproduces kiln."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import kiln
from kiln.cli import main


def kiln_cli(*args, stdin=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny sequence run shared by the tests below."""
    import random

    from conftest import TINY_PROFILE, sentiment_rows

    base = tmp_path_factory.mktemp("e2e")
    os.environ["KILN_CACHE"] = str(base / "cache")
    (base / "tiny.yaml").write_text(TINY_PROFILE)
    data = base / "data"
    data.mkdir()
    rows = sentiment_rows(240, seed=random.Random(5).randint(0, 99))
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows[:200]))
    (data / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows[200:]))
    code = main(["train", "sequence", str(data), "-n", "e2e", "--profile", str(base / "tiny.yaml"),
                 "--output-dir", str(base / "runs"), "--epochs", "6", "--seed", "3"])
    assert code == 0
    return base / "runs" / "e2e", data


def test_run_directory_layout(trained):
    run, _ = trained
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/best/model.safetensors",
                 f"checkpoints/{max(p.name for p in (run / 'checkpoints').glob('step-*'))}/optimizer.safetensors",
                 "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/kiln.json"):
        assert (run / name).is_file(), name
    assert not any(p.name.startswith(".") for p in run.rglob("*")), "temporary files left behind"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r for r in records)
    evals = [r for r in records if r.get("split") == "validation"]
    assert len(evals) == 6 and evals[-1]["eval_accuracy"] > 0.9  # the toy task is learnable


def test_evaluate_json(trained, capsys):
    run, data = trained
    assert main(["evaluate", str(run), str(data / "dev.tsv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"accuracy", "f1", "macro_f1", "mcc", "loss", "n"}
    assert set(metrics) == {*kiln.load(run).task.metric_names(), "n"}  # what train.metric is checked against
    assert metrics["n"] == 40 and metrics["accuracy"] > 0.9


def test_predict_file_appends_column_and_json(trained, tmp_path, capsys):
    run, data = trained
    out = tmp_path / "pred.tsv"
    assert main(["predict", str(run), str(data / "dev.tsv"), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "sentence\tlabel\tprediction" and len(lines) == 41
    assert all(line.split("\t")[-1] in {"pos", "neg"} for line in lines[1:])
    assert main(["predict", str(run), str(data / "dev.tsv"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 40 and set(results[0]) == {"label", "score"}


def test_predict_stdin_keeps_input_order(trained):
    run, _ = trained
    lines = ["the plot is wonderful .", "every scene is awful .", "the cast is superb .", "the film is dull ."]
    result = kiln_cli("predict", run, "--json", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    labels = [r["label"] for r in json.loads(result.stdout)]
    assert labels == ["pos", "neg", "pos", "neg"]


def test_transformers_reproduces_kiln(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import kiln

    run, _ = trained
    texts = ["the plot is wonderful .", "every scene is awful and boring .", "this movie is charming ."]
    ours = kiln.load(run, precision="fp32").predict(texts)
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    probs = logits.softmax(-1)
    for row, mine in zip(probs, ours, strict=True):
        assert model.config.id2label[int(row.argmax())] == mine["label"]
        assert float(row.max()) == pytest.approx(mine["score"], abs=1e-5)
    assert model.config.num_labels == 2 and set(model.config.label2id) == {"neg", "pos"}


def test_print_config_shows_sources(capsys, tiny_profile):
    assert main(["train", "sequence", "unused", "--profile", str(tiny_profile), "--lr", "0.01",
                 "-c", "train.seed=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()}
    assert rows["optim.lr"] == "flag" and rows["train.seed"] == "flag"
    assert rows["tokenizer.kind"] == "profile" and rows["train.batch_tokens"] == "file"
    assert rows["data.split_seed"] == "default"


@pytest.mark.parametrize(("content", "line"), [
    ("sentence\tlabel\ngood\t1\nbad\n", 3),
    (b"sentence\tlabel\ngood\t1\nbad \xff\t0\n", 3),
    ("sentence\tnot_a_label\ngood\t1\nbad\t0\n", 1),
])
def test_bad_input_one_line_exit_2_no_run_dir(tmp_path, content, line):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = kiln_cli("train", "sequence", path, "-n", "bad", "--output-dir", tmp_path / "runs")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:{line}: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--budget", "5x"], "kiln: setting 'train.budget': cannot read the duration '5x'"),
    (["--lr", "-1"], "kiln: setting 'optim.lr' must be at least 0, got -1.0"),
    (["--epochs", "0"], "kiln: setting 'train.epochs' is 0, and neither max_steps nor a budget is set"),
    (["--epochs", "-1"], "kiln: setting 'train.epochs' must be at least 0, got -1.0"),
    (["-c", "train.metric=bogus"], "kiln: setting 'train.metric': 'bogus' is not one of this task's metrics"),
    (["-c", "model.config.hidden_size=33"], "kiln: profile 'test-tiny' does not build a valid model: The hidden size"),
    (["--output-dir", "{data}/train.tsv"], "{data}/train.tsv/bad: Not a directory"),
], ids=["budget", "lr", "epochs", "negative-epochs", "metric", "shape", "output-dir"])
def test_bad_settings_fail_before_training_in_one_line(trained, tiny_profile, tmp_path, capsys, args, message):
    """Found by the settings' declarations (ranges, parsers) or before the first step, never after
    an epoch of training, and never leaving a run directory that blocks the retry."""
    _, data = trained
    args = [a.replace("{data}", str(data)) for a in args]
    output = [] if "--output-dir" in args else ["--output-dir", str(tmp_path / "runs")]
    code = main(["train", "sequence", str(data), "-n", "bad", "--profile", str(tiny_profile), *output, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message.replace("{data}", str(data))), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists() and not (data / "train.tsv" / "bad").exists()


def test_a_split_too_small_for_its_labels_says_it_was_split(tmp_path, capsys):
    path = tmp_path / "two.tsv"
    path.write_text("sentence\tlabel\nthe film is great .\tpos\nthe film is awful .\tneg\n")
    assert main(["train", "sequence", str(path), "-n", "x", "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "single label" in err and "validation is 1 of the file's 2 examples, held out at random" in err


def test_evaluate_and_predict_take_columns(trained, tmp_path, capsys):
    run, data = trained
    path = tmp_path / "three.tsv"
    path.write_text("id\tgold\ttext\n1\tpos\tthe film is wonderful .\n2\tneg\tthe film is awful .\n")
    assert main(["evaluate", str(run), str(path), "--json"]) == 2
    assert "--columns" in capsys.readouterr().err  # the advice names a flag that exists
    assert main(["evaluate", str(run), str(path), "--json", "--columns", "text=text,label=gold"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert main(["predict", str(run), str(path), "--columns", "text=2", "--json"]) == 0
    assert [r["label"] for r in json.loads(capsys.readouterr().out)] == ["pos", "neg"]
    predictor = kiln.load(run)  # the mapping is for that one file, not every later read
    assert len(predictor.read(path, labelled=True, columns="text=text,label=gold")) == 2
    assert predictor.task.config.data.columns == "" and len(predictor.read(data / "dev.tsv", labelled=True)) == 40


def test_predict_output_errors_and_bad_stdin_are_one_line(trained, tmp_path, capsys, monkeypatch):
    import io

    run, data = trained
    assert main(["predict", str(run), str(data / "dev.tsv"), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"{tmp_path}: is a directory")
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # no temporary file left behind
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"fine\ncaf\xe9 ok\n")))
    assert main(["predict", str(run)]) == 2
    assert capsys.readouterr().err.startswith("<stdin>:2: invalid UTF-8")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "sequence", str(data), "-n", "x", "--resume", "--overwrite"])
    assert exit_.value.code == 2


def test_unseen_label_in_evaluation(trained, tmp_path):
    run, _ = trained
    path = tmp_path / "eval.tsv"
    path.write_text("sentence\tlabel\nthe film is great .\tpos\nthe film is odd .\tmeh\n")
    result = kiln_cli("evaluate", run, path)
    assert result.returncode == 2 and result.stderr.startswith(f"{path}:3: label 'meh'")


def test_existing_run_needs_resume_or_overwrite(trained):
    run, data = trained
    result = kiln_cli("train", "sequence", data, "-n", run.name, "--output-dir", run.parent)
    assert result.returncode == 2 and "--resume" in result.stderr


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter(); from kiln.cli import build_parser; "
            "build_parser().format_help(); assert 'torch' not in sys.modules and "
            "'transformers' not in sys.modules; print(time.perf_counter() - t)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.5
    start = time.perf_counter()
    help_text = kiln_cli("train", "--help")
    assert help_text.returncode == 0 and "--batch-tokens" in help_text.stdout and "--columns" in help_text.stdout
    assert time.perf_counter() - start < 5  # includes interpreter start-up
    # The --profile help names each task's default without importing the tasks: keep it true.
    from kiln.tasks import TASKS, task_class

    profile_help = " ".join(help_text.stdout.split()).split("--profile PROFILE")[-1].split("--init DIR")[0]
    for name in TASKS:
        assert task_class(name).default_profile in profile_help, name
