"""The epoch's sample order and the work left in an epoch (`dataloading.planning.order`): exact tables,
then the properties exact data accounting rests on."""

import itertools
import random
from collections import Counter

import numpy as np
import pytest

from dataloading.planning import order, sampling

# (samples_per_shard, seed, epoch) -> (shard of each position, sample of each position)
ORDER_CASES = [
    (([3, 2], 0, 0), ([0, 0, 0, 1, 1], [2, 0, 1, 1, 0])),
    (([3, 2], 0, 1), ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])),  # another epoch: another order
    (([3, 2], 1, 0), ([1, 1, 0, 0, 0], [0, 1, 2, 1, 0])),  # another seed: shards swapped
    (([1, 0, 2], 5, 3), ([0, 2, 2], [0, 1, 0])),  # an empty shard holds no position
    # shard_block: a canonical shard order (seed 0: 0, 2, 3, 1) in blocks, shuffled inside them
    (([2, 1, 1, 2], 0, 0, 2), ([0, 0, 2, 3, 3, 1], [1, 0, 0, 1, 0, 0])),
    (([2, 1, 1, 2], 0, 1, 2), ([0, 0, 2, 1, 3, 3], [0, 1, 0, 0, 0, 1])),  # block {3, 1} swapped
    (([2, 1, 1, 2], 0, 0, 1), ([0, 0, 2, 3, 3, 1], [0, 1, 0, 0, 1, 0])),
    (([2, 1, 1, 2], 0, 1, 1), ([0, 0, 2, 3, 3, 1], [0, 1, 0, 1, 0, 0])),  # blocks of 1: shard order fixed
]


@pytest.mark.parametrize("args,expected", ORDER_CASES)
def test_epoch_order_table(args, expected):
    o = order.epoch_order(*args)
    np.testing.assert_array_equal(o.shard, expected[0])
    np.testing.assert_array_equal(o.sample, expected[1])
    assert o.shard.dtype == o.sample.dtype == np.int64 and len(o) == sum(args[0])


def _chunk_overlap(counts, world_size, shard_block, epochs=4) -> float:
    """Mean fraction of a rank's shards in epoch e + 1 that it also read in epoch e."""
    n, fractions = sum(counts), []
    for e in range(epochs - 1):
        for rank, (a, b) in enumerate(zip(*(order.split(order.full(n), world_size) for _ in range(2)))):
            sets = [order.shards_of(order.epoch_order(counts, 0, e + k, shard_block), c)
                    for k, c in ((0, a), (1, b))]
            fractions.append(len(sets[0] & sets[1]) / len(sets[1]))
    return float(np.mean(fractions))


def test_shard_blocks_keep_a_ranks_shards_across_epochs_and_every_sample_once():
    """What ``shard_block`` buys: 480 shards on 8 ranks; reshuffled shards give a rank ~1/8 of
    the shards it read the epoch before, canonical blocks of 8 nearly all of them; each
    epoch is still a permutation of every sample, and differs from the last."""
    counts = [int(c) for c in np.random.default_rng(0).integers(40, 46, 480)]
    reshuffled, blocked = _chunk_overlap(counts, 8, 0), _chunk_overlap(counts, 8, 8)
    assert reshuffled < 0.25 and blocked > 0.9, (reshuffled, blocked)
    a, b = order.epoch_order(counts, 0, 0, 8), order.epoch_order(counts, 0, 1, 8)
    for o in (a, b):
        assert len(set(zip(o.shard.tolist(), o.sample.tolist()))) == sum(counts)
    assert not np.array_equal(a.shard, b.shard) and not np.array_equal(a.sample, b.sample)
    with pytest.raises(ValueError, match="shard_block must be >= 0"):
        order.epoch_order(counts, 0, 0, -1)


def test_epoch_order_is_a_permutation_grouped_by_shard():
    per_shard = [7, 1, 0, 12, 5]
    o = order.epoch_order(per_shard, seed=11, epoch=4)
    assert sorted(zip(o.shard.tolist(), o.sample.tolist())) == [(s, i) for s, n in enumerate(per_shard) for i in range(n)]
    runs = [s for s, _ in itertools.groupby(o.shard.tolist())]
    assert len(runs) == len(set(runs))  # each shard's samples are consecutive positions
    assert order.epoch_order([], 0, 0).shard.shape == (0,)
    with pytest.raises(ValueError, match="samples_per_shard"):
        order.epoch_order([3, -1], 0, 0)


