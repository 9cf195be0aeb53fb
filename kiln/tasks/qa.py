"""Extractive question answering (SQuAD v1.1/v2.0 style).

Long contexts are covered by overlapping windows (``data.window`` tokens, ``data.stride`` tokens of
overlap), the question truncated first (``data.max_query_length``). A window that does not contain
the answer is trained toward the null position (the first token), as the standard recipe does. At
prediction time the n-best start/end pairs of all windows compete, answers longer than
``data.max_answer_length`` tokens are ruled out, and the span is mapped back to characters through
the tokenizer's offset mapping.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import skip_empty
from kiln.data.tables import SNIFF_BYTES, decoded_lines, jsonl_objects, refuse_binary
from kiln.errors import KilnError, MissingLabels
from kiln.metrics.squad import best_null_threshold
from kiln.tasks.base import EXAMPLE_CHARS, Dataset, Form, Task, pad_inputs, shorten


def _line_of(text: str, qid: str) -> int:
    """The line of question ``qid``'s ``"id"`` key (a bare ``"qid"`` string can occur earlier)."""
    found = re.search(r'"id"\s*:\s*' + re.escape(json.dumps(qid, ensure_ascii=False)), text)
    position = found.start() if found else text.find(f'"{qid}"')
    return text.count("\n", 0, position) + 1 if position >= 0 else 1


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def context_around(context: str, answer: tuple[str, int] | None, limit: int = 2 * EXAMPLE_CHARS) -> str:
    """At most ``limit`` characters of ``context``: whole sentences around ``answer`` (text, character
    start), or the first ones without an answer; a window of words around it when its sentence alone
    is longer than ``limit``."""
    if len(context) <= limit:
        return shorten(context, limit)
    start = answer[1] if answer else 0
    end = start + len(answer[0]) if answer else 0
    bounds = [0, *(m.end() for m in re.finditer(r"(?<=[.!?])\s+", context)), len(context)]
    sentences = list(itertools.pairwise(bounds))
    first = last = next(i for i, (a, b) in enumerate(sentences) if a <= start < b or b == len(context))
    while last + 1 < len(sentences) and sentences[last][1] < end:  # an answer across sentences
        last += 1
    if sentences[last][1] - sentences[first][0] > limit:
        begin = max(0, min(start - limit // 2, len(context) - limit))
        stop = begin + limit
        # Drop a word cut in half at either edge: start after the first space before the answer,
        # stop at the last space after it.
        space = context.find(" ", begin, start)
        if begin > 0 and space >= 0:
            begin = space + 1
        space = context.rfind(" ", end, stop)
        if stop < len(context) and space >= 0:
            stop = space
        return " ".join(context[begin:stop].split())
    while True:  # grow by the next sentence, else the previous one, while it fits
        if last + 1 < len(sentences) and sentences[last + 1][1] - sentences[first][0] <= limit:
            last += 1
        elif first > 0 and sentences[last][1] - sentences[first - 1][0] <= limit:
            first -= 1
        else:
            break
    return " ".join(context[sentences[first][0]:sentences[last][1]].split())


@dataclass
class QASettings:
    """Extractive question answering: windows over long contexts, and span decoding."""

    # Where kiln 0.1 kept these: saved runs, YAML files and -c still take the old keys.
    formerly: ClassVar[dict[str, str]] = {
        name: f"data.{name}"
        for name in ("window", "stride", "max_query_length", "max_answer_length", "n_best", "null_threshold")}

    window: int = setting(384, "Tokens per window over a long context (question included).", minimum=8)
    stride: int = setting(128, "Tokens of overlap between consecutive context windows.", minimum=0)
    max_query_length: int = setting(64, "Questions are cut to this many tokens first.", minimum=1)
    max_answer_length: int = setting(30, "Longest answer span, in tokens.", minimum=1)
    n_best: int = setting(20, "Start and end candidates per window when decoding.", minimum=1)
    null_threshold: float = setting(0.0, "SQuAD 2.0: answer nothing when null beats the best span by this.")


class QuestionAnsweringTask(Task):
    """Find the answer to a question as a span of its context."""

    name: ClassVar[str] = "qa"
    settings_class: ClassVar[type | None] = QASettings
    section: ClassVar[str] = "qa"
    suffixes: ClassVar[tuple[str, ...]] = (".json", ".jsonl", ".tsv")
    auto_model: ClassVar[str] = "AutoModelForQuestionAnswering"
    main_metric: ClassVar[str] = "f1"
    target_keys: ClassVar[tuple[str, ...]] = ("start_positions", "end_positions")
    pipeline_tag: ClassVar[str] = "question-answering"
    request_forms: ClassVar[tuple[Form, ...]] = (Form(("context", "question")),)
    string_means: ClassVar[str] = "the context and the question separated by a tab"
    prediction_fields: ClassVar[dict[str, type] | None] = {"answer": str, "score": float, "start": int, "end": int}
    describer: ClassVar[str] = "questions"
    demo: ClassVar[dict[str, str]] = {"input": "question", "render": "answer"}
    export_outputs: ClassVar[tuple[str, ...]] = ("start_logits", "end_logits")

    def head_description(self, model: Any) -> str:
        return "answer-span head (start and end of the answer)"

    # -- reading -----------------------------------------------------------------------------
    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        suffix = Path(str(path)).suffix.lower()
        extras: dict[str, Any] = {}
        if stream is None and suffix == ".json":
            examples, extras["format"] = self._read_squad(path, labelled), "squad"
        else:
            lines = [(n, text) for n, text in decoded_lines(path, stream) if text.strip()]
            if not lines:
                raise KilnError("file is empty", path)
            if stream is None and suffix == ".jsonl":
                examples, extras["format"] = self._read_jsonl(path, lines, labelled), "jsonl"
            else:
                first = [c.strip() for c in lines[0][1].split("\t")]
                if [c.lower() for c in first[:2]] == ["context", "question"]:  # an optional header row
                    extras["header"], lines = first, lines[1:]
                examples, extras["format"] = self._read_tsv(path, lines, labelled and stream is None), "tsv"
        if not examples:
            raise KilnError("no questions found", path)
        if labelled:  # predict keeps every question: its output lines up with the input
            examples, _ = skip_empty(path, examples, self._empty)
        return Dataset(str(path), examples, extras=extras)

    @staticmethod
    def _empty(example: dict) -> str | None:
        """Why a labelled question has nothing to learn from: a blank context or question."""
        if not example["context"].strip():
            return "an empty context"
        return None if example["question"].strip() else "an empty question"

    def _example(self, path: str | Path, line: int, context: Any, question: Any, answers: list,
                 **extra: Any) -> dict:
        if not isinstance(context, str) or not isinstance(question, str):
            raise KilnError("context and question must be strings", path, line)
        for text, start in answers:
            if start is None:
                raise KilnError(f"answer {text!r} has no answer_start (its character offset in the context)",
                                path, line)
            if not isinstance(start, int) or context[start:start + len(text)] != text:
                found = context[start:start + len(text)] if isinstance(start, int) else start
                raise KilnError(f"answer {text!r} does not match the context at offset {start} "
                                f"(found {found!r})", path, line)
        return {"context": context, "question": question, "answers": answers, "line": line, **extra}

    def _read_squad(self, path: str | Path, labelled: bool) -> list[dict]:
        try:
            with open(path, "rb") as head:  # refuse a binary file before reading all of it
                refuse_binary(head.read(SNIFF_BYTES), path)
            text = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise KilnError("file not found", path) from None
        except IsADirectoryError:
            raise KilnError("is a directory, expected a file", path) from None
        except UnicodeDecodeError as exc:
            raise KilnError(f"invalid UTF-8 at byte {exc.start}", path) from None
        if not text.strip():
            raise KilnError("file is empty", path, 1)
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KilnError(f"invalid JSON: {exc.msg}", path, exc.lineno) from None
        if not isinstance(tree, dict) or not isinstance(tree.get("data"), list):
            raise KilnError("not SQuAD JSON: expected {\"data\": [articles]}", path, 1)
        examples: list[dict] = []
        for article in tree["data"]:
            for paragraph in article.get("paragraphs", []):
                for qa in paragraph.get("qas", []):
                    qid = str(qa.get("id", len(examples)))
                    line = _line_of(text, qid)
                    impossible = bool(qa.get("is_impossible", False))
                    answers = [] if impossible else [
                        (a.get("text"), a.get("answer_start")) for a in qa.get("answers", [])]
                    if labelled and not impossible and not answers:
                        raise KilnError(f"question {qid} has no answers and is not marked is_impossible",
                                        path, line)
                    examples.append(self._example(path, line, paragraph.get("context"), qa.get("question"),
                                                  answers, id=qid, title=article.get("title", ""),
                                                  impossible=impossible))
        return examples

    def _read_jsonl(self, path: str | Path, lines: list[tuple[int, str]], labelled: bool) -> list[dict]:
        examples: list[dict] = []
        for number, obj in jsonl_objects(path, lines):
            answers: list = []
            if isinstance(obj.get("answers"), dict):
                texts, starts = obj["answers"].get("text", []), obj["answers"].get("answer_start", [])
                if len(texts) != len(starts):
                    raise KilnError("answers.text and answers.answer_start differ in length", path, number)
                answers = list(zip(texts, starts, strict=True))
            elif "answer_start" in obj and "answer_end" in obj:
                start, end = obj["answer_start"], obj["answer_end"]
                if not isinstance(start, int) or not isinstance(end, int) or end < start:
                    raise KilnError("answer_start/answer_end must be integers with start <= end", path, number)
                answers = [(obj["context"][start:end], start)] if isinstance(obj.get("context"), str) else []
            elif labelled and "answers" not in obj:
                raise (KilnError if examples else MissingLabels)(
                    "no answers: expected 'answers' or 'answer_start'/'answer_end'", path, number)
            examples.append(self._example(path, number, obj.get("context"), obj.get("question"), answers,
                                          id=str(obj.get("id", number)), title=str(obj.get("title", "")),
                                          impossible=labelled and not answers, obj=obj))
        return examples

    def _read_tsv(self, path: str | Path, lines: list[tuple[int, str]], labelled: bool) -> list[dict]:
        examples: list[dict] = []
        for number, text in lines:
            if not text.strip():
                continue
            cells = text.split("\t")
            if len(cells) < 2 or (labelled and len(cells) != 4):
                want = "context, question, char_start, char_end" if labelled else "context and question"
                unlabelled = labelled and len(cells) == 2 and not examples  # context and question alone
                raise (MissingLabels if unlabelled else KilnError)(
                    f"expected {want} separated by tabs, found {len(cells)} columns", path, number)
            answers = []
            if len(cells) == 4:
                try:
                    start, end = int(cells[2]), int(cells[3])
                except ValueError:
                    raise KilnError("char_start and char_end must be integers", path, number) from None
                if not 0 <= start <= end <= len(cells[0]):
                    raise KilnError(f"answer span {start}:{end} is outside the context", path, number)
                answers = [(cells[0][start:end], start)]
            examples.append(self._example(path, number, cells[0], cells[1], answers, id=str(number), title="",
                                          impossible=False, cells=cells))
        return examples

    def parse_input(self, item: Any, line: int) -> Any:
        if isinstance(item, dict):
            context, question = item.get("context"), item.get("question")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            context, question = item
        else:
            parts = str(item).split("\t")
            if len(parts) != 2:
                raise KilnError("expected a context and a question separated by a tab", "<input>", line)
            context, question = parts
        return self._example("<input>", line, context, question, [], id=str(line), title="", impossible=False)

    def example_input(self, example: dict) -> dict | None:
        """``{"context", "question"}``; a long context is cut to the sentences around its (first)
        answer, so that the example still has one to find."""
        context, question = example["context"], example["question"]
        if not context.strip() or not question.strip():
            return None
        answer = example["answers"][0] if example["answers"] else None
        return {"context": context_around(context, answer), "question": shorten(question)}

    def texts(self, dataset: Dataset) -> Iterator[str]:
        seen = set()
        for example in dataset.examples:
            if example["context"] not in seen:
                seen.add(example["context"])
                yield example["context"]
            yield example["question"]

    def group(self, example: dict) -> str:
        """Hold-out unit: whole articles, so validation contexts are never seen in training."""
        return example.get("title") or example["context"]

    def fit(self, train: Dataset) -> None:
        self.state["version"] = "2.0" if any(ex["impossible"] for ex in train.examples) else "1.1"

    # -- features and batches ----------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        data = self.settings
        window = min(data.window, max_length)
        if not dataset.examples:
            return []
        questions, lengths = zip(*(self._short_question(ex["question"], tokenizer) for ex in dataset.examples),
                                 strict=True)
        contexts = [ex["context"] for ex in dataset.examples]
        # The tokenizer needs the overlap to be shorter than the context part of every window.
        context_room = window - max(lengths) - tokenizer.num_special_tokens_to_add(pair=True)
        if context_room < 2:
            raise KilnError(f"a {window}-token QA window leaves no room for the context after questions of "
                            f"{max(lengths)} tokens; raise qa.window or lower qa.max_query_length",
                            dataset.path)
        encoded = tokenizer(list(questions), contexts, truncation="only_second", max_length=window,
                            stride=min(data.stride, window // 2, context_room - 1),
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        features = []
        for index, input_ids in enumerate(encoded["input_ids"]):
            number = encoded["overflow_to_sample_mapping"][index]
            sequence = encoded.sequence_ids(index)
            offsets = [tuple(o) if sequence[i] == 1 else None for i, o in enumerate(encoded["offset_mapping"][index])]
            feature = {"input_ids": input_ids, "example": number, "offsets": offsets}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][index]
            answers = dataset.examples[number]["answers"]
            if dataset.examples[number]["impossible"] or answers:
                feature["start_positions"], feature["end_positions"] = self._positions(offsets, answers)
            features.append(feature)
        return features

    def _short_question(self, question: str, tokenizer: Any) -> tuple[str, int]:
        """The question cut to ``data.max_query_length`` tokens, and its token count."""
        limit = self.settings.max_query_length
        ids = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        if len(ids["input_ids"]) <= limit:
            return question, len(ids["input_ids"])
        return question[:ids["offset_mapping"][limit - 1][1]], limit

    @staticmethod
    def _positions(offsets: list, answers: list) -> tuple[int, int]:
        """Token span of the first answer inside this window, else the null position 0."""
        if not answers:
            return 0, 0
        text, start_char = answers[0]
        end_char = start_char + len(text)
        inside = [i for i, o in enumerate(offsets) if o is not None]
        if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
            return 0, 0
        start = next(i for i in inside if offsets[i][1] > start_char)
        end = next(i for i in reversed(inside) if offsets[i][0] < end_char)
        return start, max(start, end)

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        import torch

        batch = pad_inputs(features, pad_id)
        if "start_positions" in features[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
        return batch

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"], reduction="sum")
        return (start + end) / 2

    def loss_units(self, batch: dict) -> int:
        return int(batch["start_positions"].numel())

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        lengths = batch["attention_mask"].sum(-1).tolist()
        starts = outputs.start_logits.float().cpu().numpy()
        ends = outputs.end_logits.float().cpu().numpy()
        return [(s[:n], e[:n]) for s, e, n in zip(starts, ends, lengths, strict=True)]

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        data = self.settings
        best: list[dict] = [{"answer": "", "score": 0.0, "start": 0, "end": 0, "logit": -np.inf,
                             "null": np.inf} for _ in dataset.examples]
        for (start_logits, end_logits), feature in zip(outputs, features, strict=True):
            candidate = best[feature["example"]]
            offsets = feature["offsets"]
            candidate["null"] = min(candidate["null"], float(start_logits[0] + end_logits[0]))
            start_log, end_log = _log_softmax(start_logits), _log_softmax(end_logits)
            starts = np.argsort(start_logits)[::-1][:data.n_best]
            ends = np.argsort(end_logits)[::-1][:data.n_best]
            for s in starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in ends:
                    if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > data.max_answer_length:
                        continue
                    logit = float(start_logits[s] + end_logits[e])
                    if logit > candidate["logit"]:
                        context = dataset.examples[feature["example"]]["context"]
                        char_start, char_end = offsets[s][0], offsets[e][1]
                        candidate.update(answer=context[char_start:char_end], start=int(char_start),
                                         end=int(char_end), logit=logit,
                                         score=float(np.exp(start_log[s] + end_log[e])))
        predictions = []
        for candidate in best:
            # How much the null answer beats the best span; what the v2 threshold is compared with.
            margin = candidate["null"] - candidate["logit"]
            null_wins = self.state.get("version") == "2.0" and margin > data.null_threshold
            span = {k: candidate[k] for k in ("answer", "score", "start", "end")}
            if null_wins or candidate["logit"] == -np.inf:
                span = {"answer": "", "score": 0.0, "start": 0, "end": 0}
            predictions.append({**span, "null_margin": margin, "span_answer": candidate["answer"]})
        return predictions

    def metric_names(self) -> list[str]:
        names = ["exact_match", "f1"]
        if self.state.get("version") == "2.0":  # the v2.0 script's breakdown and tuned thresholds
            names += [f"{kind}_{name}" for kind in ("HasAns", "NoAns") for name in ("exact", "f1", "total")]
            names += [f"best_{name}{suffix}" for name in ("exact", "f1") for suffix in ("", "_threshold")]
        return [*names, *super().metric_names()]

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.squad import squad_metrics

        gold = [[text for text, _ in ex["answers"]] for ex in dataset.examples]
        metrics = squad_metrics([p["answer"] for p in predictions], gold)
        if self.state.get("version") == "2.0":
            metrics.update(best_null_threshold([p["span_answer"] for p in predictions],
                                               [p["null_margin"] for p in predictions], gold))
        return metrics

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return [{k: p[k] for k in ("answer", "score", "start", "end")} for p in predictions]

    def write(self, dataset: Dataset, predictions: list[Any], stream: TextIO) -> None:
        fmt = dataset.extras.get("format")
        if fmt == "squad":  # the official predictions file: {question id: answer}
            answers = {ex["id"]: p["answer"] for ex, p in zip(dataset.examples, predictions, strict=True)}
            stream.write(json.dumps(answers, ensure_ascii=False) + "\n")
            return
        if dataset.extras.get("header"):
            stream.write("\t".join([*dataset.extras["header"], "answer"]) + "\n")
        for example, prediction in zip(dataset.examples, predictions, strict=True):
            if fmt == "jsonl":
                obj = dict(example.get("obj") or {})
                obj.update(self.format([prediction], dataset)[0])
                stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
            else:
                stream.write("\t".join([*example.get("cells", [example["context"], example["question"]]),
                                        prediction["answer"]]) + "\n")
