"""Reading a dataset for ``kiln describe`` as training reads it, and the streaming statistics kept
over it: lengths, digests for duplicates and leakage, token counts, findings, the description."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ColumnsMismatch, KilnError, MissingLabels
from kiln.html import Section, Table

LENGTH_LIMITS = (128, 256, 512)  # the share of examples longer than these (cut, or windowed, in training)
SPLITS = ("train", "validation", "test")
MAX_BAD_ROWS = 25  # per file: bad rows blanked and the file read again, before describe gives up on it
FINDINGS_PER_KIND = 20  # findings listed per kind; the rest are counted
SHOWN_EXAMPLES = 3  # duplicates quoted per split
RESERVOIR = 100_000  # lengths kept for medians, percentiles and histograms
FINGERPRINTS = 1 << 20  # distinct digests kept per split before sampling by hash
TOP_TOKENS = 200_000  # distinct tokens counted before the rarest half is dropped
TOKENIZE_BATCH = 1000
CORPUS_BATCH_CHARS = 1_000_000
_NOT_WORD = re.compile(r"[\W_]+")


# -- small streaming summaries ---------------------------------------------------------------
@dataclass
class Finding:
    """A problem in the data, located like a :class:`~kiln.errors.KilnError`."""

    message: str
    path: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """``path:line``, ``path`` or nothing."""
        if self.path is None:
            return ""
        return f"{self.path}:{self.line}" if self.line is not None else self.path


class Findings:
    """Findings, at most :data:`FINDINGS_PER_KIND` listed per kind and the rest counted."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self.totals: Counter = Counter()

    def add(self, kind: str, message: str, path: Any = None, line: int | None = None) -> None:
        """Count a finding of ``kind``; keep it when fewer of its kind are kept yet."""
        self.totals[kind] += 1
        if self.totals[kind] <= FINDINGS_PER_KIND:
            self.items.append(Finding(message, None if path is None else str(path), line))

    def from_error(self, kind: str, err: KilnError, prefix: str = "") -> None:
        """A finding from a reader's error, where it points."""
        self.add(kind, prefix + err.message, err.path, err.line)

    def listed(self) -> list[Finding]:
        """The findings, then one line per kind that had more than were listed."""
        more = [Finding(f"… and {total - FINDINGS_PER_KIND:,} more: {kind}")
                for kind, total in self.totals.items() if total > FINDINGS_PER_KIND]
        return self.items + more


class Lengths:
    """Min, mean and max exactly, median and p95 from a reservoir sample, and exact counts of the
    values above each limit, in memory that does not grow with the data."""

    def __init__(self, limits: Sequence[int] = (), reservoir: int = RESERVOIR, seed: int = 0):
        self.count = 0
        self.total = 0.0
        self.low: float | None = None
        self.high: float | None = None
        self.above = dict.fromkeys(limits, 0)
        self.sample: list[float] = []
        self.size = reservoir
        self.random = random.Random(seed)

    def add(self, value: float) -> None:
        """Count one value."""
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)
        for limit in self.above:
            if value > limit:
                self.above[limit] += 1
        if len(self.sample) < self.size:
            self.sample.append(value)
        else:  # Algorithm R: every value seen so far stays in the sample with the same probability
            slot = self.random.randrange(self.count)
            if slot < self.size:
                self.sample[slot] = value

    def summary(self) -> list[float | None]:
        """``[min, mean, median, p95, max]`` (None when empty)."""
        if not self.count:
            return [None] * 5
        import numpy as np

        median, p95 = np.percentile(np.asarray(self.sample, dtype=np.float64), [50, 95])
        return [self.low, self.total / self.count, float(median), float(p95), self.high]

    @property
    def exact(self) -> bool:
        """Whether the sample holds every value (median and p95 are exact)."""
        return self.count <= self.size


