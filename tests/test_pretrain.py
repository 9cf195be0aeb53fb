"""Pretraining: the corpus pipeline, masking, span corruption, the sparse MLM head, budgets, export."""

import gzip
import json
import random

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, build_once_when_racing
from safetensors.torch import load_file
from test_trainer import StopAt

import kiln
from kiln.config import TokenizerConfig, parse_duration
from kiln.data.corpus import PackedBlocks, corpus_files, iter_documents, tokenize_corpus, unigram_order
from kiln.errors import KilnError
from kiln.tasks.pretrain import (
    mask_tokens,
    random_spans_noise_mask,
    raw_length_for,
    span_lengths,
    sparse_mlm_module,
    word_continuations,
    word_marker,
)
from kiln.tokenizers import train_tokenizer
from kiln.training import checkpoint as ckpt
from kiln.training.optim import (
    budget_triangle,
    lr_at_fraction,
    planned_steps,
    ramp_accumulation,
)
from kiln.training.trainer import Callback

WORDS = ["the", "cat", "dog", "bird", "sat", "ran", "on", "under", "a", "mat", "tree", "house", "big", "small",
         "red", "green", "quickly", "slowly", "because", "although", "morning", "evening", "river", "mountain"]
CRAMMED_TINY = """\
base: crammed-bert-tiny
model: {config: {hidden_size: 32, intermediate_size: 32, num_attention_heads: 2}}
tokenizer: {vocab_size: 200}
train: {batch_size: 8, grad_accum: 2, batch_ramp: 0.0, epochs: 1}
pretrain: {seq_len: 32}
"""


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + " ." for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(sentences(600)) + "\n")
    (folder / "valid.txt").write_text("\n".join(sentences(60, seed=1)) + "\n")
    return folder


@pytest.fixture
def tokenizer():
    return train_tokenizer(TokenizerConfig(vocab_size=200), sentences(300), 128)[0]


def profile(tmp_path, text=CRAMMED_TINY):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


# -- corpus ----------------------------------------------------------------------------------
def test_corpus_files_and_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n\n\nfour\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "five"}\n\n{"text": "six"}\n')
    (tmp_path / "validation.txt").write_text("v\n")
    (tmp_path / "test.txt").write_text("t\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    (tmp_path / "SOURCE.txt").write_text("where the corpus came from\n")
    assert {k: [p.name for p in v] for k, v in corpus_files(tmp_path).items()} == {
        "train": ["a.txt", "b.jsonl.gz"], "validation": ["validation.txt"], "test": ["test.txt"]}
    # Split names are words of the file name (maybe numbered, or with "set"), not prefixes.
    extra = ("wiki.valid.tokens", "valid1.txt", "devset.txt", "values.txt", "development.txt", "wiki.test.tokens",
             "test2.txt", "contest.txt")
    for name in extra:
        (tmp_path / name).write_text("x\n")
    assert {k: [p.name for p in v] for k, v in corpus_files(tmp_path).items()} == {
        "train": ["a.txt", "b.jsonl.gz", "contest.txt", "development.txt", "values.txt"],
        "validation": ["devset.txt", "valid1.txt", "validation.txt", "wiki.valid.tokens"],
        "test": ["test.txt", "test2.txt", "wiki.test.tokens"]}
    for name in extra:
        (tmp_path / name).unlink()
    splits = corpus_files(tmp_path)
    docs = [(p.name, line, text) for p, line, text in iter_documents(splits["train"])]
    assert docs == [("a.txt", 1, "one"), ("a.txt", 3, "two"), ("a.txt", 4, "three"), ("a.txt", 7, "four"),
                    ("b.jsonl.gz", 1, "five"), ("b.jsonl.gz", 3, "six")]
    paragraphs = [text for _, _, text in iter_documents([tmp_path / "a.txt"], paragraphs=True)]
    assert paragraphs == ["one", "two three", "four"]
    (tmp_path / "mac.txt").write_bytes(b"one\rtwo\r\nthree\r\rfour")  # lone \r ends a line too
    assert [(line, text) for _, line, text in iter_documents([tmp_path / "mac.txt"])] == [
        (1, "one"), (2, "two"), (3, "three"), (5, "four")]
    (tmp_path / "mac.txt").unlink()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(KilnError, match="'text' field") as err:
        list(iter_documents([tmp_path / "bad.jsonl"]))
    assert str(err.value).startswith(f"{tmp_path / 'bad.jsonl'}:2:")
    (tmp_path / "cut.jsonl").write_text('{"text": "ok"}\n{"text": "cut sh\n')
    with pytest.raises(KilnError, match="invalid JSON") as err:
        list(iter_documents([tmp_path / "cut.jsonl"]))
    assert str(err.value).startswith(f"{tmp_path / 'cut.jsonl'}:2:")


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", b"fine\nalso fine\ncaf\xe9\n", ":3: not UTF-8"),
    ("plain.txt.gz", b"not gzip at all\n", ": cannot read this file after line 0"),
    ("cut.txt.gz", gzip.compress(b"one\ntwo\n" * 1000)[:-12], ": cannot read this file after line"),
    ("lone.jsonl", b'{"text": "ok"}\n{"text": "half a pair \\ud800"}\n', ":2: 'text' holds an unpaired surrogate"),
], ids=["latin1", "not-gzip", "cut-gzip", "surrogate"])
def test_unreadable_corpus_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(KilnError, match=message) as err:
        list(iter_documents([tmp_path / name]))
    assert str(err.value).startswith(str(tmp_path / name))


