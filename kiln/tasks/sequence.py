"""Sequence classification/regression of one text (``sequence``) or a pair (``sentence-pair``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import skip_empty
from kiln.data.tables import parse_columns, read_table, select_columns
from kiln.errors import KilnError, MissingLabels
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


# The largest class at least this many times the smallest: accuracy says little, so the best
# checkpoint is picked by macro-F1 unless train.metric names another metric.
IMBALANCE_RATIO = 10
AGGREGATES = ("mean", "max", "first")


@dataclass
class SequenceSettings:
    """Text classification (single- and multi-label) and regression: sequence and sentence-pair."""

    # Where kiln 0.1 kept these: saved runs, YAML files and -c still take the old keys.
    formerly: ClassVar[dict[str, str]] = {"problem_type": "data.problem_type"}

    problem_type: str = setting(
        "auto", "classification, multi_label (several labels per text), or regression; auto: float labels mean "
        "regression, labels holding several ('a|b', a JSON list, several label columns) multi-label.",
        choices=("auto", "classification", "multi_label", "regression"),
    )
    label_separator: str = setting("|", "Multi-label: the separator of several labels in one cell.")
    threshold: float = setting(0.5, "Multi-label: a label is predicted when its probability reaches this.",
                               minimum=0, maximum=1)
    tune_thresholds: bool = setting(
        False, "Multi-label: pick each label's threshold on the validation set (the F1-best), saved with the model.",
        flag="--tune-thresholds")
    class_weights: str = setting(
        "none", "Weigh the loss by class: none, auto (inverse frequency, n / (classes x count); multi-label: "
        "negatives / positives per label), or a file: JSON {label: weight} or TSV lines label<TAB>weight.")
    focal_gamma: float = setting(0.0, "Focal loss: scale each example's loss by (1 - p)^gamma (0: plain "
                                      "cross-entropy; 2 is the paper's).", minimum=0, maximum=10)
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy targets.", minimum=0, maximum=0.99)
    long: str = setting("truncate", "Texts longer than the model's limit: truncate (the start), or window "
                                    "(overlapping windows, each trained with the text's label, their logits "
                                    "aggregated in prediction).", choices=("truncate", "window"))
    window: int = setting(0, "long=window: tokens per window (0: the model's limit, train.max_length).", minimum=0)
    stride: int = setting(128, "long=window: tokens shared by consecutive windows.", minimum=0)
    aggregate: str = setting("mean", "long=window: how a text's window logits combine: mean, max or first.",
                             choices=AGGREGATES)


def _truthy(cell: Any) -> bool | None:
    """A 0/1 label column's cell: True, False, or None when it is neither."""
    text = str(cell).strip().lower()
    return True if text in ("1", "1.0", "true", "yes") else False if text in ("0", "0.0", "false", "no", "") else None


def class_weights_auto(counts: Sequence[int]) -> list[float]:
    """scikit-learn's ``balanced`` weights: ``n / (classes * count)``, so that each class weighs as much
    in the loss as if the classes were equally frequent (a class that never occurs: weight 1)."""
    total, present = sum(counts), sum(1 for c in counts if c)
    return [total / (present * c) if c else 1.0 for c in counts]


def weighted_cross_entropy(logits: Any, labels: Any, weights: Any = None, gamma: float = 0.0,
                           smoothing: float = 0.0) -> Any:
    """Cross-entropy summed over the examples (label -100: left out), each term ``-sum_c w_c q_c log p_c``
    with ``q`` the (smoothed) target and, for ``gamma`` > 0, times the focal factor ``(1 - p_y)^gamma``.
    Without a focal factor it equals ``F.cross_entropy(weight=, label_smoothing=, reduction="sum")``."""
    import torch
    import torch.nn.functional as F

    keep = labels != -100
    logits, labels = logits[keep], labels[keep]
    log_probs = F.log_softmax(logits, dim=-1)
    classes = logits.shape[-1]
    targets = F.one_hot(labels, classes).to(log_probs.dtype) * (1 - smoothing) + smoothing / classes
    per_class = -targets * log_probs
    if weights is not None:
        per_class = per_class * weights.to(log_probs.device)
    losses = per_class.sum(dim=-1)
    if gamma:
        p_true = log_probs.gather(1, labels.unsqueeze(1)).squeeze(1).exp()
        losses = losses * (1 - p_true) ** gamma
    return losses.sum() if len(losses) else torch.zeros((), device=logits.device)


