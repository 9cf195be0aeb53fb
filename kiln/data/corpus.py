"""Raw-text corpora for pretraining: documents -> token stream on disk -> packed fixed-length blocks.

A corpus is ``.txt`` (one document per line, or blank-line-separated paragraphs), ``.jsonl`` with a
``text`` field, ``.gz`` versions of both, or a directory of these. It is tokenized once, streaming
in batches (the Rust tokenizer encodes each batch on all cores), into a flat memory-mapped token
file (uint16 when the vocabulary fits, else uint32) with a separator after every document. The
file is cached under a hash of the corpus bytes, the tokenizer and the settings, so a second run
starts in seconds, and RAM stays bounded by one batch of text (a huge document is encoded in
pieces) whatever the corpus size.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".raw", ".tokens")
# A word of the file name, optionally followed by "set" or a number: valid.txt, wiki.valid.tokens,
# dev2.txt, validation-00000.jsonl.gz, testset.txt (but not values.txt or development.txt).
VALID_WORD = re.compile(r"(?:valid|validation|val|dev)(?:set|\d+)?")
TEST_WORD = re.compile(r"(?:test|testing)(?:set|\d+)?")
# Documentation shipped beside a corpus (wikitext-2's SOURCE.txt) is not training text.
NOT_TEXT = ("readme", "license", "licence", "source", "notice", "citation", "changelog")
# One tokenizer call encodes up to this many documents or characters: enough to keep every core
# busy, while the batch's encodings (~100 bytes per token) stay a few tens of MB.
ENCODE_BATCH = 2000
ENCODE_CHARS = 1_000_000


def corpus_files(path: str | Path) -> dict[str, list[Path]]:
    """Split a corpus path into ``{"train": [...], "validation": [...], "test": [...]}`` files.

    A file is the training corpus. In a directory, files whose name has the word ``valid``,
    ``validation``, ``val`` or ``dev``, alone or followed by ``set`` or a number (``valid.txt``,
    ``wiki.valid.tokens``, ``dev2.txt``, ``validation-00000.jsonl.gz``) are validation, those with
    ``test``/``testing`` likewise are test, and every other corpus file is training data (except
    README/LICENSE/SOURCE-style documentation).
    """
    path = Path(path)
    if path.is_file():
        return {"train": [path]}
    if not path.is_dir():
        raise KilnError("no such file or directory", path)
    splits: dict[str, list[Path]] = {}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        name = file.name.lower()
        if not name.endswith(SUFFIXES) or name.startswith(NOT_TEXT):
            continue
        words = re.split(r"[^a-z0-9]+", name)
        split = ("validation" if any(VALID_WORD.fullmatch(w) for w in words) else
                 "test" if any(TEST_WORD.fullmatch(w) for w in words) else "train")
        splits.setdefault(split, []).append(file)
    if "train" not in splits:
        raise KilnError(f"no training corpus here (files ending in {', '.join(SUFFIXES)})", path)
    return splits


OnError = Callable[[KilnError], None]


def _raise(err: KilnError) -> None:
    raise err


def _lines(path: Path, on_error: OnError = _raise,
           on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a (gzipped) UTF-8 file, decoded line by line so that a bad byte
    is reported at its line. Lines end in ``\n``, ``\r\n`` or a lone ``\r`` (old Mac files).
    A line that is not UTF-8, or a file that cannot be read on, goes to ``on_error`` (which raises
    by default; a line it returns from is skipped). ``on_bytes`` counts the bytes read (plain files)."""
    number = 0
    count = on_bytes if path.suffix != ".gz" else None  # a gzip file's progress is not its bytes read
    try:
        raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
        with raw:
            for chunk in raw:  # split on \n; a lone \r inside is a line break too
                if count is not None:
                    count(len(chunk))
                for line in chunk.rstrip(b"\n").removesuffix(b"\r").split(b"\r"):
                    number += 1
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        on_error(KilnError(f"not UTF-8 text ({exc.reason})", path, number))
                        continue
                    yield number, text
    except (OSError, EOFError, zlib.error) as exc:  # not gzip, or cut short
        on_error(KilnError(f"cannot read this file after line {number}: {exc}", path))


def iter_documents(files: Sequence[Path], paragraphs: bool = False, on_error: OnError = _raise,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[Path, int, str]]:
    """Yield ``(file, line, text)`` per document, streaming (never a whole file in memory).

    ``.txt``: one document per non-blank line, or with ``paragraphs`` one per blank-line-separated
    block. ``.jsonl``: one object per line with a ``text`` field. A bad line raises its
    :class:`KilnError`, unless ``on_error`` takes it (then the line is skipped: ``kiln describe``
    lists them all); ``on_bytes`` counts the bytes read, for a progress bar.
    """
    for path in files:
        is_json = ".jsonl" in path.name.lower()
        block: list[str] = []
        start = 0
        for number, line in _lines(path, on_error, on_bytes):
            if is_json:
                if not line.strip():
                    continue
                text = _json_text(line, path, number, on_error)
                if text is not None and text.strip():
                    yield path, number, text
            elif paragraphs:
                if line.strip():
                    block.append(line.strip())
                    start = start or number
                elif block:
                    yield path, start, " ".join(block)
                    block, start = [], 0
            elif line.strip():
                yield path, number, line.strip()
        if block:
            yield path, start, " ".join(block)


