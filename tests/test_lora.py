"""LoRA through peft: what trains, what a checkpoint holds, the merged export, the adapter alone, an
exact resume, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROFILE, sentiment_rows
from safetensors.torch import load_file

import kiln
from kiln.cli import main
from kiln.config import parse_lora
from kiln.errors import KilnError
from kiln.training import checkpoint as ckpt
from kiln.training.callbacks import Callback
from kiln.training.lora import head_modules

pytest.importorskip("peft")

# fp32: the merged export, the unmerged adapters and transformers are compared to 1e-5.
SETTINGS = {"train.precision": "fp32", "train.max_steps": 6, "train.eval_every": 3, "train.save_every": "1",
            "train.keep_last": 6, "train.dropout": 0.1, "optim.lr": 1e-2}


def flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sentiment data and a pretrained start: a tiny BERT body (no head) with its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    data = root / "data"
    data.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(120, 1)), ("dev.tsv", sentiment_rows(30, 2))):
        (data / name).write_text("\n".join(["sentence\tlabel", *(f"{t}\t{label}" for t, label in rows)]) + "\n")
    base = kiln.train("sequence", data, name="base", profile=str(root / "tiny.yaml"), max_steps=2,
                      output_dir=root / "runs")
    body = root / "start"
    AutoModel.from_pretrained(base.model_dir).save_pretrained(body)
    AutoTokenizer.from_pretrained(base.model_dir).save_pretrained(body)
    return {"root": root, "data": data, "start": body}


@pytest.fixture(scope="module")
def trained(start: dict[str, Path]) -> Path:
    runs = start["root"] / "runs"
    assert main(["train", "sequence", str(start["data"]), "-n", "lora", "--init", str(start["start"]),
                 "--output-dir", str(runs), "--lora", "r=4,alpha=8,targets=query,value", *flags(SETTINGS)]) == 0
    return runs / "lora"


def test_the_lora_flag_is_settings_of_the_lora_section():
    assert parse_lora("") == ["lora.r=8"]
    assert parse_lora("r=16,alpha=32,targets=query,key,value") == ["lora.r=16", "lora.alpha=32",
                                                                  "lora.targets=query,key,value"]
    with pytest.raises(KilnError, match="--lora has no key 'rank'"):
        parse_lora("rank=4")
    with pytest.raises(KilnError, match="KEY=VALUE pairs"):
        parse_lora("query,value")


def test_only_adapters_and_the_new_head_train_and_checkpoints_hold_only_them(trained, start, caplog):
    weights = load_file(str(ckpt.last_checkpoint(trained / "checkpoints") / "adapter_model.safetensors"))
    assert not (ckpt.last_checkpoint(trained / "checkpoints") / "model.safetensors").exists()
    names = sorted(weights)
    assert all("lora_" in n or ".classifier." in n for n in names), names
    assert sum("lora_A" in n for n in names) == 4  # query and value in each of 2 layers
    assert any(n.endswith("classifier.weight") for n in names)
    start_bytes = (start["start"] / "model.safetensors").stat().st_size
    assert sum(v.numel() * v.element_size() for v in weights.values()) < start_bytes / 10
    meta = json.loads((trained / "model" / "kiln.json").read_text())
    assert meta["lora"]["base"] == str(start["start"].resolve()) or Path(meta["lora"]["base"]) == start["start"]
    assert len(meta["lora"]["sha256"]) == 64


def test_the_export_is_plain_transformers_with_the_adapters_merged(trained, start):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = trained / "model"
    assert not any("lora" in key for key in load_file(str(model_dir / "model.safetensors")))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and "peft" not in json.dumps(config)
    texts = ["the film is lovely .", "every scene is tedious .", "the cast is superb ."]
    theirs = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        merged = theirs(**batch).logits.softmax(-1)
    ours = kiln.load(trained, device="cpu", precision="fp32").predict(texts)
    for row, prediction in zip(merged, ours, strict=True):
        assert prediction["label"] == theirs.config.id2label[int(row.argmax())]
        assert prediction["score"] == pytest.approx(float(row.max()), abs=1e-5)
    # The adapter alone, on the start, through peft: the unmerged model predicts the same.
    base = AutoModelForSequenceClassification.from_pretrained(start["start"], num_labels=2,
                                                              id2label=theirs.config.id2label,
                                                              label2id=theirs.config.label2id)
    adapted = PeftModel.from_pretrained(base, trained / "adapter").eval()
    with torch.no_grad():
        unmerged = adapted(**batch).logits.softmax(-1)
    torch.testing.assert_close(unmerged, merged, rtol=0, atol=1e-5)
    # A LoRA checkpoint predicts too (kiln merges its adapters into the start as it loads it).
    best = kiln.load(trained / "checkpoints" / "best", device="cpu", precision="fp32").predict(texts)
    assert [p["score"] for p in best] == pytest.approx([p["score"] for p in ours], abs=1e-6)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, logs) -> None:
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


def test_a_lora_run_resumes_exactly(start, tmp_path):
    # Dropout on (adapters and body): the resumed run matches only with the RNG state restored too.
    common = dict(init=str(start["start"]), output_dir=tmp_path, **SETTINGS,
                  **{"lora.r": 4, "lora.targets": "query,value"})
    straight = kiln.train("sequence", start["data"], name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", start["data"], name="cut", callbacks=[StopAt(4)], **common)
    resumed = kiln.train("sequence", start["data"], name="cut", resume=True, output_dir=tmp_path)
    a = load_file(str(ckpt.last_checkpoint(straight.path / "checkpoints") / "adapter_model.safetensors"))
    b = load_file(str(ckpt.last_checkpoint(resumed.path / "checkpoints") / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.metrics == resumed.metrics


def test_lora_refusals_are_one_line(start, tmp_path, capsys):
    data, runs = str(start["data"]), str(tmp_path / "runs")
    assert main(["train", "sequence", data, "-n", "x", "--output-dir", runs, "--lora"]) == 2
    assert "--lora adapts a pretrained start: give --init" in capsys.readouterr().err
    assert main(["train", "sequence", data, "-n", "x", "--output-dir", runs, "--init", str(start["start"]),
                 "--lora", "targets=q_proj"]) == 2
    assert "no module named 'q_proj'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()


def test_a_changed_start_stops_the_resume(start, tmp_path, capsys):
    body = tmp_path / "start"
    shutil.copytree(start["start"], body)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", start["data"], name="r", init=str(body), output_dir=tmp_path / "runs",
                   callbacks=[StopAt(2)], **SETTINGS, **{"lora.r": 2})
    weights = load_file(str(body / "model.safetensors"))
    weights = {k: v + 1 if k.endswith("word_embeddings.weight") else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(body / "model.safetensors"), metadata={"format": "pt"})
    assert main(["train", "sequence", str(start["data"]), "-n", "r", "--output-dir", str(tmp_path / "runs"),
                 "--resume"]) == 2
    assert "frozen start has changed" in capsys.readouterr().err


def test_the_head_is_the_task_s_own_modules_never_a_language_model_s_output_layer():
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForTokenClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    bert = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=50)
    assert head_modules(BertForTokenClassification(bert), ()) == ["classifier"]
    assert head_modules(BertForMaskedLM(bert), ()) == []
    assert head_modules(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)), ()) == []
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    assert head_modules(T5ForConditionalGeneration(t5), ()) == []
    # An MLM head new to a bare encoder: its transform trains whole, its decoder (the tied embeddings) not.
    new = ("cls.predictions.decoder.weight", "cls.predictions.transform.dense.weight",
           "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight")
    assert head_modules(BertForMaskedLM(bert), new) == ["cls.predictions.transform.LayerNorm",
                                                        "cls.predictions.transform.dense"]


def test_ddp_and_fsdp_train_lora_like_one_process_accumulating_two(start, tmp_path):
    import os
    import subprocess
    import sys

    settings = {**SETTINGS, "train.dropout": 0.0, "train.max_steps": 3, "train.batch_tokens": 128, "lora.r": 4}
    kiln.train("sequence", start["data"], name="one", init=str(start["start"]), output_dir=tmp_path,
               **{**settings, "train.grad_accum": 2})
    expected = load_file(str(ckpt.last_checkpoint(tmp_path / "one" / "checkpoints") / "adapter_model.safetensors"))
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp", "full"])):
        done = subprocess.run([sys.executable, "-m", "kiln", "train", "sequence", str(start["data"]), "-n", name,
                               "--init", str(start["start"]), "--output-dir", str(tmp_path), "-q", "--nproc", "2",
                               *extra, *flags(settings)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        got = load_file(str(ckpt.last_checkpoint(tmp_path / name / "checkpoints") / "adapter_model.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:  # the order of float sums differs (all-reduce against accumulation)
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("task", ["token", "embedding", "mlm"])
def test_lora_trains_other_tasks_and_exports_plain_weights(task, start, tmp_path, pair_dir):
    from test_token import sentences, write_conll

    if task == "token":
        data = tmp_path / "conll"
        data.mkdir()
        write_conll(data / "train.txt", sentences(60, 1))
        write_conll(data / "valid.txt", sentences(20, 2))
    elif task == "embedding":
        data = pair_dir
    else:
        data = tmp_path / "corpus"
        data.mkdir()
        rows = [text for text, _ in sentiment_rows(80, 3)]
        (data / "train.txt").write_text("\n".join(rows[:60]) + "\n")
        (data / "valid.txt").write_text("\n".join(rows[60:]) + "\n")
    extra = {"pretrain.seq_len": 32} if task == "mlm" else {}
    run = kiln.train(task, data, name=task, init=str(start["start"]), output_dir=tmp_path / "runs",
                     **{"lora.r": 2, "train.max_steps": 2, "train.precision": "fp32", "train.batch_tokens": 256,
                        **extra})
    adapter = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    whole = sorted({key.rsplit(".", 1)[0] for key in adapter if "lora_" not in key})
    # token: its new classifier trains whole; embedding has no head; mlm: the new head's transform, not
    # its decoder (the tied, pretrained word embeddings)
    expected = {"token": ["classifier"], "embedding": [],
                "mlm": ["cls.predictions.transform.LayerNorm", "cls.predictions.transform.dense"]}[task]
    assert whole == [f"base_model.model.{name}" for name in expected], whole
    assert not any("lora" in key for key in load_file(str(run.model_dir / "model.safetensors")))
    assert run.load(device="cpu").predict(["the film is [MASK] ." if task == "mlm" else "the film is lovely ."])
