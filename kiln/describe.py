"""``kiln describe``: what a dataset holds, read exactly as ``kiln train`` would read it.

The splits are found and read by the task objects themselves (``find_splits``, ``read``, ``fit``,
``check``), so the numbers are those of the examples training would see, after the same skipping
of empty rows. Where training stops at the first bad row, describe reports it as a finding
(``path:line``) and reads on: the row is blanked in a temporary copy (line numbers kept) and the
file is read again, up to :data:`MAX_BAD_ROWS` times.

Pretraining corpora are streamed line by line and never held in memory: totals and counts over
length limits are exact, medians and percentiles come from a fixed-size reservoir sample,
duplicates are 8-byte digests that are sampled by hash once there are too many of them (so a
duplicate's copies are always sampled together, and the count stays an unbiased estimate), and
the token counter keeps only its most frequent entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ColumnsMismatch, KilnError, MissingLabels
from kiln.html import Plot, Section, Table, percent

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


def describe(task: str, data: str | Path, *, tokenizer: str | Path | None = None, columns: str | None = None,
             pair: str | None = None, overrides: Sequence[str] = ()) -> Description:
    """Describe the dataset at ``data`` for ``task``: split sizes, labels, lengths, duplicates and
    leakage between splits, and the task's own checks. Bad rows are findings, not errors; an error
    is raised only where training could not start at all (no such path, no train split or one
    whose columns cannot be told apart)."""
    from kiln.run import resolve_config
    from kiln.tasks import get_task

    config = resolve_config(task, None, None, {"data.columns": columns, "data.pair": pair}, overrides).build()
    task_obj = get_task(task, config)
    counter = TokenCounter(tokenizer)
    kind = DESCRIBERS[task_obj.describer](task_obj, counter)
    description = Description(task, str(data), counter.name, kind=kind)
    kind.run(description, Path(data))
    return description


def _histogram(axis: Any, given: Sequence[float], limits: Sequence[int] = LENGTH_LIMITS) -> None:
    import numpy as np

    values = np.asarray(given, dtype=np.float64)
    if not len(values):
        return
    low, high = values.min(), values.max()
    if np.all(values == np.round(values)) and high - low <= 100:  # small counts: one bar per value
        bins: Any = np.arange(low, high + 2) - 0.5
    else:
        bins = 60
    axis.hist(values, bins=bins, color="#4c72b0")
    for limit in limits:
        if limit < values.max():
            axis.axvline(limit, color="#c44e52", linestyle="--", linewidth=1)


def _grouped_bars(title: str, name: str, names: Sequence[str], series: Mapping[str, Sequence[float]],
                  ylabel: str) -> Plot:
    """One bar per name and series (split), side by side."""
    import numpy as np

    from kiln.html import new_figure, png_bytes

    figure = new_figure(max(6.0, min(14.0, 0.5 * len(names) * max(1, len(series)) + 2)), 3.6)
    axis = figure.subplots()
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(names))
    for index, (label, values) in enumerate(series.items()):
        axis.bar(positions + index * width - 0.4 + width / 2, values, width, label=label)
    axis.set_xticks(positions, names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    if len(series) > 1:
        axis.legend()
    return Plot(name, title, png_bytes(figure))


class Describer:
    """Reads the splits and builds the tables every task shares; subclasses add their own."""

    def __init__(self, task: Any, counter: TokenCounter):
        self.task = task
        self.counter = counter

    # -- per task ---------------------------------------------------------------------------
    def inputs(self, example: dict) -> tuple[str, ...]:
        """The text(s) a model reads for ``example`` (lengths and duplicates are of these)."""
        raise NotImplementedError

    def label(self, example: dict) -> str | None:
        """The class label of ``example`` (None: the task has none)."""
        return None

    def add_extra(self, split: SplitStats, dataset: Any, findings: Findings) -> None:
        """Task-specific statistics of one split."""

    def extra_sections(self, description: Description, plots: bool) -> list[Section]:
        """Sections only this task has."""
        return []

    # -- shared -----------------------------------------------------------------------------
    def run(self, description: Description, data: Path) -> None:
        """Read every split of ``data`` as training would and add its statistics to ``description``."""
        findings = description.findings
        splits = self.task.find_splits(data)  # no such path, no train file: a plain error
        datasets: dict[str, Any] = {}
        for name in SPLITS:
            if name in splits:
                dataset = read_split(self.task, name, Path(splits[name]), findings)
                if dataset is not None:
                    datasets[name] = dataset
        if "train" in datasets and not datasets["train"].extras.get("unlabelled"):
            try:
                self.task.fit(datasets["train"])
            except KilnError as err:
                findings.from_error("labels", err, "training would stop here: ")
        if "validation" not in splits:
            fraction = self.task.config.data.validation_fraction
            description.notes.append(f"No validation file: training holds out {fraction:.0%} of the train "
                                     "split at random (data.validation_fraction).")
        earlier: list[SplitStats] = []
        for name, dataset in datasets.items():
            split = SplitStats(name, dataset.path, labelled=not dataset.extras.get("unlabelled"))
            self.add_split(split, dataset, earlier, findings)
            description.splits.append(split)
            earlier.append(split)

    def add_split(self, split: SplitStats, dataset: Any, earlier: list[SplitStats], findings: Findings) -> None:
        """Lengths, labels and duplicates of one read split (leakage against the ``earlier`` ones)."""
        examples = dataset.examples
        split.examples = len(examples)
        inputs = [self.inputs(example) for example in examples]
        for texts in inputs:
            split.chars.add(sum(map(len, texts)))
            split.add_text("\t".join(texts), earlier)
        with progress(len(inputs), "ex", f"tokenizing {split.name}") as bar:
            for start in range(0, len(inputs), 10 * TOKENIZE_BATCH):
                for count in self.counter.count(inputs[start:start + 10 * TOKENIZE_BATCH]):
                    split.tokens.add(count)
                bar.update(min(10 * TOKENIZE_BATCH, len(inputs) - start))
        if split.labelled:
            split.labels.update(label for example in examples if (label := self.label(example)) is not None)
            if split.name != "train" and self.task.state:
                self.check_rows(dataset, findings)
        self.add_extra(split, dataset, findings)

    def check_rows(self, dataset: Any, findings: Findings) -> None:
        """The task's own check (labels training never saw), one example at a time, so that every
        bad row is found rather than the first."""
        from kiln.tasks.base import Dataset

        for example in dataset.examples:
            try:
                self.task.check(Dataset(dataset.path, [example], extras=dataset.extras))
            except KilnError as err:
                findings.from_error("unseen labels", err)

    def sections(self, description: Description, plots: bool) -> list[Section]:
        """The report's sections for this task (the findings are added by :class:`Description`)."""
        splits = description.splits
        overview = Section("Splits")
        overview.tables.append(self.split_table(description))
        overview.notes += description.notes
        sections = [overview]
        labels = self.label_section(splits, plots)
        if labels is not None:
            sections.append(labels)
        sections.append(self.length_section(description, plots))
        sections += self.extra_sections(description, plots)
        sections.append(duplicate_section(splits))
        return sections

    def split_table(self, description: Description) -> Table:
        """Examples per split (each task names and counts its own)."""
        rows = [[s.name, s.source, s.examples, "yes" if s.labelled else "no"] for s in description.splits]
        return Table("Examples per split", ["split", "file", "examples", "labelled"], rows)

    def label_section(self, splits: list[SplitStats], plots: bool) -> Section | None:
        """The label distribution, when the task has labels."""
        return label_section(splits, plots, "Labels", "label")

    def length_section(self, description: Description, plots: bool) -> Section:
        """Characters and tokens per example, and the share over each limit."""
        section = Section("Lengths")
        rows = [[s.name, *s.chars.summary()] for s in description.splits]
        section.tables.append(Table("Characters per example", ["split", "min", "mean", "median", "p95", "max"], rows))
        add_token_tables(section, [(s.name, s.tokens) for s in description.splits], description.counter)
        if plots:
            section.plots.append(length_plot("lengths", f"Example lengths ({description.counter})",
                                             [(s.name, s.tokens) for s in description.splits]))
        return section