# A text longer than this many characters (a whole book on one line) is worked through in pieces
# of about this size, cut at whitespace: a copy, a word list or an encoding of it whole would take
# many times its size in memory.
LONG_TEXT = 1 << 20


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` (default :data:`LONG_TEXT`) characters, each
    ending in whitespace where the piece has any (so no word is cut), together exactly ``text``."""
    size = size or LONG_TEXT
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        cut = end
        while cut > start and end < len(text) and not text[cut - 1].isspace():
            cut -= 1
        end = cut if cut > start else end
        yield text[start:end]
        start = end


def digest(text: str) -> int:
    """An 8-byte fingerprint of ``text``."""
    if len(text) <= LONG_TEXT:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                              "little")
    hashed = hashlib.blake2b(digest_size=8)
    for piece in pieces(text):
        hashed.update(piece.encode("utf-8", "surrogatepass"))
    return int.from_bytes(hashed.digest(), "little")


def normal_digest(text: str) -> int:
    """:func:`digest` of :func:`normalise` ``(text)``, a piece at a time."""
    if len(text) <= LONG_TEXT:
        return digest(normalise(text))
    hashed, first = hashlib.blake2b(digest_size=8), True
    for piece in pieces(text):
        words = normalise(piece)
        if words:
            hashed.update(((" " if not first else "") + words).encode("utf-8", "surrogatepass"))
            first = False
    return int.from_bytes(hashed.digest(), "little")


def words(text: str) -> int:
    """Whitespace-separated words in ``text``, counted a piece at a time."""
    if len(text) <= LONG_TEXT:
        return len(text.split())
    return sum(len(piece.split()) for piece in pieces(text))


def normalise(text: str) -> str:
    """Lowercased, with runs of punctuation and whitespace collapsed to one space."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


class Fingerprints:
    """How often each text occurs, as 8-byte digests. Past ``cap`` distinct digests only those whose
    low ``level`` bits are zero are kept (a 1 in 2**level sample by hash): all copies of a text
    hash alike, so duplicates among the sample, scaled by 2**level, estimate those of the whole."""

    def __init__(self, cap: int = FINGERPRINTS):
        self.counts: dict[int, int] = {}
        self.level = 0
        self.cap = cap
        self.repeats = 0  # occurrences of a sampled text after its first
        self.examples: list[str] = []

    def sampled(self, key: int) -> bool:
        """Whether ``key`` belongs to the sample (all keys until the cap is reached)."""
        return key & ((1 << self.level) - 1) == 0

    def add(self, key: int, text: str) -> None:
        """Count ``text`` (digest ``key``), quoting a few of the repeats."""
        if not self.sampled(key):
            return
        seen = self.counts.get(key, 0)
        self.counts[key] = seen + 1
        if seen:
            self.repeats += 1
            if len(self.examples) < SHOWN_EXAMPLES and _shorten(text) not in self.examples:
                self.examples.append(_shorten(text))
        elif len(self.counts) > self.cap:
            self.level += 1
            self.counts = {k: n for k, n in self.counts.items() if self.sampled(k)}
            self.repeats = sum(n - 1 for n in self.counts.values())

    @property
    def duplicates(self) -> int:
        """Examples that repeat an earlier one (estimated once sampling started)."""
        return self.repeats << self.level

    def contains(self, key: int) -> bool | None:
        """Whether ``key`` was seen; None when it falls outside the sample."""
        return key in self.counts if self.sampled(key) else None


@dataclass
class Overlap:
    """Examples of one split whose text also occurs in an earlier one (leakage)."""

    hits: int = 0
    level: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """The number of shared examples (estimated when the earlier split was sampled)."""
        return self.hits << self.level


class TopTokens:
    """Token counts that keep the :data:`TOP_TOKENS` most frequent (an approximation once pruned)."""

    def __init__(self, cap: int = TOP_TOKENS):
        self.counts: Counter = Counter()
        self.cap = cap
        self.pruned = False

    def update(self, tokens: Iterable[str]) -> None:
        """Count ``tokens``; past the cap, forget all but the most frequent half."""
        self.counts.update(tokens)
        if len(self.counts) > self.cap:
            self.counts = Counter(dict(self.counts.most_common(self.cap // 2)))
            self.pruned = True


# -- tokens ---------------------------------------------------------------------------------
class TokenCounter:
    """Counts tokens: whitespace-separated words, or a tokenizer's tokens (special tokens included
    for model inputs, as the model sees them)."""

    def __init__(self, tokenizer: str | Path | None = None):
        self.backend = None
        self.name = "whitespace tokens"
        if tokenizer is None:
            return
        from kiln.tokenizers import load_tokenizer

        path = Path(tokenizer)
        if (path / "model").is_dir():  # a kiln run: its exported model's tokenizer
            path = path / "model"
        loaded = load_tokenizer(path)
        backend = getattr(loaded, "backend_tokenizer", None)
        if backend is None:
            raise KilnError("not a fast (Rust) tokenizer; describe needs tokenizer.json", path)
        from tokenizers import Tokenizer

        # A copy without the padding or truncation a saved tokenizer.json may switch on.
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        self.name = f"tokens of {path}"

    def count(self, inputs: Sequence[tuple[str, ...]], special: bool = True) -> list[int]:
        """Tokens per input (one text, or a pair encoded together)."""
        if self.backend is None:
            return [sum(words(text) for text in texts) for texts in inputs]
        if any(len(text) > LONG_TEXT for texts in inputs for text in texts):
            return [self._count_long(texts, special) for texts in inputs]
        counts: list[int] = []
        for start in range(0, len(inputs), TOKENIZE_BATCH):
            batch = [texts[0] if len(texts) == 1 else (texts[0], texts[1])
                     for texts in inputs[start:start + TOKENIZE_BATCH]]
            counts += [len(encoding.ids) for encoding in self.backend.encode_batch(batch, add_special_tokens=special)]
        return counts

    def _count_long(self, texts: tuple[str, ...], special: bool) -> int:
        """Tokens of an input with a long text, encoded a piece at a time: exact where the
        tokenizer splits at whitespace before it merges (every word-level and byte-level BPE does)."""
        assert self.backend is not None
        specials = len(self.backend.encode("", "" if len(texts) > 1 else None, add_special_tokens=special).ids)
        return specials + sum(len(self.backend.encode(piece, add_special_tokens=False).ids)
                              for text in texts for piece in pieces(text))

    def tokens(self, texts: Sequence[str]) -> Iterator[Iterable[list[str]]]:
        """The tokens of each text (no special tokens), one text's at a time, as lists of tokens to
        consume in turn: a long text's come a :func:`pieces` piece at a time, encoded on demand."""
        backend = self.backend
        if backend is None:
            yield from ((piece.split() for piece in pieces(text)) for text in texts)
        elif all(len(text) <= LONG_TEXT for text in texts):  # the common case: one batch, encoded in parallel
            yield from ([encoding.tokens] for encoding in backend.encode_batch(list(texts), add_special_tokens=False))
        else:
            for text in texts:
                yield (backend.encode(piece, add_special_tokens=False).tokens for piece in pieces(text))


def progress(total: int | None, unit: str, description: str) -> Any:
    """A tqdm bar on stderr when it is a terminal; a silent stand-in elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=description, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True, leave=False)


# -- one split ---------------------------------------------------------------------------------
@dataclass
class SplitStats:
    """What describe learns about one split."""

    name: str
    source: str
    examples: int = 0
    labelled: bool = True
    chars: Lengths = field(default_factory=Lengths)
    tokens: Lengths = field(default_factory=lambda: Lengths(LENGTH_LIMITS))
    labels: Counter = field(default_factory=Counter)
    exact: Fingerprints = field(default_factory=Fingerprints)
    normal: Fingerprints = field(default_factory=Fingerprints)
    overlaps: dict[str, tuple[Overlap, Overlap]] = field(default_factory=dict)  # earlier split -> (exact, normal)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_text(self, text: str, earlier: Sequence[SplitStats]) -> None:
        """Count ``text`` for duplicates within this split and against the ``earlier`` splits."""
        keys = (digest(text), normal_digest(text))
        for other in earlier:
            pair = self.overlaps.setdefault(other.name, (Overlap(level=other.exact.level),
                                                         Overlap(level=other.normal.level)))
            for overlap, prints, key in zip(pair, (other.exact, other.normal), keys, strict=True):
                if prints.contains(key):
                    overlap.hits += 1
                    if len(overlap.examples) < SHOWN_EXAMPLES:
                        overlap.examples.append(_shorten(text))
        self.exact.add(keys[0], text)
        self.normal.add(keys[1], text)


def _shorten(text: str, limit: int = 90) -> str:
    text = " ".join(text[:limit * 16].split())  # the start is all that is shown
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- reading, as training does ----------------------------------------------------------------
@contextlib.contextmanager
def captured_warnings(renames: dict[str, str]) -> Iterator[list[str]]:
    """Collect what the readers log as warnings (skipped empty rows) instead of printing it, to
    become findings; ``renames`` maps temporary copies back to the user's file names."""
    logger = logging.getLogger("kiln")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            for temporary, original in renames.items():
                message = message.replace(temporary, original)
            messages.append(message)

    saved = logger.handlers[:]
    logger.handlers = [Collect(logging.WARNING)]
    try:
        yield messages
    finally:
        logger.handlers = saved


def read_tolerant(task: Any, path: Path, findings: Findings, labelled: bool = True) -> Any:
    """``task.read(path)``; a bad row becomes a finding and the file is read again without it
    (blanked in a temporary copy, so every other line keeps its number). Raises the error when
    it is about the whole file, or after :data:`MAX_BAD_ROWS` bad rows."""
    # A JSON document, or a pair of parallel files (generation.pair), cannot lose one line alone.
    blankable = path.suffix.lower() != ".json" and not getattr(task.settings, "pair", "")
    bad: set[int] = set()
    at_top: list[KilnError] = []  # the same error at the first remaining row, attempt after attempt
    with tempfile.TemporaryDirectory(prefix="kiln-describe-") as scratch:
        copy = Path(scratch) / path.name
        renames = {str(copy): str(path)}
        while True:
            source = copy if bad else path
            try:
                with captured_warnings(renames) as warnings:  # kept only from the read that succeeds
                    dataset = task.read(source, labelled=labelled)
            except (MissingLabels, ColumnsMismatch):
                raise  # about the file's columns, not a row
            except KilnError as err:
                if err.path == str(source):
                    err.path = str(path)
                if not blankable or err.path != str(path) or err.line is None or err.line in bad:
                    raise
                if len(bad) >= MAX_BAD_ROWS:
                    raise KilnError(f"more than {MAX_BAD_ROWS} bad rows (the last: {err.message}); "
                                    "fix these first", path) from None
                # An error that moves to the next row whenever the first is blanked is about the
                # whole file ("cannot tell which of the 4 columns is which"): report it once.
                if err.line == _first_row(path, bad) and (not at_top or at_top[-1].message == err.message):
                    at_top.append(err)
                    if len(at_top) == 3:
                        raise at_top[0] from None
                else:
                    for earlier in [*at_top, err]:
                        findings.from_error("bad rows", earlier)
                    at_top.clear()
                bad.add(err.line)
                _blank_lines(path, copy, bad)
                continue
            for earlier in at_top:
                findings.from_error("bad rows", earlier)
            for message in warnings:
                findings.add("skipped rows", message)
            dataset.path = str(path)
            return dataset


def _first_row(path: Path, blanked: set[int]) -> int | None:
    """The number of the first non-blank line of ``path`` that is not among ``blanked``."""
    from kiln.data.tables import iter_lines

    return next((number for number, text in iter_lines(path) if text.strip() and number not in blanked), None)


def _blank_lines(path: Path, copy: Path, lines: set[int]) -> None:
    """``path`` with the given (1-based) lines emptied, written to ``copy``; line breaks are those
    :func:`kiln.data.tables.iter_lines` counts (``\\n``, ``\\r\\n``, a lone ``\\r``)."""
    parts = re.split(rb"\r\n?|\n", path.read_bytes())
    for number in lines:
        if 0 < number <= len(parts):
            parts[number - 1] = b""
    copy.write_bytes(b"\n".join(parts))


def read_split(task: Any, name: str, path: Path, findings: Findings) -> Any:
    """One split as training reads it. A file without labels is described without them (GLUE's test
    files). A train split that cannot be read is an error, as in training; another split is a
    finding, and None."""
    try:
        try:
            return read_tolerant(task, path, findings)
        except MissingLabels:
            dataset = read_tolerant(task, path, findings, labelled=False)
            dataset.extras["unlabelled"] = True
            return dataset
    except KilnError as err:
        if name == "train":
            raise
        why = ", its columns do not fit the training data's" if isinstance(err, ColumnsMismatch) else ""
        findings.from_error("unreadable split", err, f"{name} split not described{why}: ")
    return None


# -- the description ---------------------------------------------------------------------------
@dataclass
class Description:
    """Everything ``kiln describe`` reports about a dataset."""

    task: str
    data: str
    counter: str  # what a token is here
    splits: list[SplitStats] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)
    notes: list[str] = field(default_factory=list)
    kind: Any = None  # the describer, which knows the task's own tables and plots

    def sections(self, plots: bool = False) -> list[Section]:
        """The report's sections; ``plots`` draws the figures too (for the HTML page)."""
        sections = self.kind.sections(self, plots)
        listed = self.findings.listed()
        findings = Section("Findings")
        if listed:
            total = sum(self.findings.totals.values())
            findings.tables.append(Table(f"{total:,} finding{'s' if total > 1 else ''}", ["where", "what"],
                                         [[f.where, f.message] for f in listed]))
        else:
            findings.notes.append("No problems found.")
        return [*sections, findings]
