"""Tiny test videos written with PyAV (imported by the packing tests; not a conftest).

Frame ``i`` of `make_test_video` is a deterministic pattern (gradients plus a square that moves
one step per frame), so consecutive frames differ and every frame compresses differently.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


# codec name -> (PyAV encoder, container format, pixel format)
_CODECS = {
    "h264": ("libx264", "mp4", "yuv420p"),
    "mpeg4": ("mpeg4", "mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", "yuv420p"),
    "mjpeg": ("mjpeg", "avi", "yuvj420p"),
}


def pattern_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``i`` (RGB uint8) of a test video of ``size`` = (width, height)."""
    width, height = size
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (np.arange(width)[None, :] * 3 + i * 9) % 256
    img[..., 1] = (np.arange(height)[:, None] * 4) % 256
    img[..., 2] = (i * 23) % 256
    s = max(4, min(width, height) // 4)
    x = (i * 3) % max(1, width - s)
    img[height // 3 : height // 3 + s, x : x + s] = 255
    return img


def make_test_video(
    path,
    num_frames: int,
    size: tuple[int, int] = (64, 48),
    codec: str = "h264",
    fps: int = 10,
    pix_fmt: str | None = None,
    start_frame: int = 0,
) -> Path:
    """Write a ``num_frames``-frame video of ``size`` = (width, height) at ``fps`` to ``path``.

    ``codec``: h264 (mp4), mpeg4 (mp4), vp9 (webm) or mjpeg (avi); the container format is
    fixed by the codec, whatever the file extension. ``pix_fmt`` overrides the codec's 4:2:0
    default (e.g. ``yuv444p`` with h264 allows odd sizes). ``start_frame`` > 0 makes the
    timestamps start at ``start_frame / fps`` s instead of 0. Returns ``path`` as a Path.
    """
    path = Path(path)
    encoder, fmt, default_pix_fmt = _CODECS[codec]
    pix_fmt = pix_fmt or default_pix_fmt
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, size), format="rgb24")
            frame.pts = start_frame + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_audio_only(path, seconds: float = 0.5, sample_rate: int = 16000) -> Path:
    """An AAC-in-mp4 file with an audio stream and no video stream."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        samples_per_frame = 1024
        for k in range(int(seconds * sample_rate) // samples_per_frame):
            t = (np.arange(samples_per_frame) + k * samples_per_frame) / sample_rate
            tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = k * samples_per_frame
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decoded_frame_count(path_or_file) -> int:
    """Frames PyAV decodes from a path or file object (an independent count for checks)."""
    source = path_or_file if hasattr(path_or_file, "read") else str(path_or_file)
    with av.open(source) as container:
        return sum(1 for _ in container.decode(video=0))
