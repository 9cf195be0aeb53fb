"""Token tagging (NER, POS, chunking): one label per word.

The first sub-token of each word carries its label; the others are ignored in the loss. Sentences
longer than the model allows are cut into windows that overlap by half; every word is predicted
exactly once, from the window in which it is most central, so no word is ever dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import skip_empty
from kiln.data.tables import decoded_lines, jsonl_objects, parse_columns
from kiln.errors import KilnError, MissingLabels
from kiln.tasks.base import CardFacts, Dataset, Form, Task, config_labels, pad_inputs, shorten

CONLL_SUFFIXES = (".conll", ".txt", ".iob", ".bio")
TAG_KEYS = ("labels", "tags", "ner_tags")


def windows(length: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` sub-token windows of at most ``size`` covering ``length``, overlapping by half."""
    if length <= size:
        return [(0, length)]
    step = max(1, size // 2)
    spans = []
    start = 0
    while True:
        end = min(start + size, length)
        spans.append((end - size, end) if end == length else (start, end))
        if end == length:
            return spans
        start += step


def owner_window(position: int, spans: Sequence[tuple[int, int]]) -> int:
    """Index of the window in which ``position`` is farthest from an edge (most central)."""
    best, best_margin = 0, -1
    for index, (start, end) in enumerate(spans):
        if start <= position < end:
            margin = min(position - start, end - 1 - position)
            if margin > best_margin:
                best, best_margin = index, margin
    return best


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one text ([CLS] … [SEP], <s> … </s>)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


@dataclass
class TokenSettings:
    """Token classification (NER, POS)."""

    # Where kiln 0.1 kept these: saved runs, YAML files and -c still take the old keys.
    formerly: ClassVar[dict[str, str]] = {"label_names": "data.label_names", "tag_scheme": "data.tag_scheme"}

    label_names: list = setting([], "Label names for integer tags in JSONL token data (id -> name).")
    tag_scheme: str = setting(
        "auto", "Tagging scheme of token labels; auto detects it.", choices=("auto", "iob1", "iob2", "bioes")
    )


class TokenTask(Task):
    """Tag every word of a pre-tokenized sentence."""

    name: ClassVar[str] = "token"
    settings_class: ClassVar[type | None] = TokenSettings
    section: ClassVar[str] = "token"
    suffixes: ClassVar[tuple[str, ...]] = (*CONLL_SUFFIXES, ".tsv", ".jsonl")
    auto_model: ClassVar[str] = "AutoModelForTokenClassification"
    main_metric: ClassVar[str] = "f1"
    pipeline_tag: ClassVar[str] = "token-classification"
    request_forms: ClassVar[tuple[Form, ...]] = (
        Form(("tokens",), word_list="tokens", convert=lambda item: list(item["tokens"])),)
    string_means: ClassVar[str] = "a sentence, split into words at whitespace"
    prediction_fields: ClassVar[dict[str, type] | None] = {"entity_group": str, "score": float, "word": str,
                                                           "start": int, "end": int}
    predictions_per_input: ClassVar[str] = "list"
    describer: ClassVar[str] = "tagged-words"
    demo: ClassVar[dict[str, str]] = {"input": "text", "label": "Sentence", "hint": "words", "render": "entities"}
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        return CardFacts(cls.auto_model, cls.pipeline_tag, config_labels(hf_config))

    @property
    def labels(self) -> list[str]:
        return self.state.get("labels", [])

    # -- reading -----------------------------------------------------------------------------
    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        suffix = Path(str(path)).suffix.lower()
        lines = decoded_lines(path, stream)
        if not any(text.strip() for _, text in lines):
            raise KilnError("file is empty", path, 1 if lines else None)
        if stream is not None:  # stdin: one sentence per line, words separated by spaces
            examples, fmt = self._read_classy(path, lines, labelled=False), "tsv"
        elif suffix in CONLL_SUFFIXES:
            examples, fmt = self._read_conll(path, lines, labelled), "conll"
        elif suffix == ".jsonl":
            examples, fmt = self._read_jsonl(path, lines, labelled), "jsonl"
        else:
            examples, fmt = self._read_classy(path, lines, labelled), "tsv"
        if not examples:
            raise KilnError("no sentences found", path)
        if labelled:  # predict keeps every sentence: its output lines up with the input
            examples, _ = skip_empty(path, examples, self._empty)
        return Dataset(str(path), examples, extras={"format": fmt})

    @staticmethod
    def _empty(example: dict) -> str | None:
        """Why a labelled sentence has nothing to learn from: no (non-blank) token."""
        return None if any(word.strip() for word in example["words"]) else "an empty token sequence"

    def _read_conll(self, path: str | Path, lines: list[tuple[int, str]], labelled: bool) -> list[dict]:
        column = parse_columns(self.config.data.columns).get("tag", -1)
        examples: list[dict] = []
        words: list[str] = []
        tags: list[str] = []
        raw: list[str] = []
        numbers: list[int] = []  # each word's own line, for errors about its tag

        def flush() -> None:
            if words:
                examples.append({"words": list(words), "tags": list(tags) if labelled else None,
                                 "line": numbers[0], "lines": list(numbers), "raw": list(raw)})
            words.clear()
            tags.clear()
            raw.clear()
            numbers.clear()

        for number, text in lines:
            if not text.strip() or text.startswith("-DOCSTART-"):
                flush()
                continue
            cells = text.split()
            if labelled:
                if len(cells) < 2:  # on the first word: a file of words alone, i.e. without tags
                    raise (KilnError if examples or words else MissingLabels)(
                        "expected a word and a tag separated by whitespace", path, number)
                if not isinstance(column, int) or not -len(cells) <= column < len(cells):
                    raise KilnError(f"--columns tag={column}: no such column (0-based)", path, number)
                tags.append(cells[column])
            words.append(cells[0])
            raw.append(text)
            numbers.append(number)
        flush()
        return examples

    def _read_classy(self, path: str | Path, lines: list[tuple[int, str]], labelled: bool) -> list[dict]:
        examples: list[dict] = []
        for number, text in lines:
            if not text.strip():
                continue
            parts = text.split("\t")
            words = parts[0].split()
            tags = parts[1].split() if len(parts) > 1 else None
            if labelled:
                if tags is None:
                    raise (KilnError if examples else MissingLabels)("expected tokens, a tab, then labels",
                                                                     path, number)
                if len(tags) != len(words):
                    raise KilnError(f"{len(words)} tokens but {len(tags)} labels", path, number)
            examples.append({"words": words, "tags": tags if labelled else None, "line": number})
        return examples

    def _read_jsonl(self, path: str | Path, lines: list[tuple[int, str]], labelled: bool) -> list[dict]:
        names = self.state.get("label_names") or self.settings.label_names
        examples: list[dict] = []
        for number, obj in jsonl_objects(path, lines):
            words = obj.get("tokens")
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise KilnError("expected a 'tokens' list of strings", path, number)
            key = next((k for k in TAG_KEYS if k in obj), None)
            tags = None
            if key is not None:
                tags = [self._tag_name(t, names, path, number) for t in obj[key]]
                if len(tags) != len(words):
                    raise KilnError(f"{len(words)} tokens but {len(tags)} {key}", path, number)
            elif labelled:
                raise (KilnError if examples else MissingLabels)(f"no labels: expected one of {', '.join(TAG_KEYS)}",
                                                                 path, number)
            examples.append({"words": words, "tags": tags if labelled else None, "line": number, "obj": obj})
        return examples

    @staticmethod
    def _tag_name(tag: Any, names: Sequence[str], path: str | Path, line: int) -> str:
        if isinstance(tag, str):
            return tag
        if isinstance(tag, int) and not isinstance(tag, bool):
            if not names:
                raise KilnError("integer tags need the label list: -c data.label_names=[O,B-PER,...]", path, line)
            if not 0 <= tag < len(names):
                raise KilnError(f"tag id {tag} is outside data.label_names", path, line)
            return names[tag]
        raise KilnError(f"a tag must be a string or an integer, got {tag!r}", path, line)

    def parse_input(self, item: Any, line: int) -> Any:
        words = list(item) if isinstance(item, (list, tuple)) else str(item).split()
        if not words:
            raise KilnError("empty sentence", "<input>", line)
        return {"words": words, "tags": None, "line": line}

    def example_input(self, example: dict) -> str | None:
        """The sentence as its words joined by spaces (the form stdin and ``predict`` take, and the
        text the entities' offsets point into), its first words when it is long."""
        words = [word for word in example["words"] if word.strip()]
        if any(len(word.split()) != 1 for word in words):  # a word with a space would become two
            return None
        return shorten(" ".join(words)) or None

    def texts(self, dataset: Dataset) -> Iterator[str]:
        for example in dataset.examples:
            yield " ".join(example["words"])

    def fit(self, train: Dataset) -> None:
        from kiln.metrics.tagging import detect_scheme

        sentences = [ex["tags"] for ex in train.examples]
        distinct = {tag for tags in sentences for tag in tags}
        self.state["labels"] = sorted(distinct, key=lambda t: (t != "O", t.partition("-")[2], t))
        scheme = self.settings.tag_scheme
        self.state["scheme"] = detect_scheme(sentences) if scheme == "auto" else scheme
        if self.settings.label_names:
            self.state["label_names"] = list(self.settings.label_names)

    def check(self, dataset: Dataset) -> None:
        known = set(self.labels)
        for ex in dataset.examples:
            for position, tag in enumerate(ex["tags"] or ()):
                if tag not in known:
                    # CoNLL has a line per word: point at the tag's own line, not the sentence's first.
                    line = ex["lines"][position] if "lines" in ex else ex["line"]
                    raise KilnError(f"tag '{tag}' never appears in the training data", dataset.path, line)

    # -- model -------------------------------------------------------------------------------
    def head_description(self, model: Any) -> str:
        return f"tagging head: {len(self.labels)} tags"

    def model_kwargs(self) -> dict:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    # -- features and batches ----------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        pre = tokenizer.backend_tokenizer.pre_tokenizer
        # Byte-level BPE marks a word start with a leading space; give every word one.
        prefix = " " if pre is not None and "ByteLevel" in repr(pre) else ""
        flat = [prefix + word for ex in dataset.examples for word in ex["words"]]
        pieces = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        prefix_ids, suffix_ids = special_affixes(tokenizer)
        budget = max_length - len(prefix_ids) - len(suffix_ids)
        index = {label: i for i, label in enumerate(self.labels)}
        features = []
        cursor = 0
        for number, ex in enumerate(dataset.examples):
            ids: list[int] = []
            firsts: list[int] = []  # first sub-token position of each word (-1: no sub-tokens)
            for word_pieces in pieces[cursor:cursor + len(ex["words"])]:
                firsts.append(len(ids) if word_pieces else -1)
                ids.extend(word_pieces)
            cursor += len(ex["words"])
            spans = windows(len(ids), budget)
            owned: list[list[tuple[int, int]]] = [[] for _ in spans]
            for word, first in enumerate(firsts):
                if first >= 0:
                    window = owner_window(first, spans)
                    owned[window].append((word, first - spans[window][0]))
            for window, (start, end) in enumerate(spans):
                input_ids = [*prefix_ids, *ids[start:end], *suffix_ids]
                positions = [(word, position + len(prefix_ids)) for word, position in owned[window]]
                feature = {"input_ids": input_ids, "example": number, "words": positions}
                if ex["tags"] is not None:
                    labels = [-100] * len(input_ids)
                    for word, position in positions:
                        labels[position] = index.get(ex["tags"][word], -100)
                    feature["labels"] = labels
                features.append(feature)
        return features

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        return pad_inputs(features, pad_id, per_token={"labels": -100})

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits.float()  # (B, T, num_labels)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                               ignore_index=-100)

    def loss_units(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        lengths = batch["attention_mask"].sum(-1).tolist()
        logits = outputs.logits.float().cpu().numpy()
        return [row[:n] for row, n in zip(logits, lengths, strict=True)]

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        predictions = [[("O" if "O" in self.labels else self.labels[0], 0.0)] * len(ex["words"])
                       for ex in dataset.examples]
        for logits, feature in zip(outputs, features, strict=True):
            rows = predictions[feature["example"]]
            for word, position in feature["words"]:
                scores = np.exp(logits[position] - logits[position].max())
                scores /= scores.sum()
                best = int(scores.argmax())
                rows[word] = (self.labels[best], float(scores[best]))
        return predictions

    def metric_names(self) -> list[str]:
        return ["precision", "recall", "f1", "accuracy", *super().metric_names()]

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.tagging import tagging_metrics

        gold = [ex["tags"] for ex in dataset.examples]
        return tagging_metrics(gold, [[tag for tag, _ in sentence] for sentence in predictions])

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        """HF token-classification pipeline output as with ``aggregation_strategy="first"``: a word's
        tag and score are its first sub-token's, an entity's score the mean of its words'; offsets
        point into the words joined by single spaces."""
        from kiln.metrics.tagging import entities

        results = []
        for number, sentence in enumerate(predictions):
            words = dataset.examples[number]["words"]
            starts, position = [], 0
            for word in words:
                starts.append(position)
                position += len(word) + 1
            groups = []
            for kind, first, last in entities([tag for tag, _ in sentence]):
                groups.append({
                    "entity_group": kind,
                    "score": float(np.mean([score for _, score in sentence[first:last + 1]])),
                    "word": " ".join(words[first:last + 1]),
                    "start": starts[first],
                    "end": starts[last] + len(words[last]),
                })
            results.append(groups)
        return results

    def write(self, dataset: Dataset, predictions: list[Any], stream: TextIO) -> None:
        fmt = dataset.extras.get("format", "conll")
        for example, sentence in zip(dataset.examples, predictions, strict=True):
            tags = [tag for tag, _ in sentence]
            if fmt == "jsonl":
                obj = dict(example.get("obj") or {"tokens": example["words"]})
                obj["predictions"] = tags
                stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
            elif fmt == "tsv":
                stream.write(" ".join(example["words"]) + "\t" + " ".join(tags) + "\n")
            else:
                raw = example.get("raw") or example["words"]
                stream.write("".join(f"{line} {tag}\n" for line, tag in zip(raw, tags, strict=True)) + "\n")
