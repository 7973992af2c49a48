"""The catalogue of classes and `SynthSpec` (what to generate), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Bump when a change alters rendered frames or encoding, so resuming an old directory fails
# loudly instead of silently mixing two generations.
SYNTH_VERSION = 2  # 2: approach / recede as a faster endless zoom (tools.synth.plan), no visible reset

CLASS_NAMES: tuple[str, ...] = (
    "move_left",
    "move_right",
    "approach",
    "recede",
    "rotate_cw",
    "rotate_ccw",
    "shape_circle",
    "shape_square",
    "shape_triangle",
    "shape_cross",
)
MOTION_CLASSES: frozenset[str] = frozenset(CLASS_NAMES[:6])
MIN_CLASSES, MAX_CLASSES = 2, len(CLASS_NAMES)

# Saturated object colours (RGB) shared by every class; backgrounds are muted so objects
# stay visible. Each video jitters its pick by up to +-`COLOUR_JITTER` per channel.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 200, 60),
    (50, 90, 230),
    (240, 220, 40),
    (220, 50, 220),
    (40, 210, 220),
    (250, 140, 30),
    (245, 245, 245),
)
COLOUR_JITTER = 20

MIN_FRAMES = 2  # motion needs at least two frames
MIN_SIDE_PX = 16
MAX_FPS = 240


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Validated on construction (`ValueError` naming the field).

    ``sizes`` are (width, height) pairs in pixels, both even (yuv420p); each video picks
    one size, one fps from ``fps_choices`` and a duration ~ U[min_seconds, max_seconds].
    ``camera_pan_fraction`` is the probability that a video has a camera pan.
    ``approach_period_s`` is the (low, high) range of the approach / recede sawtooth's period:
    the object's radius changes x4-6 over one period (`tools.synth.plan`), so a shorter
    period is a faster looming.
    """

    num_classes: int = 10
    videos_per_class: int = 20
    seed: int = 0
    min_seconds: float = 2.0
    max_seconds: float = 10.0
    sizes: tuple[tuple[int, int], ...] = ((160, 120), (192, 144), (224, 168), (320, 240))
    fps_choices: tuple[int, ...] = (15, 24, 25, 30)
    camera_pan_fraction: float = 0.3
    approach_period_s: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON or argparse) to tuples so the spec stays hashable.
        try:
            object.__setattr__(self, "sizes", tuple(tuple(s) for s in self.sizes))
        except TypeError:
            raise ValueError(f"sizes must be a sequence of (width, height) pairs, got {self.sizes!r}") from None
        try:
            object.__setattr__(self, "fps_choices", tuple(self.fps_choices))
        except TypeError:
            raise ValueError(f"fps_choices must be a sequence of integers, got {self.fps_choices!r}") from None
        check_int("num_classes", self.num_classes)
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise ValueError(
                f"num_classes must be in {MIN_CLASSES}..{MAX_CLASSES} (the catalogue has "
                f"{MAX_CLASSES} classes), got {self.num_classes}"
            )
        check_int("videos_per_class", self.videos_per_class)
        if self.videos_per_class < 1:
            raise ValueError(f"videos_per_class must be >= 1, got {self.videos_per_class}")
        check_int("seed", self.seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("min_seconds", "max_seconds", "camera_pan_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.min_seconds <= 0:
            raise ValueError(f"min_seconds must be > 0, got {self.min_seconds}")
        if self.min_seconds > self.max_seconds:
            raise ValueError(
                f"min_seconds ({self.min_seconds}) must be <= max_seconds ({self.max_seconds})"
            )
        if not self.sizes:
            raise ValueError("sizes must contain at least one (width, height) pair")
        for size in self.sizes:
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
                raise ValueError(f"sizes entries must be (width, height) integer pairs, got {size!r}")
            width, height = size
            if width < MIN_SIDE_PX or height < MIN_SIDE_PX:
                raise ValueError(f"sizes entry {width}x{height}: both sides must be >= {MIN_SIDE_PX} px")
            if width % 2 or height % 2:
                raise ValueError(f"sizes entry {width}x{height}: width and height must be even (yuv420p)")
        if not self.fps_choices:
            raise ValueError("fps_choices must contain at least one frame rate")
        for fps in self.fps_choices:
            check_int("fps_choices entry", fps)
            if not 1 <= fps <= MAX_FPS:
                raise ValueError(f"fps_choices entry must be in 1..{MAX_FPS}, got {fps}")
        if not 0.0 <= self.camera_pan_fraction <= 1.0:
            raise ValueError(f"camera_pan_fraction must be in [0, 1], got {self.camera_pan_fraction}")
        try:
            lo_s, hi_s = (float(v) for v in self.approach_period_s)
        except (TypeError, ValueError):
            raise ValueError(f"approach_period_s must be a (low, high) pair of seconds, got "
                             f"{self.approach_period_s!r}") from None
        if not (math.isfinite(lo_s) and math.isfinite(hi_s) and 0.0 < lo_s <= hi_s):
            raise ValueError(f"approach_period_s must satisfy 0 < low <= high, got {self.approach_period_s!r}")
        object.__setattr__(self, "approach_period_s", (lo_s, hi_s))

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes of this spec, in label-index order."""
        return CLASS_NAMES[: self.num_classes]



def check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