def test_tokenize_corpus_cache_separators_holdout_and_filter(tmp_path, tokenizer, monkeypatch):
    texts = sentences(500)
    path = tmp_path / "c.txt"
    path.write_text("\n".join(texts) + "\n")
    sep = tokenizer.sep_token_id
    stream = tokenize_corpus([path], tokenizer, sep)["all"]
    assert stream.tokens.dtype == np.uint16 and stream.documents == 500
    expected = [t for text in texts for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], sep]]
    assert stream.tokens.tolist() == expected

    import kiln.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "_write_streams", lambda *a, **k: pytest.fail("cache miss"))
    assert tokenize_corpus([path], tokenizer, sep)["all"].tokens.tolist() == expected  # cached
    monkeypatch.undo()

    parts = tokenize_corpus([path], tokenizer, sep, holdout=(0.2, 7))
    assert parts["train"].documents + parts["validation"].documents == 500
    assert 60 < parts["validation"].documents < 140
    assert len(parts["train"].tokens) + len(parts["validation"].tokens) == len(expected)
    again = tokenize_corpus([path], tokenizer, sep, holdout=(0.2, 7))
    assert again["validation"].tokens.tolist() == parts["validation"].tokens.tolist()

    (tmp_path / "d.txt").write_text("the cat sat .\nzzzzqqqq xxyyxx qqzz\n")  # unknown chars: many tokens
    filtered = tokenize_corpus([tmp_path / "d.txt"], tokenizer, sep, max_tokens_per_char=0.3)["all"]
    assert (filtered.documents, filtered.dropped) == (1, 1)


def test_packed_blocks():
    tokens = np.arange(100, dtype=np.uint16)
    blocks = PackedBlocks(tokens, 10, prefix=[900], suffix=[901])
    assert len(blocks) == 12 and blocks.lengths.tolist() == [10] * 12 and blocks.n_tokens == 120
    assert blocks[1]["input_ids"].tolist() == [900, *range(8, 16), 901]
    with pytest.raises(IndexError):
        blocks[12]


def test_unigram_curriculum_puts_common_word_blocks_first():
    common, rare = [5, 6, 5, 6, 5, 6, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]  # 5 and 6 fill most of the stream
    mixed = [5, 6, 5, 6, 7, 8, 9, 10]
    stream = np.asarray(rare + common * 6 + mixed + common, dtype=np.uint16)  # 9 blocks of 8 (+ prefix)
    blocks = PackedBlocks(stream, 9, prefix=[2])
    order = unigram_order(blocks, vocab_size=16, chunk_blocks=2)  # chunked reads give the same scores
    assert sorted(order.tolist()) == list(range(9))
    assert set(order[:7].tolist()) == {1, 2, 3, 4, 5, 6, 8} and order[7:].tolist() == [7, 0]
    assert order.tolist() == unigram_order(blocks, vocab_size=16).tolist()


