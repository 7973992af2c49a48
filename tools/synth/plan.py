"""The random choices of one video (`VideoPlan`, `video_plan`): sizes, fps, duration, object
tracks, pan, background and distractor, without the pixels.

The pairs (move_left, move_right), (approach, recede), (rotate_cw, rotate_ccw) form
`MOTION_CLASSES`: within a pair every *single frame* has the same distribution, at every
frame index, so only motion over time tells them apart. This holds by construction:

* left/right: x = (x0 + v*t) mod W with x0 ~ U[0, W), so x(t) ~ U[0, W) for every t and
  both directions; the object is drawn with wrap-around copies at the frame edges.
* approach/recede: log radius follows a sawtooth with a uniformly random phase,
  ``log r = log r_lo + frac(phase0 ± t / period) * log(r_hi / r_lo)``, so the phase (and
  hence the radius) has the same distribution at every t for both directions. The sawtooth
  is an endless zoom, never a jump: over the last `APPROACH_FADE_PHASE` of the phase the
  object fades out while its copy at ``r * r_lo / r_hi`` (the next period's object, nested
  inside it) fades in, so at the wrap the copy *is* the object. Every frame then moves in the
  class direction; a visible reset (the big object snapping back small) would be a frame of
  the opposite class's motion inside every period, which dense test sampling (25 snippets)
  catches and votes with (synth version 1 had it: approach 0.8 at 3 test segments, 0.2 at 25).
* rotation: angle = angle0 ± omega*t with angle0 ~ U[0, 2pi).

Everything else (object shape, palette colour, sizes, start positions, speeds magnitudes,
background, camera pan, distractor) is drawn from distributions that do not depend on
the class within a pair. The pan speed is bounded below the slowest left/right speed, so the
on-screen direction of ``move_left``/``move_right`` is never flipped by the pan.

Determinism: every random choice of video ``(class_index, video_index)`` comes from
``np.random.default_rng([spec.seed, class_index, video_index])``, so a plan does not depend on
worker scheduling, ``num_classes`` or ``videos_per_class``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tools.synth.spec import CLASS_NAMES, COLOUR_JITTER, MIN_FRAMES, PALETTE, SynthSpec, check_int

MOTION_OBJECT_SHAPE = "ell"
# class name -> object shape
CLASS_SHAPES: dict[str, str] = {
    **{name: MOTION_OBJECT_SHAPE for name in CLASS_NAMES[:6]},
    "shape_circle": "circle",
    "shape_square": "square",
    "shape_triangle": "triangle",
    "shape_cross": "cross",
}
BACKGROUND_KINDS = ("noise", "blobs", "stripes")

# Motion parameters. Lengths are fractions of the frame width (`_W`) or of the shorter
# side (`_M`), so the look is size-independent; all rates are per second, so fps-independent.
OBJECT_RADIUS_M = (0.10, 0.17)
LEFT_RIGHT_SPEED_W_PER_S = (0.20, 0.45)
PAN_SPEED_W_PER_S = (0.04, 0.12)  # upper bound < LEFT_RIGHT_SPEED lower bound: see docstring
# Looming as fast on screen as the other motions (synth version 2): r_lo..r_hi over 0.5-1 s
# (`SynthSpec.approach_period_s`) grows ~2.5x per second, ~0.8 px per frame at 8 px radius on a
# 64 px pack. Version 1's x2-2.6 over 1.5-3 s moved ~0.1 px per frame there: at the embedded
# default's budget RGB difference told approach from recede by chance.
APPROACH_RADIUS_LO_M = (0.04, 0.06)
APPROACH_RADIUS_RATIO = (4.0, 6.0)
ROTATION_SPEED_DEG_PER_S = (120.0, 300.0)
JITTER_AMPLITUDE_M = (0.01, 0.03)
JITTER_FREQ_HZ = (0.3, 1.0)
SHAPE_WOBBLE_DEG = 8.0
BACKGROUND_MOVING_FRACTION = 0.3
BACKGROUND_SPEED_M_PER_S = (0.05, 0.2)
DISTRACTOR_FRACTION = 0.7
DISTRACTOR_RADIUS_M = (0.03, 0.06)
DISTRACTOR_SPEED_M_PER_S = (0.10, 0.35)
APPROACH_FADE_PHASE = 0.3  # the zoom's cross-fade: the last 30 % of each sawtooth period


@dataclass(frozen=True, eq=False)
class VideoPlan:
    """Every random choice of one video, without the pixels (cheap to compute).

    Tracks are in *image* coordinates (pixels, x right, y down, pan included, wrapped into
    ``[0, width) x [0, height)``), one row per frame; frame ``i`` is at ``i / fps`` seconds.
    """

    class_index: int
    video_index: int
    fps: int
    num_frames: int
    width_px: int
    height_px: int
    shape: str
    colour_rgb: tuple[int, int, int]
    centre_xy_px: np.ndarray  # (T, 2) float64
    radius_px: np.ndarray  # (T,) float64, the object's bounding-circle radius
    angle_rad: np.ndarray  # (T,) float64, counter-clockwise on screen
    pan_velocity_px_per_s: np.ndarray  # (2,) zero when the video has no camera pan
    background_kind: str
    background_velocity_px_per_s: np.ndarray  # (2,) texture scroll on top of the pan
    texture_seed: int
    distractor_xy_px: np.ndarray | None  # (T, 2) or None when there is no distractor
    distractor_radius_px: float
    distractor_colour_rgb: tuple[int, int, int]
    # approach / recede only (None otherwise): the main object's opacity (T,) in [0, 1] and
    # its nested copy's radius (T,), drawn on top with opacity 1 - opacity (the endless zoom)
    opacity: np.ndarray | None = None
    inner_radius_px: np.ndarray | None = None

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_index]

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


def _check_indices(spec: SynthSpec, class_index: int, video_index: int) -> None:
    check_int("class_index", class_index)
    check_int("video_index", video_index)
    if not 0 <= class_index < spec.num_classes:
        raise ValueError(f"class_index must be in 0..{spec.num_classes - 1}, got {class_index}")
    if video_index < 0:
        raise ValueError(f"video_index must be >= 0, got {video_index}")


def _palette_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(PALETTE[int(rng.integers(len(PALETTE)))])
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(c) for c in np.clip(base + jitter, 0, 255))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return np.array([np.cos(angle), np.sin(angle)])


def _jitter(rng: np.random.Generator, t_s: np.ndarray, scale_px: float) -> np.ndarray:
    """(T,) smooth small oscillation: one sinusoid with random amplitude, frequency, phase."""
    amplitude_px = rng.uniform(*JITTER_AMPLITUDE_M) * scale_px
    freq_hz = rng.uniform(*JITTER_FREQ_HZ)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    return amplitude_px * np.sin(2.0 * np.pi * freq_hz * t_s + phase)


def _uniform_inside(rng: np.random.Generator, extent_px: float, margin_px: float) -> float:
    """U[margin, extent - margin], or the middle when the margin does not fit."""
    if 2.0 * margin_px >= extent_px:
        return extent_px / 2.0
    return rng.uniform(margin_px, extent_px - margin_px)


def video_plan(spec: SynthSpec, class_index: int, video_index: int) -> VideoPlan:
    """All random choices of video ``(class_index, video_index)``; deterministic.

    ``num_frames = max(2, floor(seconds * fps + 0.5))`` with seconds ~ U[min, max].
    """
    _check_indices(spec, class_index, video_index)
    rng = np.random.default_rng([spec.seed, class_index, video_index])
    name = CLASS_NAMES[class_index]

    width, height = spec.sizes[int(rng.integers(len(spec.sizes)))]
    fps = int(spec.fps_choices[int(rng.integers(len(spec.fps_choices)))])
    seconds = rng.uniform(spec.min_seconds, spec.max_seconds)
    num_frames = max(MIN_FRAMES, int(math.floor(seconds * fps + 0.5)))
    t_s = np.arange(num_frames, dtype=np.float64) / fps
    short_px = float(min(width, height))

    shape = CLASS_SHAPES[name]
    colour = _palette_colour(rng)
    angle0 = rng.uniform(0.0, 2.0 * np.pi)
    radius_px = np.full(num_frames, rng.uniform(*OBJECT_RADIUS_M) * short_px)
    opacity = inner_radius_px = None
    angle_rad = np.full(num_frames, angle0)
    jitter_x, jitter_y = _jitter(rng, t_s, short_px), _jitter(rng, t_s, short_px)
    max_radius_px = OBJECT_RADIUS_M[1] * short_px

    if name in ("move_left", "move_right"):
        # Uniform start over the full (wrapping) width => x(t) ~ U[0, W) for every t.
        direction = -1.0 if name == "move_left" else 1.0
        speed_px_per_s = rng.uniform(*LEFT_RIGHT_SPEED_W_PER_S) * width
        x = rng.uniform(0.0, width) + direction * speed_px_per_s * t_s
        y = _uniform_inside(rng, height, max_radius_px) + jitter_y  # no x jitter: keeps dx signed
    else:
        if name in ("approach", "recede"):
            direction = 1.0 if name == "approach" else -1.0
            radius_lo_px = rng.uniform(*APPROACH_RADIUS_LO_M) * short_px
            log_ratio = np.log(rng.uniform(*APPROACH_RADIUS_RATIO))
            period_s = rng.uniform(*spec.approach_period_s)
            # Sawtooth phase with a uniform start: the radius has one distribution at every t.
            phase = np.mod(rng.uniform(0.0, 1.0) + direction * t_s / period_s, 1.0)
            radius_px = radius_lo_px * np.exp(phase * log_ratio)
            opacity = np.clip((1.0 - phase) / APPROACH_FADE_PHASE, 0.0, 1.0)
            inner_radius_px = radius_px / np.exp(log_ratio)
            max_radius_px = APPROACH_RADIUS_LO_M[1] * APPROACH_RADIUS_RATIO[1] * short_px
        elif name in ("rotate_cw", "rotate_ccw"):
            # Angles are counter-clockwise on screen (y down), so clockwise is negative.
            direction = -1.0 if name == "rotate_cw" else 1.0
            omega_rad_per_s = np.deg2rad(rng.uniform(*ROTATION_SPEED_DEG_PER_S))
            angle_rad = angle0 + direction * omega_rad_per_s * t_s
        else:  # appearance classes: a small rotational wobble on top of the jitter
            angle_rad = angle0 + np.deg2rad(SHAPE_WOBBLE_DEG) * np.sin(
                2.0 * np.pi * rng.uniform(*JITTER_FREQ_HZ) * t_s + rng.uniform(0.0, 2.0 * np.pi)
            )
        margin_px = max_radius_px + JITTER_AMPLITUDE_M[1] * short_px
        x = _uniform_inside(rng, width, margin_px) + jitter_x
        y = _uniform_inside(rng, height, margin_px) + jitter_y

    if rng.random() < spec.camera_pan_fraction:
        pan_velocity = rng.uniform(*PAN_SPEED_W_PER_S) * width * _random_direction(rng)
    else:
        pan_velocity = np.zeros(2)
    frame_wh = np.array([width, height], dtype=np.float64)
    centre_xy = np.mod(np.stack([x, y], axis=1) + t_s[:, None] * pan_velocity, frame_wh)

    background_kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    if rng.random() < BACKGROUND_MOVING_FRACTION:
        background_velocity = rng.uniform(*BACKGROUND_SPEED_M_PER_S) * short_px * _random_direction(rng)
    else:
        background_velocity = np.zeros(2)
    texture_seed = int(rng.integers(2**63))

    distractor_xy = None
    distractor_radius_px = 0.0
    distractor_colour = (0, 0, 0)
    if rng.random() < DISTRACTOR_FRACTION:
        distractor_radius_px = rng.uniform(*DISTRACTOR_RADIUS_M) * short_px
        distractor_colour = _palette_colour(rng)
        start = rng.uniform(0.0, 1.0, size=2) * frame_wh
        velocity = rng.uniform(*DISTRACTOR_SPEED_M_PER_S) * short_px * _random_direction(rng)
        wobble = np.stack([_jitter(rng, t_s, 3.0 * short_px), _jitter(rng, t_s, 3.0 * short_px)], axis=1)
        distractor_xy = np.mod(start + t_s[:, None] * (velocity + pan_velocity) + wobble, frame_wh)

    return VideoPlan(
        class_index=class_index,
        video_index=video_index,
        fps=fps,
        num_frames=num_frames,
        width_px=width,
        height_px=height,
        shape=shape,
        colour_rgb=colour,
        centre_xy_px=centre_xy,
        radius_px=radius_px,
        angle_rad=angle_rad,
        pan_velocity_px_per_s=pan_velocity,
        background_kind=background_kind,
        background_velocity_px_per_s=background_velocity,
        texture_seed=texture_seed,
        distractor_xy_px=distractor_xy,
        distractor_radius_px=float(distractor_radius_px),
        distractor_colour_rgb=distractor_colour,
        opacity=opacity,
        inner_radius_px=inner_radius_px,
    )


def object_track(spec: SynthSpec, class_index: int, video_index: int) -> np.ndarray:
    """(T, 2) float64 on-screen centre (x, y) in pixels of the main object, per frame."""
    return video_plan(spec, class_index, video_index).centre_xy_px
