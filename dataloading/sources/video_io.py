"""Decoding source videos and encoding the stored frames of packed samples.

Everything here counts *decoded* frames: container headers lie (a corrupt upload was seen
claiming 444 frames with 68 decodable), so a frame count is only ever the number of frames
a decoder actually produced. Decoding always runs sequentially from the start of the file
(no seeking), which also handles open-GOP streams and non-zero start timestamps.

Public API:

* `VideoError` -- a source video that cannot be used, with a human-readable reason.
* `read_video_frames` -- streaming decode + resize (+ optional fps resampling); the packer
  uses it so a long video never sits in memory as raw frames.
* `decode_video` -- the same, collected into a `DecodedVideo`.
* `resized_size` -- the output size for a short-side resize.
* `encode_jpeg_frames` -- RGB frames -> JPEG files (cv2).
* `VideoEncoder` / `encode_video` -- RGB frames -> an in-memory h264 / vp9 / mjpeg container,
  then decoded back to count the frames that the stored video really holds.
* `count_video_frames` -- decoded frame count of an in-memory video.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import cv2
import numpy as np

# Used only when a stream declares no usable frame rate and the timestamps give none either.
FALLBACK_FPS = 25.0

# codec name -> (PyAV encoder, container format, encoder pixel format)
VIDEO_CODECS = {
    "h264": ("libx264", "mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", "yuv420p"),
    "mjpeg": ("mjpeg", "avi", "yuvj420p"),
}
# libx264 preset: "veryfast" encodes ~3x faster than the default "medium" for ~10% more bytes
# at the default CRF 23 (measured on 340x256 frames); packing speed matters more here.
X264_PRESET = "veryfast"
# MJPEG quantiser bounds (the mjpeg encoder otherwise targets 200 kbit/s and looks blocky).
# qscale 2-3 measured on 342x256 synthetic frames: mean abs error ~2.5/255, like cv2 JPEG
# quality 75 (q90: ~1.9), at ~60% of the bytes of quality-90 JPEGs.
MJPEG_QMIN, MJPEG_QMAX = 2, 3


# A source is rejected as truncated when its decoded frames end before this fraction of the
# video stream's duration (and at least `TRUNCATED_MIN_MISSING_FRAMES` frame periods before).
# Time, not a frame count: a header's count is no evidence of a cut (a drop-frame AVI lists
# empty index entries as frames: 444 listed, 68 coded, and its frames still run to the end of
# its duration; balle1-vp9.avi of the real-video tests: 295 of 300, 5 empty). A file cut in half
# ends at about half its duration; B-frame and edit-list edges cost a frame or two. A cut that
# keeps more than 80% of the duration passes unnoticed.
TRUNCATED_FRACTION = 0.8
TRUNCATED_MIN_MISSING_FRAMES = 4


class VideoError(Exception):
    """A source (or re-encoded) video that cannot be used; ``reason`` is for humans."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) when pickled across worker processes
        return (type(self), (self.path, self.reason))


@dataclass
class VideoInfo:
    """Properties of an opened source video, filled in while its frames are read.

    ``width``/``height`` are the *output* frame size (after resizing), known once the first
    frame is decoded; ``num_decoded_frames`` counts decoded source frames (before fps
    resampling) and ``num_frames`` the frames yielded.
    """

    path: str
    source_fps: float
    fps: float  # frame rate of the yielded frames (== source_fps unless resampled)
    source_width: int
    source_height: int
    header_num_frames: int | None  # what the container claims; never trusted
    codec_name: str
    # the video stream's duration (its header, Matroska's DURATION tag, or the container's when
    # it holds only video; at least the header's frame count / fps), and where its decoded frames end
    # (the last one's timestamp + one frame period, from the stream's start): `check_truncated`
    claimed_duration_s: float | None = None
    decoded_end_s: float = 0.0
    width: int = 0
    height: int = 0
    num_decoded_frames: int = 0
    num_frames: int = 0


@dataclass
class DecodedVideo:
    """All frames of a video: RGB uint8 arrays of shape (height, width, 3)."""

    frames: list[np.ndarray]
    fps: float  # frame rate of ``frames`` (native unless resampled)
    source_fps: float
    source_width: int
    source_height: int
    header_num_frames: int | None
    num_decoded_frames: int  # source frames decoded (before fps resampling)
    width: int = field(init=False)
    height: int = field(init=False)

    def __post_init__(self):
        self.height, self.width = self.frames[0].shape[:2]

    @property
    def num_frames(self) -> int:
        return len(self.frames)