def test_training_follows_the_curriculum(corpus, tmp_path):
    class FirstBatches(Callback):
        def on_train_begin(self, trainer):
            self.batches = trainer.sampler.batches(0)
            self.expected = unigram_order(trainer.train_features, len(trainer.tokenizer))

    seen = FirstBatches()
    kiln.train("mlm", corpus, name="c", profile=profile(tmp_path), output_dir=tmp_path / "runs", max_steps=1,
               overrides=["pretrain.curriculum=unigram"], callbacks=[seen])
    assert [i for batch in seen.batches for i in batch] == seen.expected.tolist()


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from transformers import AutoTokenizer
from kiln.data.corpus import tokenize_corpus
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream = tokenize_corpus([Path(sys.argv[2])], tokenizer, tokenizer.sep_token_id)["all"]
print(stream.documents, len(stream.tokens), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def corpus_memory_growth(tmp_path, tokenizer, megabytes):
    """Tokenize a generated corpus of ``megabytes`` in a fresh process: (documents, peak RSS growth)."""
    import subprocess
    import sys

    tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "big.txt"
    line = " ".join(sentences(40)) + "\n"
    block = line * 1000
    with open(path, "w") as f:
        for _ in range(megabytes * 1_000_000 // len(block)):
            f.write(block)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "tok"), str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    documents, _, grown = map(int, out)
    assert documents == megabytes * 1_000_000 // len(block) * 1000
    return grown


def test_tokenizing_ignores_a_saved_tokenizers_padding_and_truncation(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("the cat\nthe big red dog sat on the mat under a tree .\n")
    sep = tokenizer.sep_token_id
    expected = tokenize_corpus([path], tokenizer, sep, cache=tmp_path / "plain")["all"].tokens.tolist()
    tokenizer.backend_tokenizer.enable_padding(length=6, pad_id=tokenizer.pad_token_id)
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    assert tokenize_corpus([path], tokenizer, sep, cache=tmp_path / "padded")["all"].tokens.tolist() == expected


def test_a_huge_document_is_encoded_in_pieces_with_the_same_tokens(tmp_path, tokenizer, monkeypatch):
    import kiln.data.corpus as corpus_module

    path = tmp_path / "book.txt"
    path.write_text(" ".join(sentences(40)) + "\nthe cat sat .\n" + "catdogbirdtree" * 30 + "\n")
    sep = tokenizer.sep_token_id
    whole = tokenize_corpus([path], tokenizer, sep, cache=tmp_path / "whole")["all"]
    monkeypatch.setattr(corpus_module, "ENCODE_CHARS", 50)  # the 1,500-character line goes in 30-odd pieces
    pieces = tokenize_corpus([path], tokenizer, sep, cache=tmp_path / "pieces")["all"]
    assert pieces.documents == whole.documents == 3
    # Cut before spaces, the first document tokenizes exactly as whole; the space-free third is cut
    # mid-word, so only its token count may differ at the cuts.
    first = whole.tokens.tolist().index(sep)
    assert pieces.tokens.tolist()[:first + 1] == whole.tokens.tolist()[:first + 1]
    assert list(pieces.tokens).count(sep) == 3


def test_concurrent_runs_tokenize_a_corpus_once(tmp_path, tokenizer, monkeypatch):
    """torchrun starts every rank at once: one tokenizes, the others wait for its cache."""
    import kiln.data.corpus as corpus_module

    path = tmp_path / "c.txt"
    path.write_text("\n".join(sentences(50)) + "\n")
    build_once_when_racing(monkeypatch, corpus_module, "_write_streams", lambda: tokenize_corpus(
        [path], tokenizer, tokenizer.sep_token_id, cache=tmp_path / "cache")["all"].tokens.tolist())


def test_tokenizing_keeps_memory_bounded(tmp_path, tokenizer):
    """A corpus streams through in bounded batches: peak RSS grows by far less than its size."""
    assert corpus_memory_growth(tmp_path, tokenizer, 20) < 60e6


@pytest.mark.slow
def test_tokenizing_a_corpus_larger_than_memory_budget(tmp_path, tokenizer):
    """3 GB of text through the pipeline with RSS growth bounded as for 20 MB."""
    assert corpus_memory_growth(tmp_path, tokenizer, 3000) < 60e6


# -- masking and span corruption -------------------------------------------------------------
def test_mask_tokens_rates_specials_and_replacements():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(200, 128))
    ids[:, 0], ids[:, -1] = 2, 3
    corrupted, selected = mask_tokens(ids, rng, special_ids=[0, 1, 2, 3, 4], mask_id=4, vocab_size=100,
                                      mask_prob=0.25)
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert abs(selected[:, 1:-1].mean() - 0.25) < 0.01
    chosen = selected.sum()
    masked = (corrupted == 4) & selected
    kept = (corrupted == ids) & selected
    assert abs(masked.sum() / chosen - 0.8) < 0.02
    assert abs(kept.sum() / chosen - 0.1 - 0.1 / 100) < 0.02  # kept, or replaced by itself at random
    assert (corrupted[~selected] == ids[~selected]).all()


def test_whole_word_masking_takes_every_piece(tokenizer):
    continues = word_continuations(tokenizer)
    ids = np.asarray([tokenizer("catdog quickly housetree riverbank mountain")["input_ids"] * 40])
    rng = np.random.default_rng(1)
    _, selected = mask_tokens(ids, rng, special_ids=tokenizer.all_special_ids, mask_id=tokenizer.mask_token_id,
                              vocab_size=len(tokenizer), mask_prob=0.3, continues=continues)
    starts = ~continues[ids[0]]
    word = np.cumsum(starts)
    for w in np.unique(word):
        pieces = selected[0][word == w]
        assert pieces.all() or not pieces.any()
    assert continues[ids[0]].any()  # the test data does have multi-piece words
    assert 0.1 < selected.mean() < 0.5  # and words were masked, at about the asked rate
    assert (selected & continues[ids]).any()  # including their continuation pieces


def _raw_tokenizer(model, pre_tokenizer=None, normalizer=None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(model)
    if pre_tokenizer is not None:
        raw.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        raw.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


def test_whole_word_markers_come_from_the_tokenizer(tokenizer):
    from tokenizers import models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "s": 3, "Ġdog": 4, "gy": 5, "##s": 6}
    merges = []
    assert word_marker(tokenizer) == ("##", False)  # kiln's WordPiece
    sentencepiece = _raw_tokenizer(models.BPE(vocab, merges, unk_token="<unk>"), pre_tokenizers.Metaspace())
    assert word_marker(sentencepiece) == ("▁", True)
    # Llama-style: spaces become ▁ in a Replace normalizer, no Metaspace pre-tokenizer.
    llama = _raw_tokenizer(models.BPE(vocab, merges, unk_token="<unk>"),
                           normalizer=normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))
    continues = word_continuations(llama)
    assert continues[[1, 2, 3]].tolist() == [False, False, True]  # "▁cat" starts a word, "s" continues it
    byte_level = _raw_tokenizer(models.BPE(vocab, merges, unk_token="<unk>"), pre_tokenizers.ByteLevel())
    assert word_marker(byte_level) == ("Ġ", True)
    with pytest.raises(KilnError, match="whole-word masking needs a tokenizer that marks word boundaries"):
        word_marker(_raw_tokenizer(models.WordLevel(vocab, unk_token="<unk>"), pre_tokenizers.Whitespace()))