def add_token_tables(section: Section, rows: list[tuple[str, Lengths]], counter: str, what: str = "example",
                     packed: bool = False) -> None:
    """The token-length table and the share above each limit, for named :class:`Lengths` (``packed``:
    pretraining's documents, which are cut into fixed-length blocks rather than truncated)."""
    sampled = not all(lengths.exact for _, lengths in rows)
    section.tables.append(Table(f"Tokens per {what} ({counter})", ["split", "min", "mean", "median", "p95", "max"],
                                [[name, *lengths.summary()] for name, lengths in rows],
                                note="median and p95 from a random sample of "
                                     f"{RESERVOIR:,} values" if sampled else ""))
    title = (f"Longer than a block ({counter}): spread over several blocks in training" if packed
             else f"Longer than the limit ({counter}): truncated or windowed in training")
    section.tables.append(Table(title, ["split", *(f"> {limit}" for limit in LENGTH_LIMITS)],
                                [[name, *(f"{percent(lengths.above[limit], lengths.count)} ({lengths.above[limit]:,})"
                                          for limit in LENGTH_LIMITS)] for name, lengths in rows],
                                note="pretraining packs documents into blocks of pretrain.seq_len tokens; nothing "
                                     "is cut off" if packed else ""))


def length_plot(name: str, title: str, rows: list[tuple[str, Lengths]]) -> Plot:
    """Histograms of lengths, one panel per split, with the limits marked."""
    from kiln.html import new_figure, png_bytes

    figure = new_figure(7.5, 1.0 + 1.9 * len(rows))
    axes = figure.subplots(len(rows), 1, squeeze=False, sharex=True)[:, 0]
    for axis, (split, lengths) in zip(axes, rows, strict=True):
        _histogram(axis, lengths.sample)
        axis.set_ylabel(split)
    axes[-1].set_xlabel("tokens (dashed: 128 / 256 / 512)")
    figure.suptitle(title)
    return Plot(name, title, png_bytes(figure))


