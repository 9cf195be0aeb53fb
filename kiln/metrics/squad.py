"""SQuAD exact match and F1, with the official evaluation script's rules.

``normalize_answer``, the token-overlap F1 and the maximum over gold answers follow the official
v1.1 script (``evaluate-v1.1.py``); an unanswerable question (SQuAD 2.0) has the empty string as its
only gold answer, as in the v2.0 script. Scores are percentages, as the official scripts print them.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official rules)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 of the normalised strings (v1.1: no overlap, empty included, scores 0)."""
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict:
    """``exact_match`` and ``f1`` (0–100), each the max over an example's gold answers.

    An example with no gold answers is unanswerable: its gold is the empty string. When both kinds
    occur, ``HasAns_*`` and ``NoAns_*`` break the scores down, as the v2.0 script does.
    """
    exact, f1, has_answer = [], [], []
    for prediction, golds in zip(predictions, gold_answers, strict=True):
        has_answer.append(bool(golds))
        if golds:  # the v1.1 script's rules
            exact.append(max(exact_match_score(prediction, g) for g in golds))
            f1.append(max(f1_score(prediction, g) for g in golds))
        else:  # unanswerable (v2.0): right only when the prediction is empty
            empty = float(not normalize_answer(prediction))
            exact.append(empty)
            f1.append(empty)
    total = max(len(exact), 1)
    result = {"exact_match": 100.0 * sum(exact) / total, "f1": 100.0 * sum(f1) / total}
    if any(has_answer) and not all(has_answer):
        for name, keep in (("HasAns", True), ("NoAns", False)):
            chosen = [i for i, h in enumerate(has_answer) if h == keep]
            result[f"{name}_exact"] = 100.0 * sum(exact[i] for i in chosen) / len(chosen)
            result[f"{name}_f1"] = 100.0 * sum(f1[i] for i in chosen) / len(chosen)
            result[f"{name}_total"] = len(chosen)
    return result


def best_null_threshold(span_answers: Sequence[str], null_margins: Sequence[float],
                        gold_answers: Sequence[Sequence[str]]) -> dict:
    """Tune the SQuAD 2.0 null threshold on labelled data, as the official v2.0 script does.

    An example answers ``""`` when its null margin (null score minus best span score) exceeds the
    threshold. Returns ``best_exact``/``best_f1`` and the thresholds that reach them, to be set
    with ``-c data.null_threshold=…``.
    """
    n = max(len(span_answers), 1)
    result = {}
    for name in ("exact_match", "f1"):
        # Per example: the score when answering with the span, and when answering nothing.
        spans = [squad_metrics([a], [g])[name] for a, g in zip(span_answers, gold_answers, strict=True)]
        empties = [squad_metrics([""], [g])[name] for g in gold_answers]
        order = sorted(range(len(spans)), key=lambda i: null_margins[i])
        # Threshold below every margin: all empty. Raising it past margin i lets example i answer.
        score = sum(empties)
        best_score, best_threshold = score, min(null_margins, default=0.0) - 1.0
        for i in order:
            score += spans[i] - empties[i]
            if score > best_score:
                best_score, best_threshold = score, null_margins[i]
        short = "exact" if name == "exact_match" else "f1"
        result[f"best_{short}"] = best_score / n
        result[f"best_{short}_threshold"] = float(best_threshold)
    return result
