"""The training epoch's sample order and the work left in an epoch: pure, 0-based, seeded.

One order per (seed, epoch), defined once for the whole job and independent of the world size,
so that an epoch interrupted at any point can be finished by any number of ranks with every
training sample used exactly once:

* `epoch_order`: a (seed, epoch) permutation of the shards, then of the samples inside each
  shard (the packer already shuffles samples across shards), keyed by `sampling.rng_for`. The
  epoch's samples are *positions* 0..N-1 in that order; ``order.shard[p]`` / ``order.sample[p]``
  say which sample position ``p`` is (its shard and its line in that shard's index).
* The work left in an epoch is a list of sorted, disjoint, non-empty ``(start, end)`` position
  intervals (half-open); a fresh epoch is ``[(0, N)]`` (`full`).
* `split`: the remaining positions, taken in order as one sequence, cut into ``world_size``
  contiguous chunks whose sizes differ by at most one (the first ``R % W`` ranks get the
  larger size). Every rank runs `steps` = ``ceil(max_chunk / batch_size)`` steps of
  ``batch_size`` entries; a rank whose chunk runs out pads its last batch(es) with entries
  that carry no weight (the loader marks them, `loader.Batch.real`).
* `remaining_after`: the work left after every rank has run ``k`` of those steps: each chunk
  minus its first ``k * batch_size`` positions. Every rank (and the checkpoint writer) computes
  it from the same numbers, without talking to the others.

Splitting the rest of an epoch over the same world size again gives each rank the rest of its
own chunk (the chunk sizes stay within one of each other, the larger first), so a resume at
the same world size continues exactly the uninterrupted sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dataloading.planning import sampling

# The stream key of the epoch order in `sampling.rng_for` (other streams: the per-sample draws).
ORDER_STREAM = 1
CANONICAL_STREAM = 3  # the epoch-independent shard order of ``shard_block`` (`epoch_order`)

Interval = tuple[int, int]


@dataclass(frozen=True)
class EpochOrder:
    """Position ``p`` of the epoch is sample ``sample[p]`` (0-based line of the index) of shard
    ``shard[p]`` (its position in the split's shard list). Both (N,) int64."""

    shard: np.ndarray
    sample: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)


def epoch_order(samples_per_shard: Sequence[int], seed: int, epoch: int, shard_block: int = 0) -> EpochOrder:
    """The (seed, epoch) order of a split whose shard ``i`` holds ``samples_per_shard[i]``
    samples: the shards permuted, then each shard's samples permuted (shards in their permuted
    order, one draw of the generator after another).

    ``shard_block`` > 0: the shards keep a canonical order across epochs (a permutation keyed
    by the seed alone, cut into consecutive blocks of ``shard_block`` shards); each epoch only
    permutes the shards inside each block, and the samples inside each shard. A contiguous
    chunk of positions (a rank's, a node's) then covers nearly the same shards every epoch:
    all but those of the blocks at its two ends (MosaicML Streaming's canonical nodes, without
    tying the order to the world size: every sample is still used once per epoch across
    resizes). What it costs: the order of the blocks never changes, so the model sees the
    dataset's blocks in the same sequence each epoch (the packer shuffled samples across
    shards, so each block is still a random draw of the classes)."""
    counts = [int(n) for n in samples_per_shard]
    if any(n < 0 for n in counts):
        raise ValueError(f"samples_per_shard must be >= 0, got {counts}")
    if shard_block < 0:
        raise ValueError(f"shard_block must be >= 0, got {shard_block}")
    rng = sampling.rng_for(seed, epoch, 0, 0, ORDER_STREAM)
    if shard_block:
        canonical = sampling.rng_for(seed, 0, 0, 0, CANONICAL_STREAM).permutation(len(counts))
        shard_perm = np.concatenate([rng.permutation(canonical[i:i + shard_block])
                                     for i in range(0, len(counts), shard_block)] or [np.zeros(0, np.int64)])
    else:
        shard_perm = rng.permutation(len(counts))
    shard_ids, samples = [], []
    for s in shard_perm:
        shard_ids.append(np.full(counts[s], s, np.int64))
        samples.append(rng.permutation(counts[s]).astype(np.int64))
    if not shard_ids:
        return EpochOrder(np.zeros(0, np.int64), np.zeros(0, np.int64))
    return EpochOrder(np.concatenate(shard_ids), np.concatenate(samples))