def test_span_noise_mask_and_lengths():
    rng = np.random.default_rng(0)
    mask = random_spans_noise_mask(100, 0.15, 3.0, rng)
    assert mask.sum() == 15 and not mask[0]
    spans = int(np.sum(mask[1:] & ~mask[:-1]))
    assert spans == 5
    raw = raw_length_for(128, 0.15, 3.0)
    assert span_lengths(raw, 0.15, 3.0)[0] <= 128 < span_lengths(raw + 1, 0.15, 3.0)[0]


def test_span_corruption_reconstructs_the_text(tmp_path):
    from kiln.config import Config
    from kiln.tasks import get_task

    t5_tok = train_tokenizer(TokenizerConfig(kind="unigram", style="t5", vocab_size=300, lowercase=False),
                             sentences(300), 128)[0]
    task = get_task("span", Config())
    task.bind(t5_tok)
    raw, _, _ = task.block_layout(t5_tok, 64)
    ids = np.asarray(t5_tok(" ".join(sentences(20)), add_special_tokens=False)["input_ids"][:raw])
    inputs, targets = task.corrupt(ids, np.random.default_rng(3))
    assert len(inputs) <= 64 and inputs[-1] == targets[-1] == t5_tok.eos_token_id
    sentinel = {s: i for i, s in enumerate(task.sentinels)}
    # Sentinels count up from <extra_id_0> in the input, and the target repeats them in the same order.
    used = [sentinel[t] for t in inputs if t in sentinel]
    assert used == list(range(len(used))) and len(used) >= 2
    assert [sentinel[t] for t in targets if t in sentinel] == used and targets[0] == task.sentinels[0]
    # Put each target span back in place of its sentinel: the original block comes back.
    spans, current = {}, None
    for token in targets[:-1]:
        if token in sentinel:
            current = sentinel[token]
            spans[current] = []
        else:
            spans[current].append(token)
    rebuilt = [t for token in inputs[:-1] for t in (spans[sentinel[token]] if token in sentinel else [token])]
    assert rebuilt == ids.tolist()
    # A block with more spans than the tokenizer has sentinels is refused before any tokenizing.
    with pytest.raises(KilnError, match="more than the tokenizer's 100 sentinel tokens"):
        task.block_layout(t5_tok, 4096)


