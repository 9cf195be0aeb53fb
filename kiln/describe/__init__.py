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

from collections.abc import Sequence
from pathlib import Path

from kiln.describe.kinds import DESCRIBERS, corpus_documents, describe_documents
from kiln.describe.reading import (
    LENGTH_LIMITS,
    Description,
    Findings,
    Fingerprints,
    Lengths,
    SplitStats,
    TokenCounter,
    TopTokens,
    digest,
    normalise,
)

__all__ = ["DESCRIBERS", "LENGTH_LIMITS", "Description", "Findings", "Fingerprints", "Lengths", "SplitStats",
           "TokenCounter", "TopTokens", "corpus_documents", "describe", "describe_documents", "digest", "normalise"]


def describe(task: str, data: str | Path, *, tokenizer: str | Path | None = None, columns: str | None = None,
             pair: str | None = None, overrides: Sequence[str] = ()) -> Description:
    """Describe the dataset at ``data`` for ``task``: split sizes, labels, lengths, duplicates and
    leakage between splits, and the task's own checks. Bad rows are findings, not errors; an error
    is raised only where training could not start at all (no such path, no train split or one
    whose columns cannot be told apart)."""
    from kiln.config import resolve_key
    from kiln.run import resolve_config
    from kiln.tasks import get_task

    config = resolve_config(task, None, None, {"data.columns": columns, resolve_key("pair"): pair}, overrides).build()
    task_obj = get_task(task, config)
    counter = TokenCounter(tokenizer)
    kind = DESCRIBERS[task_obj.describer](task_obj, counter)
    description = Description(task, str(data), counter.name, kind=kind)
    kind.run(description, Path(data))
    return description
