"""Data locations and splits. Format readers live in sibling modules (``tables`` for TSV/CSV/JSONL)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kiln.data.tables import Table
from kiln.errors import KilnError

T = TypeVar("T")
logger = logging.getLogger(__name__)

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "dev", "valid", "val"),
    "test": ("test",),
}


def find_splits(data: str | Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map split names to files. A file is the train split; a directory holds ``train.*`` etc."""
    path = Path(data)
    if path.is_file():
        return {"train": path}
    if not path.exists():
        raise KilnError("no such file or directory", path)
    found: dict[str, Path] = {}
    files = sorted(p for p in path.iterdir() if p.is_file())
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            matches = [p for p in files if p.name.split(".")[0].lower() == alias
                       and p.suffix.lower() in suffixes]
            if matches:
                matches.sort(key=lambda p: list(suffixes).index(p.suffix.lower()))
                found[split] = matches[0]
                break
    if "train" not in found:
        raise KilnError(f"no train file ({'|'.join('train' + s for s in suffixes)}) in this directory", path)
    return found


def holdout(items: Sequence[T], fraction: float, seed: int,
            group: Callable[[T], Any] | None = None) -> tuple[list[T], list[T]]:
    """Deterministic seeded split into ``(train, validation)``; validation gets ``fraction``.

    With ``group``, whole groups (e.g. SQuAD articles) go to one side, so no context is shared.
    """
    if not 0 < fraction < 1:
        raise KilnError(f"data.validation_fraction must be between 0 and 1, got {fraction}")
    keys = [group(item) if group else None for item in items]
    units = list(dict.fromkeys(k for k in keys if k is not None)) if group else list(range(len(items)))
    if group is None or len(units) < 2:
        units, keys = list(range(len(items))), list(range(len(items)))
    random.Random(seed).shuffle(units)
    n_validation = max(1, round(len(units) * fraction))
    if len(units) - n_validation < 1:
        raise KilnError(f"too few examples ({len(items)}) to hold out a validation split")
    held = set(units[:n_validation])
    train = [item for item, key in zip(items, keys, strict=True) if key not in held]
    validation = [item for item, key in zip(items, keys, strict=True) if key in held]
    return train, validation


def skip_empty(path: str | Path, examples: list[dict], reason: Callable[[dict], str | None],
               table: Table | None = None) -> tuple[list[dict], Table | None]:
    """Drop labelled examples with nothing to learn from: ``reason(example)`` names what is empty
    (``"an empty text"``) or is None. Returns the kept examples and their rows of ``table``.

    One warning per file counts the skipped rows and names the first; when none is left, it is a
    ``path:line`` error at the first (a column empty everywhere usually means a wrong --columns).
    Only labelled reading uses this: predictions must stay aligned with the input rows.
    """
    kept: list[int] = []
    skipped: list[int] = []
    reasons: dict[str, None] = {}  # distinct reasons, in order of appearance
    for index, example in enumerate(examples):
        why = reason(example)
        if why:
            skipped.append(index)
            reasons.setdefault(why)
        else:
            kept.append(index)
    if not skipped:
        return examples, table
    what, first = " or ".join(reasons), examples[skipped[0]]["line"]
    if not kept:
        raise KilnError(f"no usable rows: all {len(skipped)} have {what} (check the file and --columns)",
                        path, first)
    logger.warning("%s: skipped %d %s with %s (first at line %d)", path, len(skipped),
                   "row" if len(skipped) == 1 else "rows", what, first)
    if table is not None and len(table.rows) == len(examples):
        table = Table(table.path, table.format, table.header, [table.rows[i] for i in kept],
                      [table.lines[i] for i in kept])
    return [examples[i] for i in kept], table