# -- the sparse head -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["modernbert", "bert", "roberta", "distilbert", "deberta-v2"])
def test_sparse_mlm_head_equals_full_logits(kind):
    import transformers

    sizes = {"modernbert": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                layer_types=["full_attention"] * 2),
             "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2)}
    config = transformers.AutoConfig.for_model(kind, vocab_size=120, **sizes.get(kind, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)))
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(config).eval()
    ids = torch.randint(5, 120, (3, 16))
    positions = torch.tensor([1, 5, 17, 40, 47])
    with torch.no_grad():
        full = model(input_ids=ids).logits.flatten(0, 1)[positions]
        sparse = sparse_mlm_module(model)(input_ids=ids, masked_positions=positions).logits
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)


# -- schedules and budgets -------------------------------------------------------------------
def test_budget_triangle_and_durations():
    assert [budget_triangle(x) for x in (0.0, 0.5, 0.75, 0.9, 1.0)] == pytest.approx([0.25, 0.75, 1.0, 0.4, 0.0])
    assert lr_at_fraction("linear", 0.5, 0.0) == pytest.approx(0.5, abs=1e-3)
    assert lr_at_fraction("budget-triangle", 0.25, 0.1) == pytest.approx(0.5)
    assert [parse_duration(s) for s in ("45m", "2h", "1d", "1h30m", "90", "")] == [2700, 7200, 86400, 5400, 90, 0]
    with pytest.raises(KilnError, match="duration"):
        parse_duration("ten minutes")


def test_budget_stops_on_time_and_ramps_the_batch(corpus, tmp_path):
    text = CRAMMED_TINY.replace("batch_ramp: 0.0, epochs: 1", "batch_ramp: 0.6, grad_accum: 4")
    run = kiln.train("mlm", corpus, name="b", profile=profile(tmp_path, text), budget="4s",
                     output_dir=tmp_path / "runs", log_every=1)
    logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "split" not in r]
    assert steps[-2]["elapsed"] < 4.0 <= steps[-1]["elapsed"]  # stops on the step that spends the budget
    assert run.model_dir.joinpath("model.safetensors").is_file()
    lrs = [r["lr"] for r in steps]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # the triangle rises, then falls
    per_step = np.diff([0] + [r["tokens"] for r in steps])  # 8 blocks of 32 tokens per micro-batch
    assert per_step[0] == 8 * 32 and per_step.max() == 4 * 8 * 32  # the batch ramps from 1 to 4


def test_budget_run_logs_its_last_step(corpus, tmp_path):
    run = kiln.train("mlm", corpus, name="b", profile=profile(tmp_path, CRAMMED_TINY), budget="2s",
                     output_dir=tmp_path / "runs", log_every=10**6)
    logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in logs if "split" not in r]  # only the step that spent the budget
    state = json.loads((ckpt.last_checkpoint(run.path / "checkpoints") / "trainer_state.json").read_text())
    assert last["step"] == state["step"] and last["tokens"] == state["tokens_seen"] > 0