def _round_even(x: float) -> int:
    """Nearest even integer >= 2 (4:2:0 chroma subsampling needs even frame sizes)."""
    return max(2, int(round(x / 2.0)) * 2)


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling so the short side is ``short_side`` (aspect kept).

    Both sides are rounded to even numbers, so an odd ``short_side`` becomes the nearest even
    value. ``None`` keeps the source size unchanged (odd sizes included).
    """
    if short_side is None:
        return width, height
    if short_side < 2:
        raise ValueError(f"short_side must be >= 2, got {short_side}")
    scale = short_side / min(width, height)
    return _round_even(width * scale), _round_even(height * scale)


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = rgb.shape[:2]
    if (width, height) == size:
        return rgb
    # INTER_AREA averages source pixels when shrinking (no aliasing); it is blocky when
    # enlarging, where bilinear is the better choice.
    shrinking = size[0] * size[1] < width * height
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and 0 < float(rate) < 1000:
            return float(rate)
    return None


def _open_error_reason(path: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not a video file"
    if isinstance(err, PermissionError):
        return "permission denied"
    detail = getattr(err, "strerror", None) or str(err)
    return f"cannot open: not a media file, or truncated/corrupt ({detail})"


def _claimed_duration_s(container, stream) -> float | None:
    """The video stream's duration as its container states it: the stream header, else
    Matroska's per-stream DURATION tag, else the container's duration when it holds nothing
    but video (an audio track may run longer); None when none is stated."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if (stream.metadata or {}).get("DURATION"):
        try:
            h, m, sec = stream.metadata["DURATION"].split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None
    if container.duration and all(st.type == "video" for st in container.streams):
        return container.duration / 1e6  # microseconds (AV_TIME_BASE)
    return None


def check_truncated(info: VideoInfo) -> None:
    """Raise `VideoError` when ``info`` (complete: every frame decoded) shows a source whose
    decoded frames stop clearly short of its video stream's duration (`TRUNCATED_FRACTION`):
    a file cut short whose decoder stops without an error. How many frames its header lists
    is not evidence (empty index entries of a drop-frame capture are listed as frames)."""
    claimed, end, fps = info.claimed_duration_s, info.decoded_end_s, info.source_fps
    if claimed and end < TRUNCATED_FRACTION * claimed and (claimed - end) * fps >= TRUNCATED_MIN_MISSING_FRAMES:
        raise VideoError(info.path, f"its frames stop at {end:.2f} s of the {claimed:.2f} s its header states "
                                    f"({info.num_decoded_frames} frames decoded; truncated? a file cut short "
                                    f"decodes without an error; re-copy or re-download it)")


