"""What a run leaves and says: test-split scores, the model card, progress off a terminal, verbosity,
and the precision switches."""

import json
import os
import subprocess
import sys

import pytest
from conftest import sentiment_rows

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.training.device import inference_precision, resolve_precision


def write_split(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join("\t".join(row) + "\n" for row in rows))


def test_labelled_test_split_is_scored_and_recorded(sentiment_dir, tiny_profile, tmp_path, capsys):
    write_split(sentiment_dir / "test.tsv", sentiment_rows(30, seed=9))
    assert main(["train", "sequence", str(sentiment_dir), "-n", "t", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path), "--precision", "fp32"]) == 0
    run = tmp_path / "t"
    recorded = json.loads((run / "run.json").read_text())["test_metrics"]
    assert recorded["n"] == 30 and set(recorded) == {"accuracy", "f1", "macro_f1", "mcc", "loss", "n"}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["split"] == "test" and logged[-1]["test_accuracy"] == recorded["accuracy"]
    assert f"test: accuracy {recorded['accuracy']:.4f}" in capsys.readouterr().err
    # The same figures as `kiln evaluate` on the exported model (its default precision both).
    assert kiln.load(run).evaluate(sentiment_dir / "test.tsv") == pytest.approx(recorded)


def test_unlabelled_test_split_is_skipped_with_one_line(sentiment_dir, tiny_profile, tmp_path, capsys):
    write_split(sentiment_dir / "test.tsv", [(text,) for text, _ in sentiment_rows(5)], header="sentence")
    run = kiln.train("sequence", sentiment_dir, name="u", profile=str(tiny_profile), max_steps=2,
                     output_dir=tmp_path)
    assert run.test_metrics == {} and "test_metrics" not in json.loads((run.path / "run.json").read_text())
    said = [line for line in capsys.readouterr().err.splitlines() if "test.tsv" in line]
    assert len(said) == 1 and "no labels, not evaluated" in said[0]


def test_a_test_split_laid_out_otherwise_is_skipped_with_one_line(tmp_path, tiny_profile, capsys):
    folder = tmp_path / "cola"
    folder.mkdir()
    for split, rows in (("train", sentiment_rows(60)), ("dev", sentiment_rows(20, seed=1))):
        (folder / f"{split}.tsv").write_text("".join(f"src\t{label}\t\t{text}\n" for text, label in rows))
    (folder / "test.tsv").write_text("index\tsentence\n0\tthe film is dull .\n")  # GLUE CoLA's test file
    run = kiln.train("sequence", folder, name="cola", profile=str(tiny_profile), columns="text=3,label=1",
                     max_steps=1, output_dir=tmp_path / "runs")
    said = [line for line in capsys.readouterr().err.splitlines() if "test.tsv" in line]
    assert run.test_metrics == {} and len(said) == 1 and "columns do not fit" in said[0]