def test_batch_ramp_grows_accumulation_to_the_final_batch():
    assert [ramp_accumulation(8, x, 0.6) for x in (0.0, 0.15, 0.3, 0.59, 0.6, 0.9)] == [1, 2, 4, 8, 8, 8]
    assert ramp_accumulation(8, 0.1, 0.0) == 8


def test_planned_steps_count_the_ramp():
    # Without a ramp: ceil per epoch (an epoch's last step takes the remainder).
    assert planned_steps([10, 10], 20, 4, 0.0) == 6
    assert planned_steps([10, 10], 15, 4, 0.0) == 5  # 1.5 epochs
    # On a ramp the early steps are smaller, so there are more of them; simulated, they consume
    # exactly the planned micro-batches.
    steps, consumed = 0, 0
    while consumed < 100:
        consumed += min(ramp_accumulation(8, consumed / 100, 0.6), 100 - consumed)
        steps += 1
    assert planned_steps([100], 100, 8, 0.6) == steps > planned_steps([100], 100, 8, 0.0) == 13


def test_a_batch_ramp_without_budget_still_trains_every_epoch(corpus, tmp_path):
    text = CRAMMED_TINY.replace("batch_ramp: 0.0, epochs: 1", "batch_ramp: 0.6, epochs: 2").replace(
        "grad_accum: 2", "grad_accum: 4")
    run = kiln.train("mlm", corpus, name="r", profile=profile(tmp_path, text), output_dir=tmp_path / "runs")
    state = json.loads((ckpt.last_checkpoint(run.path / "checkpoints") / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 0)  # both epochs, to their last micro-batch


def test_training_masks_change_every_epoch_evaluation_masks_never(corpus, tokenizer):
    from kiln.config import Config
    from kiln.tasks import get_task

    task = get_task("mlm", Config())
    task.bind(tokenizer)
    blocks = task.encode(task.read(corpus / "train.txt"), tokenizer, 128)
    features = [blocks[i] for i in range(8)]
    evaluation = [task.collate(features, 0)["masked_positions"] for _ in range(2)]
    assert torch.equal(*evaluation)
    epochs = [task.collate_training(features, 0, epoch)["masked_positions"] for epoch in (0, 0, 1)]
    assert torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0], epochs[2])


@pytest.mark.parametrize("kind", ["modernbert", "t5"])
def test_set_dropout_reaches_functional_and_absent_dropouts(kind):
    import transformers

    from kiln.models import set_dropout

    sizes = {"modernbert": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                layer_types=["full_attention"] * 2, attention_dropout=0.0, mlp_dropout=0.0,
                                embedding_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                cls_token_id=2, sep_token_id=3),
             "t5": dict(d_model=32, d_ff=32, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0)}[kind]
    config = transformers.AutoConfig.for_model(kind, vocab_size=120, **sizes)
    if kind == "modernbert":
        model = transformers.AutoModelForMaskedLM.from_config(config).train()
    else:
        model = transformers.T5EncoderModel(config).train()
    ids = torch.randint(5, 120, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)[0], model(input_ids=ids)[0])  # no dropout at all
        set_dropout(model, 0.3)
        assert torch.allclose(model(input_ids=ids)[0], model(input_ids=ids)[0]) is False
    recorded = {k: v for k, v in vars(model.config).items() if "dropout" in k and isinstance(v, float)}
    assert recorded and set(recorded.values()) == {0.3}
    # The probabilities these attentions hand to the functional dropout are plain floats.
    attention = [m for m in model.modules() if type(m).__name__ in ("T5Attention", "ModernBertAttention")]
    assert attention and all(getattr(m, "attention_dropout", getattr(m, "dropout", None)) == 0.3
                             for m in attention)


