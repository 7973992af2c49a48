"""Table-driven tests of TSN segment sampling (TSN.md section 4), exact arrays."""

import numpy as np
import pytest

from dataloading.planning import sampling
from dataloading.planning.sampling import DRAW_RANGE as D

# (num_frames, K, L, segment draws, expected starts)
TRAIN_CASES = [
    # avg = (N - L + 1) // K > 0: start_k = k*avg + pick(draw_k, avg)
    (20, 3, 1, [0, D - 1, D // 2], [0, 11, 15]),
    (10, 3, 5, [0, D - 1, D // 2], [0, 3, 5]),
    (3, 3, 1, [1, 2, 3], [0, 1, 2]),  # N == K: avg 1, one frame per segment
    (7, 5, 3, [D - 1, 0, D // 2, D // 4, 3 * D // 4], [0, 1, 2, 3, 4]),
    (300, 8, 1, [D // 8] * 8, [4, 41, 78, 115, 152, 189, 226, 263]),
    # avg == 0 and N > K: K sorted random starts in [0, N - L]
    (6, 3, 5, [D - 1, 0, D // 2], [0, 1, 1]),
    (6, 5, 3, [D - 1, 0, D // 2, D // 4, 3 * D // 4], [0, 1, 2, 3, 3]),
    (5, 3, 5, [D - 1, 0, D // 2], [0, 0, 0]),  # only one possible start
    (5, 3, 7, [D - 1, 0, D // 2], [0, 0, 0]),  # N < L: nothing to pick from
    # avg == 0 and N <= K: all starts 0
    (2, 3, 1, [1, 2, 3], [0, 0, 0]),
    (4, 5, 1, [D - 1, 0, D // 2, D // 4, 3 * D // 4], [0, 0, 0, 0, 0]),
    (1, 1, 1, [D - 1], [0]),
]


@pytest.mark.parametrize("n,k,l,draws,expected", TRAIN_CASES)
def test_train_starts_table(n, k, l, draws, expected):
    np.testing.assert_array_equal(sampling.train_starts(n, k, l, draws), expected)


# (num_frames, K, L, expected starts)
CENTER_CASES = [
    (20, 3, 1, [3, 10, 16]),
    (8, 3, 5, [0, 2, 3]),
    (30, 25, 1, [0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19, 21, 22, 23, 24, 25, 27, 28, 29]),
    (100, 1, 1, [50]),
    # Short videos, L <= N <= K + L - 1: the K starts spread over the N - L + 1 there are, as the
    # authors' test sampling and mmaction2's test mode do (these read frame 0 K times before).
    (7, 3, 5, [0, 1, 2]),  # N == K + L - 1: 3 possible starts, 3 segments
    (25, 25, 1, list(range(25))),  # 25 test segments on a 25-frame clip: every frame once
    (13, 25, 1, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12]),
    # flow, L = 5, on a 29-frame clip = 28 flow frames: 24 possible starts for 25 segments
    (28, 25, 5, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]),
    (6, 3, 5, [0, 1, 1]),  # 2 possible starts
    (5, 3, 5, [0, 0, 0]),  # N == L: one possible start
    (2, 3, 1, [0, 1, 1]),
    (1, 3, 1, [0, 0, 0]),
    # N < L: shorter than one snippet, all 0 (the snippet clamps to the last frame)
    (3, 3, 5, [0, 0, 0]),
    (2, 25, 6, [0] * 25),
]


@pytest.mark.parametrize("n,k,l,expected", CENTER_CASES)
def test_center_starts_table(n, k, l, expected):
    np.testing.assert_array_equal(sampling.center_starts(n, k, l), expected)


def test_center_starts_match_authors_float_formula_except_at_exact_integers():
    """The authors compute int(tick/2 + tick*k) in floats; we use exact integers. They agree
    everywhere except where the float sum lands a hair below an exact integer centre."""
    differing = 0
    for n in range(1, 400):
        for k in (1, 3, 5, 8, 25):
            for l in (1, 5, 6):
                ours = sampling.center_starts(n, k, l)
                if n <= k + l - 1:
                    continue
                tick = (n - l + 1) / float(k)
                for i in range(k):
                    f = tick / 2.0 + tick * i
                    if int(f) != ours[i]:
                        differing += 1
                        assert abs(f - round(f)) < 1e-9 and ours[i] == round(f)
    assert differing > 0  # the float formula really does drop exact centres (e.g. N=30, K=25)


def test_short_video_starts_match_mmaction2_test_mode_except_at_exact_integers():
    """For N <= K + L - 1 the starts are mmaction2's test-mode offsets (``SampleFrames``,
    test_mode: ``int(avg/2 + avg*k)`` with ``avg = (N - L + 1) / K`` while N >= L, else 0),
    the float formula whose only differences from exact integers are exact centres."""
    checked = 0
    for n in range(1, 60):
        for k in (1, 3, 5, 8, 25):
            for l in (1, 5, 6):
                if n > k + l - 1:
                    continue
                ours = sampling.center_starts(n, k, l)
                assert ours.min() >= 0 and ours.max() <= max(n - l, 0)
                assert np.all(np.diff(ours) >= 0)
                if n < l:
                    np.testing.assert_array_equal(ours, 0)
                    continue
                avg = (n - l + 1) / float(k)
                for i in range(k):
                    f = avg / 2.0 + avg * i
                    assert int(f) == ours[i] or (abs(f - round(f)) < 1e-9 and ours[i] == round(f))
                    checked += 1
                # every possible start is used when there are at most K of them
                assert len(set(ours.tolist())) == min(n - l + 1, k)
    assert checked > 1000


def test_snippet_indices_clamp_to_last_frame():
    np.testing.assert_array_equal(sampling.snippet_indices([3, 7], 4, 9), [[3, 4, 5, 6], [7, 8, 8, 8]])


@pytest.mark.parametrize("mode", ["train", "val", "test"])
def test_frame_indices_in_range_and_ordered(mode):
    rng = sampling.rng_for(0, 0, 0, 0)
    for n in range(1, 80):
        for k, l in ((3, 1), (8, 1), (3, 6), (25, 1)):
            draws = sampling.draw(rng, k)
            idx = sampling.frame_indices(mode, n, k, l, draws)
            assert idx.shape == (k, l)
            assert idx.min() >= 0 and idx.max() <= n - 1
            assert np.all(np.diff(idx[:, 0]) >= 0)  # segments in temporal order


def test_train_segments_stay_inside_their_segment():
    rng = sampling.rng_for(1, 0, 0, 0)
    for _ in range(200):
        n = int(rng.integers(30, 500))
        starts = sampling.train_starts(n, 3, 1, sampling.draw(rng, 3))
        avg = n // 3
        for k, s in enumerate(starts):
            assert k * avg <= s < (k + 1) * avg


def test_pick_is_uniform_enough():
    rng = sampling.rng_for(2, 0, 0, 0)
    counts = np.bincount(sampling.pick(sampling.draw(rng, 60000), 6), minlength=6)
    assert counts.min() > 9400 and counts.max() < 10600


def test_rng_keyed_by_seed_epoch_rank_worker():
    a = sampling.batch_draws(0, 1, 2, 0, 5, 4, 3)
    np.testing.assert_array_equal(a, sampling.batch_draws(0, 1, 2, 0, 5, 4, 3))
    assert a.shape == (4, 3 + len(sampling.AUG_DRAWS))
    assert a.min() >= 0 and a.max() < D
    for other in ((1, 1, 2, 0, 5), (0, 2, 2, 0, 5), (0, 1, 3, 0, 5), (0, 1, 2, 1, 5), (0, 1, 2, 0, 6)):
        assert not np.array_equal(a, sampling.batch_draws(*other, 4, 3))


@pytest.mark.parametrize("args,match", [
    ((0, 3, 1, [0, 0, 0]), "num_frames"),
    ((10, 0, 1, []), "num_segments"),
    ((10, 3, 0, [0, 0, 0]), "snippet_length"),
    ((10, 3, 1, [0, 0]), "3 segment draws"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        sampling.train_starts(*args)


def test_train_needs_draws_and_mode_checked():
    with pytest.raises(ValueError, match="draws"):
        sampling.frame_indices("train", 10, 3, 1)
    with pytest.raises(ValueError, match="mode"):
        sampling.frame_indices("eval", 10, 3, 1)
    with pytest.raises(ValueError, match="seed"):
        sampling.rng_for(-1, 0, 0, 0)
