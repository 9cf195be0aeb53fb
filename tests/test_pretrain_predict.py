"""Pretraining runs predict in Hugging Face pipeline shapes: fill-mask (mlm), text-generation (clm) and
text2text with sentinels (span), equal to transformers' own pipelines on the exported model."""

import io
import json

import pytest
import torch
from test_pretrain import CRAMMED_TINY, GPT2_TINY, T5_TINY, sentences

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.tasks.base import generate_parameters

# 2 layers, hidden 32 each. A few steps at a small learning rate leave the weights near their random
# start, whose greedy decoding is varied text (a few more steps and a tiny model says one token over
# and over), so equal outputs say something. no_repeat_ngram_size keeps span's near-random T5 from
# repeating one sentinel; the exported generation_config.json carries it to transformers.
PROFILES = {
    "mlm": CRAMMED_TINY,
    "clm": GPT2_TINY + "generate: {max_new_tokens: 12}\n",
    "span": T5_TINY + "generate: {max_new_tokens: 12, no_repeat_ngram_size: 1}\n",
}
MASKED = ["the cat [MASK] on a mat .", "a [MASK] .",
          "the big red dog ran quickly under the green tree because [MASK] morning ."]
SEVERAL_MASKS = "the [MASK] sat on [MASK] mat ."
PROMPTS = ["the cat sat", "a big red dog ran quickly under", "river"]
SENTINELS = ["the <extra_id_0> sat on <extra_id_1> mat .", "a dog <extra_id_0> quickly under the big tree .",
             "the <extra_id_0> walks in <extra_id_1> park"]
SCORE_TOLERANCE = 1e-5  # relative, fp32 on both sides; bf16 would be ~1e-2 off


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(task)``: a tiny run of ``task``, trained once for the module on first use."""
    root = tmp_path_factory.mktemp("pretrain-predict")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(sentences(600)) + "\n")
    (corpus / "valid.txt").write_text("\n".join(sentences(60, seed=1)) + "\n")
    runs = {}

    def train(task):
        if task not in runs:
            profile = root / f"{task}.yaml"
            profile.write_text(PROFILES[task])
            runs[task] = kiln.train(task, corpus, name=task, profile=str(profile), output_dir=root / "runs",
                                    max_steps=3, lr=1e-4, overrides=["train.precision=fp32"])
        return runs[task]

    train.corpus = corpus
    return train


def stdin(monkeypatch, lines):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("".join(f"{line}\n" for line in lines).encode())))


def predict_cli(run, capsys, *args):
    """``kiln predict RUN [DATA] ARGS --precision fp32``'s output (DATA: an argument not a flag)."""
    data = [a for a in args[:1] if not a.startswith("-")]
    assert main(["predict", str(run.path), *data, *args[len(data):], "--precision", "fp32"]) == 0
    return capsys.readouterr().out


def assert_same_fill_mask(ours, theirs):
    """The same candidates in the same order with the same keys; scores equal within the tolerance."""
    if isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_same_fill_mask(a, b)
        return
    assert list(ours) == list(theirs) == ["score", "token", "token_str", "sequence"]
    assert {k: v for k, v in ours.items() if k != "score"} == {k: v for k, v in theirs.items() if k != "score"}
    assert ours["score"] == pytest.approx(theirs["score"], rel=SCORE_TOLERANCE, abs=0)


def fill_mask_pipeline(run):
    import transformers

    return transformers.pipeline("fill-mask", model=str(run.model_dir), dtype=torch.float32)


# -- mlm -> fill-mask ------------------------------------------------------------------------
def test_fill_mask_equals_the_pipeline(trained, tmp_path, capsys, monkeypatch):
    run = trained("mlm")
    pipe = fill_mask_pipeline(run)
    inputs = [*MASKED, SEVERAL_MASKS]  # several masks: a list per mask, in one batch with the others
    expected = [pipe(text) for text in inputs]
    assert [len(e) for e in expected] == [5, 5, 5, 2] and len(expected[3][0]) == 5
    model = kiln.load(run.path, precision="fp32")
    assert model.task.parameters() == {"top_k": "pretrain.fill_mask_top_k"}
    assert_same_fill_mask(model.predict(inputs), expected)

    stdin(monkeypatch, inputs)
    assert_same_fill_mask(json.loads(predict_cli(run, capsys, "--json")), expected)

    # The plain output: each input with its best candidate in, in the input's own format.
    lines = tmp_path / "masked.txt"
    lines.write_text("\n".join(MASKED) + "\n")
    assert predict_cli(run, capsys, str(lines)).splitlines() == [e[0]["sequence"] for e in expected[:3]]
    rows = tmp_path / "masked.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(MASKED)))
    assert [json.loads(line) for line in predict_cli(run, capsys, str(rows)).splitlines()] == [
        {"id": i, "text": text, "sequence": expected[i][0]["sequence"]} for i, text in enumerate(MASKED)]


