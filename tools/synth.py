"""Synthetic labelled action-video dataset: the project's embedded default dataset.

No real dataset can be downloaded, so demos, tests and the motion benchmark use videos
generated here. The catalogue (`CLASS_NAMES`, fixed order; ``num_classes`` takes a prefix):

=================  =====================================================================
``move_left``      the "motion object" (an L shape) translates leftwards, wrapping around
``move_right``     ... rightwards
``approach``       the motion object grows (looming; log-size sawtooth, see below)
``recede``         ... shrinks
``rotate_cw``      the motion object rotates clockwise (as seen on screen)
``rotate_ccw``     ... counter-clockwise
``shape_circle``   a circle with small random jitter motion
``shape_square``   a square, jitter
``shape_triangle`` a triangle, jitter
``shape_cross``    a plus-shaped cross, jitter
=================  =====================================================================

The pairs (move_left, move_right), (approach, recede), (rotate_cw, rotate_ccw) form
`MOTION_CLASSES`: within a pair every *single frame* has the same distribution, at every
frame index, so only motion over time tells them apart. This holds by construction:

* left/right: x = (x0 + v*t) mod W with x0 ~ U[0, W), so x(t) ~ U[0, W) for every t and
  both directions; the object is drawn with wrap-around copies at the frame edges.
* approach/recede: log radius follows a sawtooth with a uniformly random phase,
  ``log r = log r_lo + frac(phase0 ± t / period) * log(r_hi / r_lo)``, so the phase (and
  hence the radius) has the same distribution at every t for both directions.
* rotation: angle = angle0 ± omega*t with angle0 ~ U[0, 2pi).

Everything else (object shape, palette colour, sizes, start positions, speeds magnitudes,
background, camera pan, distractor) is drawn from distributions that do not depend on
the class within a pair. The four ``shape_*`` classes are separable by appearance alone,
so an appearance-only model tops out at about (4 + 6/2) / 10 = 70 % on the full catalogue.

Distractors, per video: a periodic textured background (smooth noise, blobs or stripes,
with static grain), optionally scrolling; a camera pan (a constant drift of the whole
frame content, background and objects, wrapping) on ``camera_pan_fraction`` of videos; a
small second object moving on its own; the object colour from a shared `PALETTE` plus
jitter; random object size. The pan speed is bounded below the slowest left/right speed,
so the on-screen direction of ``move_left``/``move_right`` is never flipped by the pan.

Output layout of `generate_dataset`::

    OUT/videos/<class_name>/<class_name>_<i:04d>.mp4   # H.264, yuv420p, constant fps
    OUT/labels.csv      # header "path,label"; path relative to OUT, label = class NAME
    OUT/classes.txt     # one class name per line, in class-index order
    OUT/synth.json      # generator version + spec, guards resuming with another spec

Determinism: every random choice of video ``(class_index, video_index)`` comes from
``np.random.default_rng([spec.seed, class_index, video_index])``, so frames do not depend
on worker scheduling, ``num_classes`` or ``videos_per_class``; x264 runs single-threaded,
so the .mp4 bytes are reproducible for a given PyAV/FFmpeg/x264 build.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

# Bump when a change alters rendered frames or encoding, so resuming an old directory fails
# loudly instead of silently mixing two generations.
SYNTH_VERSION = 1

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
LABELS_FILE, CLASSES_FILE, SPEC_FILE = "labels.csv", "classes.txt", "synth.json"
VIDEO_SUFFIX = ".mp4"
# x264 settings chosen for a reproducible bitstream: threads=1 (no frame-thread races) and
# asm=0 (C kernels only). Measured here (x264 core 165 in the PyAV 18 wheel, AMD EPYC): with
# the AVX-512 kernels, 1-15 % of repeated encodes of the same 64x48 frames in one process
# came out different, while asm=AVX2 and asm=0 were stable over hundreds of repeats (and
# valgrind, which runs the AVX2 paths, reports no uninitialised reads in x264). C-only also
# makes x264's output independent of the CPU's SIMD level, at ~3x the encode time
# (~1.7 ms per 320x240 frame, still about 10x the rendering time).
X264_OPTIONS = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}

_DRAW_SHIFT_BITS = 4  # cv2 sub-pixel drawing: coordinates in 1/16 px
_DRAW_SCALE = 1 << _DRAW_SHIFT_BITS


def _centred_polygon(points: list[tuple[float, float]]) -> np.ndarray:
    """(K, 2) float64 polygon translated so its area centroid is the origin."""
    p = np.asarray(points, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2.0
    centroid = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6.0 * area)
    return p - centroid


def _regular_polygon(num_vertices: int, start_angle_rad: float) -> np.ndarray:
    angles = start_angle_rad + 2.0 * np.pi * np.arange(num_vertices) / num_vertices
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_bounding_circle(polygon: np.ndarray) -> np.ndarray:
    """Scale a polygon about the origin so its farthest vertex is at distance 1."""
    return polygon / np.linalg.norm(polygon, axis=1).max()


# Unit shapes (K, 2) in image coordinates (x right, y down), centred on the origin, with
# bounding circle radius 1: an object of radius r is the unit shape times r, so r is its
# bounding radius exactly. None = a circle (cv2.circle).
_ARM = 0.3  # half thickness of the cross arms, relative to the arm length
_SHAPES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": _unit_bounding_circle(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)),
    "triangle": _regular_polygon(3, -np.pi / 2),
    "cross": _unit_bounding_circle(np.array(
        [
            [-_ARM, -1], [_ARM, -1], [_ARM, -_ARM], [1, -_ARM], [1, _ARM], [_ARM, _ARM],
            [_ARM, 1], [-_ARM, 1], [-_ARM, _ARM], [-1, _ARM], [-1, -_ARM], [-_ARM, -_ARM],
        ],
        dtype=np.float64,
    )),
    # The motion object: chiral and without rotational symmetry, so rotation is visible;
    # centred on its area centroid, which is what the track follows.
    "ell": _unit_bounding_circle(_centred_polygon(
        [(-0.75, -0.85), (-0.05, -0.85), (-0.05, 0.15), (0.75, 0.15), (0.75, 0.85), (-0.75, 0.85)]
    )),
}
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
APPROACH_RADIUS_LO_M = (0.06, 0.09)
APPROACH_RADIUS_RATIO = (2.0, 2.6)
APPROACH_PERIOD_S = (1.5, 3.0)
ROTATION_SPEED_DEG_PER_S = (120.0, 300.0)
JITTER_AMPLITUDE_M = (0.01, 0.03)
JITTER_FREQ_HZ = (0.3, 1.0)
SHAPE_WOBBLE_DEG = 8.0
BACKGROUND_MOVING_FRACTION = 0.3
BACKGROUND_SPEED_M_PER_S = (0.05, 0.2)
DISTRACTOR_FRACTION = 0.7
DISTRACTOR_RADIUS_M = (0.03, 0.06)
DISTRACTOR_SPEED_M_PER_S = (0.10, 0.35)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Validated on construction (`ValueError` naming the field).

    ``sizes`` are (width, height) pairs in pixels, both even (yuv420p); each video picks
    one size, one fps from ``fps_choices`` and a duration ~ U[min_seconds, max_seconds].
    ``camera_pan_fraction`` is the probability that a video has a camera pan.
    """

    num_classes: int = 10
    videos_per_class: int = 20
    seed: int = 0
    min_seconds: float = 2.0
    max_seconds: float = 10.0
    sizes: tuple[tuple[int, int], ...] = ((160, 120), (192, 144), (224, 168), (320, 240))
    fps_choices: tuple[int, ...] = (15, 24, 25, 30)
    camera_pan_fraction: float = 0.3

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
        _check_int("num_classes", self.num_classes)
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise ValueError(
                f"num_classes must be in {MIN_CLASSES}..{MAX_CLASSES} (the catalogue has "
                f"{MAX_CLASSES} classes), got {self.num_classes}"
            )
        _check_int("videos_per_class", self.videos_per_class)
        if self.videos_per_class < 1:
            raise ValueError(f"videos_per_class must be >= 1, got {self.videos_per_class}")
        _check_int("seed", self.seed)
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
            _check_int("fps_choices entry", fps)
            if not 1 <= fps <= MAX_FPS:
                raise ValueError(f"fps_choices entry must be in 1..{MAX_FPS}, got {fps}")
        if not 0.0 <= self.camera_pan_fraction <= 1.0:
            raise ValueError(f"camera_pan_fraction must be in [0, 1], got {self.camera_pan_fraction}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes of this spec, in label-index order."""
        return CLASS_NAMES[: self.num_classes]


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")


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

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_index]

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


