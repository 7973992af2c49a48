"""Seconds spent in each stage of the input pipeline, summed since the loader was made.

Stages (a stage a path does not have stays 0):

    read       reading a sample's bytes: the node cache's copy, a local pread, or ranged GETs
               of object storage; summed over the read threads (several run at once)
    plan       planning a sample (which frames, the crop) and checking its bytes against the
               pack-time checksums; summed over the read threads
    read_wait  the pipeline waiting for its batch's reads: the part of read + plan the threads
               did not hide
    decode     DALI's graph: JPEG / video decode, crop, flip (and on GPU resize and
               normalise), without read_wait
    finish     the CPU path's torch finishing step: resize, mirror, normalise, layout

The training loop adds its own (`tsn.engine`): ``h2d_s`` (host to device copy) and
``data_wait_s`` (the training thread waiting for the loader) per step.

Why sums and not a histogram per stage: Prometheus counters of seconds (`cluster.metrics`) give
seconds per batch per stage as rate(stage) / rate(steps), over any window, at the cost of a
float addition here. Timing costs two ``perf_counter`` calls per read and per stage, and one
lock. `benchmarks/bench_stage_timing.py` measures clips/s with and without it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

STAGES = ("read", "plan", "read_wait", "decode", "finish")


class StageTimes:
    """Thread-safe per-stage sums (module docstring). ``enabled=False``: every call is a no-op
    (the baseline of the cost measurement)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._seconds = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self._seconds[stage] += seconds

    @contextmanager
    def timed(self, stage: str):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def snapshot(self) -> dict[str, float]:
        """{stage: seconds so far}."""
        with self._lock:
            return dict(self._seconds)


def per_batch(before: dict[str, float], after: dict[str, float], batches: int) -> dict[str, float]:
    """Seconds per batch of each stage between two snapshots."""
    return {s: (after.get(s, 0.0) - before.get(s, 0.0)) / batches if batches else 0.0 for s in STAGES}


def slowest(seconds: dict[str, float]) -> str | None:
    """The stage with the most seconds (None when all are 0)."""
    stage = max(STAGES, key=lambda s: seconds.get(s, 0.0))
    return stage if seconds.get(stage, 0.0) > 0 else None


def format_stages(seconds_per_batch: dict[str, float]) -> str:
    """``read 1.2 plan 0.3 ... (slowest: decode)``, in ms per batch."""
    parts = " ".join(f"{s} {seconds_per_batch.get(s, 0.0) * 1000:.1f}" for s in STAGES)
    return f"{parts} (slowest: {slowest(seconds_per_batch)})"