def test_a_bad_row_in_a_labelled_test_split_is_an_error_not_a_skip(sentiment_dir, tiny_profile, tmp_path):
    write_split(sentiment_dir / "test.tsv", [("a fine film .", "pos"), ("an odd film .", "")])
    assert main(["train", "sequence", str(sentiment_dir), "-n", "bad", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "bad").exists()


def test_an_unseen_label_in_the_test_split_is_refused_before_training(sentiment_dir, tiny_profile, tmp_path):
    write_split(sentiment_dir / "test.tsv", [("a fine film .", "pos"), ("an odd film .", "meh")])
    with pytest.raises(KilnError, match="meh") as caught:
        kiln.train("sequence", sentiment_dir, name="x", profile=str(tiny_profile), output_dir=tmp_path)
    assert caught.value.line == 3 and not (tmp_path / "x").exists()


def test_model_card_says_what_was_trained_and_how(sentiment_dir, tiny_profile, tmp_path):
    assert main(["train", "sequence", str(sentiment_dir), "-n", "card", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path), "--max-steps", "3", "-q"]) == 0
    card = (tmp_path / "card" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    parameters = sum(p.numel() for p in kiln.load(tmp_path / "card").model.parameters())
    assert f"({parameters / 1e6:.2f}M parameters)" in card
    assert "labels (2): `neg`, `pos`" in card and f"train: `{sentiment_dir / 'train.tsv'}`" in card
    assert "| validation | 40 | " in card and "AutoModelForSequenceClassification.from_pretrained" in card
    command = json.loads((tmp_path / "card" / "run.json").read_text())["command"]
    assert command == (f"kiln train sequence {sentiment_dir} -n card --profile {tiny_profile} --output-dir "
                       f"{tmp_path} --max-steps 3 -q") and f"\n{command}\n" in card
    run = kiln.train("sequence", sentiment_dir, name="api", profile=str(tiny_profile), max_steps=1,
                     output_dir=tmp_path)
    assert f"kiln.train('sequence', '{sentiment_dir}', name='api', profile='{tiny_profile}', max_steps=1)" \
        in (run.model_dir / "README.md").read_text()


def test_progress_lines_when_stderr_is_a_file(sentiment_dir, tiny_profile, tmp_path):
    """`nohup kiln train ... 2> log`: no bar, but plain progress lines."""
    log = tmp_path / "log"
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "kiln", "train", "sequence", str(sentiment_dir), "-n", "p",
                               "--profile", str(tiny_profile), "--output-dir", str(tmp_path), "--max-steps", "6"],
                              stderr=stderr, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0
    text = log.read_text()
    progress = [line for line in text.splitlines() if line.strip().startswith("step ")]
    assert progress and progress[0].split()[:2] == ["step", "5/6"]  # log_every is 5 in the tiny profile
    for field in ("loss", "lr", "tok/s", "elapsed", "ETA"):
        assert field in progress[0]
    assert "\r" not in text and "it/s" not in text  # no tqdm bar
    quiet = subprocess.run([sys.executable, "-m", "kiln", "train", "sequence", str(sentiment_dir), "-n", "q",
                            "--profile", str(tiny_profile), "--output-dir", str(tmp_path), "--max-steps", "6",
                            "--quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_deberta_trains_in_bf16_and_the_summary_says_what_stays_fp32(tmp_path, caplog):
    data = tmp_path / "data.tsv"
    write_split(data, sentiment_rows(40))
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    with caplog.at_level("INFO", logger="kiln"):
        kiln.train("sequence", data, name="d", profile="deberta-base", precision="bf16", max_steps=1,
                   output_dir=tmp_path, overrides=[f"model.config.{k}={v}" for k, v in tiny.items()])
    assert "in bf16 (attention in fp32: transformers' DeBERTa mask overflows bf16/fp16)" in caplog.text


def test_kiln_precision_sets_what_auto_and_the_inference_default_mean(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    monkeypatch.delenv("KILN_PRECISION", raising=False)
    assert inference_precision(None, cpu) == "fp32" and inference_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("KILN_PRECISION", "bf16")
    assert resolve_precision("auto", cpu) == "bf16" and inference_precision(None, cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"  # a pinned precision stays pinned
    monkeypatch.setenv("KILN_PRECISION", "fp8")
    for resolve in (lambda: resolve_precision("auto", cpu), lambda: inference_precision(None, cpu)):
        with pytest.raises(KilnError, match="KILN_PRECISION=fp8"):
            resolve()


def test_auto_follows_the_cpu(monkeypatch):
    import torch

    from kiln.training import device

    monkeypatch.delenv("KILN_PRECISION", raising=False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda native=native: native)
        assert resolve_precision("auto", torch.device("cpu")) == expected


def test_predict_and_evaluate_take_a_precision(sentiment_dir, tiny_profile, tmp_path, capsys):
    run = kiln.train("sequence", sentiment_dir, name="p", profile=str(tiny_profile), output_dir=tmp_path,
                     precision="fp32")
    scores = {}
    for precision in ("fp32", "bf16"):
        assert main(["predict", str(run.path), str(sentiment_dir / "dev.tsv"), "--json", "--precision",
                     precision]) == 0
        scores[precision] = [r["score"] for r in json.loads(capsys.readouterr().out)]
    # bf16 keeps about 3 significant digits: close to fp32, but not equal.
    assert scores["bf16"] == pytest.approx(scores["fp32"], abs=0.05) and scores["bf16"] != scores["fp32"]
    assert os.environ.get("KILN_PRECISION") or kiln.load(run.path).precision == "fp32"


def test_a_csv_with_quoted_newlines_trains_and_predicts_back(tiny_profile, tmp_path):
    import csv

    rows = sentiment_rows(60, seed=3)
    rows[5] = ('the film, "in short",\nis wonderful .', "pos")  # a comma, doubled quotes, a newline
    with open(tmp_path / "reviews.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    run = kiln.train("sequence", tmp_path / "reviews.csv", name="csv", profile=str(tiny_profile), max_steps=2,
                     output_dir=tmp_path / "runs")
    assert run.metrics["n"] == 6  # 10 % of 60 records (not of the 61 physical lines)
    assert main(["predict", str(run.path), str(tmp_path / "reviews.csv"), "-o", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", newline="") as back:
        written = list(csv.reader(back))
    assert written[0] == ["text", "label", "prediction"] and written[6][0] == rows[5][0] and len(written) == 61