# -- end to end ------------------------------------------------------------------------------
def test_mlm_end_to_end_export_parity_and_finetuning(corpus, tmp_path, sentiment_dir):
    import transformers

    run = kiln.train("mlm", corpus, name="pre", profile=profile(tmp_path), output_dir=tmp_path / "runs")
    assert {"loss", "perplexity", "n"} <= set(run.metrics)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(run.model_dir).eval()  # no trust_remote_code
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    model = kiln.load(run.path, precision="fp32")
    features = model.task.encode(model.task.read(corpus / "valid.txt"), model.tokenizer, 32)
    batch = model.task.collate([features[i] for i in range(4)], model.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = model.task.training_module(model.model.eval())(**model.task.model_inputs(batch)).logits
        theirs = hf(input_ids=batch["input_ids"]).logits.flatten(0, 1)[batch["masked_positions"]]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    metrics = model.evaluate(corpus / "valid.txt")
    assert metrics["loss"] == pytest.approx(run.metrics["loss"], rel=1e-4)  # fixed masks: same number

    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(run.model_dir, num_labels=2)
    assert type(classifier).__name__ == "ModernBertForSequenceClassification"
    tuned = kiln.train("sequence", sentiment_dir, name="ft", init=run.path, max_steps=3,
                       output_dir=tmp_path / "runs")
    a = load_file(str(run.model_dir / "model.safetensors"))
    b = load_file(str(tuned.model_dir / "model.safetensors"))
    key = "model.embeddings.tok_embeddings.weight"
    assert a[key].shape == b[key].shape and not torch.equal(a[key], b[key])  # started from it, then trained


def test_mlm_resume_mid_epoch_is_exact(corpus, tmp_path):
    common = dict(profile=profile(tmp_path), max_steps=8, eval_every=4, output_dir=tmp_path)
    straight = kiln.train("mlm", corpus, name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("mlm", corpus, name="stopped", callbacks=[StopAt(5)], **common)
    resumed = kiln.train("mlm", corpus, name="stopped", resume=True, output_dir=tmp_path)
    a = load_file(str(ckpt.last_checkpoint(straight.path / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.last_checkpoint(resumed.path / "checkpoints") / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


GPT2_TINY = """\
base: gpt2
model: {config: {n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}}
tokenizer: {vocab_size: 300}
optim: {lr: 3.0e-3}
train: {batch_tokens: 512, epochs: 2}
pretrain: {seq_len: 32}
"""
T5_TINY = """\
base: t5-tiny
model: {config: {d_model: 32, d_ff: 64, num_layers: 2, num_decoder_layers: 2, num_heads: 2, d_kv: 16}}
tokenizer: {vocab_size: 300}
optim: {lr: 3.0e-3}
train: {batch_tokens: 512, epochs: 2}
pretrain: {seq_len: 32}
"""


@pytest.mark.parametrize(("task", "text", "auto"), [("clm", GPT2_TINY, "AutoModelForCausalLM"),
                                                     ("span", T5_TINY, "AutoModelForSeq2SeqLM")])
def test_clm_and_span_learn_and_export(task, text, auto, corpus, tmp_path):
    import transformers

    run = kiln.train(task, corpus, name=task, profile=profile(tmp_path, text), output_dir=tmp_path / "runs")
    logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in logs if "eval_loss" in r]
    assert evals[-1] < evals[0] < 6.0  # learning (uniform over ~300 tokens would be 5.7)
    getattr(transformers, auto).from_pretrained(run.model_dir)


@pytest.mark.data
@pytest.mark.slow  # MLM on tiny corpora is in the default run; this is the same on the real one
def test_wikitext2_mlm_smoke(tmp_path):
    run = kiln.train("mlm", SHARED_DATA / "wikitext-2", name="w", profile="crammed-bert-tiny", max_steps=3,
                     output_dir=tmp_path, **{"train.batch_size": 8, "train.grad_accum": 1})
    assert run.metrics["n"] > 100  # validation blocks from valid.txt


def test_budget_resume_counts_the_time_already_spent(corpus, tmp_path):
    common = dict(profile=profile(tmp_path), budget="3s", output_dir=tmp_path, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("mlm", corpus, name="b", callbacks=[StopAt(2)], **common)
    resumed = kiln.train("mlm", corpus, name="b", resume=True, output_dir=tmp_path)
    logs = [json.loads(line) for line in (resumed.path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "split" not in r]
    assert [r["step"] for r in steps][:2] == [1, 2] and steps[-1]["step"] > 2  # the log continues
    assert 3.0 <= steps[-1]["elapsed"] < 5.0  # one budget across both runs, not 3 s each
    assert resumed.model_dir.joinpath("model.safetensors").is_file()
