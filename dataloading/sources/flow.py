"""Optical flow and warped optical flow for TSN's temporal streams (TSN.md sections 3 and 7).

Pure functions over frames already resized like the packed RGB frames (same short side):

* `compute_flow` / `FlowEstimator`: dense flow between two consecutive grayscale frames with
  one of `ALGORITHMS`: ``tvl1`` (OpenCV contrib's Dual TV-L1, the paper's algorithm, OpenCV
  default parameters), ``dis`` (DIS, preset MEDIUM: ~70x faster than TV-L1 on a CPU) or
  ``farneback``. Flow is float32 (H, W, 2) in pixels, channel 0 = x (right positive), 1 = y
  (down positive), defined on the first frame: ``next[y + fy, x + fx] ~ prev[y, x]``.
* `quantize` / `dequantize`: the authors' 8-bit storage: clip to [-bound, bound] (bound 20),
  ``q = round((f + bound) * 255 / (2 * bound))``, rounded half to even as the authors'
  ``cvRound`` (and ``np.rint``) do: zero flow = 127.5 -> **128**, so "subtract 128" (the
  authors' flow mean) maps zero flow to exactly 0. `flip_x` is the flow-aware horizontal flip
  of the quantised x plane: ``x -> 255 - x`` (a zero flow then reads 127, -1 LSB = -0.16 px at
  bound 20: the authors' convention, kept).
* `estimate_homography` / `warp_frame`: the camera motion between two frames as a homography,
  from corners (``goodFeaturesToTrack``) tracked with pyramidal Lucas-Kanade, checked
  forward-backward, fitted with RANSAC. The moving subject is excluded cheaply by RANSAC
  itself: the homography explains the dominant motion (the background, which covers most
  tracked corners in action videos); corners on the subject disagree with it by more than
  `RANSAC_REPROJ_PX` and are outliers. Warping the second frame with it cancels the camera
  motion; flow recomputed on (first, warped second) is the *warped flow* (iDT / TSN). When no
  trustworthy homography exists (too few corners, too few inliers, a degenerate fit) the
  identity is used (warped flow = flow) and the pair is counted as a fallback.
* `video_flow`: every consecutive pair of a frame sequence -> quantised x, y planes, streaming
  (one decoded frame and one gray frame kept). `naive_video_flow`: the straightforward
  reference implementation the benchmark compares against (a new algorithm object per pair,
  both frames converted again for every pair, float64 arithmetic, single process).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

ALGORITHMS = ("tvl1", "dis", "farneback")
FLOW_MODALITIES = ("flow", "warped_flow")
DEFAULT_BOUND = 20.0  # px: flow is clipped to +-this before 8-bit quantisation
QUANT_MAX = 255  # quantised flow spans 0..QUANT_MAX (uint8): -bound -> 0, +bound -> QUANT_MAX

# Homography estimation (warped flow)
MAX_CORNERS = 400
MIN_MATCHES = 12  # fewer tracked corners: no homography (identity)
MIN_INLIER_FRACTION = 0.3  # the dominant motion must explain at least this share of the matches
RANSAC_REPROJ_PX = 1.0  # a corner off the homography by more than this is not background
FB_CHECK_PX = 1.0  # forward-backward LK error above this: the track is unreliable


class FlowError(ValueError):
    """Flow cannot be computed for this input (the message says why)."""


def _require_tvl1():
    optflow = getattr(cv2, "optflow", None)
    if optflow is None or not hasattr(optflow, "DualTVL1OpticalFlow_create"):
        raise FlowError("flow algorithm 'tvl1' needs OpenCV contrib (cv2.optflow): install "
                        "opencv-contrib-python-headless instead of opencv-python-headless (same version)")
    return optflow


def create_algorithm(algorithm: str):
    """A fresh OpenCV flow object for ``algorithm`` (one of `ALGORITHMS`); has ``calc``."""
    if algorithm == "tvl1":
        return _require_tvl1().DualTVL1OpticalFlow_create()
    if algorithm == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if algorithm == "farneback":
        # pyr_scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2: OpenCV's sample
        # values, robust on frames from 48 px (tests) to 256 px (the packed short side).
        return cv2.FarnebackOpticalFlow_create(numLevels=3, pyrScale=0.5, fastPyramids=False, winSize=15,
                                               numIters=3, polyN=5, polySigma=1.2, flags=0)
    raise FlowError(f"unknown flow algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def check_algorithm(algorithm: str) -> None:
    """Raise `FlowError` now (not in a worker) if ``algorithm`` is unknown or unavailable."""
    create_algorithm(algorithm)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> gray uint8 (H, W) (ITU-R 601 weights, as cv2)."""
    if rgb.ndim == 2:
        return rgb
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise FlowError(f"expected an RGB uint8 (H, W, 3) frame, got {rgb.dtype} {rgb.shape}")
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _check_pair(prev: np.ndarray, nxt: np.ndarray) -> None:
    if prev.shape != nxt.shape or prev.ndim != 2 or prev.dtype != np.uint8 or nxt.dtype != np.uint8:
        raise FlowError(f"flow needs two gray uint8 frames of one size, got {prev.dtype} {prev.shape} "
                        f"and {nxt.dtype} {nxt.shape}")
    if min(prev.shape) < 8:
        raise FlowError(f"frames of {prev.shape[1]}x{prev.shape[0]} are too small for optical flow")


