"""Train, cache and load tokenizers. Everything is saved in the HF format ``AutoTokenizer`` reads.

From-scratch runs train the tokenizer the profile names on the training split with HF
``tokenizers``: WordPiece (BERT family), byte-level BPE (GPT-2/RoBERTa/BART) or Unigram
(T5/XLM-R/mBART/DeBERTa-v2). The result is cached under a hash of the texts and the spec, so a
re-run with the same data does not train it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kiln.config import TokenizerConfig
from kiln.errors import KilnError

# Special tokens per style, in vocabulary order (pad first so pad_token_id is 0 for BERT).
STYLES: dict[str, dict[str, str]] = {
    "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
             "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "roberta": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>"},
    # T5: <pad>=0 (also the decoder start), </s>=1, <unk>=2, no <s>; sentinels for span corruption.
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
    # GPT-2: one <|endoftext|> token serves as bos, eos, unk and (for batching) pad.
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"},
}
STYLES["mbart"] = STYLES["roberta"]  # plus the language codes below
T5_SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
# mBART-cc25 language codes, in the released vocabulary's order.
MBART_CODES = ["ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN",
               "it_IT", "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO",
               "ru_RU", "si_LK", "tr_TR", "vi_VN", "zh_CN"]
EXTRA_SPECIALS = {"t5": T5_SENTINELS, "mbart": MBART_CODES}


def special_tokens(style: str) -> list[str]:
    """The style's special tokens that lead the vocabulary (each once; mBART codes last).

    T5's sentinels are not among them: they are appended after training, as in T5's own vocabulary.
    """
    return list(dict.fromkeys(STYLES[style].values())) + (MBART_CODES if style == "mbart" else [])


def kiln_cache() -> Path:
    """kiln's cache: ``$KILN_CACHE`` or ``~/.cache/kiln``."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def cache_root() -> Path:
    """Where trained tokenizers are cached (``kiln_cache()/tokenizers``)."""
    return kiln_cache() / "tokenizers"


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> None:
    """Make the cache directory ``target`` unless it is complete (has ``marker``): ``build`` fills a
    temporary sibling, which is renamed into place, so no reader ever sees half an entry.

    Under a lock: torchrun starts every rank at once, and one of them should build (a tokenizer, a
    tokenized corpus) while the others wait for it.
    """
    if (target / marker).is_file():
        return
    with exclusive(target.parent / f".{target.name}.lock"):
        if (target / marker).is_file():  # built by another process while we waited
            return
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(target)
        except OSError:  # built by another process that had no lock (Windows); theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` across processes and machines: ``filelock``'s lock (fcntl
    on POSIX, which Linux carries over NFS; msvcrt on Windows), so ranks on several nodes that
    share a cache directory build it once."""
    from filelock import FileLock

    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield


def effective_vocab_size(spec: TokenizerConfig, texts: Sequence[str]) -> int:
    """The profile's vocabulary, capped for small data.

    A vocabulary larger than about half the distinct words mostly learns whole rare words that the
    embedding never sees often enough to train; the cap keeps small-data runs fast and accurate.
    """
    if spec.pin_vocab:
        return spec.vocab_size
    distinct = set()
    for text in texts:
        distinct.update((text.lower() if spec.lowercase else text).split())
    cap = max(1024, -(-len(distinct) // 2 // 64) * 64)
    return min(spec.vocab_size, cap)


def _spec_hash(spec: TokenizerConfig, vocab_size: int, max_length: int, texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    settings = {"kind": spec.kind, "style": spec.style, "lowercase": spec.lowercase,
                "min_frequency": spec.min_frequency, "vocab_size": vocab_size, "max_length": max_length,
                "version": 3}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:20]


def _build_raw(spec: TokenizerConfig, vocab_size: int, texts: Sequence[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = special_tokens(spec.style)
    unk = STYLES[spec.style]["unk_token"]
    if spec.style == "t5":  # the sentinels appended below count towards the vocabulary, as in T5's 32100
        vocab_size -= len(T5_SENTINELS)
    trainer: Any
    if spec.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase, strip_accents=spec.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, show_progress=False, min_frequency=spec.min_frequency,
            special_tokens=specials)
    elif spec.kind == "bpe":
        tok = Tokenizer(models.BPE())
        if spec.lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=spec.min_frequency,
                                      special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif spec.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, show_progress=False, special_tokens=specials, unk_token=unk)
    else:
        raise KilnError(f"unknown tokenizer kind '{spec.kind}'")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if spec.style == "t5":
        # T5's layout, which outside tools assume (HF's T5 span collator computes a sentinel's id as
        # len(tokenizer) - 1 - N): the sentinels close the vocabulary, <extra_id_0> last.
        tok.add_special_tokens(T5_SENTINELS[::-1])
    if spec.style == "bert":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    elif spec.style in ("t5", "mbart"):  # mBART: the generation task adds the language codes
        eos_id = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
    elif spec.style == "gpt2":
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    else:
        bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", bos_id), ("</s>", eos_id)],
        )
    return tok


def wrap(raw: Any, style: str, max_length: int) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    inputs = ["input_ids", "token_type_ids", "attention_mask"] if style == "bert" else [
        "input_ids", "attention_mask"]
    extra = {"additional_special_tokens": EXTRA_SPECIALS[style]} if style in EXTRA_SPECIALS else {}
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=max_length,
                                   model_input_names=inputs, **STYLES[style], **extra)


def train_tokenizer(spec: TokenizerConfig, texts: Sequence[str], max_length: int) -> tuple[Any, Path]:
    """Train (or fetch from cache) a tokenizer on ``texts``; returns ``(tokenizer, cache_dir)``."""
    vocab_size = effective_vocab_size(spec, texts)
    key = _spec_hash(spec, vocab_size, max_length, texts)
    target = cache_root() / key
    build_once(target, "tokenizer.json",
               lambda tmp: wrap(_build_raw(spec, vocab_size, texts), spec.style, max_length).save_pretrained(tmp))
    return load_tokenizer(target), target  # as saved, whether trained now or before


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer directory (kiln run, model dir or HF checkpoint) without network access."""
    from transformers import AutoTokenizer

    from kiln.model_files import verify_tokenizer_files

    path = Path(path)
    if not path.is_dir():
        raise KilnError("tokenizer directory not found", path)
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
             "sentencepiece.bpe.model")
    if not any((path / name).is_file() for name in known):
        raise KilnError(f"no tokenizer files here (none of {', '.join(known)})", path)
    verify_tokenizer_files(path)  # a damaged file: one line naming it, not the JSON decoder's error
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise KilnError(f"cannot load a tokenizer here: {str(exc).splitlines()[0]}", path) from None
