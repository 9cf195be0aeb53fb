import numpy as np
import pytest

from kiln.training.batching import EqualBatches, TokenBudgetSampler

LENGTHS = np.random.default_rng(0).integers(3, 60, size=1000).tolist()


def test_every_example_once_and_budget_respected():
    sampler = TokenBudgetSampler(LENGTHS, batch_tokens=512, max_batch_size=64, seed=1)
    batches = sampler.batches(0)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) <= 64
        padded = max(LENGTHS[i] for i in batch) * len(batch)
        assert padded <= 512 or len(batch) == 1


def test_length_bucketing_keeps_padding_low():
    batches = TokenBudgetSampler(LENGTHS, batch_tokens=1024, seed=1).batches(0)
    real = sum(LENGTHS)
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    assert padded / real < 1.15  # random batching pads ~1.9x with these lengths


def test_epochs_differ_but_are_reproducible():
    sampler = TokenBudgetSampler(LENGTHS, batch_tokens=512, seed=1)
    assert sampler.batches(0) == TokenBudgetSampler(LENGTHS, batch_tokens=512, seed=1).batches(0)
    assert sampler.batches(0) != sampler.batches(1)


def test_fixed_batch_size():
    batches = TokenBudgetSampler(LENGTHS, batch_size=32, seed=1).batches(0)
    assert sorted(len(b) for b in batches)[1:] == [32] * (len(batches) - 1)


def test_inference_order_is_sorted_by_length():
    batches = TokenBudgetSampler(LENGTHS, batch_tokens=512, shuffle=False).batches()
    lengths = [LENGTHS[i] for b in batches for i in b]
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shares(world_size):
    shares = [TokenBudgetSampler(LENGTHS, batch_tokens=512, seed=1, rank=r, world_size=world_size).batches(0)
              for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))


def test_fixed_order_is_a_curriculum_kept_every_epoch_and_split_across_ranks():
    order = [3, 1, 0, 2, 5, 4]
    sampler = TokenBudgetSampler([8] * 6, batch_size=2, order=order, seed=1)
    assert list(sampler.batches(0)) == list(sampler.batches(3)) == [[3, 1], [0, 2], [5, 4]]
    ranks = [list(TokenBudgetSampler([8] * 6, batch_size=2, order=order, rank=r, world_size=2).batches(0))
             for r in (0, 1)]
    # Equal batch counts on both ranks; the last batch is trained (wrapping around to the first),
    # not dropped every epoch.
    assert ranks == [[[3, 1], [5, 4]], [[0, 2], [3, 1]]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("curriculum", [False, True])
@pytest.mark.parametrize("sizes", [{"batch_size": 7}, {"batch_tokens": 640, "max_batch_size": 256}])
def test_equal_length_batches_are_the_general_batches_in_numpy(world_size, curriculum, sizes):
    """Packed blocks take a numpy path (8 bytes a block, not a list each); it must cut, shuffle and
    share out exactly the batches the general path does."""
    order = np.random.default_rng(5).permutation(100) if curriculum else None
    for rank in range(world_size):
        sampler = TokenBudgetSampler([128] * 100, seed=3, rank=rank, world_size=world_size, order=order, **sizes)
        for epoch in (0, 1):
            fast = sampler._batches(epoch)
            assert isinstance(fast, EqualBatches)
            assert list(fast) == sampler._length_batches(epoch)
            assert fast[1:3] == sampler._length_batches(epoch)[1:3]
