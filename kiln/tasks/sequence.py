"""Sequence classification/regression of one text (``sequence``) or a pair (``sentence-pair``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import skip_empty
from kiln.data.tables import parse_columns, read_table, select_columns
from kiln.errors import KilnError
from kiln.tasks.base import CardFacts, Dataset, Form, Task, config_labels, pad_inputs

LABEL_ALIASES = ("label", "labels", "score", "target", "class", "gold_label", "quality")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def refuse_mixed_labels(examples: Sequence[dict], path: str | Path, majority: bool = True) -> None:
    """Under ``problem_type: auto``, refuse labels that mix numbers and non-numbers when the
    non-numbers look like mistakes in a numeric column, at the first non-numeric label's line.

    - Any fractional number (``3.8``): the column is a regression score, so every label must be one.
    - Integers only, and they are more than half of the labels: integer classes with a stray value.
    - Otherwise (non-numbers are at least half) the labels are class names, some of them digits.

    Without this rule one typo silently turns a regression into a many-class classification, or
    adds a class of one row. ``problem_type: classification`` accepts any mix deliberately.
    ``majority=False`` applies the first rule only (a part of a file may tip the majority).
    """
    numbers = [ex for ex in examples if _is_float(ex["label"])]
    others = [ex for ex in examples if not _is_float(ex["label"])]
    if not numbers or not others:
        return
    bad = others[0]
    if any(not _is_int(ex["label"]) for ex in numbers):
        raise KilnError(f"label '{bad['label']}' is not a number, but the other labels are (regression); "
                        "fix this row", path, bad["line"])
    if majority and len(numbers) * 2 > len(examples):
        raise KilnError(f"label '{bad['label']}' is not a number, but {len(numbers)} of the "
                        f"{len(examples)} labels are integer classes; fix this row, or set "
                        "-c sequence.problem_type=classification if it is a class", path, bad["line"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class SequenceSettings:
    """Text classification and regression (sequence, sentence-pair)."""

    formerly: ClassVar[str] = "data"  # kiln 0.1 kept these under data.*

    problem_type: str = setting(
        "auto", "Classification or regression; auto: float labels mean regression.",
        choices=("auto", "classification", "regression"),
    )


class SequenceTask(Task):
    """Classify (or score) a single text. Labels: strings/ints mean classes, floats regression."""

    name: ClassVar[str] = "sequence"
    settings_class: ClassVar[type | None] = SequenceSettings
    section: ClassVar[str] = "sequence"
    suffixes: ClassVar[tuple[str, ...]] = (".tsv", ".csv", ".jsonl", ".txt")
    auto_model: ClassVar[str] = "AutoModelForSequenceClassification"
    pipeline_tag: ClassVar[str] = "text-classification"
    request_forms: ClassVar[tuple[Form, ...]] = (Form(("text",)),)
    prediction_fields: ClassVar[dict[str, type] | None] = {"label": str, "score": float}
    describer: ClassVar[str] = "labelled-text"
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    demo: ClassVar[dict[str, str]] = {"input": "text", "label": "Text", "render": "labels"}

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        return CardFacts(cls.auto_model, cls.pipeline_tag, config_labels(hf_config))
    text_roles: ClassVar[dict[str, tuple[str, ...]]] = {
        "text": ("text", "sentence", "sequence", "review", "content", "document"),
    }
    example_fields: ClassVar[tuple[str, ...]] = ("text",)

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return "pearson" if self.regression else "accuracy"

    @property
    def regression(self) -> bool:
        return self.state.get("problem_type") == "regression"

    @property
    def labels(self) -> list[str]:
        return self.state.get("labels", [])

    # -- reading -----------------------------------------------------------------------------
    def _roles(self) -> dict[str, tuple[str, ...]]:
        return {**self.text_roles, "label": LABEL_ALIASES}

    def _is_header(self, cells: list[str]) -> bool:
        known = {alias for aliases in self._roles().values() for alias in aliases}
        # The --columns names of the texts: an unlabelled file (MRPC's test.tsv) lacks the label's.
        named = {c.lower() for role, c in parse_columns(self.config.data.columns).items()
                 if isinstance(c, str) and role != "label"}
        lowered = {c.lower() for c in cells}
        return bool(lowered & known) or bool(named and named <= lowered)

    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        table = read_table(path, self._is_header, stream=stream, fmt="tsv" if stream else None)
        text_roles = list(self.text_roles)
        order = [*text_roles, "label"]
        positional = {len(text_roles): text_roles, len(order): order}
        records = select_columns(
            table, self._roles(), required=order if labelled else text_roles,
            columns=parse_columns(self.config.data.columns), positional=positional,
        )
        examples = []
        for record in records:
            texts = []
            for role in text_roles:
                value = record.get(role)
                if not isinstance(value, str):
                    raise KilnError(f"'{role}' must be a string, got {value!r}", table.path, record["_line"])
                texts.append(value)
            if labelled and not all(text.strip() for text in texts):  # skipped below, label unread
                examples.append({"texts": tuple(texts), "label": None, "line": record["_line"]})
                continue
            label = record.get("label")
            if label is not None and not isinstance(label, str):
                label = str(label) if not isinstance(label, float) else repr(label)
            if labelled and (label is None or not label.strip()):
                raise KilnError("missing label", table.path, record["_line"])
            examples.append({"texts": tuple(texts), "label": label.strip() if label else None,
                             "line": record["_line"]})
        if not labelled:  # predict keeps every row: its output lines up with the input
            return Dataset(str(path), examples, table)
        examples, kept = skip_empty(path, examples, self._empty, table)
        if self.settings.problem_type == "auto" and "problem_type" not in self.state:
            # Before training decides the problem type: a whole file, wherever a hold-out cuts it.
            refuse_mixed_labels(examples, path)
        return Dataset(str(path), examples, kept)

    def _empty(self, example: dict) -> str | None:
        """Why a labelled example has nothing to learn from: a blank text (either one of a pair)."""
        blank = [role for role, text in zip(self.text_roles, example["texts"], strict=True) if not text.strip()]
        return f"an empty {blank[0]}" if blank else None

    def parse_input(self, item: Any, line: int) -> Any:
        parts: list[Any]
        if isinstance(item, dict):
            parts = [item.get(role) for role in self.text_roles]
        elif isinstance(item, (tuple, list)):
            parts = list(item)
        else:
            parts = str(item).split("\t") if len(self.text_roles) > 1 else [str(item)]
        if len(parts) != len(self.text_roles) or not all(isinstance(p, str) for p in parts):
            raise KilnError(f"expected {len(self.text_roles)} tab-separated text(s), got {len(parts)}",
                            "<stdin>", line)
        return {"texts": tuple(parts), "label": None, "line": line}

    def example_input(self, example: dict) -> Any:
        """The text (``sequence``), or ``{"sentence1", "sentence2"}`` (``sentence-pair``)."""
        return super().example_input(dict(zip(self.example_fields, example["texts"], strict=True)))

    def texts(self, dataset: Dataset) -> Iterator[str]:
        for example in dataset.examples:
            yield from example["texts"]

    def fit(self, train: Dataset) -> None:
        """Decide classification vs regression and fix the label order (numeric if all ints)."""
        raw = [ex["label"] for ex in train.examples]
        problem = self.settings.problem_type
        if problem == "auto":
            # read() checked whole files; a hold-out part is checked only for fractions, which a
            # part cannot gain: the majority of one part may differ from the file's.
            refuse_mixed_labels(train.examples, train.path, majority=False)
            floats = all(_is_float(v) for v in raw)
            problem = "regression" if floats and not all(_is_int(v) for v in raw) else "classification"
        self.state["problem_type"] = problem
        if problem == "regression":
            for ex in train.examples:
                if not _is_float(ex["label"]):
                    raise KilnError(f"label '{ex['label']}' is not a number (regression)", train.path, ex["line"])
            self.state["labels"] = ["score"]
            return
        distinct = set(raw)
        ordered = sorted(distinct, key=int) if all(_is_int(v) for v in distinct) else sorted(distinct)
        if len(ordered) < 2:
            raise KilnError(f"training data has a single label '{ordered[0]}'; need at least two classes",
                            train.path)
        self.state["labels"] = ordered

    def check(self, dataset: Dataset) -> None:
        if self.regression:
            for ex in dataset.examples:
                if ex["label"] is not None and not _is_float(ex["label"]):
                    raise KilnError(f"label '{ex['label']}' is not a number, but the training labels are "
                                    "(regression)", dataset.path, ex["line"])
            return
        known = set(self.labels)
        for ex in dataset.examples:
            if ex["label"] is not None and ex["label"] not in known:
                raise KilnError(f"label '{ex['label']}' never appears in the training data "
                                f"(known: {', '.join(self.labels[:10])})", dataset.path, ex["line"])

    def target(self, label: str) -> float | int:
        if self.regression:
            return float(label)
        return self.labels.index(label) if label in self.labels else -100

    # -- model -------------------------------------------------------------------------------
    def head_description(self, model: Any) -> str:
        return "regression head" if self.regression else f"classification head: {len(self.labels)} labels"

    def model_kwargs(self) -> dict:
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression",
                    "id2label": {0: "score"}, "label2id": {"score": 0}}
        return {"num_labels": len(self.labels), "problem_type": "single_label_classification",
                "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    def build_model(self, hf_config: Any) -> Any:
        from kiln.models import first_token_last_layer

        model = super().build_model(hf_config)
        first_token_last_layer(model)
        return model

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        from kiln.models import first_token_last_layer

        model = super().load_model(path, **kwargs)
        first_token_last_layer(model)
        return model

    # -- features and batches ----------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        columns = list(zip(*(ex["texts"] for ex in dataset.examples), strict=True)) if dataset.examples else []
        encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length,
                            return_attention_mask=False)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        features = []
        index = {label: i for i, label in enumerate(self.labels)}
        for i, ex in enumerate(dataset.examples):
            feature = {k: encoded[k][i] for k in keys}
            feature["example"] = i
            if ex["label"] is not None:
                feature["label"] = float(ex["label"]) if self.regression else index.get(ex["label"], -100)
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        import torch

        batch = pad_inputs(features, pad_id)
        if "label" in features[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
        return batch

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits.float()  # (B, num_labels)
        labels = batch["labels"]
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)

    def loss_units(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum()) if not self.regression else int(batch["labels"].numel())

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        predictions = []
        for logits in outputs:
            if self.regression:
                predictions.append({"label": "score", "score": float(logits[0])})
            else:
                probs = _softmax(np.asarray(logits, dtype=np.float64))
                best = int(probs.argmax())
                predictions.append({"label": self.labels[best], "score": float(probs[best]), "id": best})
        return predictions

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.classification import classification_metrics, regression_metrics

        if self.regression:
            gold = [float(ex["label"]) for ex in dataset.examples]
            return regression_metrics(gold, [p["score"] for p in predictions])
        gold_ids = [self.labels.index(ex["label"]) for ex in dataset.examples]
        return classification_metrics(gold_ids, [p["id"] for p in predictions], len(self.labels))

    def metric_names(self) -> list[str]:
        names = ["pearson", "spearman", "mse"] if self.regression else ["accuracy", "f1", "macro_f1", "mcc"]
        return [*names, *super().metric_names()]

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return [{"label": p["label"], "score": p["score"]} for p in predictions]

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        if fmt == "jsonl":
            return {"label": [p["label"] if not self.regression else p["score"] for p in predictions],
                    "score": [p["score"] for p in predictions]}
        name = "prediction"
        return {name: [p["score"] if self.regression else p["label"] for p in predictions]}


class SentencePairTask(SequenceTask):
    """Classify (or score) a pair of texts, e.g. paraphrase, entailment, similarity."""

    name: ClassVar[str] = "sentence-pair"
    text_roles: ClassVar[dict[str, tuple[str, ...]]] = {
        "sentence1": ("sentence1", "sentence_1", "text_a", "premise", "question1", "question", "text1"),
        "sentence2": ("sentence2", "sentence_2", "text_b", "hypothesis", "question2", "sentence", "text2"),
    }
    example_fields: ClassVar[tuple[str, ...]] = ("sentence1", "sentence2")
    request_forms: ClassVar[tuple[Form, ...]] = (
        Form(("sentence1", "sentence2")),
        Form(("text", "text_pair"), convert=lambda item: (item["text"], item["text_pair"])))
    string_means: ClassVar[str] = "the two texts separated by a tab"
    demo: ClassVar[dict[str, str]] = {"input": "pair", "label": "First text", "render": "labels"}
