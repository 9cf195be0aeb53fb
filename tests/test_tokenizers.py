import pytest
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