def _json_text(line: str, path: Path, number: int, on_error: OnError) -> str | None:
    """A JSON line's ``text`` field, or None after handing ``on_error`` what is wrong with it."""
    try:
        text = json.loads(line)["text"]
    except json.JSONDecodeError as exc:
        on_error(KilnError(f"invalid JSON ({exc.msg} at column {exc.colno})", path, number))
        return None
    except (KeyError, TypeError):
        on_error(KilnError("expected a JSON object with a 'text' field", path, number))
        return None
    if not isinstance(text, str):
        on_error(KilnError("'text' must be a string", path, number))
        return None
    if "\\u" in line:  # an escape can spell a lone surrogate, which no tokenizer takes
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            on_error(KilnError("'text' holds an unpaired surrogate escape (\\ud800-\\udfff)", path, number))
            return None
    return text


def sample_texts(files: Sequence[Path], paragraphs: bool, max_chars: int = 50_000_000) -> list[str]:
    """The first ``max_chars`` characters of documents, for training a tokenizer in bounded RAM."""
    texts, total = [], 0
    for _, _, text in iter_documents(files, paragraphs):
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def holdout_document(index: int, fraction: float, seed: int) -> bool:
    """Deterministic per-document validation membership (stable as the corpus grows)."""
    return zlib.crc32(f"{seed}:{index}".encode()) % 100_000 < fraction * 100_000


@dataclass
class TokenStream:
    """A flat token file: documents, each followed by the separator token."""

    tokens: np.ndarray  # memory-mapped, (n_tokens,)
    documents: int
    dropped: int  # documents removed by the tokens-per-character filter


