"""The generation task: readers, seq2seq and decoder-only training, generate() parity with transformers."""

import json
import random

import pytest
import torch
from conftest import SHARED_DATA

import kiln
from kiln.cli import main
from kiln.config import Config, resolve_key
from kiln.errors import KilnError
from kiln.tasks import get_task
from kiln.tasks.base import Dataset

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "jumps", "big", "small"]
T5_TINY = """\
base: t5-tiny
model: {config: {d_model: 32, d_ff: 64, num_layers: 2, num_decoder_layers: 2, num_heads: 2, d_kv: 16}}
tokenizer: {vocab_size: 400}
optim: {lr: 1.0e-2}
schedule: {warmup_ratio: 0.0}
train: {batch_tokens: 256, epochs: 10}
generate: {max_new_tokens: 20}
"""
GPT2_TINY = """\
base: gpt2
model: {config: {n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}}
tokenizer: {vocab_size: 300}
optim: {lr: 1.0e-2}
schedule: {warmup_ratio: 0.0}
train: {batch_tokens: 256, epochs: 10}
generate: {max_new_tokens: 12}
"""


@pytest.fixture
def copy_dir(tmp_path):
    """A copy task (target = source): learnable by a tiny model in seconds."""
    rng = random.Random(0)
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, n in (("train.tsv", 400), ("dev.tsv", 20)):
        rows = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(n)]
        (folder / name).write_text("source\ttarget\n" + "".join(f"{r}\t{r}\n" for r in rows))
    return folder


def profile(tmp_path, text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def task(**data):
    return get_task("generation", Config().with_settings({resolve_key(k): v for k, v in data.items()}))


def test_readers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"source_sequence": "hello", "target_sequence": "hallo", "source_language": "en"}\n')
    assert task().read(path).examples[0]["target"] == "hallo"
    (tmp_path / "train.en").write_text("a cat\na dog\n")
    (tmp_path / "train.de").write_text("eine Katze\neinen Hund\n")
    example = task(pair="en-de").read(tmp_path / "train.en").examples[1]
    assert (example["source_language"], example["target_language"]) == ("en", "de")  # for mBART's codes
    (tmp_path / "train.de").write_text("eine Katze\n")
    t = task(pair="en-de")
    with pytest.raises(KilnError, match="2 source lines but 1 target lines") as err:
        t.read(t.find_splits(tmp_path)["train"])
    assert str(err.value).startswith(f"{tmp_path / 'train.en'}:2:")
    with pytest.raises(KilnError, match="--pair expects SRC-TGT"):
        task(pair="en").find_splits(tmp_path)


@pytest.mark.data
def test_multi30k_layout():
    splits = task(pair="en-de").find_splits(SHARED_DATA / "multi30k" / "raw")
    assert {k: v.name for k, v in splits.items()} == {"train": "train.en", "validation": "val.en",
                                                       "test": "test_2016_flickr.en"}
    data = task(pair="en-de").read(splits["test"])
    assert len(data) == 1000 and data.examples[0]["target"]


def test_decoder_only_loss_covers_the_target_only(tmp_path, copy_dir):
    run = kiln.train("generation", copy_dir, name="lm", profile=profile(tmp_path, GPT2_TINY, "g"), max_steps=1,
                     output_dir=tmp_path / "runs")
    model = kiln.load(run.path)
    data = model.task.read(copy_dir / "dev.tsv")
    feature = model.task.encode(data, model.tokenizer, 64)[0]
    prompt = len(feature["prompt_ids"])
    assert feature["labels"][:prompt] == [-100] * prompt
    assert feature["labels"][prompt:] == feature["input_ids"][prompt:]  # target tokens and the final eos
    assert feature["input_ids"][:prompt] == feature["prompt_ids"]
    # A source longer than max_length is cut, not the target: every example still trains.
    long_source = data.examples[0] | {"source": " ".join([data.examples[0]["source"]] * 40)}
    data.examples = [long_source]
    (feature,) = model.task.encode(data, model.tokenizer, 64)
    target = model.tokenizer(long_source["target"], add_special_tokens=False)["input_ids"]
    assert len(feature["input_ids"]) == 64
    assert [t for t in feature["labels"] if t != -100] == [*target, model.tokenizer.eos_token_id]
    assert feature["input_ids"][-len(target) - 2] == model.tokenizer.eos_token_id  # the prompt's end


@pytest.mark.parametrize(("kind", "text", "auto"), [("t5", T5_TINY, "AutoModelForSeq2SeqLM"),
                                                     ("gpt2", GPT2_TINY, "AutoModelForCausalLM")])
