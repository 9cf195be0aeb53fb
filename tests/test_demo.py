"""The demo's example inputs (``kiln.json``'s ``examples``) and the demo page as a file."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_pretrain import CRAMMED_TINY, GPT2_TINY, T5_TINY

import kiln
from kiln.config import Config, TokenizerConfig, resolve_key
from kiln.tasks import get_task
from kiln.tasks.base import EXAMPLE_CHARS, Dataset
from kiln.tasks.qa import context_around
from kiln.tokenizers import train_tokenizer

PAGE = Path(kiln.__file__).parent / "serve" / "static" / "index.html"


def task(name, **data):
    return get_task(name, Config().with_settings({resolve_key(k): v for k, v in data.items()}))


# -- what each task stores ----------------------------------------------------------------------
def test_sequence_and_pair_examples_are_spread_distinct_and_short():
    sequence = task("sequence")
    rows = [{"texts": (f"review {i // 2}",), "label": "a", "line": i} for i in range(20)]  # each one twice
    rows[8]["texts"] = ("   ",)  # blank: makes no example
    rows[12]["texts"] = ("review 6 " + "and so on " * 100,)
    items = sequence.example_inputs(Dataset("x", rows))
    # rows 0, 4, 8, 12, 16 first (spread over the set), then the rest in order for the blank one
    assert [item.split(" and")[0] for item in items] == ["review 0", "review 2", "review 6", "review 8", "review 1"]
    assert len(items[2]) <= EXAMPLE_CHARS and items[2].endswith(" on")  # cut at a word boundary

    pair = task("sentence-pair")
    [item] = pair.example_inputs(Dataset("x", [{"texts": ("A man eats .", "Someone eats ."), "line": 1}]))
    assert item == {"sentence1": "A man eats .", "sentence2": "Someone eats ."}
    assert pair.parse_input(item, 1)["texts"] == ("A man eats .", "Someone eats .")  # what /predict reads


def test_token_and_generation_examples():
    token = task("token")
    words = ["EU", "rejects", "German", "call"] * 40
    item = token.example_input({"words": words, "tags": ["O"] * len(words), "line": 1})
    assert isinstance(item, str) and item.startswith("EU rejects German call EU") and len(item) <= EXAMPLE_CHARS
    assert token.parse_input(item, 1)["words"] == item.split()
    assert token.example_input({"words": ["New York", "is"], "line": 1}) is None  # a word with a space

    generation = task("generation")
    assert generation.example_input({"source": "A man rides a bike .", "target": "x", "line": 1}) \
        == "A man rides a bike ."
    generation.tokenizer = SimpleNamespace(get_vocab=lambda: {"en_XX": 5, "de_DE": 6, "fr_XX": 7})  # mBART's codes
    generation.state = {"source_language": "en", "target_language": "de"}  # the run's most common pair
    german = {"source": "Hi", "target": "Hallo", "source_language": "en", "target_language": "de", "line": 1}
    assert generation.example_input(german) == "Hi"  # the defaults need no saying
    assert generation.example_input({**german, "target_language": "fr"}) \
        == {"source": "Hi", "source_language": "en", "target_language": "fr"}
    generation.tokenizer = SimpleNamespace(get_vocab=lambda: {})  # T5 with --pair en-fr: no codes to pick
    assert generation.example_input({**german, "target_language": "fr"}) == "Hi"


def test_qa_examples_keep_the_answer_in_a_shortened_context():
    context = " ".join(f"Sentence {i} says something about the weather and the town." for i in range(60))
    start = context.index("Sentence 41 ")
    example = {"context": context, "question": "Which sentence ?", "answers": [("41", start + 9)], "line": 1}
    item = task("qa").example_input(example)
    assert set(item) == {"context", "question"} and item["question"] == "Which sentence ?"
    assert "Sentence 41 says" in item["context"] and len(item["context"]) <= 2 * EXAMPLE_CHARS
    assert item["context"].startswith("Sentence ") and item["context"].endswith("town.")  # whole sentences
    assert context_around(context, None).startswith("Sentence 0 says")  # no answer: the beginning
    words = " ".join(f"w{i}" for i in range(500))  # one endless sentence: a window of whole words
    window = context_around(words, ("w300", words.index("w300 ")))
    assert " w300 " in window and re.fullmatch(r"(w\d+ )+w\d+", window) and len(window) <= 2 * EXAMPLE_CHARS
    assert context_around("Short.  Context", ("Short", 0)) == "Short. Context"


RIVERS = [f"The {word} river runs slowly beneath the bridge ." for word in
          ("green", "quiet", "muddy", "frozen", "narrow", "little", "broad", "silent")]


def test_pretraining_examples_from_held_out_documents(tmp_path):
    (tmp_path / "train.txt").write_text(" = Heading = \n" + "\n".join(RIVERS * 30) + "\n")
    tokenizer = train_tokenizer(TokenizerConfig(vocab_size=200), RIVERS, 64)[0]
    config = Config().with_settings({"data.validation_fraction": 0.5})
    mlm = get_task("mlm", config)
    mlm.tokenizer = tokenizer
    _, validation = mlm.holdout(mlm.read(tmp_path / "train.txt"))
    items = mlm.example_inputs(validation)
    assert len(items) == 5 == len(set(items))
    assert all(item.replace(tokenizer.mask_token, "beneath") in RIVERS for item in items)  # the longest word
    clm = get_task("clm", config)
    prompts = clm.example_inputs(validation)
    assert len(prompts) == 5 and all(any(river.startswith(prompt + " ") for river in RIVERS) for prompt in prompts)
    assert all(len(prompt.split()) == 4 for prompt in prompts)  # half the sentence, at most 8 words
    span = get_task("span", config)
    span.tokenizer = tokenizer  # a tokenizer without sentinels makes no span examples, cleanly
    assert span.example_inputs(validation) == []


# -- end to end: a run stores them, and they predict --------------------------------------------
def test_a_run_stores_examples_that_predict(sentiment_dir, tiny_profile, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="demo", profile=str(tiny_profile), max_steps=2,
                     output_dir=tmp_path)
    saved = json.loads((run.model_dir / "kiln.json").read_text())
    dev = {line.split("\t")[0] for line in (sentiment_dir / "dev.tsv").read_text().splitlines()[1:]}
    assert len(saved["examples"]) == 5 and set(saved["examples"]) <= dev  # from the validation split
    model = kiln.load(run.path, precision="fp32")
    results = model.predict(saved["examples"])
    assert [set(result) for result in results] == [{"label", "score"}] * 5

    del saved["examples"]  # a model saved before examples existed still loads
    (run.model_dir / "kiln.json").write_text(json.dumps(saved))
    assert kiln.load(run.path).predict(["the film is great ."])[0]["label"] in {"pos", "neg"}


SHORT_GENERATION = "generate: {max_new_tokens: 8}\n"  # the tiny models have 64 positions


@pytest.mark.parametrize(("task", "profile_text", "form"), [
    ("mlm", CRAMMED_TINY, lambda e: e.replace("[MASK]", "beneath") in RIVERS),  # the longest word masked
    ("clm", GPT2_TINY + SHORT_GENERATION, lambda e: any(r.startswith(e + " ") for r in RIVERS)),  # first words
    ("span", T5_TINY + SHORT_GENERATION, lambda e: e.replace("<extra_id_0>", "beneath") in RIVERS),  # a sentinel
])
def test_a_pretraining_run_stores_examples_that_predict(task, profile_text, form, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(RIVERS * 40) + "\n")
    (corpus / "valid.txt").write_text("\n".join(RIVERS) + "\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(profile_text)
    run = kiln.train(task, corpus, name=task, profile=str(profile), max_steps=1, output_dir=tmp_path / "runs")
    examples = json.loads((run.model_dir / "kiln.json").read_text())["examples"]
    assert len(examples) == 5 and all(isinstance(e, str) and form(e) for e in examples), examples
    results = kiln.load(run.path).predict(examples)
    keys = {"score", "token", "token_str", "sequence"} if task == "mlm" else {"generated_text"}
    assert len(results) == 5 and all(keys == set(result[0]) for result in results)


# -- the page -----------------------------------------------------------------------------------
def test_the_demo_page_is_self_contained():
    """No CDN, font, script or image from elsewhere: the page works with the network off."""
    html = PAGE.read_text(encoding="utf-8")
    assert re.search(r"(?i)\b(?:https?|ftp|wss?):|(?:src|href|action)\s*=\s*[\"']?//|url\(\s*[\"']?//|@import",
                     html) is None
    assert re.search(r"(?i)<(?:iframe|object|embed|img)\b|<script[^>]+src\s*=", html) is None
    assert re.findall(r"(?i)<link\b[^>]*>", html) == ['<link rel="icon" href="data:,">']  # no /favicon.ico either
    for element_id in ("info", "examples", "input-text", "submit", "result", "latency", "error", "api-key"):
        assert f'id="{element_id}"' in html
    assert "innerHTML" not in html  # model output and user text only ever go in as text
