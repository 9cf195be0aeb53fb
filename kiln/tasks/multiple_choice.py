"""Multiple choice (SWAG, HellaSwag, COPA, ARC): a context, an optional question, N candidate answers,
one of them right. ``AutoModelForMultipleChoice`` scores each (context, question + answer) pair and a
softmax over the candidates picks one.

Data: JSONL with the candidates as a list (``choices``, ``endings``, ``options``; ARC's ``{"text":
[...]}`` too) or as numbered fields, or TSV/CSV with a header and numbered columns (``ending0``,
``ending1``…, ``choice1``, ``choice2``…, ``option_a``…). The right answer (``label``, ``answer``,
``answerKey``, ``gold``) is the index of the candidate, counting from 0 as in SWAG and HellaSwag,
a letter (``A`` is the first), or the candidate's own text. Examples may have different numbers of
candidates: a batch pads the missing ones, and they never win.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.data import skip_empty
from kiln.data.tables import read_table
from kiln.errors import KilnError, MissingLabels
from kiln.tasks.base import CardFacts, Dataset, Features, Form, Task

CONTEXT_KEYS = ("context", "ctx", "sent1", "premise", "article", "passage", "startphrase", "text")
QUESTION_KEYS = ("question", "sent2", "stem", "query", "ctx_b")
LIST_KEYS = ("choices", "endings", "options", "candidates", "answers")
ANSWER_KEYS = ("label", "labels", "answer", "answerKey", "answer_key", "gold", "correct")
# Numbered candidate columns: ending0, choice1, option_a, answer_B...
NUMBERED = re.compile(r"(ending|choice|option|candidate|answer)[_ ]?([0-9]+|[a-e])", re.IGNORECASE)
MIN_CHOICES = 2


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def answer_index(answer: Any, choices: Sequence[str]) -> int | None:
    """The candidate ``answer`` names: an index from 0, a letter (``A`` = the first) or the text of
    one candidate; None when it names none."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer).strip()
    if text.isdigit():
        return int(text) if int(text) < len(choices) else None
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
        return ord(text.upper()) - ord("A")
    return choices.index(text) if text in choices else None


def numbered_columns(names: Sequence[str]) -> list[str]:
    """The candidate columns among ``names``, in their numbers' (or letters') order."""
    matches = [(match, name) for name in names if (match := NUMBERED.fullmatch(name.strip()))]
    families = {match.group(1).lower() for match, _ in matches}
    if len(families) > 1:  # e.g. ending0..3 and answer: the ending columns are the candidates
        family = min(families, key=lambda f: ("ending", "choice", "option", "candidate", "answer").index(f))
        matches = [(match, name) for match, name in matches if match.group(1).lower() == family]
    found = [(match.group(2).lower(), name) for match, name in matches]
    return [name for _, name in sorted(found, key=lambda item: (len(item[0]), item[0]))]