def label_section(splits: list[SplitStats], plots: bool, title: str, what: str,
                  counts: dict[str, Counter] | None = None) -> Section | None:
    """A distribution table (one column per split: count and share), the imbalance ratio per split
    and, with ``plots``, grouped bars. ``counts``: split -> Counter (default: the splits' labels)."""
    counts = counts if counts is not None else {s.name: s.labels for s in splits if s.labels}
    counts = {name: counter for name, counter in counts.items() if counter}
    if not counts:
        return None
    names = sorted({key for counter in counts.values() for key in counter},
                   key=lambda key: (-sum(c[key] for c in counts.values()), key))
    section = Section(title)
    rows = []
    for key in names:
        rows.append([key, *(f"{counter[key]:,} ({percent(counter[key], sum(counter.values()))})"
                            for counter in counts.values())])
    imbalance = ", ".join(f"{split} {max(c.values()) / min(c.values()):.2f}" for split, c in counts.items())
    section.tables.append(Table(f"{what.capitalize()} distribution", [what, *counts], rows,
                                note=f"imbalance (largest / smallest {what} count): {imbalance}"))
    if plots:
        shown = names[:40]
        series = {split: [100 * counter[key] / sum(counter.values()) for key in shown]
                  for split, counter in counts.items()}
        section.plots.append(_grouped_bars(f"{what.capitalize()} distribution", f"{what.replace(' ', '_')}s",
                                           shown, series, "% of the split"))
    return section


