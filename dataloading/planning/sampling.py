"""TSN segment sampling and the project's one RNG helper: pure, 0-based, seeded functions.

The behaviour is TSN.md section 4 (the authors' PyTorch `TSNDataSet`), except that val/test
starts of short videos (N <= K + L - 1) spread over the frames there are, as the authors' test
sampling and mmaction2's test mode do, instead of all 0 (`center_starts`); and one deliberate
difference: randomness enters as integer *draws* (uniform in ``[0, DRAW_RANGE)``) instead of
calls to an RNG, so the very same draws can be replayed by the DALI graph, the reference
loader and the tests (all through the per-sample plan, `dataloading.planning.plan`). A draw ``r`` picks an
integer in ``[0, n)`` as ``(r * n) >> DRAW_BITS``: uniform up to ``n / 2**31`` (negligible) and
monotone in ``r``, which the sorted branch relies on.

Frame indices are 0-based. A snippet of length L starting at ``s`` reads frames
``s, s+1, ..., s+L-1`` clamped to ``N-1`` (the last frame repeats).
"""

from __future__ import annotations

import numpy as np

DRAW_BITS = 31
DRAW_RANGE = 1 << DRAW_BITS

# Per-sample draw vector layout: K segment draws, then the augmentation draws.
AUG_DRAWS = ("scale_pair", "crop_position", "flip")


def rng_for(seed: int, epoch: int, rank: int, worker: int, *stream: int) -> np.random.Generator:
    """The project's single source of randomness: a generator keyed by (seed, epoch, rank,
    worker) and optional stream keys (e.g. the batch index within the epoch).

    Keying by position instead of carrying generator state makes every draw reproducible
    after a restart from a checkpoint, independent of how many batches were prefetched.
    """
    for name, v in (("seed", seed), ("epoch", epoch), ("rank", rank), ("worker", worker)):
        if v < 0:
            raise ValueError(f"rng_for: {name} must be >= 0, got {v}")
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, worker, *stream]))


def draw(rng: np.random.Generator, shape) -> np.ndarray:
    """Integer draws, int64 uniform in [0, DRAW_RANGE)."""
    return rng.integers(0, DRAW_RANGE, size=shape, dtype=np.int64)


def pick(draws, n):
    """Map draws in [0, DRAW_RANGE) to integers in [0, n): ``(r * n) >> DRAW_BITS``.

    Works on numpy arrays and (same expression) on DALI DataNodes of int64.
    """
    return (draws * n) >> DRAW_BITS


def batch_draws(seed: int, epoch: int, rank: int, worker: int, batch_index: int, batch_size: int,
                num_segments: int) -> np.ndarray:
    """Draws for one batch: int64 array (batch_size, num_segments + len(AUG_DRAWS)).

    Columns 0..K-1 drive train segment offsets; then scale pair, crop position, flip.
    """
    rng = rng_for(seed, epoch, rank, worker, batch_index)
    return draw(rng, (batch_size, num_segments + len(AUG_DRAWS)))


# The stream key of per-sample draws in `rng_for` (`dataloading.planning.order.ORDER_STREAM` is 1).
SAMPLE_STREAM = 2


def sample_draws(seed: int, epoch: int, positions, num_segments: int) -> np.ndarray:
    """Draws of training samples keyed by their position in the epoch's order
    (`dataloading.planning.order`): int64 (len(positions), num_segments + len(AUG_DRAWS)), row ``i`` from
    ``rng_for(seed, epoch, 0, 0, SAMPLE_STREAM, positions[i])``, so a sample's segments, crop
    and flip do not depend on the world size or on which batch it lands in. A negative
    position (a padding entry) gets a row of zeros."""
    positions = [int(p) for p in positions]
    out = np.zeros((len(positions), num_segments + len(AUG_DRAWS)), np.int64)
    for i, p in enumerate(positions):
        if p >= 0:
            out[i] = draw(rng_for(seed, epoch, 0, 0, SAMPLE_STREAM, p), out.shape[1])
    return out


