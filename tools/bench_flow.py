"""`tsn bench-flow`: optical-flow extraction throughput, flow frames/s per core, for every
algorithm of `dataloading.sources.flow` and both motion modalities, the product path against the
naive reference path, on the same frames in one run.

- ``fast``: `flow.FlowExtractor`, what `tsn pack --modalities` runs per worker process: one
  algorithm object reused for the whole video, each frame converted to gray once, float32 flow
  quantised in place.
- ``naive``: `flow.naive_video_flow`: a new algorithm object per pair, both frames converted
  again for every pair (float64), float64 clipping and quantisation, one process.
- ``parallel``: the fast path in ``--workers`` processes (`dataloading.procpool`, the packer's
  pool, OpenCV at 1 thread each), the pairs split evenly between them; pool start-up is not
  timed (a packing run pays it once). Reported as total flow frames/s and per core (total / workers).

``fast`` and ``naive`` run in this process with OpenCV's thread pool set to 1 thread: their
numbers are per core. A flow frame is one consecutive pair (N frames -> N - 1);
extraction = gray conversion, (homography + warp,) flow, quantisation to uint8; JPEG encoding
is excluded (the same for both paths). ``mean_abs_diff_q`` compares the two paths' uint8
outputs (their gray conversions differ by rounding, so a few levels of difference are expected).
Ratios are within the same run (absolute numbers drift on shared machines).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from dataloading.sources import flow

DEFAULT_SIZE = (340, 256)  # (width, height): the paper's frame size
DEFAULT_FRAMES = 9  # 8 flow frames: splits evenly over 2 or 4 workers


def synthetic_frames(num_frames: int, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) frames: a smooth-noise background panning +2 px/frame in x (camera
    motion) and a textured square moving -3 px/frame: every algorithm and the homography have
    real work to do, deterministically."""
    w, h = size
    rng = np.random.default_rng(seed)
    pad = 2 * num_frames + 8
    bg = cv2.GaussianBlur(rng.integers(0, 256, (h, w + 2 * pad, 3), dtype=np.uint8), (0, 0), 1.5)
    side = max(8, min(w, h) // 4)
    obj = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (0, 0), 1.0)
    frames = []
    for t in range(num_frames):
        img = bg[:, pad - 2 * t : pad - 2 * t + w].copy()
        x = max(0, w // 2 + side - 3 * t)
        y = h // 3
        img[y : y + side, x : x + side] = obj[:, : max(0, min(side, w - x))]
        frames.append(img)
    return frames


def video_frames(path: str, num_frames: int, short_side: int | None) -> list[np.ndarray]:
    """The first ``num_frames`` frames of a video, resized as `tsn pack` does."""
    from dataloading.sources.video_io import read_video_frames

    frames = []
    for f in read_video_frames(path, short_side):
        frames.append(f)
        if len(frames) == num_frames:
            break
    if len(frames) < 2:
        raise ValueError(f"{path}: needs at least 2 decodable frames for flow, got {len(frames)}")
    return frames


def _time_fast(frames, algorithm: str, modality: str, bound: float):
    flow.FlowExtractor(algorithm, bound, (modality,))  # first-use costs (library init) not timed
    extractor = flow.FlowExtractor(algorithm, bound, (modality,))
    t0 = time.perf_counter()
    out = [item for item in map(extractor.push, frames) if item is not None]
    return time.perf_counter() - t0, out


def _time_naive(frames, algorithm: str, modality: str, bound: float):
    t0 = time.perf_counter()
    out = flow.naive_video_flow(frames, algorithm, bound, (modality,))
    return time.perf_counter() - t0, out


def _flow_chunk(task) -> int:
    """Worker: flow frames of one contiguous chunk of frames (fast path)."""
    frames, algorithm, modality, bound = task
    extractor = flow.FlowExtractor(algorithm, bound, (modality,))
    return sum(1 for f in frames if extractor.push(f) is not None)


def _noop(_):
    return None


def _time_parallel(pool, workers: int, frames, algorithm: str, modality: str, bound: float) -> float:
    pairs = len(frames) - 1
    cuts = [round(i * pairs / workers) for i in range(workers + 1)]
    # chunk c covers pairs [cuts[c], cuts[c+1]): frames cuts[c] .. cuts[c+1] (one frame overlap)
    tasks = [(frames[a : b + 1], algorithm, modality, bound) for a, b in zip(cuts, cuts[1:]) if b > a]
    list(pool.map(_flow_chunk, [(frames[:2], algorithm, modality, bound)] * workers))  # warm every worker
    t0 = time.perf_counter()
    done = sum(pool.map(_flow_chunk, tasks))
    dt = time.perf_counter() - t0
    if done != pairs:
        raise RuntimeError(f"parallel flow computed {done} of {pairs} flow frames")
    return dt


def run_bench(frames: list[np.ndarray], algorithms=flow.ALGORITHMS, modalities=flow.FLOW_MODALITIES,
              bound: float = flow.DEFAULT_BOUND, naive: bool = True, source: str = "synthetic",
              workers: int = 0, repeats: int = 1, log=print) -> dict:
    """Every (algorithm, modality) row; returns the JSON-ready result (see the module docstring).
    Each timing is the best of ``repeats`` runs (shared machines are noisy)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def best(timed):  # timed() -> (seconds, output)
        runs = [timed() for _ in range(repeats)]
        return min(r[0] for r in runs), runs[0][1]

    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(1)  # per core
    try:
        pairs = len(frames) - 1
        if pairs < 1:
            raise ValueError("bench-flow needs at least 2 frames")
        h, w = frames[0].shape[:2]
        result = {"source": source, "frames": len(frames), "flow_frames": pairs, "width": w, "height": h,
                  "threads": 1, "workers": workers, "repeats": repeats, "bound": bound, "unit": "flow frames/s per core",
                  "rows": {}}
        pool = None
        if workers > 0:
            from dataloading import procpool  # the packer's pool: forkserver, OpenCV at 1 thread each

            pool = procpool.new_pool(workers, preload=[__name__])
        for alg in algorithms:
            for modality in modalities:
                name = f"{alg}/{modality}"
                log(f"[{name}] fast ...")
                t_fast, out_fast = best(lambda: _time_fast(frames, alg, modality, bound))
                row = {"algorithm": alg, "modality": modality, "fast_fps": pairs / t_fast,
                       "fast_ms_per_frame": 1000 * t_fast / pairs}
                if naive:
                    log(f"[{name}] naive ...")
                    t_naive, out_naive = best(lambda: _time_naive(frames, alg, modality, bound))
                    diffs = [np.abs(a[modality][c].astype(np.int16) - b[modality][c]).mean()
                             for a, b in zip(out_fast, out_naive) for c in (0, 1)]
                    row.update(naive_fps=pairs / t_naive, naive_ms_per_frame=1000 * t_naive / pairs,
                               fast_over_naive=t_naive / t_fast, mean_abs_diff_q=float(np.mean(diffs)))
                if pool is not None:
                    log(f"[{name}] parallel x{workers} ...")
                    t_par, _ = best(lambda: (_time_parallel(pool, workers, frames, alg, modality, bound), None))
                    row.update(parallel_fps=pairs / t_par, parallel_fps_per_core=pairs / t_par / workers)
                    if naive:
                        row["parallel_over_naive"] = t_naive / t_par
                result["rows"][name] = row
        if pool is not None:
            pool.shutdown()
        # The paper's extraction (TV-L1, done naively) is the baseline every row is compared with.
        for modality in modalities:
            base = result["rows"].get(f"tvl1/{modality}", {}).get("naive_fps")
            if base:
                for alg in algorithms:
                    row = result["rows"][f"{alg}/{modality}"]
                    row["fast_over_naive_tvl1"] = row["fast_fps"] / base
        return result
    finally:
        cv2.setNumThreads(threads_before)


def format_table(result: dict) -> str:
    lines = [f"{result['unit']}, {result['width']}x{result['height']}, {result['flow_frames']} flow frames "
             f"({result['source']})",
             f"{'algorithm/modality':<24}{'fast':>9}{'naive':>9}{'fast/naive':>12}{'vs naive tvl1':>15}"
             f"{'ms/frame':>10}{'|dq|':>7}{'parallel (total, /core, /naive)':>34}"]
    for name, r in result["rows"].items():
        naive = f"{r['naive_fps']:>9.1f}" if "naive_fps" in r else f"{'-':>9}"
        ratio = f"{r['fast_over_naive']:>11.2f}x" if "fast_over_naive" in r else f"{'-':>12}"
        vs_tvl1 = f"{r['fast_over_naive_tvl1']:>14.1f}x" if "fast_over_naive_tvl1" in r else f"{'-':>15}"
        dq = f"{r['mean_abs_diff_q']:>7.2f}" if "mean_abs_diff_q" in r else f"{'-':>7}"
        par = (f"{r['parallel_fps']:>12.1f}{r['parallel_fps_per_core']:>10.1f}"
               + (f"{r['parallel_over_naive']:>11.2f}x" if "parallel_over_naive" in r else f"{'-':>12}")
               if "parallel_fps" in r else "")
        lines.append(f"{name:<24}{r['fast_fps']:>9.1f}{naive}{ratio}{vs_tvl1}{r['fast_ms_per_frame']:>10.1f}{dq}{par}")
    lines.append("fast = FlowExtractor, 1 core; naive = a new algorithm object per pair, float64, 1 core; "
                 "|dq| = mean abs difference of their uint8 outputs;")
    lines.append(f"parallel = fast in {result['workers']} packer worker processes (the packer's pool)")
    return "\n".join(lines)


def _size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 340x256") from None
    if w < 16 or h < 16:
        raise ValueError(f"--size {text!r}: both sides must be >= 16 pixels")
    return w, h


def _list_arg(text: str, choices, what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in choices]
    if bad or not names:
        raise ValueError(f"{what} {text!r}: a comma-separated list of {', '.join(choices)}")
    return names


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-flow", help="benchmark optical-flow extraction (frames/s per core, vs naive)")
    p.add_argument("--video", help="take frames from this video (resized to --short-side); default: synthetic frames")
    p.add_argument("--size", default=f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}", metavar="WxH",
                   help="synthetic frame size (default 340x256, the paper's)")
    p.add_argument("--short-side", type=int, default=256, metavar="N", help="--video: resize the short side to N")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, metavar="N",
                   help=f"frames to process (N - 1 flow frames; default {DEFAULT_FRAMES})")
    p.add_argument("--algorithms", default=",".join(flow.ALGORITHMS), help="comma-separated subset of "
                   + ", ".join(flow.ALGORITHMS))
    p.add_argument("--modalities", default=",".join(flow.FLOW_MODALITIES), help="flow, warped_flow or both")
    p.add_argument("--flow-bound", type=float, default=flow.DEFAULT_BOUND, metavar="PX")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference path")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the parallel row (default: CPU count; 0 skips it)")
    p.add_argument("--repeats", type=int, default=1, metavar="N", help="best of N timings per row (default 1)")
    p.add_argument("--json", help="also write the result JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    algorithms = _list_arg(args.algorithms, flow.ALGORITHMS, "--algorithms")
    modalities = _list_arg(args.modalities, flow.FLOW_MODALITIES, "--modalities")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2 (flow needs pairs), got {args.frames}")
    for alg in algorithms:
        flow.check_algorithm(alg)
    if args.video:
        if not Path(args.video).is_file():
            raise FileNotFoundError(f"{args.video}: file not found")
        frames, source = video_frames(args.video, args.frames, args.short_side), args.video
    else:
        frames, source = synthetic_frames(args.frames, _size_arg(args.size)), "synthetic pan + moving object"
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    result = run_bench(frames, algorithms, modalities, args.flow_bound, not args.no_naive, source, workers,
                       args.repeats, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