def duplicate_section(splits: list[SplitStats]) -> Section:
    """Duplicates within each split and shared between splits (leakage)."""
    section = Section("Duplicates and leakage")
    estimated = any(s.exact.level or s.normal.level for s in splits)
    section.tables.append(Table(
        "Duplicates within a split", ["split", "exact", "normalised", "examples"],
        [[s.name, f"{s.exact.duplicates:,} ({percent(s.exact.duplicates, s.examples)})",
          f"{s.normal.duplicates:,} ({percent(s.normal.duplicates, s.examples)})",
          " | ".join(s.normal.examples or s.exact.examples)] for s in splits],
        note="an example counts once per earlier copy; normalised: lowercased, punctuation and whitespace "
             "collapsed" + ("; estimated from a sample by hash" if estimated else "")))
    rows = []
    for split in splits:
        for other, (exact, normal) in split.overlaps.items():
            rows.append([f"{split.name} in {other}", f"{exact.count:,} ({percent(exact.count, split.examples)})",
                         f"{normal.count:,} ({percent(normal.count, split.examples)})",
                         " | ".join(normal.examples or exact.examples)])
    if rows:
        section.tables.append(Table("Across splits (leakage)", ["examples of", "exact", "normalised", "examples"],
                                    rows, note="examples of the first split whose text also occurs in the second"))
    return section


# -- per task ----------------------------------------------------------------------------------
class SequenceDescriber(Describer):
    """``sequence`` and ``sentence-pair``: labels (or regression scores) and the texts."""

    def inputs(self, example: dict) -> tuple[str, ...]:
        return tuple(example["texts"])

    def label(self, example: dict) -> str | None:
        return example["label"]

    def label_section(self, splits: list[SplitStats], plots: bool) -> Section | None:
        if self.task.state.get("problem_type") != "regression":
            return super().label_section(splits, plots)
        section = Section("Scores (regression)")
        rows = []
        for split in splits:
            scores = Lengths()
            for label, count in split.labels.items():
                try:
                    score = float(label)
                except (TypeError, ValueError):
                    continue  # not a number: the data checks list it as a finding
                for _ in range(count):
                    scores.add(score)
            rows.append([split.name, *scores.summary()])
        section.tables.append(Table("Label scores", ["split", "min", "mean", "median", "p95", "max"], rows))
        return section