def _check_indices(spec: SynthSpec, class_index: int, video_index: int) -> None:
    _check_int("class_index", class_index)
    _check_int("video_index", video_index)
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
            period_s = rng.uniform(*APPROACH_PERIOD_S)
            # Sawtooth phase with a uniform start: the radius has one distribution at every t.
            phase = np.mod(rng.uniform(0.0, 1.0) + direction * t_s / period_s, 1.0)
            radius_px = radius_lo_px * np.exp(phase * log_ratio)
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
    )


def object_track(spec: SynthSpec, class_index: int, video_index: int) -> np.ndarray:
    """(T, 2) float64 on-screen centre (x, y) in pixels of the main object, per frame."""
    return video_plan(spec, class_index, video_index).centre_xy_px


# --------------------------------------------------------------------------- rendering


def _periodic_lowpass(rng: np.random.Generator, height: int, width: int, cycles: float) -> np.ndarray:
    """(H, W) float64 smooth noise, zero mean / unit std, periodic in both axes (tiles)."""
    noise = rng.standard_normal((height, width))
    fy = np.fft.fftfreq(height)[:, None] * height  # cycles per frame height
    fx = np.fft.rfftfreq(width)[None, :] * width
    spectrum = np.fft.rfft2(noise) * np.exp(-(fx**2 + fy**2) / (2.0 * cycles**2))
    field = np.fft.irfft2(spectrum, s=(height, width))
    return (field - field.mean()) / (field.std() + 1e-12)