def _check(num_frames: int, num_segments: int, snippet_length: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if snippet_length < 1:
        raise ValueError(f"snippet_length must be >= 1, got {snippet_length}")


def train_starts(num_frames: int, num_segments: int, snippet_length: int, draws) -> np.ndarray:
    """Random snippet starts for training, shape (K,), int64.

    ``avg = (N - L + 1) // K``; if ``avg > 0``: ``start_k = k*avg + pick(draw_k, avg)``;
    elif ``N > K``: K sorted random starts in ``[0, N - L]`` (sorting the draws, then
    mapping monotonically, gives the distribution of sorted independent picks);
    else all 0. ``draws``: the K segment draws.
    """
    _check(num_frames, num_segments, snippet_length)
    draws = np.asarray(draws, dtype=np.int64)
    if draws.shape != (num_segments,):
        raise ValueError(f"need {num_segments} segment draws, got shape {draws.shape}")
    n_starts = num_frames - snippet_length + 1
    avg = n_starts // num_segments
    if avg > 0:
        return np.arange(num_segments, dtype=np.int64) * avg + pick(draws, avg)
    if num_frames > num_segments:
        # N > K but N - L + 1 < K: only reachable with L > 1; n_starts may still be <= 0
        return pick(np.sort(draws), max(n_starts, 1))
    return np.zeros(num_segments, dtype=np.int64)


def center_starts(num_frames: int, num_segments: int, snippet_length: int) -> np.ndarray:
    """Deterministic starts for val/test: segment centres, shape (K,), int64, 0-based.

    With ``S = max(N - L + 1, 1)`` possible starts and ``tick = S / K``:
    ``start_k = floor(tick/2 + tick*k)``, computed exactly in integers as
    ``(S * (2k + 1)) // (2K)``; every start lies in ``[0, S - 1]``.

    * ``N > K + L - 1`` (room for K distinct snippets): the authors' segment centres. Their
      float version truncates e.g. 14.999999999999998 to 14 where the exact centre is 15
      (N=30, K=25); exact arithmetic also lets the DALI graph compute the same indices.
    * ``L <= N <= K + L - 1`` (a short video: fewer possible starts than segments): the same
      formula spreads the K starts over the S starts there are, repeating some, as the
      authors' test sampling (``_get_test_indices`` has no short-video branch) and mmaction2's
      test mode do, e.g. N=25, K=25, L=1 -> 0, 1, ..., 24 (the authors' val branch, and this
      function before issue 15, read frame 0 for every segment).
    * ``N < L`` (shorter than one snippet): S = 1, all starts 0 (the snippet's frames clamp
      to N - 1, `snippet_indices`).
    """
    _check(num_frames, num_segments, snippet_length)
    n_starts = max(num_frames - snippet_length + 1, 1)
    k = np.arange(num_segments, dtype=np.int64)
    return (n_starts * (2 * k + 1)) // (2 * num_segments)


def snippet_indices(starts, snippet_length: int, num_frames: int) -> np.ndarray:
    """Frame indices (K, L): ``start + l`` clamped to ``num_frames - 1``."""
    starts = np.asarray(starts, dtype=np.int64)
    idx = starts[:, None] + np.arange(snippet_length, dtype=np.int64)[None, :]
    return np.minimum(idx, num_frames - 1)


def frame_indices(mode: str, num_frames: int, num_segments: int, snippet_length: int,
                  draws=None) -> np.ndarray:
    """Frame indices (K, L) for ``mode`` in {'train', 'val', 'test'}; train needs ``draws``."""
    if mode == "train":
        if draws is None:
            raise ValueError("train sampling needs the segment draws")
        starts = train_starts(num_frames, num_segments, snippet_length, draws)
    elif mode in ("val", "test"):
        starts = center_starts(num_frames, num_segments, snippet_length)
    else:
        raise ValueError(f"mode must be 'train', 'val' or 'test', got {mode!r}")
    return snippet_indices(starts, snippet_length, num_frames)
