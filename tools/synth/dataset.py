"""The synthetic dataset on disk: `write_video` (one H.264 .mp4) and `generate_dataset` (every
video of a spec, rendered in worker processes, plus the label files).

Output layout of `generate_dataset`::

    OUT/videos/<class_name>/<class_name>_<i:04d>.mp4   # H.264, yuv420p, constant fps
    OUT/labels.csv      # header "path,label"; path relative to OUT, label = class NAME
    OUT/classes.txt     # one class name per line, in class-index order
    OUT/synth.json      # generator version + spec, guards resuming with another spec

Determinism: frames come from `video_plan` (seeded per video); x264 runs single-threaded with C
kernels only, so the .mp4 bytes are reproducible for a given PyAV/FFmpeg/x264 build, whatever
the number of workers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from dataloading import procpool
from dataloading.store import files
from tools.synth.plan import video_plan
from tools.synth.render import iter_frames
from tools.synth.spec import CLASS_NAMES, SYNTH_VERSION, SynthSpec, check_int

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


def video_relpath(class_index: int, video_index: int) -> str:
    """``videos/<class>/<class>_<i:04d>.mp4``, relative to the dataset directory (POSIX)."""
    name = CLASS_NAMES[class_index]
    return f"videos/{name}/{name}_{video_index:04d}{VIDEO_SUFFIX}"


def write_video(path: str | os.PathLike, frames: Iterator[np.ndarray], fps: int, width_px: int, height_px: int) -> int:
    """Encode RGB frames to an H.264/yuv420p .mp4 atomically; returns the frame count.

    The stream goes to a hidden temporary file beside ``path`` (`dataloading.store.files`) that is
    fsync'ed and renamed over ``path`` only once complete (and removed on error), so an
    existing ``path`` is always a complete video. Only a hard kill can leave a ``.tmp`` file
    behind; nothing reads those and they are safe to delete.
    """
    count = 0

    def encode(f) -> None:
        nonlocal count
        with av.open(f, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
            stream.width, stream.height, stream.pix_fmt = width_px, height_px, "yuv420p"
            time_base = Fraction(1, fps)
            for frame_rgb in frames:
                frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
                frame.pts, frame.time_base = count, time_base
                container.mux(stream.encode(frame))
                count += 1
            container.mux(stream.encode(None))  # flush delayed (B-)frames

    files.atomic_write(path, encode)
    return count


def _write_one(task: tuple[SynthSpec, str, int, int]) -> tuple[int, int]:
    """Worker: render and encode video (class, video) of ``task = (spec, out_dir, class_index,
    video_index)`` unless it exists. Returns (class, video) index."""
    spec, out_dir, class_index, video_index = task
    path = Path(out_dir) / video_relpath(class_index, video_index)
    if not path.exists():
        plan = video_plan(spec, class_index, video_index)
        write_video(path, iter_frames(plan), plan.fps, plan.width_px, plan.height_px)
    return class_index, video_index


# Spec fields that change video content; num_classes / videos_per_class only select which
# (class, video) indices exist, so they may change between resumed runs.
_CONTENT_FIELDS = ("seed", "min_seconds", "max_seconds", "sizes", "fps_choices", "camera_pan_fraction",
                   "approach_period_s")


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
    files.atomic_write_text(out_dir / SPEC_FILE,
                            json.dumps({"version": SYNTH_VERSION, "spec": asdict(spec)}, indent=2) + "\n")


def generate_dataset(
    out_dir: str | os.PathLike, spec: SynthSpec, workers: int | None = None, progress: bool = True
) -> dict:
    """Write the dataset described by ``spec`` under ``out_dir`` (layout: module docstring).

    Videos that already exist are skipped, so re-running resumes an interrupted run;
    labels.csv and classes.txt are (re)written atomically at the end and list exactly the
    videos of ``spec``. ``workers`` processes render in parallel (default os.cpu_count();
    1 renders in this process); they come from `dataloading.procpool` (a forkserver), so a
    calling script needs the usual ``if __name__ == "__main__":`` guard. Returns ``{num_videos, num_classes, out_dir,
    seconds_total (summed video duration), num_written, num_skipped, wall_seconds}``.
    """
    if not isinstance(spec, SynthSpec):
        raise TypeError(f"spec must be a SynthSpec, got {type(spec).__name__}")
    if workers is None:
        workers = os.cpu_count() or 1
    check_int("workers", workers)
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
                _write_one((spec, str(out), c, v))
                bar.update(1)
        else:
            # The shared pool: forkserver workers (safe even when the caller holds threads: Ray,
            # torch, cv2 pools), OpenCV at 1 thread each; a worker's error is re-raised here and
            # closing the results stops the pool (on errors and Ctrl-C too).
            results = procpool.ordered_results(_write_one, [(spec, str(out), c, v) for c, v in todo], workers,
                                               preload=[__name__])
            with contextlib.closing(results):
                for _ in results:
                    bar.update(1)
    finally:
        bar.close()

    files.atomic_write_text(out / CLASSES_FILE, "".join(f"{name}\n" for name in spec.class_names))
    labels = io.StringIO()
    writer = csv.writer(labels, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows((video_relpath(c, v), CLASS_NAMES[c]) for c, v in jobs)
    files.atomic_write_text(out / LABELS_FILE, labels.getvalue())

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