def _background_texture(plan: VideoPlan) -> np.ndarray:
    """(H, W, 3) uint8 periodic texture (so scrolling and panning can wrap seamlessly)."""
    rng = np.random.default_rng(plan.texture_seed)
    height, width = plan.height_px, plan.width_px
    if plan.background_kind == "noise":
        level = 0.5 + 0.18 * _periodic_lowpass(rng, height, width, rng.uniform(2.0, 6.0))
    elif plan.background_kind == "stripes":
        yy, xx = np.mgrid[0:height, 0:width]
        level = np.zeros((height, width))
        for _ in range(2):  # integer wave numbers keep the grating periodic
            kx, ky = int(rng.integers(-6, 7)), int(rng.integers(-6, 7))
            kx = kx or 1
            level += 0.25 * np.sin(2.0 * np.pi * (kx * xx / width + ky * yy / height) + rng.uniform(0, 2 * np.pi))
        level += 0.5
    else:  # blobs
        canvas = np.zeros((height, width), dtype=np.float32)
        short_px = min(width, height)
        for _ in range(int(rng.integers(6, 16))):
            centre = rng.uniform(0.0, 1.0, size=2) * (width, height)
            radius = rng.uniform(0.05, 0.25) * short_px
            _draw_wrapped(canvas, None, centre, radius, 0.0, float(rng.uniform(-1.0, 1.0)), outline=None)
        smooth = np.fft.irfft2(
            np.fft.rfft2(canvas)
            * np.exp(-((np.fft.rfftfreq(width)[None, :] * width) ** 2 + (np.fft.fftfreq(height)[:, None] * height) ** 2)
                     / (2.0 * 12.0**2)),
            s=(height, width),
        )
        level = 0.5 + 0.3 * np.clip(smooth, -1.0, 1.0)
    # Muted two-tone colouring plus static grain (texture that moves with the background).
    grey = rng.uniform(50.0, 190.0, size=2)
    tones = grey[:, None] + rng.normal(0.0, 18.0, size=(2, 3))
    level = np.clip(level, 0.0, 1.0)[..., None]
    rgb = tones[0] * (1.0 - level) + tones[1] * level + rng.normal(0.0, 5.0, size=(height, width, 1))
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _draw_wrapped(
    image: np.ndarray,
    unit_shape: np.ndarray | None,
    centre_xy_px: np.ndarray,
    radius_px: float,
    angle_rad: float,
    colour: tuple[int, int, int] | float,
    outline: tuple[int, int, int] | None,
) -> None:
    """Draw a shape in place, plus wrap-around copies so the frame tiles (periodic world)."""
    height, width = image.shape[:2]
    reach_px = radius_px + 2.0  # bounding radius + anti-aliasing / outline margin
    if unit_shape is not None:
        cos_a, sin_a = math.cos(angle_rad), math.sin(angle_rad)
        # Counter-clockwise on screen with y pointing down: y' = -x sin + y cos.
        rotation = np.array([[cos_a, -sin_a], [sin_a, cos_a]])
        local = unit_shape @ rotation * radius_px
    for dx in (-width, 0, width):
        cx = centre_xy_px[0] + dx
        if cx + reach_px < 0 or cx - reach_px > width:
            continue
        for dy in (-height, 0, height):
            cy = centre_xy_px[1] + dy
            if cy + reach_px < 0 or cy - reach_px > height:
                continue
            if unit_shape is None:
                centre_fixed = (int(round(cx * _DRAW_SCALE)), int(round(cy * _DRAW_SCALE)))
                radius_fixed = int(round(radius_px * _DRAW_SCALE))
                cv2.circle(image, centre_fixed, radius_fixed, colour, -1, cv2.LINE_AA, _DRAW_SHIFT_BITS)
                if outline is not None:
                    cv2.circle(image, centre_fixed, radius_fixed, outline, 1, cv2.LINE_AA, _DRAW_SHIFT_BITS)
            else:
                points = np.round((local + (cx, cy)) * _DRAW_SCALE).astype(np.int32)
                cv2.fillPoly(image, [points], colour, cv2.LINE_AA, _DRAW_SHIFT_BITS)
                if outline is not None:
                    cv2.polylines(image, [points], True, outline, 1, cv2.LINE_AA, _DRAW_SHIFT_BITS)