def read_video_frames(
    path: str | os.PathLike, short_side: int | None, fps: float | None = None, info_out: list | None = None
) -> Iterator[np.ndarray]:
    """Yield the RGB uint8 (H, W, 3) frames of ``path``, decoded sequentially from the start.

    Frames are resized so the short side is ``short_side`` (see `resized_size`; ``None`` keeps
    the size). With ``fps`` set, output frame ``k`` is the source frame whose timestamp is
    nearest to ``t0 + k / fps`` (ties -> earlier frame), for every ``k`` whose time lies inside
    the span covered by the source frames; ``None`` yields every decoded frame.

    If ``info_out`` is a list, a `VideoInfo` is appended to it as soon as the file is opened;
    it is updated while frames are produced (size, counts) and complete once the generator
    is exhausted.

    Raises `VideoError` for: missing / empty / unreadable files, no video stream, a decoder
    error after N frames ("truncated or corrupt after N frames"), and zero decodable frames.
    A file cut short whose decoder just stops early is not an error here (the frames are what
    they are); the packer rejects it with `check_truncated` on the complete ``info``.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise VideoError(path, "empty file (0 bytes)")
    except OSError as e:
        raise VideoError(path, _open_error_reason(path, e)) from None
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    try:
        container = av.open(path, "r")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(path, _open_error_reason(path, e)) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(path, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        # Frame threading decodes several frames in parallel: much faster for long H.264
        # files; output order and content are unchanged.
        stream.thread_type = "AUTO"
        source_fps = _stream_fps(stream)
        ctx = stream.codec_context
        info = VideoInfo(
            path=path,
            source_fps=source_fps or FALLBACK_FPS,
            fps=float(fps) if fps is not None else (source_fps or FALLBACK_FPS),
            source_width=int(ctx.width or 0),
            source_height=int(ctx.height or 0),
            header_num_frames=int(stream.frames) if stream.frames else None,
            codec_name=ctx.name or "unknown",
        )
        seconds = _claimed_duration_s(container, stream)
        if stream.frames:
            # the header's count x the frame period is a duration too, and the one an AVI
            # cut short keeps (its demuxer re-derives stream.duration from the chunks left);
            # AVI counts empty index entries, so it never overstates a drop-frame capture
            seconds = max(seconds or 0.0, int(stream.frames) / info.source_fps)
        info.claimed_duration_s = seconds
        if info_out is not None:
            info_out.append(info)
        frames = _decode_frames(container, stream, path, info)
        if fps is None:
            source = ((None, f) for f in frames)
        else:
            source = _resample(frames, 1.0 / info.source_fps, 1.0 / float(fps))
        size = None
        last_id, last_out = None, None
        for frame_id, frame in source:
            if frame_id is not None and frame_id == last_id:
                yield last_out  # fps upsampling repeats a source frame: resize it once
                info.num_frames += 1
                continue
            if size is None:
                info.source_width, info.source_height = frame.width, frame.height
                size = resized_size(frame.width, frame.height, short_side)
                info.width, info.height = size
            out = _resize(frame.to_ndarray(format="rgb24"), size)
            last_id, last_out = frame_id, out
            info.num_frames += 1
            yield out
        if info.num_frames == 0:
            raise VideoError(path, "no decodable video frames")


def _decode_frames(container, stream, path: str, info: VideoInfo) -> Iterator[av.VideoFrame]:
    """Decoded source frames in presentation order; counts them in ``info`` and follows where
    they end in time (``decoded_end_s``: from the stream's start, one frame period past the
    last timestamp; a frame without a timestamp counts one period past the one before)."""
    period_s = 1.0 / info.source_fps
    start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base \
        else None
    try:
        for frame in container.decode(stream):
            info.num_decoded_frames += 1
            if frame.pts is not None and frame.time_base:
                t = float(frame.pts * frame.time_base)
                start_s = t if start_s is None else start_s
                info.decoded_end_s = max(info.decoded_end_s, t - start_s + period_s)
            else:
                info.decoded_end_s += period_s
            yield frame
    except (av.FFmpegError, EOFError) as e:  # PyAV errors derive from FFmpegError
        n = info.num_decoded_frames
        if n == 0:
            raise VideoError(path, f"cannot decode any frame ({e})") from None
        raise VideoError(path, f"truncated or corrupt after {n} frames ({e})") from None


_TIME_EPS_S = 1e-6  # timestamps closer than this are equal (far below any frame period)


def _resample(frames: Iterable[av.VideoFrame], source_period_s: float, period_s: float):
    """Nearest-timestamp fps resampling, streaming: yields (source frame index, frame).

    Timestamps come from the frames (pts * time_base); a missing or non-increasing one is
    replaced by previous + one source frame period. Output time ``k`` exists while it lies
    before the end of the last source frame (its timestamp + one source period). Comparisons
    allow `_TIME_EPS_S` so float rounding (3 * 0.05 != 0.15) cannot turn an exact tie or an
    exact hit into a different frame.
    """
    eps = _TIME_EPS_S
    t0 = None
    k = 0  # next output frame index
    prev = None  # (index, time, frame)
    for i, frame in enumerate(frames):
        t = frame.time
        if prev is not None and (t is None or t <= prev[1]):
            t = prev[1] + source_period_s
        elif t is None:
            t = 0.0
        if t0 is None:
            t0 = t
        while t0 + k * period_s <= t + eps:
            target = t0 + k * period_s
            if prev is not None and target - prev[1] <= t - target + eps:
                yield prev[0], prev[2]
            else:
                yield i, frame
            k += 1
        prev = (i, t, frame)
    if prev is not None:
        end = prev[1] + source_period_s
        while t0 + k * period_s < end - eps:
            yield prev[0], prev[2]
            k += 1


def decode_video(path: str | os.PathLike, short_side: int | None, fps: float | None = None) -> DecodedVideo:
    """Decode every frame of ``path`` into memory (see `read_video_frames` for the rules).

    The frame count is the number of decoded frames, never the container's claim (kept as
    ``header_num_frames`` for diagnostics). Raises `VideoError`.
    """
    info_out: list[VideoInfo] = []
    frames = list(read_video_frames(path, short_side, fps, info_out))
    info = info_out[0]
    return DecodedVideo(
        frames=frames,
        fps=info.fps,
        source_fps=info.source_fps,
        source_width=info.source_width,
        source_height=info.source_height,
        header_num_frames=info.header_num_frames,
        num_decoded_frames=info.num_decoded_frames,
    )


def encode_jpeg_frames(frames: Iterable[np.ndarray], quality: int = 90) -> list[bytes]:
    """JPEG-encode RGB uint8 frames with cv2 (baseline JPEG, 4:2:0), one file per frame."""
    return [encode_jpeg(f, quality) for f in frames]


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """One RGB uint8 frame -> JPEG bytes."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    # cv2 expects BGR channel order.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for a {frame.shape} {frame.dtype} frame")
    return buf.tobytes()


