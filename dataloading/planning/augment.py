"""TSN crop geometry as pure functions (TSN.md section 3, the authors' GroupMultiScaleCrop).

All sizes are in pixels of the *stored* frames (packed with a short side, 256 by default).
Scales are exact fractions so that numpy here and the DALI graph compute identical integers:
``int(base * 0.66)`` equals ``(base * 33) // 50`` for every integer base.

Train: crop width and height are each one of ``int(base * s)`` for s in the scales (a size
within 3 px of the input size snaps to it), the (h, w) scale indices at most ``max_distort``
apart; the crop sits at one of the fixed positions on a 4x4 grid of steps (13 with
``more_fix_crop``, 5 without); a coin flips the whole sample horizontally.
Eval: the centre crop of side ``base * input_size / resize_short`` (224 of 256).
Test: that crop at the 4 corners and the centre, each also flipped (10 views; 5 with
``flip=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from dataloading.planning.sampling import pick

# Fixed crop positions as (x, y) multiples of (w_step, h_step), w_step = (W - crop_w) // 4.
# Order as in the authors' `_sample_fix_offset`: 4 corners + centre, then with
# more_fix_crop the 4 edge middles and the 4 quarter points.
FIX_CROP_POSITIONS = (
    (0, 0), (4, 0), (0, 4), (4, 4), (2, 2),
    (0, 2), (4, 2), (2, 4), (2, 0),
    (1, 1), (3, 1), (1, 3), (3, 3),
)
SNAP_PIXELS = 3  # a crop size within this of the input size is set to the input size
# Test-time 10 views: these 5 positions, unflipped then flipped.
TEST_CROP_POSITIONS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2))


def as_fraction(scale: float) -> Fraction:
    """0.66 -> 33/50, 0.875 -> 7/8: the exact rational the config's decimal means."""
    f = Fraction(str(scale)).limit_denominator(1000)
    if not 0 < f <= 1:
        raise ValueError(f"crop scale must be in (0, 1], got {scale}")
    return f


@dataclass(frozen=True)
class CropSpec:
    """Geometry parameters of TSN's multi-scale crop (defaults: the paper's RGB settings)."""

    input_size: int = 224
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_distort: int = 1
    more_fix_crop: bool = True  # 13 positions (authors) vs 5 (mmaction2 default)
    resize_short: int = 256  # the short side the crop fractions refer to (eval crop = 224/256)
    # Horizontal flip at train time and the 5 flipped test views. Off for classes defined by
    # direction (left vs right, clockwise vs counter-clockwise), which a flip swaps.
    flip: bool = True

    def __post_init__(self):
        if self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")
        if not self.scales:
            raise ValueError("scales must not be empty")
        for s in self.scales:
            as_fraction(s)
        if self.max_distort < 0:
            raise ValueError(f"max_distort must be >= 0, got {self.max_distort}")

    @property
    def fractions(self) -> tuple[Fraction, ...]:
        return tuple(as_fraction(s) for s in self.scales)

    @property
    def scale_pairs(self) -> tuple[tuple[int, int], ...]:
        """(h scale index, w scale index) pairs allowed by max_distort, the authors' order."""
        n = len(self.scales)
        return tuple((i, j) for i in range(n) for j in range(n) if abs(i - j) <= self.max_distort)

    @property
    def positions(self) -> tuple[tuple[int, int], ...]:
        return FIX_CROP_POSITIONS if self.more_fix_crop else FIX_CROP_POSITIONS[:5]


def crop_size(base: int, scale: Fraction, input_size: int) -> int:
    """``int(base * scale)``, snapped to input_size when within SNAP_PIXELS of it, never
    larger than ``base``: the authors' frames had base 256, where the bound never binds;
    frames stored smaller (e.g. base 222) would otherwise get a 224 crop off the frame."""
    size = (base * scale.numerator) // scale.denominator
    return min(input_size if abs(size - input_size) < SNAP_PIXELS else size, base)


@dataclass(frozen=True)
class CropBox:
    """A crop in stored-frame pixels plus the horizontal flip of the whole sample."""

    x: int
    y: int
    width: int
    height: int
    flip: bool = False


def train_crop(height: int, width: int, spec: CropSpec, scale_pair_draw: int, position_draw: int,
               flip_draw: int) -> CropBox:
    """The multi-scale corner crop for one sample from its three augmentation draws."""
    base = min(height, width)
    pairs = spec.scale_pairs
    i, j = pairs[int(pick(np.int64(scale_pair_draw), len(pairs)))]
    fr = spec.fractions
    crop_h = crop_size(base, fr[i], spec.input_size)
    crop_w = crop_size(base, fr[j], spec.input_size)
    px, py = spec.positions[int(pick(np.int64(position_draw), len(spec.positions)))]
    w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
    flip = spec.flip and bool(pick(np.int64(flip_draw), 2))
    return CropBox(px * w_step, py * h_step, crop_w, crop_h, flip)


def eval_crop_side(height: int, width: int, spec: CropSpec) -> int:
    """Side of the square eval/test crop: ``base * input_size // resize_short`` (224 of 256)."""
    return min(height, width) * spec.input_size // spec.resize_short


def center_crop(height: int, width: int, spec: CropSpec) -> CropBox:
    side = eval_crop_side(height, width, spec)
    return CropBox((width - side) // 2, (height - side) // 2, side, side)


def test_crops(height: int, width: int, spec: CropSpec) -> list[CropBox]:
    """The 10 test views: 4 corners + centre, then the same 5 flipped (5 views without flip)."""
    side = eval_crop_side(height, width, spec)
    w_step, h_step = (width - side) // 4, (height - side) // 4
    boxes = [CropBox(px * w_step, py * h_step, side, side) for px, py in TEST_CROP_POSITIONS]
    return boxes + [CropBox(b.x, b.y, b.width, b.height, True) for b in boxes] if spec.flip else boxes