def full(num_samples: int) -> list[Interval]:
    """A whole epoch of ``num_samples`` positions (empty for 0)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return [(0, int(num_samples))] if num_samples else []


def check_intervals(intervals: Iterable, num_samples: int | None = None, *, what: str = "intervals") -> list[Interval]:
    """``intervals`` as a list of (start, end) int tuples after checking that they are sorted,
    disjoint, non-empty and (given ``num_samples``) inside [0, num_samples); adjacent ones are
    merged. ``what`` names the value in the error (e.g. a checkpoint key)."""
    out: list[Interval] = []
    for item in intervals:
        try:
            start, end = (int(v) for v in item)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {item!r} is not a [start, end] pair of integers") from e
        if not 0 <= start < end:
            raise ValueError(f"{what}: interval [{start}, {end}) is empty or negative")
        if num_samples is not None and end > num_samples:
            raise ValueError(f"{what}: interval [{start}, {end}) goes past the epoch's {num_samples} samples")
        if out and start < out[-1][1]:
            raise ValueError(f"{what}: intervals must be sorted and disjoint, got [{start}, {end}) after "
                             f"[{out[-1][0]}, {out[-1][1]})")
        if out and start == out[-1][1]:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def count(intervals: Sequence[Interval]) -> int:
    """Positions in ``intervals``."""
    return sum(end - start for start, end in intervals)


def positions(intervals: Sequence[Interval]) -> np.ndarray:
    """The positions of ``intervals`` in order, (count,) int64."""
    if not intervals:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in intervals])


def chunk_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` chunks of ``total`` positions: ``total // W`` each, one more
    for the first ``total % W`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(int(total), world_size)
    return [base + (r < extra) for r in range(world_size)]


def _cut(intervals: Sequence[Interval], begin: int, end: int) -> list[Interval]:
    """The positions with sequence index in [begin, end) of ``intervals`` read as one sequence."""
    out, first = [], 0
    for start, stop in intervals:
        n = stop - start
        lo, hi = max(begin - first, 0), min(end - first, n)
        if lo < hi:
            out.append((start + lo, start + hi))
        first += n
    return out


def split(remaining: Sequence[Interval], world_size: int) -> list[list[Interval]]:
    """Per rank, its contiguous chunk of the ``remaining`` sequence (`chunk_sizes`)."""
    sizes = chunk_sizes(count(remaining), world_size)
    out, begin = [], 0
    for size in sizes:
        out.append(_cut(remaining, begin, begin + size))
        begin += size
    return out


def steps(remaining: Sequence[Interval], world_size: int, batch_size: int) -> int:
    """Steps every rank runs to finish ``remaining``: ``ceil(max chunk / batch_size)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-chunk_sizes(count(remaining), world_size)[0] // batch_size)


def remaining_after(remaining: Sequence[Interval], world_size: int, batch_size: int, steps_done: int) -> list[Interval]:
    """The work left after every rank ran ``steps_done`` steps on ``split(remaining,
    world_size)``: each chunk without its first ``steps_done * batch_size`` positions."""
    if steps_done < 0:
        raise ValueError(f"steps_done must be >= 0, got {steps_done}")
    taken = steps_done * batch_size
    left: list[Interval] = []
    for chunk in split(remaining, world_size):
        left.extend(_cut(chunk, taken, count(chunk)))
    return check_intervals(sorted(left))


def shards_of(order: EpochOrder, intervals: Sequence[Interval]) -> set[int]:
    """The shards holding the positions of ``intervals`` (what a rank's chunk reads)."""
    return {int(s) for start, end in intervals for s in np.unique(order.shard[start:end])}