class TokenDescriber(Describer):
    """``token``: tags, entities per type, and tagging-scheme problems with the word's own line."""

    def inputs(self, example: dict) -> tuple[str, ...]:
        return (" ".join(example["words"]),)

    expect_b = True  # chunks should start with B- (IOB2, BIOES; IOB1 data mostly starts them with I-)

    def add_extra(self, split: SplitStats, dataset: Any, findings: Findings) -> None:
        from kiln.metrics.tagging import entities

        if split.name == "train":
            self.expect_b = self.starts_with_b(dataset.examples)
        tags: Counter = Counter()
        kinds: Counter = Counter()
        words = 0
        for example in dataset.examples:
            words += len(example["words"])
            if example["tags"] is None:
                continue
            tags.update(example["tags"])
            kinds.update(kind for kind, _, _ in entities(example["tags"]))
            self.check_scheme(example, dataset.path, findings)
        split.labels = tags
        split.extra.update(entities=kinds, words=words)

    @staticmethod
    def starts_with_b(examples: Sequence[dict]) -> bool:
        """Whether most chunks start with ``B-`` (IOB2) rather than ``I-`` (IOB1)."""
        by_b = by_i = 0
        for example in examples:
            previous = "O"
            for tag in example["tags"] or ():
                if tag.startswith("B-"):
                    by_b += 1
                elif tag.startswith("I-") and previous[2:] != tag[2:]:
                    by_i += 1
                previous = tag
        return by_b >= by_i

    def check_scheme(self, example: dict, path: str, findings: Findings) -> None:
        """Tags that are not ``O`` or ``PREFIX-TYPE``, and a chunk that starts inside (``I-PER``
        after ``O`` or another type) in data that otherwise begins chunks with ``B-``."""
        previous = "O"
        for position, tag in enumerate(example["tags"]):
            line = example["lines"][position] if "lines" in example else example["line"]
            prefix, _, kind = tag.partition("-")
            if tag != "O" and not (prefix in ("B", "I", "E", "S") and kind):
                findings.add("unknown tags", f"tag '{tag}' is neither O nor B-/I-/E-/S-TYPE", path, line)
            elif prefix in ("I", "E") and self.expect_b and previous[2:] != kind:
                findings.add("chunks without B-", f"'{tag}' after '{previous}': a chunk that does not start "
                                                  f"with B-{kind}", path, line)
            previous = tag if tag == "O" or "-" in tag else "O"

    def run(self, description: Description, data: Path) -> None:
        super().run(description, data)
        scheme = self.task.state.get("scheme")
        if scheme:
            description.notes.append(f"Tagging scheme: {scheme}, as training detects it from the train split "
                                     "(-c data.tag_scheme=... sets it).")
        if scheme == "iob1" and self.expect_b:
            description.notes.append("Most chunks start with B-, yet some start with I-: training reads the data "
                                     "as IOB1. If it is IOB2, those I- tags are errors (see the findings).")

    def split_table(self, description: Description) -> Table:
        rows = [[s.name, s.source, s.examples, s.extra.get("words", 0), sum(s.extra.get("entities", {}).values()),
                 "yes" if s.labelled else "no"] for s in description.splits]
        return Table("Examples per split", ["split", "file", "sentences", "words", "entities", "labelled"], rows)

    def label_section(self, splits: list[SplitStats], plots: bool) -> Section | None:
        return label_section(splits, plots, "Tags", "tag")

    def extra_sections(self, description: Description, plots: bool) -> list[Section]:
        counts = {s.name: s.extra.get("entities", Counter()) for s in description.splits}
        section = label_section(description.splits, plots, "Entities", "entity type", counts)
        return [section] if section else []


class QuestionAnsweringDescriber(Describer):
    """``qa``: where answers start, how many fall beyond the first window, unanswerable questions."""

    def inputs(self, example: dict) -> tuple[str, ...]:
        return (example["question"], example["context"])

    def add_extra(self, split: SplitStats, dataset: Any, findings: Findings) -> None:
        data = self.task.settings
        answered = [ex for ex in dataset.examples if ex["answers"]]
        starts = Lengths()
        beyond = 0
        questions = self.counter.count([(ex["question"],) for ex in answered], special=False)
        befores = self.counter.count([(ex["context"][:ex["answers"][0][1]],) for ex in answered], special=False)
        ends = self.counter.count([(ex["context"][:ex["answers"][0][1] + len(ex["answers"][0][0])],)
                                   for ex in answered], special=False)
        specials = 3 if self.counter.backend is not None else 0  # [CLS] question [SEP] context [SEP]
        for question, before, end in zip(questions, befores, ends, strict=True):
            starts.add(before)
            if min(question, data.max_query_length) + end + specials > data.window:
                beyond += 1
        split.extra.update(
            starts=starts, beyond=beyond, answered=len(answered),
            unanswerable=sum(1 for ex in dataset.examples if ex.get("impossible")),
            contexts=len({ex["context"] for ex in dataset.examples}))

    def split_table(self, description: Description) -> Table:
        rows = [[s.name, s.source, s.examples, s.extra.get("contexts"), s.extra.get("unanswerable"),
                 "yes" if s.labelled else "no"] for s in description.splits]
        return Table("Questions per split", ["split", "file", "questions", "contexts", "unanswerable", "labelled"],
                     rows)

    def extra_sections(self, description: Description, plots: bool) -> list[Section]:
        window = self.task.settings.window
        section = Section("Answers")
        rows = [[s.name, s.extra["answered"], *s.extra["starts"].summary(),
                 f"{percent(s.extra['beyond'], s.extra['answered'])} ({s.extra['beyond']:,})"]
                for s in description.splits if s.labelled]
        section.tables.append(Table(f"Answer start ({description.counter} into the context)",
                                    ["split", "answers", "min", "mean", "median", "p95", "max", f"beyond {window}"],
                                    rows, note=f"beyond {window}: the answer ends outside the first {window}-token "
                                               "window (question and context; qa.window), so only a later, "
                                               "overlapping window holds it"))
        if plots:
            section.plots.append(length_plot("answer_starts", f"Answer start ({description.counter})",
                                             [(s.name, s.extra["starts"]) for s in description.splits if s.labelled]))
        return [section]


