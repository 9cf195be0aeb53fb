"""The Python API and the training features around the loop (init, precision, early stopping)."""

import builtins
import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

import kiln
from kiln.cli.predict import _interactive
from kiln.errors import KilnError


def test_sentence_pair_regression_from_jsonl(pair_dir, tiny_profile, tmp_path):
    run = kiln.train("sentence-pair", pair_dir, name="pairs", profile=str(tiny_profile), epochs=3,
                     precision="fp32", output_dir=tmp_path / "runs")  # compared with fp32 inference below
    assert set(run.metrics) >= {"pearson", "spearman", "mse", "loss", "n"}
    model = kiln.load(run.path, precision="fp32")
    assert model.task.regression and model.model.config.num_labels == 1
    results = model.predict([("the film is great .", "the film is lovely ."), ("the plot is dull .", "x")])
    assert [set(r) for r in results] == [{"label", "score"}] * 2
    metrics = model.evaluate(pair_dir / "validation.jsonl")
    assert metrics["pearson"] == pytest.approx(run.metrics["pearson"], abs=1e-6)
    with pytest.raises(KilnError, match="2 tab-separated"):
        model.predict(["only one text"])


def test_single_file_is_split_90_10(sentiment_dir, tiny_profile, tmp_path):
    run = kiln.train("sequence", sentiment_dir / "train.tsv", name="one", profile=str(tiny_profile),
                     max_steps=2, output_dir=tmp_path)
    assert run.metrics["n"] == 16  # 10% of 160


def test_init_from_a_local_hf_checkpoint(sentiment_dir, tiny_profile, tmp_path, caplog, capfd):
    """--init takes any local HF directory (here a random BertForMaskedLM), never a hub."""
    donor = kiln.train("sequence", sentiment_dir, name="donor", profile=str(tiny_profile), max_steps=1,
                       output_dir=tmp_path)
    checkpoint = tmp_path / "mlm-checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(donor.model_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(config)
    mlm.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    capfd.readouterr()
    with caplog.at_level("INFO", logger="kiln"):
        run = kiln.train("sentence-pair", sentiment_dir, name="from-init", init=checkpoint, max_steps=2, lr=0.0,
                         columns="sentence1=sentence,sentence2=sentence", output_dir=tmp_path)
    # One line of kiln's own about the fresh weights, instead of transformers' load-report table.
    assert ("new       classification head: 2 labels, 4 tensors initialised at random (bert.pooler.dense.bias, "
            "bert.pooler.dense.weight, classifier.bias, classifier.weight)") in caplog.text
    assert "LOAD REPORT" not in capfd.readouterr().err
    saved = json.loads((run.model_dir / "kiln.json").read_text())
    assert saved["init"] == str(checkpoint)
    loaded = kiln.load(run.path).model
    # lr 0: the encoder is exactly the checkpoint's; only the new head is fresh.
    assert torch.equal(loaded.bert.encoder.layer[0].attention.self.query.weight,
                       mlm.bert.encoder.layer[0].attention.self.query.weight)
    assert loaded.config.num_labels == 2


def test_bf16_autocast_on_cpu_trains(sentiment_dir, tiny_profile, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="bf16", profile=str(tiny_profile), max_steps=2,
                     precision="bf16", output_dir=tmp_path)
    weights = kiln.load(run.path).model.classifier.weight
    assert weights.dtype == torch.float32  # master weights stay fp32 under autocast


def test_fp16_needs_cuda(sentiment_dir, tiny_profile, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KilnError, match="fp16 needs a CUDA device"):
        kiln.train("sequence", sentiment_dir, name="fp16", profile=str(tiny_profile), precision="fp16",
                   output_dir=tmp_path)
    assert not (tmp_path / "fp16").exists()


def test_early_stopping_on_patience(sentiment_dir, tiny_profile, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="patient", profile=str(tiny_profile), epochs=20,
                     lr=0.0, patience=2, eval_every=2, output_dir=tmp_path)
    evals = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
             if '"split"' in line]
    assert len(evals) == 3  # the first sets the best; two more without improvement stop the run


def test_interactive_predict(sentiment_dir, tiny_profile, tmp_path, monkeypatch, capsys):
    run = kiln.train("sequence", sentiment_dir, name="chat", profile=str(tiny_profile), max_steps=1,
                     output_dir=tmp_path)
    lines = iter(["the film is great .", "", "the plot is dull ."])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert _interactive(kiln.load(run.path)) == 0
    outputs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outputs) == 2 and all(set(o) == {"label", "score"} for o in outputs)


def test_profile_must_support_task(sentiment_dir, tmp_path):
    yaml_path = tmp_path / "seq-only.yaml"
    yaml_path.write_text("base: bert-tiny\ntasks: [sequence]\n")
    with pytest.raises(KilnError, match="does not support task 'sentence-pair'"):
        kiln.train("sentence-pair", sentiment_dir, name="x", profile=str(yaml_path), output_dir=tmp_path)
