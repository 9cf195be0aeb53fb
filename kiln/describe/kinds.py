"""What ``kiln describe`` reports for each kind of data a task declares (``Task.describer``):
labelled text, tagged words, questions, parallel text, and corpora. A kind is a shape of data, not a
task: tasks that read alike share one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.describe.reading import (
    CORPUS_BATCH_CHARS,
    LENGTH_LIMITS,
    RESERVOIR,
    SPLITS,
    TOKENIZE_BATCH,
    Description,
    Findings,
    Lengths,
    SplitStats,
    TokenCounter,
    TopTokens,
    progress,
    read_split,
    read_tolerant,
)
from kiln.errors import KilnError
from kiln.html import Plot, Section, Table, percent


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
        add_token_tables(section, [(s.name, s.tokens) for s in description.splits], description.counter,
                         long=self.task.long_inputs)
        if plots:
            section.plots.append(length_plot("lengths", f"Example lengths ({description.counter})",
                                             [(s.name, s.tokens) for s in description.splits]))
        return section


def add_token_tables(section: Section, rows: list[tuple[str, Lengths]], counter: str, what: str = "example",
                     packed: bool = False, long: str = "") -> None:
    """The token-length table and the share above each limit, for named :class:`Lengths` (``packed``:
    pretraining's documents, which are cut into fixed-length blocks rather than truncated; ``long``:
    what training does with the longer ones, as the task says)."""
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
                                     "is cut off" if packed else long))


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