class FlowEstimator:
    """Reusable flow computation: the algorithm object is created once (TV-L1 allocates its
    pyramids on the first call and reuses them for frames of the same size)."""

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self._impl = create_algorithm(algorithm)

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Gray uint8 (H, W) x 2 -> flow float32 (H, W, 2), pixels, x then y."""
        _check_pair(prev, nxt)
        try:  # the OpenCV implementations need contiguous buffers (a crop view is not)
            flow = self._impl.calc(np.ascontiguousarray(prev), np.ascontiguousarray(nxt), None)
        except cv2.error as e:
            raise FlowError(f"{self.algorithm} failed on {prev.shape[1]}x{prev.shape[0]} frames: "
                            f"{str(e).strip().splitlines()[-1]}") from None
        if flow is None or flow.shape != (*prev.shape, 2):
            raise FlowError(f"{self.algorithm} returned no flow for {prev.shape[1]}x{prev.shape[0]} frames")
        if not np.isfinite(flow).all():
            raise FlowError(f"{self.algorithm} produced non-finite flow values")
        return flow


def compute_flow(prev: np.ndarray, nxt: np.ndarray, algorithm: str = "tvl1") -> np.ndarray:
    """Flow between two gray uint8 (H, W) frames: float32 (H, W, 2) (see the module docstring)."""
    return FlowEstimator(algorithm)(prev, nxt)


def levels_per_px(bound: float = DEFAULT_BOUND) -> float:
    """Quantisation levels per pixel of flow: ``255 / (2 * bound)`` (6.375 at bound 20). The one
    scale of `quantize` and of the DALI graph's quantisation of the flow it computes
    (`dataloading.pipeline.dali_flow`)."""
    if not bound > 0:
        raise ValueError(f"flow bound must be > 0, got {bound}")
    return QUANT_MAX / (2.0 * bound)


def quantize(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Flow in pixels (any shape, float) -> uint8 of the same shape.

    ``q = rint((clip(f, -bound, bound) + bound) * 255 / (2 * bound))``, half to even: -bound ->
    0, 0 -> 128 (127.5 rounds to even), +bound -> 255. float32 input (the algorithms' output)
    is computed in float32 (3x faster than float64; the two agree except for values within
    ~1e-5 px of a bin edge: none in 174k measured), anything else in float64.
    """
    scale = levels_per_px(bound)
    f = np.asarray(flow)
    dtype = np.float32 if f.dtype == np.float32 else np.float64
    v = np.clip(f.astype(dtype, copy=False), -bound, bound).astype(dtype, copy=False)  # a new array
    v += dtype(bound)
    v *= dtype(scale)
    np.rint(v, out=v)
    return v.astype(np.uint8)