def iter_frames(plan: VideoPlan) -> Iterator[np.ndarray]:
    """Yield the plan's frames, each (H, W, 3) uint8 RGB, C-contiguous, a fresh array."""
    texture = _background_texture(plan)
    size_wh = (plan.width_px, plan.height_px)
    # Background shift = texture scroll + camera pan; objects carry the pan in their tracks.
    background_velocity = plan.background_velocity_px_per_s + plan.pan_velocity_px_per_s
    moving = bool(np.any(background_velocity))
    object_outline = tuple(int(0.35 * c) for c in plan.colour_rgb)
    unit_shape = _SHAPES[plan.shape]
    distractor_outline = tuple(int(0.35 * c) for c in plan.distractor_colour_rgb)
    for i in range(plan.num_frames):
        if moving:
            shift_x, shift_y = background_velocity * (i / plan.fps)
            # Reduce modulo the period (the texture tiles) so float32 keeps sub-pixel precision.
            shift = np.float32([[1, 0, shift_x % plan.width_px], [0, 1, shift_y % plan.height_px]])
            frame = cv2.warpAffine(texture, shift, size_wh, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        else:
            frame = texture.copy()
        if plan.distractor_xy_px is not None:  # behind the main object
            _draw_wrapped(frame, None, plan.distractor_xy_px[i], plan.distractor_radius_px, 0.0,
                          plan.distractor_colour_rgb, distractor_outline)
        _draw_wrapped(frame, unit_shape, plan.centre_xy_px[i], float(plan.radius_px[i]),
                      float(plan.angle_rad[i]), plan.colour_rgb, object_outline)
        yield frame


def render_video(spec: SynthSpec, class_index: int, video_index: int) -> tuple[np.ndarray, float]:
    """Frames ``(T, H, W, 3)`` uint8 RGB and fps of video ``(class_index, video_index)``.

    Deterministic: same spec, class_index and video_index -> identical frames.
    """
    plan = video_plan(spec, class_index, video_index)
    frames = np.empty((plan.num_frames, plan.height_px, plan.width_px, 3), dtype=np.uint8)
    for i, frame in enumerate(iter_frames(plan)):
        frames[i] = frame
    return frames, float(plan.fps)


# --------------------------------------------------------------------------- writing


def video_relpath(class_index: int, video_index: int) -> str:
    """``videos/<class>/<class>_<i:04d>.mp4``, relative to the dataset directory (POSIX)."""
    name = CLASS_NAMES[class_index]
    return f"videos/{name}/{name}_{video_index:04d}{VIDEO_SUFFIX}"


def write_video(path: str | os.PathLike, frames: Iterator[np.ndarray], fps: int, width_px: int, height_px: int) -> int:
    """Encode RGB frames to an H.264/yuv420p .mp4 atomically; returns the frame count.

    The stream goes to a hidden ``.<name>.<pid>.partial`` file beside ``path`` that is
    renamed over ``path`` only once complete (and removed on error), so an existing
    ``path`` is always a complete video. Only a hard kill can leave a ``.partial`` file
    behind; nothing reads those and they are safe to delete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    count = 0
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
            stream.width, stream.height, stream.pix_fmt = width_px, height_px, "yuv420p"
            time_base = Fraction(1, fps)
            for frame_rgb in frames:
                frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
                frame.pts, frame.time_base = count, time_base
                container.mux(stream.encode(frame))
                count += 1
            container.mux(stream.encode(None))  # flush delayed (B-)frames
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _write_one(spec: SynthSpec, out_dir: str, class_index: int, video_index: int) -> tuple[int, int]:
    """Worker: render and encode one video unless it exists. Returns (class, video) index."""
    path = Path(out_dir) / video_relpath(class_index, video_index)
    if not path.exists():
        plan = video_plan(spec, class_index, video_index)
        write_video(path, iter_frames(plan), plan.fps, plan.width_px, plan.height_px)
    return class_index, video_index


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; avoid oversubscription


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Spec fields that change video content; num_classes / videos_per_class only select which
# (class, video) indices exist, so they may change between resumed runs.
_CONTENT_FIELDS = ("seed", "min_seconds", "max_seconds", "sizes", "fps_choices", "camera_pan_fraction")


def _check_resume(out_dir: Path, spec: SynthSpec) -> None:
    """Refuse to add videos to a directory generated with a content-changing spec."""
    spec_path = out_dir / SPEC_FILE
    if not spec_path.exists():
        return
    try:
        saved = json.loads(spec_path.read_text(encoding="utf-8"))
        old = SynthSpec(**saved["spec"])
        version = saved["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"out_dir {out_dir}: unreadable {SPEC_FILE} ({exc}); use a new directory") from exc
    if version != SYNTH_VERSION:
        raise ValueError(
            f"out_dir {out_dir} was generated by synth version {version}, this is {SYNTH_VERSION}; "
            "use a new directory"
        )
    for name in _CONTENT_FIELDS:
        if getattr(old, name) != getattr(spec, name):
            raise ValueError(
                f"out_dir {out_dir} was generated with {name}={getattr(old, name)!r}, not "
                f"{getattr(spec, name)!r}; use a new directory to avoid mixing datasets"
            )


def _write_spec(out_dir: Path, spec: SynthSpec) -> None:
    _atomic_write_text(out_dir / SPEC_FILE, json.dumps({"version": SYNTH_VERSION, "spec": asdict(spec)}, indent=2) + "\n")


def generate_dataset(
    out_dir: str | os.PathLike, spec: SynthSpec, workers: int | None = None, progress: bool = True
) -> dict:
    """Write the dataset described by ``spec`` under ``out_dir`` (layout: module docstring).

    Videos that already exist are skipped, so re-running resumes an interrupted run;
    labels.csv and classes.txt are (re)written atomically at the end and list exactly the
    videos of ``spec``. ``workers`` processes render in parallel (default os.cpu_count();
    1 renders in this process); they are started with ``spawn``, so a calling script needs
    the usual ``if __name__ == "__main__":`` guard. Returns ``{num_videos, num_classes, out_dir,
    seconds_total (summed video duration), num_written, num_skipped, wall_seconds}``.
    """
    if not isinstance(spec, SynthSpec):
        raise TypeError(f"spec must be a SynthSpec, got {type(spec).__name__}")
    if workers is None:
        workers = os.cpu_count() or 1
    _check_int("workers", workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, spec)
    _write_spec(out, spec)  # before any video, so an interrupted run is guarded too
    for name in spec.class_names:
        (out / "videos" / name).mkdir(parents=True, exist_ok=True)

    jobs = [(c, v) for c in range(spec.num_classes) for v in range(spec.videos_per_class)]
    todo = [(c, v) for c, v in jobs if not (out / video_relpath(c, v)).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="video", desc="synth",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(todo) <= 1:
            for c, v in todo:
                _write_one(spec, str(out), c, v)
                bar.update(1)
        else:
            # spawn: safe even when the caller holds threads (Ray, torch, cv2 pools).
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                                       initializer=_init_worker)
            try:
                futures = [pool.submit(_write_one, spec, str(out), c, v) for c, v in todo]
                for future in as_completed(futures):
                    future.result()  # re-raises a worker's error (the finally cancels the rest)
                    bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()

    _atomic_write_text(out / CLASSES_FILE, "".join(f"{name}\n" for name in spec.class_names))
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows((video_relpath(c, v), CLASS_NAMES[c]) for c, v in jobs)
    _atomic_write_text(out / LABELS_FILE, labels.getvalue())

    seconds_total = sum(video_plan(spec, c, v).seconds for c, v in jobs)
    return {
        "num_videos": len(jobs),
        "num_classes": spec.num_classes,
        "out_dir": str(out),
        "seconds_total": seconds_total,
        "num_written": len(todo),
        "num_skipped": len(jobs) - len(todo),
        "wall_seconds": time.monotonic() - started,
    }


# --------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x120, got {text!r}") from None
    return width, height


def add_cli(subparsers) -> None:
    """Register ``synth`` on an argparse subparsers object (``func`` -> exit code)."""
    defaults = SynthSpec()
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic action-video dataset",
        description="Generate labelled synthetic action videos (H.264 .mp4) with labels.csv and "
        f"classes.txt. Classes, in order: {', '.join(CLASS_NAMES)}. Re-running resumes.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--classes", type=int, default=defaults.num_classes,
                        help=f"number of classes, a catalogue prefix ({MIN_CLASSES}..{MAX_CLASSES})")
    parser.add_argument("--videos-per-class", type=int, default=defaults.videos_per_class)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--size", type=_parse_size, action="append", metavar="WxH",
                        help="frame size choice, repeatable (default: "
                        f"{' '.join(f'{w}x{h}' for w, h in defaults.sizes)})")
    parser.add_argument("--fps", type=int, action="append",
                        help=f"frame rate choice, repeatable (default: {' '.join(map(str, defaults.fps_choices))})")
    parser.add_argument("--camera-pan-fraction", type=float, default=defaults.camera_pan_fraction)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        spec = SynthSpec(
            num_classes=args.classes,
            videos_per_class=args.videos_per_class,
            seed=args.seed,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            sizes=tuple(args.size) if args.size else SynthSpec.sizes,
            fps_choices=tuple(args.fps) if args.fps else SynthSpec.fps_choices,
            camera_pan_fraction=args.camera_pan_fraction,
        )
        summary = generate_dataset(args.out, spec, workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:
        print(f"tsn synth: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"synth: {summary['num_videos']} videos ({summary['num_written']} written, "
        f"{summary['num_skipped']} skipped), {summary['num_classes']} classes, "
        f"{summary['seconds_total']:.1f} s of video in {summary['wall_seconds']:.1f} s -> {summary['out_dir']}"
    )
    return 0


__all__ = [
    "CLASS_NAMES",
    "MOTION_CLASSES",
    "PALETTE",
    "SynthSpec",
    "VideoPlan",
    "add_cli",
    "generate_dataset",
    "iter_frames",
    "object_track",
    "render_video",
    "video_plan",
    "video_relpath",
    "write_video",
]