class MultipleChoiceTask(Task):
    """Pick the right one of a few candidate answers to a context (and question)."""

    name: ClassVar[str] = "multiple-choice"
    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".tsv", ".csv")
    auto_model: ClassVar[str] = "AutoModelForMultipleChoice"
    main_metric: ClassVar[str] = "accuracy"
    pipeline_tag: ClassVar[str] = "multiple-choice"
    request_forms: ClassVar[tuple[Form, ...]] = (
        Form(("context", "choices"), optional=("question",), word_list="choices"),)
    string_means: ClassVar[str] = "the context followed by the candidates, separated by tabs"
    prediction_fields: ClassVar[dict[str, type] | None] = {"label": int, "answer": str, "score": float}
    describer: ClassVar[str] = "labelled-text"
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    export_axes: ClassVar[tuple[str, ...]] = ("batch", "choices", "sequence")
    demo: ClassVar[dict[str, str]] = {"input": "choices", "label": "Candidates", "hint": "choices", "render": "choice"}

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        return CardFacts(cls.auto_model, cls.pipeline_tag, notes=[
            "Inputs are `(batch, candidates, tokens)`: each candidate is encoded as the pair (context, question "
            "and candidate); the logits rank the candidates."])

    # -- reading -----------------------------------------------------------------------------
    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        table = read_table(path, lambda cells: bool(numbered_columns(cells)), stream=stream,
                           fmt="tsv" if stream else None)
        if table.format == "jsonl":
            rows = table.rows
        elif table.header is not None:
            rows = [dict(zip(table.header, row, strict=True)) for row in table.rows]
        elif stream is not None:  # stdin lines: the context, then the candidates, separated by tabs
            rows = [{"context": row[0], "choices": list(row[1:])} for row in table.rows]
        else:
            raise KilnError("a multiple-choice file needs a header naming the context and the candidate columns "
                            "(e.g. context, question, ending0, ending1, label)", table.path, table.lines[0])
        examples = []
        for line, row in zip(table.lines, rows, strict=True):
            if not isinstance(row, dict):
                raise KilnError("expected a JSON object", table.path, line)
            examples.append(self._example(row, line, table.path, labelled))
        if not labelled:
            return Dataset(str(path), examples, table)
        examples, kept = skip_empty(path, examples, self._empty, table)
        return Dataset(str(path), examples, kept)

    def _example(self, row: dict, line: int, path: str, labelled: bool) -> dict:
        lowered = {str(key).lower(): key for key in row}

        def field(keys: Sequence[str]) -> Any:
            return next((row[lowered[k.lower()]] for k in keys if k.lower() in lowered), None)

        context, question = field(CONTEXT_KEYS), field(QUESTION_KEYS)
        choices = field(LIST_KEYS)
        if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # ARC: {"text": [...], "label": [...]}
            choices = choices["text"]
        if choices is None:
            choices = [row[name] for name in numbered_columns([str(k) for k in row])]
        for role, value in (("context", context), ("question", question)):
            if value is not None and not isinstance(value, str):
                raise KilnError(f"'{role}' must be a string, got {value!r}", path, line)
        if context is None:
            raise KilnError(f"no context: name it one of {', '.join(CONTEXT_KEYS[:5])}", path, line)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise KilnError("the candidates must be a list of strings (choices, endings) or numbered "
                            "columns (ending0, ending1, ...)", path, line)
        if len(choices) < MIN_CHOICES:
            raise KilnError(f"{len(choices)} candidate(s); multiple choice needs at least {MIN_CHOICES}", path, line)
        answer = field(ANSWER_KEYS)
        label = None
        if labelled or (answer is not None and str(answer).strip()):
            if answer is None or not str(answer).strip():
                raise MissingLabels("missing answer (label, answer or answerKey)", path, line)
            label = answer_index(answer, choices)
            if label is None:
                raise KilnError(f"answer {answer!r} names none of the {len(choices)} candidates (an index from 0, "
                                "a letter, or a candidate's text)", path, line)
        texts = (context, *([question] if question else []), *choices)
        return {"context": context, "question": question or "", "choices": list(choices),
                "texts": texts, "label": None if label is None else str(label), "line": line}

    @staticmethod
    def _empty(example: dict) -> str | None:
        if not example["context"].strip() and not example["question"].strip():
            return "an empty context"
        return "an empty candidate" if not all(choice.strip() for choice in example["choices"]) else None

    def parse_input(self, item: Any, line: int) -> Any:
        if isinstance(item, dict):
            row = dict(item)
        else:
            parts = list(item) if isinstance(item, (list, tuple)) else str(item).split("\t")
            row = {"context": parts[0] if parts else "", "choices": parts[1:]}
        return self._example(row, line, "<input>", labelled=False)

    def example_input(self, example: dict) -> Any:
        item = {"context": example["context"], "choices": example["choices"]}
        if example["question"]:
            item["question"] = example["question"]
        return item

    def texts(self, dataset: Dataset) -> Iterator[str]:
        for example in dataset.examples:
            yield from example["texts"]

    # -- features and batches ----------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """One feature per example: each candidate as the pair (context, question + candidate), cut to
        ``max_length`` tokens (the context first). Its length for the token budget is the candidates'
        count times the longest of them: the tokens its part of a padded batch takes."""
        firsts, seconds = [], []
        for example in dataset.examples:
            for choice in example["choices"]:
                firsts.append(example["context"])
                seconds.append(f"{example['question']} {choice}".strip())
        encoded = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length,
                            return_attention_mask=False) if firsts else {"input_ids": []}
        features = Features.grouped(encoded, [len(example["choices"]) for example in dataset.examples], "choice_")
        for feature, example in zip(features, dataset.examples, strict=True):
            if example["label"] is not None:
                feature["label"] = int(example["label"])
        return features

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        """``(batch, candidates, tokens)`` tensors, padded to the most candidates and the longest one;
        ``choice_mask`` marks the real candidates."""
        import torch

        count = max(len(f["choice_input_ids"]) for f in features)
        longest = max(len(ids) for f in features for ids in f["choice_input_ids"])
        shape = (len(features), count, longest)
        arrays = {"input_ids": np.full(shape, pad_id, dtype=np.int64), "attention_mask": np.zeros(shape, np.int64)}
        if "choice_token_type_ids" in features[0]:
            arrays["token_type_ids"] = np.zeros(shape, dtype=np.int64)
        choice_mask = np.zeros(shape[:2], dtype=bool)
        for row, feature in enumerate(features):
            for column, ids in enumerate(feature["choice_input_ids"]):
                arrays["input_ids"][row, column, :len(ids)] = ids
                arrays["attention_mask"][row, column, :len(ids)] = 1
                if "token_type_ids" in arrays:
                    arrays["token_type_ids"][row, column, :len(ids)] = feature["choice_token_type_ids"][column]
                choice_mask[row, column] = True
        batch = {key: torch.from_numpy(array) for key, array in arrays.items()}
        batch["choice_mask"] = torch.from_numpy(choice_mask)
        if "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return batch

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits.float().masked_fill(~batch["choice_mask"].to(outputs.logits.device), float("-inf"))
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    def loss_units(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        logits = outputs.logits.float().cpu().numpy()
        mask = batch["choice_mask"].numpy()
        return [row[keep] for row, keep in zip(logits, mask, strict=True)]  # each example's own candidates

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        predictions = []
        for scores, example in zip(outputs, dataset.examples, strict=True):
            probs = _softmax(np.asarray(scores, dtype=np.float64))
            best = int(probs.argmax())
            predictions.append({"label": best, "answer": example["choices"][best], "score": float(probs[best])})
        return predictions

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        right = [p["label"] == int(ex["label"]) for p, ex in zip(predictions, dataset.examples, strict=True)]
        return {"accuracy": float(np.mean(right)) if right else 0.0}

    def metric_names(self) -> list[str]:
        return ["accuracy", *super().metric_names()]

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return predictions

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        return {"predicted_label": [p["label"] for p in predictions],
                "predicted_answer": [p["answer"] for p in predictions],
                "score": [round(p["score"], 6) for p in predictions]}