def best_thresholds(probabilities: np.ndarray, gold: np.ndarray, default: float) -> list[float]:
    """Each label's threshold with the best F1 on these examples (ties: the one nearest ``default``)."""
    chosen = []
    for column in range(gold.shape[1]):
        probs, truth = probabilities[:, column], gold[:, column].astype(bool)
        best = (-1.0, 0.0, default)
        for candidate in sorted({default, *probs.tolist()}):
            predicted = probs >= candidate
            tp = int((predicted & truth).sum())
            f1 = 2 * tp / max(int(predicted.sum()) + int(truth.sum()), 1)
            key = (f1, -abs(candidate - default), candidate)
            best = max(best, key)
        chosen.append(float(best[2]))
    return chosen


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class SequenceTask(Task):
    """Classify (or score) a single text. Labels: strings/ints mean classes, floats regression, several
    per text multi-label."""

    name: ClassVar[str] = "sequence"
    settings_class: ClassVar[type | None] = SequenceSettings
    section: ClassVar[str] = "sequence"
    suffixes: ClassVar[tuple[str, ...]] = (".tsv", ".csv", ".jsonl", ".txt")
    auto_model: ClassVar[str] = "AutoModelForSequenceClassification"
    pipeline_tag: ClassVar[str] = "text-classification"
    request_forms: ClassVar[tuple[Form, ...]] = (Form(("text",)),)
    describer: ClassVar[str] = "labelled-text"
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    text_roles: ClassVar[dict[str, tuple[str, ...]]] = {
        "text": ("text", "sentence", "sequence", "review", "content", "document"),
    }
    example_fields: ClassVar[tuple[str, ...]] = ("text",)
    demo_input: ClassVar[tuple[str, str]] = ("text", "Text")

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        notes = ["Multi-label: apply a sigmoid to each logit (transformers' text-classification pipeline does, "
                 "with `top_k=None`); kiln's thresholds are in `kiln.json` (`task_state`)."] \
            if hf_config.get("problem_type") == "multi_label_classification" else []
        return CardFacts(cls.auto_model, cls.pipeline_tag, config_labels(hf_config), notes)

    seen: dict[str, Any] | None = None  # what fit() counted in the training data, for the summary

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        if self.regression:
            return "pearson"
        if self.multi_label:
            return "micro_f1"
        return "macro_f1" if self.state.get("imbalance", 0) >= IMBALANCE_RATIO else "accuracy"

    @property
    def regression(self) -> bool:
        return self.state.get("problem_type") == "regression"

    @property
    def multi_label(self) -> bool:
        return self.state.get("problem_type") == "multi_label"

    @property
    def labels(self) -> list[str]:
        return self.state.get("labels", [])

    # A multi-label prediction is every label's score and the labels chosen, not one label.
    @property
    def prediction_fields(self) -> dict[str, type] | None:  # type: ignore[override]
        return {"labels": list, "scores": list} if self.multi_label else {"label": str, "score": float}

    @property
    def demo(self) -> dict[str, str]:  # type: ignore[override]
        kind, label = self.demo_input
        return {"input": kind, "label": label, "render": "json" if self.multi_label else "labels"}

    @property
    def long_inputs(self) -> str:
        if self.settings.long == "window":
            return f"read in overlapping windows, their logits combined by {self.settings.aggregate} (sequence.long)"
        return "only the start is read; -c sequence.long=window reads a long text in overlapping windows"

    # -- reading -----------------------------------------------------------------------------
    def _columns(self) -> dict[str, Any]:
        columns = parse_columns(self.config.data.columns)
        if "labels" in columns:  # --columns labels=billing,refund,...: one 0/1 column per label
            columns["label"] = columns.pop("labels")
        return columns

    def _roles(self) -> dict[str, tuple[str, ...]]:
        return {**self.text_roles, "label": LABEL_ALIASES}

    def _is_header(self, cells: list[str]) -> bool:
        known = {alias for aliases in self._roles().values() for alias in aliases}
        # The --columns names of the texts: an unlabelled file (MRPC's test.tsv) lacks the label's.
        named = {c.lower() for role, c in self._columns().items() if isinstance(c, str) and role != "label"}
        lowered = {c.lower() for c in cells}
        return bool(lowered & known) or bool(named and named <= lowered)

    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        table = read_table(path, self._is_header, stream=stream, fmt="tsv" if stream else None)
        text_roles = list(self.text_roles)
        order = [*text_roles, "label"]
        positional = {len(text_roles): text_roles, len(order): order}
        columns = self._columns()
        try:
            records = select_columns(table, self._roles(), required=order if labelled else text_roles,
                                     columns=columns, positional=positional)
        except KilnError as err:
            raise self._pair_hint(table, err) from None
        label_columns = self._label_columns(table, columns)
        multi = self._reads_multi_label([record.get("label") for record in records], label_columns)
        if multi and any(isinstance(record.get("label"), list) for record in records):
            bare = next((r for r in records if isinstance(r.get("label"), str)), None)
            if bare is not None:  # one form per file: a bare label among lists is likelier a slip than a set
                raise KilnError(f"label {bare['label']!r} is a single label, but other rows hold lists of labels "
                                f"(multi-label): write it as {json.dumps([bare['label']])}", table.path, bare["_line"])
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
            example = {"texts": tuple(texts), "label": None, "line": record["_line"]}
            if multi:
                example.update(self._label_set(record, label_columns, table.path, labelled))
            else:
                example["label"] = self._single_label(record, table.path, labelled)
            examples.append(example)
        if not labelled:  # predict keeps every row: its output lines up with the input
            return Dataset(str(path), examples, table)
        examples, kept = skip_empty(path, examples, self._empty, table)
        if not multi and self.settings.problem_type == "auto" and "problem_type" not in self.state:
            # Before training decides the problem type: a whole file, wherever a hold-out cuts it.
            refuse_mixed_labels(examples, path)
        return Dataset(str(path), examples, kept)

    @staticmethod
    def _label_columns(table: Any, columns: dict[str, Any]) -> list[str] | None:
        """The label names of ``--columns labels=a,b,...`` (one 0/1 column each), else None."""
        given = columns.get("label")
        if not isinstance(given, list):
            return None
        header = table.header or []
        return [header[c] if isinstance(c, int) and 0 <= c < len(header) else str(c) for c in given]

    def _reads_multi_label(self, labels: list[Any], label_columns: list[str] | None) -> bool:
        """Whether a file's labels are sets: as trained, as set, or (auto) as the file writes them."""
        if "problem_type" in self.state:
            return self.multi_label
        if self.settings.problem_type != "auto":
            return self.settings.problem_type == "multi_label"
        separator = self.settings.label_separator
        return label_columns is not None or any(isinstance(label, list) or (isinstance(label, str) and separator
                                                                            and separator in label)
                                                for label in labels)

    def _label_set(self, record: dict, label_columns: list[str] | None, path: str, labelled: bool) -> dict:
        """A multi-label row's labels (``label`` joins them, for kiln describe); a row with none is
        labelled too (no label applies), unless the file has no label column."""
        line, value = record["_line"], record.get("label")
        if label_columns is not None and isinstance(value, list):
            flags = [_truthy(cell) for cell in value]
            bad = next((cell for cell, flag in zip(value, flags, strict=True) if flag is None), None)
            if bad is not None:
                raise KilnError(f"label column value {bad!r} is not 0 or 1", path, line)
            names = [name for name, flag in zip(label_columns, flags, strict=True) if flag]
        elif isinstance(value, list):
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                raise KilnError(f"a label list holds strings, got {value!r}", path, line)
            names = [str(v).strip() for v in value]
        elif value is None:
            if labelled:
                raise MissingLabels("missing label", path, line)
            return {"label": None, "labels": None}
        elif isinstance(value, str):
            if value.strip().startswith("["):
                raise KilnError(f"label {value!r} looks like a JSON list inside a text cell; write the labels "
                                f"separated by '{self.settings.label_separator}'", path, line)
            names = [part.strip() for part in value.split(self.settings.label_separator)] if value.strip() else []
        else:
            raise KilnError(f"label {value!r} is neither a label nor a list of labels", path, line)
        if any(not name for name in names):
            raise KilnError(f"label {value!r} has an empty label between separators", path, line)
        ordered = tuple(sorted(set(names)))
        return {"label": self.settings.label_separator.join(ordered), "labels": ordered}

    def _single_label(self, record: dict, path: str, labelled: bool) -> str | None:
        label = record.get("label")
        if isinstance(label, list):  # a JSON list in a file read as single-label (or an older model)
            raise KilnError(f"label {label!r} is a list of labels, but the labels are single "
                            f"({self.state.get('problem_type') or self.settings.problem_type}); a multi-label "
                            "file holds lists (or 'a|b') throughout", path, record["_line"])
        if label is not None and not isinstance(label, str):
            label = str(label) if not isinstance(label, float) else repr(label)
        if labelled and (label is None or not label.strip()):
            raise KilnError("missing label", path, record["_line"])
        return label.strip() if label else None

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
        """Decide the problem (classification, multi-label, regression), fix the label order (numeric if
        all ints), and count the labels (class weights, imbalance, the run summary)."""
        problem = self.settings.problem_type
        if problem == "auto":
            problem = "multi_label" if any("labels" in ex for ex in train.examples) else self._auto_problem(train)
        self.state["problem_type"] = problem
        if problem == "regression":
            for ex in train.examples:
                if not _is_float(ex["label"]):
                    raise KilnError(f"label '{ex['label']}' is not a number (regression)", train.path, ex["line"])
            self.state["labels"] = ["score"]
            return
        if problem == "multi_label":
            distinct = {name for ex in train.examples for name in ex.get("labels") or ()}
        else:
            distinct = {ex["label"] for ex in train.examples}
        ordered = sorted(distinct, key=int) if distinct and all(_is_int(v) for v in distinct) else sorted(distinct)
        if len(ordered) < (1 if problem == "multi_label" else 2):
            raise KilnError(f"training data has {'no label' if not ordered else f'a single label {ordered[0]!r}'}; "
                            "need at least two classes", train.path)
        self.state["labels"] = ordered
        # What this run trained on, for its summary (notes); the state keeps only what predicting needs.
        counts = self._label_counts(train)
        self.seen = {"examples": len(train.examples), "counts": counts}
        present = [c for c in counts if c]
        imbalance = round(max(present) / min(present), 2) if problem == "classification" else 0
        if imbalance >= IMBALANCE_RATIO:  # macro-F1 picks the best checkpoint (main_metric)
            self.state["imbalance"] = imbalance
        weights = self._class_weights(counts, len(train.examples))
        if weights is not None:
            self.state["class_weights"] = weights

    def _auto_problem(self, train: Dataset) -> str:
        raw = [ex["label"] for ex in train.examples]
        # read() checked whole files; a hold-out part is checked only for fractions, which a
        # part cannot gain: the majority of one part may differ from the file's.
        refuse_mixed_labels(train.examples, train.path, majority=False)
        floats = all(_is_float(v) for v in raw)
        return "regression" if floats and not all(_is_int(v) for v in raw) else "classification"

    def _label_counts(self, dataset: Dataset) -> list[int]:
        """How many examples carry each label, in label order."""
        index = {label: i for i, label in enumerate(self.labels)}
        counts = [0] * len(self.labels)
        for ex in dataset.examples:
            for name in (ex.get("labels") or ()) if self.multi_label else (ex["label"],):
                if name in index:
                    counts[index[name]] += 1
        return counts

    def _class_weights(self, counts: list[int], examples: int) -> list[float] | None:
        """``sequence.class_weights`` as one weight per label (None: unweighted). Multi-label weights
        are the positives' weight in each label's binary loss."""
        given = self.settings.class_weights.strip()
        if given in ("", "none"):
            return None
        if given == "auto":
            if self.multi_label:  # negatives / positives, as BCEWithLogitsLoss's pos_weight
                return [(examples - c) / c if c else 1.0 for c in counts]
            return class_weights_auto(counts)
        return read_class_weights(Path(given), self.labels)

    def check(self, dataset: Dataset) -> None:
        if self.regression:
            for ex in dataset.examples:
                if ex["label"] is not None and not _is_float(ex["label"]):
                    raise KilnError(f"label '{ex['label']}' is not a number, but the training labels are "
                                    "(regression)", dataset.path, ex["line"])
            return
        known = set(self.labels)
        for ex in dataset.examples:
            names = (ex.get("labels") or ()) if self.multi_label else (() if ex["label"] is None else (ex["label"],))
            unknown = next((name for name in names if name not in known), None)
            if unknown is not None:
                raise KilnError(f"label '{unknown}' never appears in the training data "
                                f"(known: {', '.join(self.labels[:10])})", dataset.path, ex["line"])

    def notes(self) -> list[str]:
        """The label distribution training saw, the class weights, and why the best checkpoint is
        picked by macro-F1 when the classes are imbalanced."""
        if not self.seen:
            return []
        counts = self.seen["counts"]
        # Single-label: each label's share of the examples; multi-label: of the examples carrying it.
        total = self.seen["examples"] if self.multi_label else sum(counts)
        shown = sorted(zip(self.labels, counts, strict=True), key=lambda item: -item[1])
        text = ", ".join(f"{label} {count / max(total, 1):.1%} ({count:,})" for label, count in shown[:8])
        lines = [f"labels    {text}{', …' if len(shown) > 8 else ''}"
                 + (f" of {total:,} examples (multi-label)" if self.multi_label else "")]
        weights = self.state.get("class_weights")
        if weights:
            shown_weights = ", ".join(f"{label} {w:.3g}" for label, w in zip(self.labels[:8], weights, strict=False))
            lines.append(f"weights   {shown_weights}{', …' if len(weights) > 8 else ''} "
                         f"(sequence.class_weights={self.settings.class_weights})")
        ratio = self.state.get("imbalance", 0)
        if ratio >= IMBALANCE_RATIO and not self.config.train.metric:
            lines.append(f"imbalance {ratio:g}:1 (at least {IMBALANCE_RATIO}:1): the best checkpoint is the best "
                         "macro_f1, not accuracy (train.metric picks another)")
        return lines

    # -- model -------------------------------------------------------------------------------
    def head_description(self, model: Any) -> str:
        if self.regression:
            return "regression head"
        return f"{'multi-label ' if self.multi_label else ''}classification head: {len(self.labels)} labels"

    def model_kwargs(self) -> dict:
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression",
                    "id2label": {0: "score"}, "label2id": {"score": 0}}
        problem = "multi_label_classification" if self.multi_label else "single_label_classification"
        return {"num_labels": len(self.labels), "problem_type": problem,
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
        """One feature per example; with ``long=window``, one per window of each example (``example``
        says whose), every window carrying the example's label."""
        columns = [list(c) for c in zip(*(ex["texts"] for ex in dataset.examples), strict=True)] \
            if dataset.examples else []
        if self.settings.long == "window" and columns:
            window, stride = self._window(dataset, tokenizer, max_length)
            encoded = tokenizer(*columns, truncation="only_second" if len(columns) > 1 else True,
                                max_length=window, stride=stride, return_overflowing_tokens=True,
                                return_attention_mask=False)
            owners = list(encoded["overflow_to_sample_mapping"])
        else:
            encoded = tokenizer(*columns, truncation=True, max_length=max_length, return_attention_mask=False)
            owners = list(range(len(dataset.examples)))
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        features = []
        for i, owner in enumerate(owners):
            feature = {k: encoded[k][i] for k in keys}
            feature["example"] = owner
            target = self._target(dataset.examples[owner])
            if target is not None:
                feature["label"] = target
            features.append(feature)
        return features

    def _pair_hint(self, table: Any, err: KilnError) -> KilnError:
        """``err``, or, when a one-text task meets a file whose first row names two texts (GLUE's
        sentence1/sentence2), the task that reads it."""
        row = table.header or (table.rows[0] if table.rows else [])
        first = [str(cell).lower() for cell in (row.keys() if isinstance(row, dict) else row) if isinstance(cell, str)]
        # Names only a pair has (not "sentence" or "question", which one-text files use too).
        pair = {a for aliases in SentencePairTask.text_roles.values() for a in aliases} - {"sentence", "question"}
        named = [cell for cell in first if cell in pair]
        if len(self.text_roles) > 1 or len(named) < 2:
            return err
        return KilnError(f"the columns {', '.join(named)} hold pairs of texts: train them with the sentence-pair "
                         "task (kiln train sentence-pair ...), or map one text with --columns text=NAME",
                         err.path, err.line)

    def _window(self, dataset: Dataset, tokenizer: Any, max_length: int) -> tuple[int, int]:
        """``long=window``'s window and stride, checked: the stride inside the window, and a pair's first
        text leaving room for the second."""
        settings = self.settings
        window = min(settings.window or max_length, max_length)
        specials = tokenizer.num_special_tokens_to_add(pair=len(self.text_roles) > 1)
        if settings.stride >= window - specials:
            raise KilnError(f"setting 'sequence.stride' ({settings.stride}) must be smaller than the window's "
                            f"{window - specials} text tokens (sequence.window {window}, {specials} special)")
        if len(self.text_roles) > 1:  # the window slides over the second text; the first must fit whole
            firsts = tokenizer([ex["texts"][0] for ex in dataset.examples], add_special_tokens=False)["input_ids"]
            for ex, ids in zip(dataset.examples, firsts, strict=True):
                if len(ids) + specials + settings.stride >= window:
                    raise KilnError(f"the first text ({len(ids)} tokens) leaves no room in a {window}-token window "
                                    f"with a stride of {settings.stride}: raise sequence.window or shorten it",
                                    dataset.path, ex["line"])
        return window, settings.stride

    def _target(self, example: dict) -> Any:
        """An example's training target: a class id, a score, or a multi-hot row (None: unlabelled)."""
        if self.multi_label:
            names = example.get("labels")
            if names is None:
                return None
            return [1.0 if label in names else 0.0 for label in self.labels]
        if example["label"] is None:
            return None
        if self.regression:
            return float(example["label"])
        return self.labels.index(example["label"]) if example["label"] in self.labels else -100

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        import torch

        batch = pad_inputs(features, pad_id)
        if "label" in features[0]:
            dtype = torch.long if not (self.regression or self.multi_label) else torch.float32
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=dtype)
        return batch

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch
        import torch.nn.functional as F

        logits = outputs.logits.float()  # (B, num_labels)
        labels = batch["labels"]
        weights = self.state.get("class_weights")
        weights = torch.tensor(weights, dtype=torch.float32, device=logits.device) if weights else None
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
        if self.multi_label:  # the mean over labels of each example, as transformers' BCEWithLogitsLoss
            summed = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weights, reduction="sum")
            return summed / logits.shape[-1]
        return weighted_cross_entropy(logits, labels, weights, self.settings.focal_gamma,
                                      self.settings.label_smoothing)

    def loss_units(self, batch: dict) -> int:
        if self.regression or self.multi_label:
            return len(batch["labels"])
        return int((batch["labels"] != -100).sum())

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        """One prediction per example; the logits of an example's windows aggregated first."""
        grouped: list[list[np.ndarray]] = [[] for _ in dataset.examples]
        for logits, feature in zip(outputs, features, strict=True):
            grouped[feature["example"]].append(np.asarray(logits, dtype=np.float64))
        how = self.settings.aggregate
        predictions = []
        for windows in grouped:
            logits = windows[0] if how == "first" or len(windows) == 1 else \
                np.max(windows, axis=0) if how == "max" else np.mean(windows, axis=0)
            if self.regression:
                predictions.append({"label": "score", "score": float(logits[0])})
            elif self.multi_label:
                predictions.append({"probabilities": _sigmoid(logits)})
            else:
                probs = _softmax(logits)
                best = int(probs.argmax())
                predictions.append({"label": self.labels[best], "score": float(probs[best]), "id": best})
        return predictions

    def _thresholds(self) -> np.ndarray:
        tuned = self.state.get("thresholds")
        return np.asarray(tuned if tuned else [self.settings.threshold] * len(self.labels))

    def _chosen(self, predictions: list[Any]) -> list[list[str]]:
        """Each multi-label prediction's labels at or above their thresholds."""
        thresholds = self._thresholds()
        return [[label for label, on in zip(self.labels, p["probabilities"] >= thresholds, strict=True) if on]
                for p in predictions]

    def calibrate(self, predictions: list[Any], dataset: Dataset) -> None:
        """``--tune-thresholds``: each label's F1-best threshold on the validation predictions."""
        if self.multi_label and self.settings.tune_thresholds and predictions:
            probabilities = np.stack([p["probabilities"] for p in predictions])
            self.state["thresholds"] = best_thresholds(probabilities, self._gold(dataset), self.settings.threshold)

    def _gold(self, dataset: Dataset) -> np.ndarray:
        return np.array([[label in (ex.get("labels") or ()) for label in self.labels] for ex in dataset.examples])

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.classification import classification_metrics, multi_label_metrics, regression_metrics

        if self.regression:
            gold = [float(ex["label"]) for ex in dataset.examples]
            return regression_metrics(gold, [p["score"] for p in predictions])
        if self.multi_label:
            chosen = np.stack([p["probabilities"] for p in predictions]) >= self._thresholds()
            return multi_label_metrics(self._gold(dataset), chosen, self.labels)
        gold_ids = [self.labels.index(ex["label"]) for ex in dataset.examples]
        return classification_metrics(gold_ids, [p["id"] for p in predictions], len(self.labels))

    def metric_names(self) -> list[str]:
        if self.regression:
            names = ["pearson", "spearman", "mse"]
        elif self.multi_label:
            names = ["micro_f1", "macro_f1", "subset_accuracy", *(f"f1/{label}" for label in self.labels)]
        else:
            names = ["accuracy", "f1", "macro_f1", "mcc"]
        return [*names, *super().metric_names()]

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        if self.multi_label:  # the labels chosen, and every label's score as the HF pipeline's top_k=None
            return [{"labels": names,
                     "scores": sorted(({"label": label, "score": float(score)} for label, score in
                                       zip(self.labels, p["probabilities"], strict=True)), key=lambda s: -s["score"])}
                    for p, names in zip(predictions, self._chosen(predictions), strict=True)]
        return [{"label": p["label"], "score": p["score"]} for p in predictions]

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        if self.multi_label:
            chosen = self._chosen(predictions)
            if fmt == "jsonl":
                return {"labels": chosen, "scores": [{label: round(float(s), 6) for label, s in
                                                      zip(self.labels, p["probabilities"], strict=True)}
                                                     for p in predictions]}
            return {"prediction": [self.settings.label_separator.join(names) for names in chosen]}
        if fmt == "jsonl":
            return {"label": [p["label"] if not self.regression else p["score"] for p in predictions],
                    "score": [p["score"] for p in predictions]}
        name = "prediction"
        return {name: [p["score"] if self.regression else p["label"] for p in predictions]}


