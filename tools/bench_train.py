"""`tsn bench-train`'s measurement: is the trainer fed? Loader-fed training against training on
batches already in memory, in the same process, with the CPU cost of each side.

Rows (each over ``steps`` optimizer steps after ``warmup``; interleaved rounds, medians):

- ``loader``: the loader alone (every batch taken, nothing trained): batches/s and CPU seconds
  per video (process CPU time: DALI's threads, the prefetching thread, the finishing step);
- ``compute``: the training step alone on batches taken from the loader beforehand and kept in
  memory (cycled): steps/s and CPU seconds per video;
- ``fed_sync``: the training step fed by a loader with ``prefetch_batches=0`` (the finishing
  step on the training thread, as before the prefetching thread existed);
- ``fed``: the training step fed by the prefetching loader (the product's default).

For the fed rows: steps/s, data-wait fraction (time blocked in ``next(loader)`` / wall time, as
`tsn.engine` counts ``data_wait_s``) and the ratio to ``compute`` (1.0 = the data path costs
the trainer nothing). ``cpu_bound_steps_per_s`` = cores / (loader + compute CPU seconds per step):
the rate the cores allow when the data path and the step share them; when ``fed`` reaches it the
cores, not the data path's structure, are the limit.

This module knows nothing of models: the caller passes a loader factory and a step function
(`cli.bench_train` wires the config's TSN and SGD step). Loaders iterate over epoch boundaries,
so the epoch starts (one pipeline per epoch) are part of every loader row, as in training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

ROWS = ("loader", "compute", "fed_sync", "fed")
DATA_WAIT_TARGET = 0.10  # the main job's goal: data wait under 10 % of training time


def _endless(loader: Iterable) -> Iterator:
    """Batches over successive epochs of a re-iterable loader (each pass is the next epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batch in a whole epoch")


def _videos(batch) -> int:
    return int(batch.frames.shape[0])


def _measure(batches: Iterator, step: Callable | None, steps: int, warmup: int) -> dict:
    """Wall / CPU / data-wait seconds and videos over ``steps`` iterations after ``warmup``."""
    for _ in range(warmup):
        batch = next(batches)
        if step is not None:
            step(batch)
    wait_s, videos = 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t
        if step is not None:
            step(batch)
        videos += _videos(batch)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "data_wait_s": wait_s,
            "videos": videos, "steps": steps}


def _summary(m: dict) -> dict:
    return {"steps_per_s": m["steps"] / m["wall_s"], "videos_per_s": m["videos"] / m["wall_s"],
            "cpu_s_per_video": m["cpu_s"] / m["videos"], "data_wait_fraction": m["data_wait_s"] / m["wall_s"]}


def run_bench(make_loader: Callable[[int], Iterable], step: Callable[[object], None], *, steps: int = 40,
              warmup: int = 20, repeats: int = 2, in_memory_batches: int = 8, cores: float = 1.0,
              log: Callable[[str], None] = print) -> dict:
    """All rows; returns the JSON-ready result.

    ``make_loader(prefetch_batches)`` -> a loader (iterable of batches with ``frames`` (B, ...),
    re-iterable over epochs; closed with ``close()`` when it has one). ``step(batch)`` runs one
    optimizer step on it. ``cores``: the CPU cores this process may use (for
    ``cpu_bound_steps_per_s``).
    """
    if steps < 1 or warmup < 0 or repeats < 1 or in_memory_batches < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, repeats >= 1, in_memory_batches >= 1; got steps={steps}, "
                         f"warmup={warmup}, repeats={repeats}, in_memory_batches={in_memory_batches}")
    loaders = {"sync": make_loader(0), "prefetch": make_loader(2)}
    try:
        feeds = {name: _endless(loader) for name, loader in loaders.items()}
        memory = [next(feeds["sync"]) for _ in range(in_memory_batches)]

        def cycle_memory():
            while True:
                yield from memory

        rounds = {row: [] for row in ROWS}
        for r in range(repeats):
            tag = f"round {r + 1}/{repeats}:"
            for row, batches, fn in (("loader", feeds["prefetch"], None), ("compute", cycle_memory(), step),
                                     ("fed_sync", feeds["sync"], step), ("fed", feeds["prefetch"], step)):
                log(f"{tag} {row} ...")
                rounds[row].append(_summary(_measure(batches, fn, steps, warmup)))
    finally:
        for loader in loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()
    result = {"steps": steps, "warmup": warmup, "repeats": repeats, "cores": cores,
              "videos_per_step": _videos(memory[0]), "rounds": rounds}
    for row in ROWS:
        result[row] = {k: float(np.median([m[k] for m in rounds[row]])) for k in rounds[row][0]}
    v = result["videos_per_step"]
    cpu_per_step = (result["loader"]["cpu_s_per_video"] + result["compute"]["cpu_s_per_video"]) * v
    result["cpu_s_per_step"] = {"loader": result["loader"]["cpu_s_per_video"] * v,
                                "compute": result["compute"]["cpu_s_per_video"] * v, "total": cpu_per_step}
    result["cpu_bound_steps_per_s"] = cores / cpu_per_step
    compute_rate = result["compute"]["steps_per_s"]
    result["ratios"] = {"fed_over_compute": result["fed"]["steps_per_s"] / compute_rate,
                        "fed_sync_over_compute": result["fed_sync"]["steps_per_s"] / compute_rate,
                        "fed_over_fed_sync": result["fed"]["steps_per_s"] / result["fed_sync"]["steps_per_s"],
                        "fed_over_cpu_bound": result["fed"]["steps_per_s"] / result["cpu_bound_steps_per_s"]}
    result["data_wait_target_met"] = result["fed"]["data_wait_fraction"] < DATA_WAIT_TARGET
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['videos_per_step']} videos/step, {result['cores']:g} core(s), median of "
             f"{result['repeats']} interleaved round(s) of {result['steps']} steps",
             f"{'row':<10}{'steps/s':>9}{'videos/s':>10}{'cpu s/video':>13}{'data wait':>11}{'/compute':>10}"]
    for row in ROWS:
        r = result[row]
        wait = f"{r['data_wait_fraction']:>10.1%}" if row.startswith("fed") else f"{'':>10}"
        ratio = f"{r['steps_per_s'] / result['compute']['steps_per_s']:>9.2f}x" if row != "loader" else f"{'':>10}"
        lines.append(f"{row:<10}{r['steps_per_s']:>9.1f}{r['videos_per_s']:>10.1f}{r['cpu_s_per_video']:>13.4f}"
                     f" {wait}{ratio}")
    c = result["cpu_s_per_step"]
    lines.append(f"CPU per step: loader {c['loader'] * 1000:.1f} ms + compute {c['compute'] * 1000:.1f} ms = "
                 f"{c['total'] * 1000:.1f} ms -> the cores allow {result['cpu_bound_steps_per_s']:.1f} steps/s; "
                 f"fed reaches {result['ratios']['fed_over_cpu_bound']:.0%} of that")
    lines.append(f"target: fed data wait < {DATA_WAIT_TARGET:.0%} "
                 f"({'met' if result['data_wait_target_met'] else 'not met'})")
    return "\n".join(lines)