def test_fill_mask_top_k_is_the_setting(trained):
    run = trained("mlm")
    model = kiln.load(run.path, precision="fp32")
    ours = model.predict(MASKED, parameters={"top_k": 2})  # sets pretrain.fill_mask_top_k for this call
    assert [len(candidates) for candidates in ours] == [2, 2, 2]
    pipe = fill_mask_pipeline(run)
    assert_same_fill_mask(ours, [pipe(text, top_k=2) for text in MASKED])


def test_an_input_without_a_mask_is_one_line(trained, capsys, monkeypatch):
    run = trained("mlm")
    stdin(monkeypatch, ["the cat [MASK] .", "", "a dog ran ."])  # blank lines are skipped, still counted
    assert main(["predict", str(run.path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "<stdin>:3: no [MASK] token in the input; put one where a word is to be filled in\n"
    with pytest.raises(KilnError, match=r"^<input>:2: no \[MASK\] token"):
        kiln.load(run.path).predict(["a [MASK] .", "no mask here"])


# -- clm -> text-generation ------------------------------------------------------------------
def test_text_generation_equals_the_pipeline(trained, tmp_path, capsys, monkeypatch):
    import transformers

    run = trained("clm")
    decoding = json.loads((run.model_dir / "generation_config.json").read_text())
    assert (decoding["max_new_tokens"], decoding["num_beams"], decoding["do_sample"]) == (12, 1, False)
    pipe = transformers.pipeline("text-generation", model=str(run.model_dir), dtype=torch.float32)
    # transformers 5's text-generation pipeline samples unless told not to (its default, not the model's).
    expected = [pipe(prompt, do_sample=False) for prompt in PROMPTS]
    continuations = {e[0]["generated_text"][len(p):] for p, e in zip(PROMPTS, expected, strict=True)}
    assert len(continuations) == len(PROMPTS) and all(len(c) > 3 for c in continuations)  # varied text
    model = kiln.load(run.path, precision="fp32")
    assert model.task.parameters() == generate_parameters()
    assert model.predict(PROMPTS) == expected

    stdin(monkeypatch, PROMPTS)
    assert json.loads(predict_cli(run, capsys, "--json")) == expected
    stdin(monkeypatch, PROMPTS)
    new_only = json.loads(predict_cli(run, capsys, "--json", "--generate", "return_full_text=false"))
    assert new_only == [pipe(prompt, do_sample=False, return_full_text=False) for prompt in PROMPTS]
    assert [r[0]["generated_text"] for r in new_only] == [e[0]["generated_text"][len(p):]
                                                         for p, e in zip(PROMPTS, expected, strict=True)]
    assert model.predict(PROMPTS, parameters={"return_full_text": False}) == new_only
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert predict_cli(run, capsys, str(prompts)).splitlines() == [e[0]["generated_text"] for e in expected]

    # A prompt longer than the positions left after max_new_tokens keeps its end, as the pipeline's "hole".
    long_prompt = " ".join(["the cat sat on a mat ."] * 20)
    (answer,) = model.predict([long_prompt])
    assert answer[0]["generated_text"].startswith(long_prompt) and len(answer[0]["generated_text"]) > len(long_prompt)


# -- span -> text2text -----------------------------------------------------------------------
def test_span_generation_equals_text2text(trained, capsys, monkeypatch):
    import transformers

    run = trained("span")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(run.model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    expected = []
    for text in SENTINELS:
        # What transformers 4's text2text-generation pipeline (gone in 5) did: generate() with the
        # model's generation config, then decode dropping special tokens, spaces not cleaned up.
        with torch.no_grad():
            ids = hf.generate(**tokenizer(text, return_tensors="pt", return_token_type_ids=False))[0]
        expected.append([{"generated_text": tokenizer.decode(ids, skip_special_tokens=True,
                                                             clean_up_tokenization_spaces=False)}])
    assert len({e[0]["generated_text"] for e in expected}) == len(SENTINELS)  # varied, non-empty text
    model = kiln.load(run.path, precision="fp32")
    assert model.predict(SENTINELS) == expected
    assert "return_full_text" not in model.task.parameters()
    assert set(model.task.parameters()) < set(generate_parameters())
    stdin(monkeypatch, SENTINELS)
    assert json.loads(predict_cli(run, capsys, "--json")) == expected


# -- evaluation stays what it was ------------------------------------------------------------
@pytest.mark.parametrize("task", ["clm", "span"])
def test_evaluate_on_a_corpus_is_unchanged(trained, task, capsys):
    run = trained(task)
    assert main(["evaluate", str(run.path), str(trained.corpus / "valid.txt"), "--json", "--precision", "fp32"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"loss", "perplexity", "n"}
    assert metrics["loss"] == pytest.approx(run.metrics["loss"], rel=1e-5)  # what training's evaluation said
    assert metrics["n"] == run.metrics["n"]