class GenerationDescriber(Describer):
    """``generation``: source and target lengths, their ratio, empty and missing targets."""

    def inputs(self, example: dict) -> tuple[str, ...]:
        return (example["source"],)

    def add_extra(self, split: SplitStats, dataset: Any, findings: Findings) -> None:
        examples = dataset.examples
        targets = [ex for ex in examples if ex["target"] is not None]
        target_tokens = Lengths(LENGTH_LIMITS)
        ratios = Lengths()
        sources = self.counter.count([(ex["source"],) for ex in targets])
        for count, source in zip(self.counter.count([(ex["target"],) for ex in targets]), sources, strict=True):
            target_tokens.add(count)
            ratios.add(count / max(source, 1))
        split.extra.update(targets=target_tokens, ratios=ratios, missing=len(examples) - len(targets),
                           empty=self.empty_targets(dataset.path, findings) if split.labelled else 0)

    def empty_targets(self, path: str, findings: Findings) -> int:
        """Rows with a blank target, which training skips: every one, with its line (the labelled
        read drops them, so the file is read once more, keeping every row)."""
        try:
            everything = read_tolerant(self.task, Path(path), Findings(), labelled=False)
        except KilnError:
            return 0
        empty = [ex for ex in everything.examples if ex["target"] is not None and not ex["target"].strip()]
        for example in empty:
            findings.add("empty targets", "empty target (training skips this row)", path, example["line"])
        return len(empty)

    def split_table(self, description: Description) -> Table:
        rows = [[s.name, s.source, s.examples, s.extra.get("empty"), s.extra.get("missing")]
                for s in description.splits]
        return Table("Examples per split", ["split", "file", "pairs", "empty targets (skipped)", "no target"], rows,
                     note="no target: a source alone, which trains a language model on the source")

    def length_section(self, description: Description, plots: bool) -> Section:
        section = super().length_section(description, plots)
        rows = [(f"{s.name} target", s.extra["targets"]) for s in description.splits if s.extra["targets"].count]
        if rows:
            add_token_tables(section, rows, description.counter, "target")
            section.tables.append(Table("Target / source length (tokens)", ["split", "min", "mean", "median", "p95",
                                                                             "max"],
                                        [[s.name, *s.extra["ratios"].summary()] for s in description.splits
                                         if s.extra["ratios"].count]))
            if plots:
                section.plots.append(length_plot("target_lengths", f"Target lengths ({description.counter})", rows))
        return section


