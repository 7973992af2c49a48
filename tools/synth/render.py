"""The pixels of a planned video: periodic background textures, shapes drawn with wrap-around
copies (the world tiles, so pans and scrolls wrap seamlessly), `iter_frames`, `render_video`."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import cv2
import numpy as np

from tools.synth.plan import VideoPlan, video_plan
from tools.synth.spec import SynthSpec

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
        draw = functools.partial(_draw_wrapped, unit_shape=unit_shape, centre_xy_px=plan.centre_xy_px[i],
                                 angle_rad=float(plan.angle_rad[i]), colour=plan.colour_rgb,
                                 outline=object_outline)
        if plan.opacity is None:
            draw(frame, radius_px=float(plan.radius_px[i]))
        else:  # the endless zoom (tools.synth.plan): the object fades out as its nested copy fades in
            opacity = float(plan.opacity[i])
            _blend(frame, opacity, lambda layer: draw(layer, radius_px=float(plan.radius_px[i])))
            _blend(frame, 1.0 - opacity, lambda layer: draw(layer, radius_px=float(plan.inner_radius_px[i])))
        yield frame


def _blend(frame: np.ndarray, opacity: float, draw_on) -> None:
    """``draw_on(layer)`` composited onto ``frame`` in place with ``opacity`` (0: nothing)."""
    if opacity >= 1.0:
        draw_on(frame)
    elif opacity > 0.0:
        layer = frame.copy()
        draw_on(layer)
        frame[...] = np.clip(frame * (1.0 - opacity) + layer * opacity + 0.5, 0, 255).astype(np.uint8)


def render_video(spec: SynthSpec, class_index: int, video_index: int) -> tuple[np.ndarray, float]:
    """Frames ``(T, H, W, 3)`` uint8 RGB and fps of video ``(class_index, video_index)``.

    Deterministic: same spec, class_index and video_index -> identical frames.
    """
    plan = video_plan(spec, class_index, video_index)
    frames = np.empty((plan.num_frames, plan.height_px, plan.width_px, 3), dtype=np.uint8)
    for i, frame in enumerate(iter_frames(plan)):
        frames[i] = frame
    return frames, float(plan.fps)

