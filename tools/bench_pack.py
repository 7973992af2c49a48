"""`tsn bench-pack`'s measurement: videos/s of the single-process pack against the cluster pack
(`tsn pack --address`) with 1, 2, ... Ray workers, in the same run, on the same inputs.

Rows: ``single_process`` (`dataloading.pack.pack_dataset` with one decoding process, the
baseline) and ``ray_<N>`` (the cluster pack on a Ray cluster of N CPUs = N workers). Each row
packs every input into a fresh directory; its time is the pack call alone (the Ray cluster is
started before and stopped after, outside the timing, as a long-lived cluster would be), so a
``ray_N`` row includes what a real cluster pack pays: task scheduling, worker start-up and
per-task decoder start-up. ``ratio`` = the row's videos/s / the baseline's.

This module knows nothing of Ray (`tools` may not import `cluster`): the caller passes the
cluster's start, pack and stop functions (`cli.bench_pack` wires `cluster.pack`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dataloading.pack import pack_dataset
from dataloading.sources.items import VideoItem

BASELINE = "single_process"


def _row(name: str, workers: int, manifest: dict, stats: dict, seconds: float) -> dict:
    done = stats.get("packed", 0) + stats.get("rejected", 0)
    return {"name": name, "workers": workers, "videos": done, "packed": stats.get("packed", 0),
            "rejected": stats.get("rejected", 0), "shards": len(manifest["shards"]), "seconds": seconds,
            "videos_per_s": done / seconds if seconds > 0 else 0.0,
            "frames_per_s": stats.get("frames", 0) / seconds if seconds > 0 else 0.0}


def run_bench(items: Sequence[VideoItem], classes: Sequence[str], work_dir: str | os.PathLike, *,
              start_cluster: Callable[[int], None] | None, cluster_pack: Callable[..., dict] | None,
              stop_cluster: Callable[[], None] | None, ray_workers: Sequence[int] = (1, 2),
              pack_kwargs: dict | None = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Pack ``items`` once per row into ``work_dir/<row>`` (deleted after the row) and time it.

    ``cluster_pack(items, classes, out_dir, run_stats=..., **pack_kwargs)`` runs the cluster
    pack on the cluster ``start_cluster(n)`` started (``stop_cluster()`` ends it); without them
    only the baseline is measured. Returns ``{"videos", "rows": [row...], "cpu_count",
    "load_average"}``, each row ``{name, workers, videos, packed, rejected, shards, seconds,
    videos_per_s, frames_per_s, ratio}``."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    kw = {"progress": False, **(pack_kwargs or {})}
    rows = []

    def timed(name: str, workers: int, fn: Callable[..., dict]) -> None:
        out = work_dir / name
        shutil.rmtree(out, ignore_errors=True)
        stats: dict = {}
        log(f"bench-pack: {name} ...")
        t0 = time.perf_counter()
        manifest = fn(list(items), list(classes), out, run_stats=stats, **kw)
        seconds = time.perf_counter() - t0
        rows.append(_row(name, workers, manifest, stats, seconds))
        log(f"bench-pack: {name}: {rows[-1]['videos_per_s']:.2f} videos/s")
        shutil.rmtree(out, ignore_errors=True)

    timed(BASELINE, 1, lambda *a, **k: pack_dataset(*a, workers=1, **k))
    if cluster_pack is not None:
        for n in ray_workers:
            start_cluster(n)
            try:
                timed(f"ray_{n}", n, cluster_pack)
            finally:
                stop_cluster()
    base = rows[0]["videos_per_s"]
    for row in rows:
        row["ratio"] = row["videos_per_s"] / base if base > 0 else 0.0
    return {"videos": len(items), "rows": rows, "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def format_table(result: dict) -> str:
    """The rows as a text table, ratios against the single-process pack."""
    lines = [f"{'row':<16}{'workers':>8}{'videos':>8}{'seconds':>9}{'videos/s':>10}{'frames/s':>10}{'ratio':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['name']:<16}{r['workers']:>8}{r['videos']:>8}{r['seconds']:>9.2f}{r['videos_per_s']:>10.2f}"
                     f"{r['frames_per_s']:>10.0f}{r['ratio']:>7.2f}")
    load = result.get("load_average")
    lines.append(f"{result['videos']} videos; {result['cpu_count']} CPUs"
                 + (f"; load average {load[0]:.2f} at the end" if load else ""))
    return "\n".join(lines)