class CorpusDescriber(Describer):
    """``mlm``, ``clm``, ``span``: a corpus, streamed; documents, tokens, top tokens, duplicates."""

    def run(self, description: Description, data: Path) -> None:
        files = self.task.find_splits(data)
        paragraphs = self.task.settings.paragraphs
        if "validation" not in files:
            fraction = self.task.config.data.validation_fraction
            description.notes.append(f"No validation file: training holds out {fraction:.0%} of the documents "
                                     "(data.validation_fraction).")
        description.notes.append("Documents: " + ("blank-line-separated paragraphs" if paragraphs else
                                                  "one per non-blank line") + " (pretrain.paragraphs).")
        earlier: list[SplitStats] = []
        for name in SPLITS:
            if name not in files:
                continue
            split = SplitStats(name, ", ".join(str(f) for f in files[name]))
            documents = corpus_documents(files[name], paragraphs, description.findings)
            describe_documents(split, (text for _, _, text in documents), self.counter, earlier)
            description.splits.append(split)
            earlier.append(split)

    def sections(self, description: Description, plots: bool) -> list[Section]:
        splits = description.splits
        overview = Section("Splits")
        rows = []
        for s in splits:
            tokens, chars = s.extra["tokens"], s.chars.total
            rows.append([s.name, s.source, s.examples, int(chars), tokens, tokens / chars if chars else None])
        overview.tables.append(Table("Documents per split", ["split", "files", "documents", "characters",
                                                             "tokens", "tokens per character"], rows))
        overview.notes += description.notes
        lengths = Section("Lengths")
        lengths.tables.append(Table("Characters per document", ["split", "min", "mean", "median", "p95", "max"],
                                    [[s.name, *s.chars.summary()] for s in splits]))
        add_token_tables(lengths, [(s.name, s.tokens) for s in splits], description.counter, "document", packed=True)
        if plots:
            lengths.plots.append(length_plot("lengths", f"Document lengths ({description.counter})",
                                             [(s.name, s.tokens) for s in splits]))
        top = Section("Most frequent tokens")
        for s in splits:
            counts: TopTokens = s.extra["top"]
            total = s.extra["tokens"]
            common = counts.counts.most_common(20)
            top.tables.append(Table(f"{s.name}: top 20 of {len(counts.counts):,}{'+' if counts.pruned else ''} "
                                    "distinct tokens", ["token", "count", "share"],
                                    [[token, count, percent(count, total)] for token, count in common],
                                    note="counts kept for the most frequent tokens only" if counts.pruned else ""))
            if plots and common:
                top.plots.append(_grouped_bars(f"{s.name}: most frequent tokens", f"top_tokens_{s.name}",
                                               [t for t, _ in common], {s.name: [c for _, c in common]}, "count"))
        return [overview, lengths, top, duplicate_section(splits)]


def describe_documents(split: SplitStats, documents: Iterable[str], counter: TokenCounter,
                       earlier: Sequence[SplitStats] = ()) -> SplitStats:
    """Add a stream of documents to ``split`` in memory bounded by the batch size and the caps of
    its summaries, whatever the number of documents."""
    top = split.extra.setdefault("top", TopTokens())
    split.extra.setdefault("tokens", 0)
    batch: list[str] = []
    chars = 0

    def flush() -> None:
        for parts in counter.tokens(batch):
            count = 0
            for part in parts:
                count += len(part)
                top.update(part)
            split.tokens.add(count)
            split.extra["tokens"] += count
        batch.clear()

    for text in documents:
        split.examples += 1
        split.chars.add(len(text))
        split.add_text(text, earlier)
        batch.append(text)
        chars += len(text)
        if len(batch) >= TOKENIZE_BATCH or chars >= CORPUS_BATCH_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    return split


def corpus_documents(files: Sequence[Path], paragraphs: bool, findings: Findings) -> Iterator[tuple[Path, int, str]]:
    """The documents training reads (:func:`kiln.data.corpus.iter_documents`), streaming with a
    progress bar, except that a bad line (not UTF-8, bad JSON) is a finding and is skipped, where
    training stops at it."""
    from kiln.data.corpus import iter_documents

    def finding(err: KilnError) -> None:
        findings.add("bad rows" if err.line else "unreadable files",
                     err.message + ("; skipped" if err.line else ""), err.path, err.line)

    sizes = [f.stat().st_size for f in files if f.is_file()]
    with progress(sum(sizes) or None, "B", "reading") as bar:
        yield from iter_documents(files, paragraphs, on_error=finding, on_bytes=bar.update)


# A task's kind of data (its `describer`) -> what reads and summarises it.
DESCRIBERS: dict[str, type[Describer]] = {
    "labelled-text": SequenceDescriber,
    "tagged-words": TokenDescriber,
    "questions": QuestionAnsweringDescriber,
    "parallel-text": GenerationDescriber,
    "corpus": CorpusDescriber,
}