def test_train_evaluate_predict_and_transformers_parity(kind, text, auto, copy_dir, tmp_path, capsys):
    import transformers

    run = kiln.train("generation", copy_dir, name=kind, profile=profile(tmp_path, text, kind),
                     output_dir=tmp_path / "runs", overrides=["generate.num_beams=2"])
    assert main(["evaluate", str(run.path), str(copy_dir / "dev.tsv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "loss",
                            "perplexity", "n"}
    assert metrics["perplexity"] < 4  # the copy task is being learned (uniform guessing: ~300)
    model = kiln.load(run.path, precision="fp32")
    assert set(metrics) == {*model.task.metric_names(), "n"}  # what train.metric is checked against
    sources = ["red cat runs", "big blue dog"]
    ours = [r["generated_text"] for r in model.predict(sources)]

    hf = getattr(transformers, auto).from_pretrained(run.model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    theirs = []
    for source in sources:
        ids = tokenizer(source, return_tensors="pt")["input_ids"]
        if kind == "gpt2":
            ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
        with torch.no_grad():  # decoding settings come from the exported generation_config.json
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        if kind == "gpt2":
            out = out[:, ids.shape[1]:]
        theirs.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    assert ours == theirs
    assert json.loads((run.model_dir / "generation_config.json").read_text())["num_beams"] == 2

    # --generate overrides decoding at predict time; a wrong key is a clean error.
    assert main(["predict", str(run.path), str(copy_dir / "dev.tsv"), "--json", "--generate", "max_new_tokens=1"]) == 0
    short = [r["generated_text"] for r in json.loads(capsys.readouterr().out)]
    assert main(["predict", str(run.path), str(copy_dir / "dev.tsv"), "--json"]) == 0
    full = [r["generated_text"] for r in json.loads(capsys.readouterr().out)]
    assert all(len(a) <= len(b) for a, b in zip(short, full, strict=True)) and short != full
    assert main(["predict", str(run.path), str(copy_dir / "dev.tsv"), "--generate", "beams=2"]) == 2


MBART_TINY = """\
base: mbart
model: {config: {d_model: 32, encoder_layers: 2, decoder_layers: 2, encoder_attention_heads: 2,
                 decoder_attention_heads: 2, encoder_ffn_dim: 64, decoder_ffn_dim: 64,
                 max_position_embeddings: 64, dropout: 0.0}}
tokenizer: {kind: bpe, vocab_size: 400}  # unigram on ten words learns only characters
optim: {lr: 1.0e-4}  # near the random init: decoding is not collapsed onto </s>
schedule: {warmup_ratio: 0.0}
train: {batch_tokens: 256}
generate: {max_new_tokens: 12}
"""


def test_language_codes():
    from kiln.tasks.generation import language_code
    from kiln.tokenizers import MBART_CODES

    assert language_code("en", MBART_CODES) == "en_XX"
    assert language_code("DE", MBART_CODES) == "de_DE"
    assert language_code("ro_RO", MBART_CODES) == "ro_RO"
    assert language_code("xx", MBART_CODES) is None


def test_mbart_languages_forced_bos_and_transformers_parity(tmp_path, capsys):
    """mBART: <src_code> text </s> in, <tgt_code> text </s> out, the target code forced at decoding."""
    import transformers

    rng = random.Random(0)
    rows = []
    for i in range(600):
        words = [rng.choice(WORDS) for _ in range(3)]
        lang = "de" if i % 2 else "fr"
        target = words if lang == "de" else words[::-1]
        rows.append({"source": " ".join(words), "target": " ".join(target), "source_language": "en",
                     "target_language": lang})
    folder = tmp_path / "mt"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:560]))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[560:]))
    run = kiln.train("generation", folder, name="mbart", profile=profile(tmp_path, MBART_TINY, "m"),
                     output_dir=tmp_path / "runs", max_steps=1)
    model = kiln.load(run.path, precision="fp32")
    tokenizer = model.tokenizer
    codes = {c: tokenizer.convert_tokens_to_ids(c) for c in ("en_XX", "de_DE", "fr_XX")}
    feature = model.task.encode(model.task.read(folder / "dev.jsonl"), tokenizer, 64)[0]
    assert feature["input_ids"][0] == codes["en_XX"] and feature["input_ids"][-1] == tokenizer.eos_token_id
    assert feature["labels"][0] == codes["fr_XX"] and feature["forced"] == [codes["fr_XX"]]
    batch = model.task.collate([feature], tokenizer.pad_token_id)
    assert batch["labels"][0, 0] == -100  # the forced code is never a loss term
    assert batch["decoder_input_ids"][0, :2].tolist() == [tokenizer.eos_token_id, codes["fr_XX"]]

    # kiln's generate() ids after the forced prefix equal transformers' with forced_bos_token_id.
    inputs = [{"source": "red cat runs", "target_language": lang} for lang in ("de", "fr")]
    dataset = Dataset("<input>", [model.task.parse_input(item, i + 1) for i, item in enumerate(inputs)])
    features = model.task.encode(dataset, tokenizer, 64)
    ours = model.task.outputs(None, model.task.collate(features, tokenizer.pad_token_id), model.model)
    assert ours[0] != ours[1]  # the forced code steers decoding
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(run.model_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    ids = torch.tensor([[codes["en_XX"], *hf_tokenizer("red cat runs", add_special_tokens=False)["input_ids"],
                         hf_tokenizer.eos_token_id]])
    assert ids[0].tolist() == features[0]["input_ids"]
    for lang, expected in (("de_DE", ours[0]), ("fr_XX", ours[1])):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, forced_bos_token_id=codes[lang], max_new_tokens=12)
        assert out[0, :2].tolist() == [tokenizer.eos_token_id, codes[lang]]
        assert out[0, 2:].tolist()[:len(expected)] == expected

    # Inputs without a language take the training data's most common one; unknown ones are errors.
    assert model.task.state["source_language"] == "en"
    bad = folder / "bad.jsonl"
    bad.write_text('{"source": "a", "target_language": "de"}\n{"source": "b", "target_language": "tlh"}\n')
    assert main(["predict", str(run.path), str(bad)]) == 2
    assert f"{bad}:2: unknown target_language 'tlh'" in capsys.readouterr().err


def test_rouge_stems_as_run_summarization_does():
    from kiln.metrics.generation import generation_metrics

    metrics = generation_metrics(["the cats were running"], ["the cat was runs"])
    assert metrics["rouge1"] == pytest.approx(75.0)  # the, cat(s), run(ning|s) match; were/was do not
    assert metrics["rougeLsum"] == metrics["rougeL"]  # one sentence each
    assert metrics["exact_match"] == 0.0