def read_class_weights(path: Path, labels: list[str]) -> list[float]:
    """Per-label weights from a JSON object ``{label: weight}`` or TSV lines ``label<TAB>weight``; a
    label the file leaves out weighs 1. A label the data never has, or a weight that is not a positive
    number, is a KilnError naming the line."""
    if not path.is_file():
        raise KilnError("sequence.class_weights: no such file (or give auto or none)", path)
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[str, Any, int]] = []
    if path.suffix.lower() == ".json":
        try:
            given = json.loads(text)
        except ValueError as err:
            raise KilnError(f"not JSON: {err}", path) from None
        if not isinstance(given, dict):
            raise KilnError("expected a JSON object {label: weight}", path, 1)
        for label, weight in given.items():
            where = next((n for n, row in enumerate(text.splitlines(), 1) if json.dumps(label) in row), None)
            entries.append((str(label), weight, where or 1))
    else:
        for number, row in enumerate(text.splitlines(), 1):
            if row.strip():
                label, _, weight = row.partition("\t")
                entries.append((label.strip(), weight.strip(), number))
    weights = dict.fromkeys(labels, 1.0)
    for label, weight, line in entries:
        if label not in weights:
            raise KilnError(f"label '{label}' is not one of the training data's ({', '.join(labels[:10])})",
                            path, line)
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise KilnError(f"weight {weight!r} of '{label}' is not a number", path, line) from None
        if not math.isfinite(value) or value <= 0:
            raise KilnError(f"weight {weight!r} of '{label}' must be a positive number", path, line)
        weights[label] = value
    return [weights[label] for label in labels]


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
    demo_input: ClassVar[tuple[str, str]] = ("pair", "First text")
