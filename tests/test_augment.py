"""Crop geometry of TSN's multi-scale corner cropping (TSN.md section 3), exact boxes."""

import numpy as np
import pytest

from dataloading.planning import augment
from dataloading.planning.sampling import DRAW_RANGE as D


def draw_for(index, n):
    """A draw that `pick` maps to ``index`` of ``n``."""
    return (2 * index + 1) * D // (2 * n)


def authors_crop_sizes(w, h, scales=(1, .875, .75, .66), input_size=224, max_distort=1):
    """The authors' GroupMultiScaleCrop._sample_crop_size, restated with floats."""
    base = min(w, h)
    sizes = [int(base * s) for s in scales]
    ch = [input_size if abs(x - input_size) < 3 else x for x in sizes]
    cw = [input_size if abs(x - input_size) < 3 else x for x in sizes]
    # the authors' frames had base 256; for smaller frames our sizes are bounded by the base
    return [(min(cw[j], base), min(ch[i], base))
            for i in range(len(ch)) for j in range(len(cw)) if abs(i - j) <= max_distort]


def test_scale_pairs_match_authors_for_many_frame_sizes():
    spec = augment.CropSpec()
    for w in range(160, 480, 7):
        for h in (120, 171, 240, 256, 257):
            got = [augment.train_crop(h, w, spec, draw_for(p, 10), 0, 0) for p in range(10)]
            assert [(b.width, b.height) for b in got] == authors_crop_sizes(w, h)


def test_thirteen_positions_on_340x256():
    spec = augment.CropSpec()
    pair_224 = spec.scale_pairs.index((1, 1))  # both scales .875 -> 224 x 224
    boxes = [augment.train_crop(256, 340, spec, draw_for(pair_224, 10), draw_for(p, 13), 0) for p in range(13)]
    assert [(b.x, b.y) for b in boxes] == [
        (0, 0), (116, 0), (0, 32), (116, 32), (58, 16),
        (0, 16), (116, 16), (58, 32), (58, 0),
        (29, 8), (87, 8), (29, 24), (87, 24)]
    assert all((b.width, b.height) == (224, 224) for b in boxes)


def test_five_positions_without_more_fix_crop():
    spec = augment.CropSpec(more_fix_crop=False)
    positions = {(b.x, b.y) for b in (augment.train_crop(256, 340, spec, 0, d, 0) for d in range(0, D, D // 97))}
    # draw 0 picks the first scale pair: a 256 x 256 crop, w_step 21, h_step 0
    assert positions == {(0, 0), (84, 0), (42, 0)}


def test_scale_pair_distortion_bounded_and_all_used():
    spec = augment.CropSpec()
    assert spec.scale_pairs == ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3))
    sizes = {(b.width, b.height) for b in (augment.train_crop(256, 340, spec, d, 0, 0) for d in range(0, D, D // 1000))}
    assert sizes == {(256, 256), (224, 256), (256, 224), (224, 224), (192, 224), (224, 192), (192, 192),
                     (168, 192), (192, 168), (168, 168)}


def test_snapped_crop_never_exceeds_a_small_frame():
    # base 222: 0.875 * 222 = 194, 1.0 * 222 = 222 would snap to 224 > 222
    b = augment.train_crop(222, 300, augment.CropSpec(), 0, 0, 0)
    assert (b.width, b.height) == (222, 222)


def test_flow_scales_and_crops_inside_frame():
    spec = augment.CropSpec(scales=(1.0, 0.875, 0.75))
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        b = augment.train_crop(h, w, spec, *rng.integers(0, D, 3))
        assert 0 <= b.x and b.x + b.width <= w and 0 <= b.y and b.y + b.height <= h


def test_flip_is_a_fair_coin():
    flips = [augment.train_crop(256, 340, augment.CropSpec(), 0, 0, d).flip for d in range(0, D, D // 1000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_eval_and_test_crops():
    spec = augment.CropSpec()
    assert augment.center_crop(256, 340, spec) == augment.CropBox(58, 16, 224, 224)
    views = augment.test_crops(256, 340, spec)
    assert [(b.x, b.y, b.flip) for b in views] == [
        (0, 0, False), (116, 0, False), (0, 32, False), (116, 32, False), (58, 16, False),
        (0, 0, True), (116, 0, True), (0, 32, True), (116, 32, True), (58, 16, True)]
    # frames stored at short side 128: the same fractions (112 = 224/256 of 128)
    assert augment.center_crop(128, 170, spec) == augment.CropBox(29, 8, 112, 112)


def test_scale_fractions_are_exact():
    assert augment.as_fraction(0.66).numerator == 33 and augment.as_fraction(0.66).denominator == 50
    with pytest.raises(ValueError, match="scale"):
        augment.CropSpec(scales=(1.0, 1.5))
