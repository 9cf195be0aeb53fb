"""Entity-level metrics for tagging, the CoNLL (conlleval) way.

Chunks are read with conlleval's start/end-of-chunk rules, which accept IOB1, IOB2 and BIOES tags
alike; this is also the default (non-strict) mode of the ``seqeval`` package, and a test checks the
numbers are identical to seqeval's on the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence


def _split(tag: str) -> tuple[str, str]:
    """``"B-PER" -> ("B", "PER")``; ``"O" -> ("O", "_")``."""
    if tag in ("O", ""):
        return "O", "_"
    prefix, _, kind = tag.partition("-")
    return (prefix, kind or "_") if kind else ("I" if prefix not in "BIESO" else prefix, prefix)


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != kind


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != kind


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, first, last)`` word spans (inclusive) of the chunks in one sentence."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, kind = _split(tag)
        if _end_of_chunk(prev_tag, prefix, prev_type, kind) and prev_tag != "O":
            chunks.append((prev_type, begin, index - 1))
        if _start_of_chunk(prev_tag, prefix, prev_type, kind):
            begin = index
        prev_tag, prev_type = prefix, kind
    return chunks


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """``bioes`` if E-/S- tags occur, ``iob1`` if a chunk may start with I-, else ``iob2``."""
    prefixes = {_split(tag)[0] for tags in sentences for tag in tags}
    if prefixes & {"E", "S"}:
        return "bioes"
    for tags in sentences:
        prev = "O"
        for tag in tags:
            prefix, kind = _split(tag)
            if prefix == "I" and (prev == "O" or _split(prev)[1] != kind):
                return "iob1"
            prev = tag
    return "iob2"


def tagging_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """Micro entity precision/recall/F1 (as conlleval and seqeval) plus token accuracy."""
    true_chunks: set = set()
    pred_chunks: set = set()
    correct_tokens = total_tokens = 0
    for sentence, (gold_tags, pred_tags) in enumerate(zip(gold, predicted, strict=True)):
        true_chunks.update((sentence, *chunk) for chunk in entities(gold_tags))
        pred_chunks.update((sentence, *chunk) for chunk in entities(pred_tags))
        correct_tokens += sum(g == p for g, p in zip(gold_tags, pred_tags, strict=True))
        total_tokens += len(gold_tags)
    hits = len(true_chunks & pred_chunks)
    precision = hits / len(pred_chunks) if pred_chunks else 0.0
    recall = hits / len(true_chunks) if true_chunks else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": correct_tokens / total_tokens if total_tokens else 0.0}
