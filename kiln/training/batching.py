"""Token-budget batching with length bucketing: batches of similar lengths, padded only to their own
longest member, so no compute is spent on padding to a fixed maximum length."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def feature_lengths(features: Sequence[dict]) -> np.ndarray:
    """Token count of each feature; packed corpora report theirs without reading every block."""
    lengths = getattr(features, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.asarray([len(f["input_ids"]) for f in features], dtype=np.int64)


class TokenBudgetSampler:
    """Group example indices into micro-batches whose padded size fits ``batch_tokens``.

    Training order is shuffled per epoch (seeded by ``seed + epoch``, so resuming at a batch index is
    exact): indices are shuffled, cut into pools of roughly ``pool_batches`` batches, each pool is
    sorted by length and cut into batches, and the batches are shuffled again. A fixed ``order``
    (a curriculum) is cut into batches as given, the same every epoch. Without shuffling, examples
    are sorted by length (inference). With ``world_size > 1`` each rank takes every
    ``world_size``-th batch and all ranks get the same number of batches (a shuffled epoch drops its
    remainder, a curriculum wraps around to its first batches).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_tokens: int = 8192,
        max_batch_size: int = 256,
        batch_size: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pool_batches: int = 64,
        order: Sequence[int] | None = None,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pool_batches = pool_batches
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self._cached: tuple[int | None, list[list[int]]] | None = None  # (epoch key, its batches)

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """Cut an ordered run of indices into batches under the budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order.tolist():
            length = int(self.lengths[index])
            grown = max(longest, length)
            if self.batch_size:
                full = len(current) >= self.batch_size
            else:
                full = len(current) >= self.max_batch_size or grown * (len(current) + 1) > self.batch_tokens
            if current and full:
                batches.append(current)
                current, grown = [], length
            current.append(index)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def batches(self, epoch: int = 0) -> list[list[int]]:
        """All micro-batches of ``epoch`` for this rank (the last epoch asked for is kept: set-up and
        the loop both ask for the first, and cutting a large corpus is seconds of Python)."""
        key = epoch if self.shuffle and self.order is None else None  # otherwise every epoch is alike
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._batches(epoch))
        return self._cached[1]

    def _batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if self.order is not None:
            batches = self._cut(self.order)
        elif not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = self._cut(order)
        else:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(n)
            mean_length = max(1.0, float(self.lengths.mean())) if n else 1.0
            per_batch = self.batch_size or max(1, min(self.max_batch_size, int(self.batch_tokens / mean_length)))
            pool = max(per_batch, per_batch * self.pool_batches)
            batches = []
            for start in range(0, n, pool):
                chunk = order[start:start + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches.extend(self._cut(chunk))
            permutation = rng.permutation(len(batches))
            batches = [batches[i] for i in permutation]
        if self.world_size > 1:
            if self.order is not None and len(batches) >= self.world_size:
                # A curriculum is the same every epoch, so dropping the remainder would drop the same
                # (hardest) batches every time: wrap around to the first ones instead, as torch's
                # DistributedSampler does.
                short = -len(batches) % self.world_size  # batches missing for an equal share
                batches = batches + batches[:short]
            usable = len(batches) // self.world_size * self.world_size
            batches = batches[:usable][self.rank::self.world_size]
        return batches
