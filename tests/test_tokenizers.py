import pytest
from conftest import build_once_when_racing
from transformers import AutoTokenizer

from kiln.config import TokenizerConfig
from kiln.tokenizers import cache_root, effective_vocab_size, train_tokenizer

TEXTS = [f"the {w} film was {v} , said reviewer {i}" for i, (w, v) in enumerate(
    [("new", "great"), ("old", "dull"), ("long", "Superb"), ("short", "boring")] * 30)]


@pytest.mark.parametrize(("kind", "style", "first", "last"), [
    ("wordpiece", "bert", "[CLS]", "[SEP]"),
    ("bpe", "roberta", "<s>", "</s>"),
    ("unigram", "roberta", "<s>", "</s>"),
    ("bpe", "bert", "[CLS]", "[SEP]"),  # DeBERTa v1: byte-level BPE with BERT-style specials
    ("unigram", "t5", "▁", "</s>"),       # T5: no start token (the text begins), </s> after each text
])
def test_train_save_and_load_with_transformers(tmp_path, kind, style, first, last):
    spec = TokenizerConfig(kind=kind, style=style, vocab_size=300, lowercase=kind == "wordpiece")
    tokenizer, cached = train_tokenizer(spec, TEXTS, max_length=64)
    ids = tokenizer("the new film", "was great")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == first and tokens[-1] == last
    reloaded = AutoTokenizer.from_pretrained(cached)
    assert reloaded("the new film", "was great")["input_ids"] == ids
    assert reloaded.pad_token_id == tokenizer.pad_token_id is not None
    assert tokenizer.model_max_length == 64


def test_t5_and_gpt2_styles():
    t5, _ = train_tokenizer(TokenizerConfig(kind="unigram", style="t5", vocab_size=300, lowercase=False), TEXTS, 64)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    # T5's layout: the sentinels close the vocabulary, counting down from <extra_id_0>, within vocab_size.
    assert len(t5) <= 300
    assert [t5.convert_tokens_to_ids(f"<extra_id_{i}>") for i in (0, 1, 99)] == [len(t5) - 1, len(t5) - 2,
                                                                                 len(t5) - 100]
    assert t5.bos_token is None
    gpt2, _ = train_tokenizer(TokenizerConfig(kind="bpe", style="gpt2", vocab_size=400, lowercase=False), TEXTS, 64)
    ids = gpt2("the new film")["input_ids"]
    assert gpt2.eos_token_id == gpt2.pad_token_id == gpt2.bos_token_id == 0
    assert 0 not in ids  # GPT-2 adds no special tokens around a text
    assert gpt2.decode(ids) == "the new film"


def test_cache_hit_and_miss():
    spec = TokenizerConfig(vocab_size=300)
    _, first = train_tokenizer(spec, TEXTS, 64)
    _, again = train_tokenizer(spec, TEXTS, 64)
    _, other = train_tokenizer(spec, [*TEXTS, "one more line"], 64)
    assert first == again != other
    assert first.parent == cache_root()


def test_uncased_wordpiece_lowercases():
    tokenizer, _ = train_tokenizer(TokenizerConfig(vocab_size=300, lowercase=True), TEXTS, 64)
    assert tokenizer.tokenize("SUPERB") == tokenizer.tokenize("superb")


def test_vocab_capped_for_small_data_unless_pinned():
    spec = TokenizerConfig(vocab_size=30522)
    assert effective_vocab_size(spec, TEXTS) == 1024
    assert effective_vocab_size(TokenizerConfig(vocab_size=30522, pin_vocab=True), TEXTS) == 30522
    assert effective_vocab_size(TokenizerConfig(vocab_size=500), TEXTS) == 500


def test_concurrent_runs_train_a_tokenizer_once(monkeypatch):
    """torchrun starts every rank at once: one trains the tokenizer, the others wait for its cache."""
    import kiln.tokenizers as tokenizers_module

    spec = TokenizerConfig(vocab_size=123)
    build_once_when_racing(monkeypatch, tokenizers_module, "_build_raw",
                           lambda: train_tokenizer(spec, TEXTS, 64)[0].get_vocab())


def test_a_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    from kiln.errors import KilnError
    from kiln.tokenizers import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # a model dir missing its tokenizer
    with pytest.raises(KilnError, match="no tokenizer files here") as err:
        load_tokenizer(tmp_path)
    assert str(err.value).startswith(str(tmp_path))