def encode_gray_jpeg(plane: np.ndarray, quality: int = 90) -> bytes:
    """One single-channel uint8 (H, W) image (e.g. a quantised flow plane) -> grayscale JPEG
    bytes (one component: no chroma subsampling, ~1/2 the bytes of a 3-channel JPEG)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if plane.ndim != 2 or plane.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) plane, got {plane.dtype} {plane.shape}")
    ok, buf = cv2.imencode(".jpg", plane, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for a {plane.shape} plane")
    return buf.tobytes()


def _rate(fps: float) -> Fraction:
    """A frame rate as a small fraction (29.97 -> 30000/1001), as container time bases need."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


class VideoEncoder:
    """Incremental in-memory encoder: ``add(frame)`` RGB uint8 frames, then ``finish()``.

    Codecs (see `VIDEO_CODECS`): ``h264`` -> mp4 (libx264, yuv420p, no B-frames, a keyframe
    exactly every ``gop`` frames, single-threaded so output is deterministic), ``vp9`` -> webm
    (libvpx-vp9 realtime/cpu-used 8, no lag, keyframe every ``gop``), ``mjpeg`` -> avi
    (yuvj420p; every frame is a keyframe, ``gop`` is irrelevant). Frame sizes must be even.
    """

    def __init__(self, codec: str, fps: float, gop: int):
        if codec not in VIDEO_CODECS:
            raise ValueError(f"unknown video codec {codec!r}; expected one of {sorted(VIDEO_CODECS)}")
        if gop < 1:
            raise ValueError(f"gop must be >= 1, got {gop}")
        self.codec, self.gop, self.fps = codec, int(gop), float(fps)
        self._rate = _rate(fps)
        self._buf = io.BytesIO()
        encoder, fmt, self._pix_fmt = VIDEO_CODECS[codec]
        self._encoder = encoder
        self._container = av.open(self._buf, "w", format=fmt)
        self._stream = None
        self.num_frames_in = 0
        self.width = self.height = 0

    def _options(self) -> dict[str, str]:
        g = str(self.gop)
        if self.codec == "h264":
            # g/keyint_min fix the keyframe interval; sc_threshold=0 stops scene-cut keyframes
            # so decoders can rely on the gop; bf=0: no B-frames (no reordering delay).
            return {"g": g, "keyint_min": g, "bf": "0", "sc_threshold": "0", "threads": "1", "preset": X264_PRESET}
        if self.codec == "vp9":
            return {
                "g": g,
                "keyint_min": g,
                "deadline": "realtime",
                "cpu-used": "8",
                "lag-in-frames": "0",
                "threads": "1",
            }
        return {"qmin": str(MJPEG_QMIN), "qmax": str(MJPEG_QMAX)}

    def _open_stream(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"{self.codec} needs an even frame size, got {width}x{height}")
        self.width, self.height = width, height
        self._stream = self._container.add_stream(self._encoder, rate=self._rate, options=self._options())
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = self._pix_fmt

    def add(self, frame: np.ndarray) -> None:
        height, width = frame.shape[:2]
        if self._stream is None:
            self._open_stream(width, height)
        elif (width, height) != (self.width, self.height):
            raise ValueError(f"frame {self.num_frames_in} is {width}x{height}, expected {self.width}x{self.height}")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.num_frames_in  # in units of 1/fps: the encoder's time base
        self._container.mux(self._stream.encode(vf))
        self.num_frames_in += 1

    def finish(self) -> tuple[bytes, int]:
        """Close the container; returns (video bytes, decoded frame count of those bytes)."""
        if self._stream is None:
            self._container.close()
            raise ValueError("no frames to encode")
        self._container.mux(self._stream.encode(None))  # flush delayed frames
        self._container.close()
        data = self._buf.getvalue()
        return data, count_video_frames(data)


def encode_video(frames: Iterable[np.ndarray], fps: float, codec: str, gop: int) -> tuple[bytes, int]:
    """Encode RGB uint8 frames into an in-memory video (see `VideoEncoder` for the settings).

    Returns (container bytes, number of frames the stored bytes decode to) -- the decodable
    count of the *stored* video, which is what goes into ``KEY.info``.
    """
    enc = VideoEncoder(codec, fps, gop)
    for frame in frames:
        enc.add(frame)
    return enc.finish()


def count_video_frames(data: bytes, *, name: str = "<encoded video>") -> int:
    """Number of frames PyAV decodes from an in-memory video. Raises `VideoError`."""
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.video:
                raise VideoError(name, "no video stream")
            n = 0
            for _ in container.decode(video=0):
                n += 1
            return n
    except av.FFmpegError as e:
        raise VideoError(name, f"cannot decode: {e}") from None