# (remaining, world_size) -> per-rank chunks
SPLIT_CASES = [
    (([(0, 10)], 3), [[(0, 4)], [(4, 7)], [(7, 10)]]),
    (([(2, 4), (6, 9)], 2), [[(2, 4), (6, 7)], [(7, 9)]]),  # a chunk spans two intervals
    (([(0, 2)], 3), [[(0, 1)], [(1, 2)], []]),  # more ranks than samples: an empty chunk
    (([], 2), [[], []]),
]


@pytest.mark.parametrize("args,expected", SPLIT_CASES)
def test_split_table(args, expected):
    assert order.split(*args) == expected


# (remaining, world_size, batch_size, steps_done) -> intervals left
AFTER_CASES = [
    (([(0, 10)], 3, 2, 0), [(0, 10)]),
    (([(0, 10)], 3, 2, 1), [(2, 4), (6, 7), (9, 10)]),
    (([(0, 10)], 3, 2, 2), []),  # steps([(0, 10)], 3, 2) == 2: the epoch is done
    (([(2, 4), (6, 9)], 2, 2, 1), [(6, 7)]),
    (([(0, 9)], 2, 4, 1), [(4, 5)]),  # chunks 5 and 4: rank 1 is done, its 2nd step all padding
]


@pytest.mark.parametrize("args,expected", AFTER_CASES)
def test_remaining_after_table(args, expected):
    assert order.remaining_after(*args) == expected


def test_steps_and_chunk_sizes():
    assert order.chunk_sizes(10, 3) == [4, 3, 3] and order.chunk_sizes(2, 3) == [1, 1, 0]
    assert order.steps([(0, 10)], 3, 2) == 2 and order.steps([(0, 9)], 2, 4) == 2
    assert order.steps([(0, 1)], 4, 8) == 1 and order.steps([], 2, 8) == 0
    with pytest.raises(ValueError, match="world_size"):
        order.chunk_sizes(4, 0)


def _random_remaining(rng: random.Random, n: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(n + 1), k=min(n + 1, 2 * rng.randint(1, 4))))
    return order.check_intervals([(a, b) for a, b in zip(cuts[0::2], cuts[1::2]) if a < b])


def test_split_and_remaining_after_account_for_every_position_once():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 60)
        remaining = _random_remaining(rng, n) if n else []
        W, B = rng.randint(1, 5), rng.randint(1, 6)
        chunks = order.split(remaining, W)
        sizes = [order.count(c) for c in chunks]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        flat = np.concatenate([order.positions(c) for c in chunks])
        np.testing.assert_array_equal(flat, order.positions(remaining))  # contiguous, in order
        S = order.steps(remaining, W, B)
        assert S * B >= max(sizes) and (S - 1) * B < max(sizes) or S == 0
        k = rng.randint(0, S)
        left = order.remaining_after(remaining, W, B, k)
        used = [p for c in chunks for p in order.positions(c)[:k * B]]
        assert Counter(used + order.positions(left).tolist()) == Counter(order.positions(remaining).tolist())
        assert order.remaining_after(remaining, W, B, S) == []
        # Same world size again: each rank continues its own chunk (exact same-size resume).
        again = order.split(left, W)
        for c, rest in zip(chunks, again):
            np.testing.assert_array_equal(order.positions(rest), order.positions(c)[k * B:])


@pytest.mark.parametrize("bad,match", [
    ([(3, 2)], "empty"), ([(0, 4), (2, 6)], "sorted and disjoint"), ([(0, 11)], "past the epoch"),
    ([("a", 2)], "pair of integers"), ([(-1, 2)], "negative")])
def test_check_intervals_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        order.check_intervals(bad, 10, what="ckpt loader_state.remaining")
    assert order.check_intervals([(0, 2), (2, 5), (7, 8)], 10) == [(0, 5), (7, 8)]


def test_shards_of_a_chunk():
    o = order.epoch_order([3, 2], 0, 0)  # shards 0, 0, 0, 1, 1
    assert order.shards_of(o, [(0, 3)]) == {0} and order.shards_of(o, [(2, 4)]) == {0, 1}
    assert order.shards_of(o, []) == set()


def test_sample_draws_are_keyed_by_position_only():
    d = sampling.sample_draws(7, 2, [5, -1, 9], 3)
    assert d.shape == (3, 3 + len(sampling.AUG_DRAWS)) and d.dtype == np.int64
    np.testing.assert_array_equal(d[1], 0)  # padding
    np.testing.assert_array_equal(d[0], sampling.sample_draws(7, 2, [5], 3)[0])  # not by row
    np.testing.assert_array_equal(d[2], sampling.sample_draws(7, 2, [1, 9], 3)[1])
    assert not np.array_equal(d[0], sampling.sample_draws(7, 3, [5], 3)[0])  # epoch-keyed
    assert ((d >= 0) & (d < sampling.DRAW_RANGE)).all()