def dequantize(q: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """uint8 -> flow in pixels, float32: ``q * 2 * bound / 255 - bound`` (the bin's value)."""
    return (np.asarray(q, np.float32) * np.float32(2.0 * bound / QUANT_MAX) - np.float32(bound)).astype(np.float32)


def flip_x(q_x):
    """The quantised x plane of a horizontally flipped sample: ``255 - x`` (values only; the
    caller mirrors the image). Applies to x planes only: y is unchanged by a horizontal flip.

    The one definition of the flow flip, plain arithmetic so that every site uses it as is:
    a uint8 numpy array gives uint8 (the reference loader), a float torch tensor of 0..255
    values gives float (the torch finishing step's mirrored test views), a DALI DataNode gives
    an int32 node the graph casts back to uint8 (`dataloading.pipeline.dali_flow`).
    """
    return QUANT_MAX - q_x


# ---------------------------------------------------------------------------------------------
# warped flow: camera motion as a homography


@dataclass
class HomographyResult:
    """``matrix``: float64 (3, 3) mapping first-frame pixels to second-frame pixels (identity
    when ``fallback``); ``matches``: tracked corners; ``inliers``: those RANSAC kept."""

    matrix: np.ndarray
    matches: int
    inliers: int
    fallback: bool
    reason: str = ""


def _identity(matches: int, inliers: int, reason: str) -> HomographyResult:
    return HomographyResult(np.eye(3), matches, inliers, True, reason)


def estimate_homography(prev: np.ndarray, nxt: np.ndarray) -> HomographyResult:
    """The dominant (camera) motion from ``prev`` to ``nxt`` (gray uint8 (H, W)).

    Corners of ``prev`` are tracked into ``nxt`` with pyramidal LK and back; tracks whose round
    trip misses by more than `FB_CHECK_PX` are dropped; RANSAC (threshold `RANSAC_REPROJ_PX`)
    fits the homography to the rest, so tracks on the moving subject end up as outliers.
    LK + corners rather than ORB: ORB needs a 31 px border and finds almost nothing in frames
    of ~50 px; corners work from tiny to full-size frames and cost ~1 ms at 340x256.
    """
    _check_pair(prev, nxt)
    prev, nxt = np.ascontiguousarray(prev), np.ascontiguousarray(nxt)
    h, w = prev.shape
    min_distance = max(3, min(h, w) // 40)
    pts = cv2.goodFeaturesToTrack(prev, MAX_CORNERS, 0.01, min_distance, blockSize=5)
    if pts is None or len(pts) < MIN_MATCHES:
        return _identity(0 if pts is None else len(pts), 0, "too few corners")
    lk = dict(winSize=(15, 15), maxLevel=3, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
    fwd, st1, _ = cv2.calcOpticalFlowPyrLK(prev, nxt, pts, None, **lk)
    back, st2, _ = cv2.calcOpticalFlowPyrLK(nxt, prev, fwd, None, **lk)
    ok = (st1.reshape(-1) == 1) & (st2.reshape(-1) == 1)
    ok &= np.linalg.norm((back - pts).reshape(-1, 2), axis=1) < FB_CHECK_PX
    src, dst = pts.reshape(-1, 2)[ok], fwd.reshape(-1, 2)[ok]
    if len(src) < MIN_MATCHES:
        return _identity(len(src), 0, "too few tracked corners")
    matrix, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_REPROJ_PX, maxIters=500, confidence=0.995)
    if matrix is None or mask is None:
        return _identity(len(src), 0, "RANSAC found no homography")
    inliers = int(mask.sum())
    if inliers < max(MIN_MATCHES, MIN_INLIER_FRACTION * len(src)):
        return _identity(len(src), inliers, "no dominant motion")
    # A camera moves little between consecutive frames: a wild homography (flipped, strongly
    # scaled or skewed) is a fit to noise, not camera motion.
    det = float(np.linalg.det(matrix[:2, :2]))
    if not (0.5 < det < 2.0) or np.abs(matrix[2, :2]).max() > 2e-3 or abs(matrix[2, 2]) < 1e-6:
        return _identity(len(src), inliers, "implausible homography")
    return HomographyResult(matrix / matrix[2, 2], len(src), inliers, False)


def warp_frame(nxt: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``nxt`` resampled into the first frame's coordinates: ``out(p) = nxt(matrix @ p)``
    (bilinear, replicated borders), i.e. the camera motion ``matrix`` undone."""
    h, w = nxt.shape[:2]
    return cv2.warpPerspective(nxt, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)


def compute_warped_flow(prev: np.ndarray, nxt: np.ndarray, estimator: FlowEstimator) -> tuple[np.ndarray, bool]:
    """Warped flow float32 (H, W, 2) of two gray frames and whether the identity was used."""
    hom = estimate_homography(prev, nxt)
    if hom.fallback:
        return estimator(prev, nxt), True
    return estimator(prev, warp_frame(nxt, hom.matrix)), False


# ---------------------------------------------------------------------------------------------
# whole videos


@dataclass
class FlowStats:
    """Counts of one `video_flow` run: flow frames (pairs) and warped-flow identity fallbacks."""

    num_flow_frames: int = 0
    homography_fallbacks: int = 0
    fallback_reasons: dict = field(default_factory=dict)


class FlowExtractor:
    """Streaming flow of a frame sequence: ``push`` frames in order; from the second frame on,
    each push returns ``{modality: (x, y)}`` (quantised uint8 (H, W) planes) for the pair
    (previous frame, this frame), for each requested modality in `FLOW_MODALITIES`. Keeps one
    gray frame and one algorithm object (reused for every pair). ``stats`` counts pairs and
    warped-flow identity fallbacks."""

    def __init__(self, algorithm: str = "tvl1", bound: float = DEFAULT_BOUND,
                 modalities: Iterable[str] = ("flow",)):
        self.modalities = tuple(modalities)
        for m in self.modalities:
            if m not in FLOW_MODALITIES:
                raise FlowError(f"unknown flow modality {m!r}; expected one of {', '.join(FLOW_MODALITIES)}")
        if not bound > 0:
            raise FlowError(f"flow bound must be > 0, got {bound}")
        self.bound = float(bound)
        self.estimator = FlowEstimator(algorithm)
        self.stats = FlowStats()
        self._prev: np.ndarray | None = None

    def push(self, frame: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """Add the next frame (RGB uint8 (H, W, 3) or gray uint8 (H, W))."""
        gray = to_gray(frame)
        prev, self._prev = self._prev, gray
        if prev is None:
            return None
        bound, out, f = self.bound, {}, None
        if "flow" in self.modalities:
            f = self.estimator(prev, gray)
            out["flow"] = (quantize(f[..., 0], bound), quantize(f[..., 1], bound))
        if "warped_flow" in self.modalities:
            hom = estimate_homography(prev, gray)
            if hom.fallback:
                self.stats.homography_fallbacks += 1
                reasons = self.stats.fallback_reasons
                reasons[hom.reason] = reasons.get(hom.reason, 0) + 1
                wf = f if f is not None else self.estimator(prev, gray)  # identity: warped = plain flow
            else:
                wf = self.estimator(prev, warp_frame(gray, hom.matrix))
            out["warped_flow"] = (quantize(wf[..., 0], bound), quantize(wf[..., 1], bound))
        self.stats.num_flow_frames += 1
        return out


def video_flow(frames: Iterable[np.ndarray], algorithm: str = "tvl1", bound: float = DEFAULT_BOUND,
               modalities: Iterable[str] = ("flow",), stats: FlowStats | None = None,
               ) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`FlowExtractor` over a sequence: N frames yield N - 1 ``{modality: (x, y)}`` items
    (quantised uint8 (H, W) planes). Pass a generator to stream. ``stats``, if given, receives
    the counts once the sequence is exhausted."""
    extractor = FlowExtractor(algorithm, bound, modalities)
    for frame in frames:
        item = extractor.push(frame)
        if item is not None:
            yield item
    if stats is not None:
        stats.__dict__.update(extractor.stats.__dict__)


def naive_video_flow(frames: Iterable[np.ndarray], algorithm: str = "tvl1", bound: float = DEFAULT_BOUND,
                     modalities: Iterable[str] = ("flow",)) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The straightforward implementation, for the benchmark: all frames held in memory,
    both frames of every pair converted to gray again (float64 weights), a new algorithm
    object per pair and per modality, homography features detected afresh, float64
    clipping and quantisation. Same output contract as `video_flow` (a list)."""
    frames = list(frames)
    out = []
    weights = np.array([0.299, 0.587, 0.114])
    for t in range(len(frames) - 1):
        pair = []
        for img in (frames[t], frames[t + 1]):
            g = img.astype(np.float64) @ weights if img.ndim == 3 else img.astype(np.float64)
            pair.append(np.clip(np.rint(g), 0, 255).astype(np.uint8))
        prev, nxt = pair
        item = {}
        for m in modalities:
            target = nxt
            if m == "warped_flow":
                hom = estimate_homography(prev, nxt)
                if not hom.fallback:
                    target = warp_frame(nxt, hom.matrix)
            f = create_algorithm(algorithm).calc(prev, np.ascontiguousarray(target), None).astype(np.float64)
            q = []
            for c in range(2):
                v = np.minimum(np.maximum(f[..., c], -bound), bound)
                q.append(np.rint((v + bound) * 255.0 / (2.0 * bound)).astype(np.uint8))
            item[m] = (q[0], q[1])
        out.append(item)
    return out