def _files_digest(files: Sequence[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = path.stat()
        digest.update(path.name.encode() + b"\x00" + _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns))
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int) -> bytes:
    """The hash of a file's bytes, once per process (the training and validation parts of a
    held-out split look the same files up); size and mtime in the key notice a rewrite."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.digest()


def _tokenizer_digest(tokenizer: Any) -> str:
    return hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=16).hexdigest()


def tokenize_corpus(
    files: Sequence[Path],
    tokenizer: Any,
    separator: int,
    *,
    paragraphs: bool = False,
    max_tokens_per_char: float = 0.0,
    holdout: tuple[float, int] | None = None,
    cache: Path | None = None,
) -> dict[str, TokenStream]:
    """Tokenize ``files`` into cached token files; returns ``{"all"}`` or ``{"train", "validation"}``.

    ``holdout=(fraction, seed)`` routes a deterministic fraction of documents to validation.
    ``max_tokens_per_char`` (cramming's filter) drops documents that tokenize badly (> cutoff).
    """
    from kiln.tokenizers import build_once, cache_root

    settings = {"separator": separator, "paragraphs": paragraphs, "max_tokens_per_char": max_tokens_per_char,
                "holdout": list(holdout) if holdout else None, "version": 2}  # 2: lone-\r lines
    key = hashlib.blake2b(json.dumps([_files_digest(files), _tokenizer_digest(tokenizer), settings]).encode(),
                          digest_size=12).hexdigest()
    target = (cache or cache_root().parent / "corpora") / key
    parts = ["train", "validation"] if holdout else ["all"]
    build_once(target, "meta.json", lambda tmp: _write_streams(files, tokenizer, separator, paragraphs,
                                                              max_tokens_per_char, holdout, parts, tmp))
    meta = json.loads((target / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for part in parts:
        info = meta["parts"][part]
        tokens = (np.memmap(target / f"{part}.bin", dtype=dtype, mode="r") if info["tokens"]
                  else np.zeros(0, dtype=dtype))
        streams[part] = TokenStream(tokens, info["documents"], info["dropped"])
    return streams


class _Streams:
    """The ``{part}.bin`` files of a cache entry being written: documents arrive as pieces, are
    encoded a batch at a time, and each finished document goes to its part (train or validation)."""

    def __init__(self, tmp: Path, parts: list[str], dtype: Any, backend: Any, separator: int,
                 holdout: tuple[float, int] | None, max_tokens_per_char: float):
        self.parts, self.dtype, self.backend = parts, dtype, backend
        self.holdout, self.max_tokens_per_char = holdout, max_tokens_per_char
        self.separator = np.asarray([separator], dtype=dtype)
        self.outputs = {part: open(tmp / f"{part}.bin", "wb") for part in parts}  # noqa: SIM115
        self.counts = {part: {"tokens": 0, "documents": 0, "dropped": 0} for part in parts}
        self.index = 0  # documents finished so far
        self.pending: list[np.ndarray] = []  # token ids of the document whose pieces are still arriving
        self.pending_chars = 0

    def flush(self, batch: list[tuple[str, bool]]) -> None:
        """Encode ``(piece, ends its document)`` pairs and write out the documents they finish."""
        encodings = self.backend.encode_batch([text for text, _ in batch], add_special_tokens=False)  # all cores
        routed: dict[str, list[np.ndarray]] = {part: [] for part in self.parts}
        for (text, last), encoding in zip(batch, encodings, strict=True):
            self.pending.append(np.asarray(encoding.ids, dtype=self.dtype))
            self.pending_chars += len(text)
            if not last:
                continue
            ids = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
            chars = self.pending_chars
            self.pending.clear()
            self.pending_chars = 0
            part = self.parts[0]
            if self.holdout:
                part = "validation" if holdout_document(self.index, *self.holdout) else "train"
            self.index += 1
            if self.max_tokens_per_char and len(ids) > self.max_tokens_per_char * chars:
                self.counts[part]["dropped"] += 1
                continue
            routed[part] += [ids, self.separator]
            self.counts[part]["documents"] += 1
            self.counts[part]["tokens"] += len(ids) + 1
        for part, arrays in routed.items():
            if arrays:
                np.concatenate(arrays).tofile(self.outputs[part])

    def close(self) -> None:
        for stream in self.outputs.values():
            stream.close()


def _write_streams(files: Sequence[Path], tokenizer: Any, separator: int, paragraphs: bool,
                   max_tokens_per_char: float, holdout: tuple[float, int] | None, parts: list[str],
                   tmp: Path) -> None:
    """Tokenize ``files`` into ``tmp/{part}.bin`` and ``tmp/meta.json`` (written last: it marks the
    entry complete)."""
    from tokenizers import Tokenizer

    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    # A copy without the padding or truncation a saved tokenizer.json may switch on (they would
    # pad or cut every document).
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    streams = _Streams(tmp, parts, dtype, backend, separator, holdout, max_tokens_per_char)
    try:
        batch: list[tuple[str, bool]] = []
        chars = 0
        for _, _, text in iter_documents(files, paragraphs):
            for piece, last in _pieces(text, ENCODE_CHARS):
                batch.append((piece, last))
                chars += len(piece)
                if len(batch) == ENCODE_BATCH or chars >= ENCODE_CHARS:
                    streams.flush(batch)
                    batch, chars = [], 0
        if batch:
            streams.flush(batch)
    finally:
        streams.close()
    (tmp / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "parts": streams.counts,
                                               "files": [str(f) for f in files]}))


def _pieces(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """``text`` in pieces of at most ``size`` characters, cut before a space where there is one
    (so a word-start marker is tokenized as in the whole text), each with "ends the text".

    A huge document (a whole book on one line) is then encoded piece by piece: the tokenizer's
    encodings cost ~100 bytes per token, the document's ids only 2-4.
    """
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        if cut <= start:
            cut = start + size
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def unigram_order(blocks: PackedBlocks, vocab_size: int, chunk_blocks: int = 65536) -> np.ndarray:
    """Block indices from the most to the least likely under the stream's own unigram distribution.

    Cramming's curriculum: a block's score is the mean log-probability of its tokens under the
    add-one-smoothed token frequencies of the whole stream, so blocks of common words come first.
    The memory map is read in chunks (two passes), so RAM stays bounded for any corpus size.
    """
    body = blocks.body
    tokens = blocks.tokens[:blocks.count * body]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk_blocks * body):
        counts += np.bincount(np.asarray(tokens[start:start + chunk_blocks * body]), minlength=vocab_size)
    log_probs = np.log((counts + 1) / (counts.sum() + vocab_size))
    scores = np.empty(blocks.count)
    for start in range(0, blocks.count, chunk_blocks):
        stop = min(start + chunk_blocks, blocks.count)
        chunk = np.asarray(tokens[start * body:stop * body]).reshape(stop - start, body)
        scores[start:stop] = log_probs[chunk].mean(axis=1)
    return np.argsort(-scores, kind="stable")


class PackedBlocks(Sequence):
    """Fixed-length training sequences cut from a token stream, with no padding.

    Block ``i`` is ``prefix + tokens[i * body:(i + 1) * body] + suffix`` where ``body`` is the
    block length minus the prefix and suffix (e.g. BERT's ``[CLS]`` and ``[SEP]``). Documents run
    across block boundaries, separated by the separator token, as in BERT/GPT-2 pretraining.
    Items are views into the memory map, so a corpus larger than RAM is fine.
    """

    count: int  # type: ignore[assignment]  # the number of blocks (Sequence.count, which counts a value, is unused)

    def __init__(self, tokens: np.ndarray, length: int, prefix: Sequence[int] = (), suffix: Sequence[int] = ()):
        self.tokens = tokens
        self.length = length
        self.prefix = np.asarray(prefix, dtype=np.int64)
        self.suffix = np.asarray(suffix, dtype=np.int64)
        self.body = length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise KilnError(f"sequence length {length} leaves no room for text")
        self.count = len(tokens) // self.body

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        body = np.asarray(self.tokens[index * self.body:(index + 1) * self.body], dtype=np.int64)
        return {"input_ids": np.concatenate([self.prefix, body, self.suffix]), "index": index}

    @property
    def lengths(self) -> np.ndarray:
        """Every block has the same length (for the batch sampler)."""
        return np.full(self.count, self.length, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return self.count * self.length
