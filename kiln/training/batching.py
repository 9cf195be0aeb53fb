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


class EqualBatches(Sequence):
    """Batches of ``size`` consecutive entries of ``order``, taken in the order of ``chunks``.

    The batches of equal-length examples (packed pretraining blocks) without a Python list per
    batch: 8 bytes per block instead of ~40, for corpora of hundreds of millions of blocks.
    Items are lists of indices, like the general sampler's.
    """

    def __init__(self, order: np.ndarray, size: int, chunks: np.ndarray):
        self.order, self.size, self.chunks = order, size, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        start = int(self.chunks[index]) * self.size
        return self.order[start:start + self.size].tolist()


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
        lengths: Sequence[int] | np.ndarray,
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
        self._cached: tuple[int | None, Sequence[list[int]]] | None = None  # (epoch key, its batches)

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

    def global_batches(self, epoch: int = 0) -> Sequence[list[int]]:
        """The micro-batches of ``epoch`` for all ranks together, the same on every rank: rank r of
        W takes the batches r, r + W, … of each step's stretch. Their count is a multiple of W (the
        remainder dropped, or a curriculum wrapped around). The last epoch asked for is kept: set-up
        and the loop both ask for the first, and cutting a large corpus is seconds of Python."""
        key = epoch if self.shuffle and self.order is None else None  # otherwise every epoch is alike
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._batches(epoch))
        return self._cached[1]

    def batches(self, epoch: int = 0) -> Sequence[list[int]]:
        """This rank's micro-batches of ``epoch``: every ``world_size``-th of :meth:`global_batches`."""
        batches = self.global_batches(epoch)
        if self.world_size == 1:
            return batches
        if isinstance(batches, EqualBatches):
            return EqualBatches(batches.order, batches.size, batches.chunks[self.rank::self.world_size])
        return batches[self.rank::self.world_size]

    def _batches(self, epoch: int) -> Sequence[list[int]]:
        n = len(self.lengths)
        if n and self.shuffle and self.lengths.min() == self.lengths.max():
            return self._equal_batches(epoch)
        return self._length_batches(epoch)

    def _length_batches(self, epoch: int) -> list[list[int]]:
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
        return [batches[i] for i in self._usable(len(batches))]

    def _equal_batches(self, epoch: int) -> EqualBatches:
        """:meth:`_batches` for examples of one length, drawing the same random numbers: cut the
        (shuffled or curriculum) order into consecutive batches, then shuffle the batches."""
        length = int(self.lengths[0])
        size = self.batch_size or max(1, min(self.max_batch_size, self.batch_tokens // length))
        chunks = -(-len(self.lengths) // size)
        if self.order is not None:
            order, batch_order = self.order, np.arange(chunks)
        else:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(len(self.lengths))
            batch_order = rng.permutation(chunks)
        return EqualBatches(order, size, batch_order[self._usable(chunks)])

    def _usable(self, count: int) -> np.ndarray:
        """Which of ``count`` batches the ranks take, all ranks taking equally many."""
        ids = np.arange(count)
        if self.world_size == 1:
            return ids
        if self.order is not None and count >= self.world_size:
            # A curriculum is the same every epoch, so dropping the remainder would drop the same
            # (hardest) batches every time: wrap around to the first ones instead, as torch's
            # DistributedSampler does.
            ids = np.concatenate([ids, ids[:-count % self.world_size]])
        return ids[:len(ids) // self.world_size * self.world_size]
