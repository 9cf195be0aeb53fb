"""Every family trains every task it supports in low precision: a finite loss, an export, a reload.

The CPU tier runs ``--precision bf16`` whatever the CPU (emulated bf16 on AVX2 is slow, so the
shapes are tiny and the runs two steps long), so a bf16 breakage shows up on every machine. The
``gpu`` tier does the same in bf16 and fp16 on CUDA and skips without it.
"""

from __future__ import annotations

import inspect
import json
import math
import random

import pytest
import torch

import kiln
from kiln.profiles import builder_for

ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "max_position_embeddings": 80}
SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 80}
# One profile per family, with tiny shapes (the architecture code is the family's; size does not matter).
FAMILIES = {
    "bert-tiny": ENCODER,
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 80},
    "roberta-base": ENCODER,
    "xlm-roberta-base": ENCODER,
    "deberta-base": ENCODER,
    "squeezebert": {**ENCODER, "embedding_size": 32},
    "crammed-bert-tiny": {**ENCODER, "intermediate_size": 32},
    "bart-base": SEQ2SEQ,
    "mbart": SEQ2SEQ,
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 80},
    "t5-tiny": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "d_kv": 16},
}
WORDS = ["anna", "bob", "met", "paris", "lives", "in", "a", "good", "dull", "film", "the", "cat", "sat"]


def cases() -> list[tuple[str, str]]:
    return [(profile, task) for profile in FAMILIES for task in builder_for(profile).build().tasks]


def write_data(folder, task: str):
    """A few dozen examples of ``task``'s format in ``folder`` (train + validation)."""
    rng = random.Random(0)
    folder.mkdir(exist_ok=True)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for split, n in (("train", 32), ("validation", 8)):
        if task == "sequence":
            text = "".join(f"{words(5)}\t{rng.choice(['pos', 'neg'])}\n" for _ in range(n))
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + text)
        elif task in ("sentence-pair", "embedding"):  # scored pairs, as STS-B
            text = "".join(f"{words(4)}\t{words(4)}\t{rng.random() * 5:.2f}\n" for _ in range(n))
            (folder / f"{split}.tsv").write_text("sentence1\tsentence2\tscore\n" + text)
        elif task == "token":
            (folder / f"{split}.tsv").write_text("".join(f"Anna met Bob {i}\tB-PER O B-PER O\n" for i in range(n)))
        elif task == "qa":
            rows = [{"context": f"Anna lives in Paris {i} .", "question": "Where?",
                     "answers": {"text": ["Paris"], "answer_start": [14]}} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif task == "multiple-choice":
            rows = [{"context": words(4), "choices": [words(3) for _ in range(3)], "label": rng.randrange(3)}
                    for _ in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif task == "generation":
            rows = [words(4) for _ in range(n)]
            (folder / f"{split}.tsv").write_text("source\ttarget\n" + "".join(f"{r}\t{r}\n" for r in rows))
        else:  # mlm, clm, span: raw text
            (folder / f"{split}.txt").write_text("".join(f"{words(rng.randint(6, 20))} .\n" for _ in range(n * 4)))
    return folder


def train_in(precision: str, device: str, profile: str, task: str, tmp_path):
    data = write_data(tmp_path / "data", task)
    overrides = [f"model.config.{k}={v}" for k, v in FAMILIES[profile].items()]
    overrides += ["tokenizer.vocab_size=200", "train.log_every=1", "generate.max_new_tokens=4",
                  "pretrain.seq_len=32", "train.batch_size=4", "train.grad_accum=1", "train.batch_ramp=0"]
    if profile == "mbart":
        overrides.append("tokenizer.kind=bpe")  # unigram on a dozen words learns only characters
    return kiln.train(task, data, name=task, profile=profile, max_steps=2, precision=precision, device=device,
                      overrides=overrides, output_dir=tmp_path / "runs")


def check_run(run, task: str, precision: str) -> None:
    """Finite training and validation losses, and an export that transformers loads and runs."""
    import transformers

    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses), losses
    assert json.loads((run.path / "run.json").read_text())["precision"] == precision
    auto = getattr(transformers, kiln.load(run.path).task.auto_model)
    model = auto.from_pretrained(run.model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    accepted = inspect.signature(model.forward).parameters
    inputs = {k: v for k, v in tokenizer(["anna met bob in paris ."], return_tensors="pt").items() if k in accepted}
    if auto is transformers.AutoModelForSeq2SeqLM:
        inputs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id]])
    if auto is transformers.AutoModelForMultipleChoice:  # (batch, candidates, tokens)
        inputs = {k: v.unsqueeze(1).expand(-1, 2, -1) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(next(v for v in out.values() if torch.is_tensor(v))).all()


@pytest.mark.parametrize(("profile", "task"), cases())
def test_every_family_trains_every_task_in_bf16_on_cpu(profile, task, tmp_path):
    run = train_in("bf16", "cpu", profile, task, tmp_path)
    check_run(run, task, "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(("profile", "task"), cases())
def test_every_family_trains_every_task_on_gpu(profile, task, precision, tmp_path):
    run = train_in(precision, "cuda", profile, task, tmp_path)
    check_run(run, task, precision)
