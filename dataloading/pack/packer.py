"""Packing orchestration: `pack_dataset` decodes source videos once and packs them into
WebDataset tar shards.

Output directory (sample format: `dataloading.format.shards`)::

    OUT/_options.json                  packing options (+ classes); guards resuming
    OUT/<split>/<split>-000000.tar     POSIX (ustar) shards; appear only when complete
    OUT/<split>/<split>-000000.idx     DALI webdataset index of each shard
    OUT/<split>/_journal.jsonl         resume journal: one line per finished shard / rejected video
    OUT/rejected.jsonl                 {"path", "reason", "split"} per rejected video
    OUT/manifest.json                  written last (see `pack_dataset`)
    OUT/_lock                          flock()ed while a packer runs

``OUT`` may be an ``s3://bucket/prefix``: the same files are then written to a local staging
directory and each shard is uploaded once complete, the manifest last (`remote`).

Pipeline per split: the split's videos in a seeded random order (`split_order`; samples are
shuffled across shards) -> worker processes decode, resize and encode each video
(`encode.pack_one` on `dataloading.procpool`; results consumed in input order, so the output
does not depend on the number of workers or on timing) -> samples are appended to the current
shard (`writer.ShardWriter`), which rolls over before it would exceed the size bound.

Resuming (`journal`): the journal records each shard only after it was renamed to its final
name and indexed, together with the source paths it holds. A re-run with the same options
keeps those shards, skips their videos and the rejected ones (unless their file changed since), deletes leftovers of an
interrupted run (``*.partial``, unjournaled shards) and continues the shard and sample
numbering. Because the order and the roll-over rule are deterministic, an interrupted run that
is resumed produces the same shards as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from dataloading import modality, procpool
from dataloading.pack import encode
from dataloading.pack.journal import Journal, SplitState, load_split_state, prepare_out_dir, rejected_record
from dataloading.pack.manifest import write_outputs
from dataloading.pack.options import (
    DEFAULT_SHARD_SIZE_BYTES,
    FORMAT_VERSION,
    JOURNAL_FILE,
    REJECTED_FILE,
    PackError,
    PackOptions,
)
from dataloading.pack.remote import RemoteOut
from dataloading.pack.verify import drop_changed_shards
from dataloading.pack.writer import ShardWriter, naming_path
from dataloading.sources import flow
from dataloading.sources.items import SPLITS, VideoItem
from dataloading.store import storage


def split_order(items: list[VideoItem], split: str, seed: int) -> list[VideoItem]:
    """The split's items in the seeded packing order (the order of samples in the shards)."""
    chosen = [it for it in items if it.split == split]
    random.Random(f"{seed}/{split}").shuffle(chosen)  # str seeds hash deterministically
    return chosen


def pack_dataset(
    items: Sequence[VideoItem],
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    codec: str = "jpeg",
    short_side: int | None = 256,
    jpeg_quality: int = 90,
    gop: int = 8,
    fps: float | None = None,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    min_frames: int = 16,
    workers: int | None = None,
    seed: int = 0,
    modalities: Sequence[str] = (modality.RGB,),
    flow_algorithm: str = "tvl1",
    flow_bound: float = flow.DEFAULT_BOUND,
    progress: bool = True,
    overwrite: bool = False,
    run_stats: dict | None = None,
    staging_dir: str | os.PathLike | None = None,
    body: Callable | None = None,
    extra_options: dict | None = None,
    verify: bool = False,
) -> dict:
    """Pack ``items`` into shards under ``out_dir``; returns the manifest (also written to
    ``out_dir/manifest.json``).

    * ``codec``: ``jpeg`` (frame-pack layout; ``jpeg_quality`` applies) or ``h264`` / ``vp9`` /
      ``mjpeg`` (video layout; keyframe every ``gop`` frames).
    * ``short_side``: stored frames are resized so the short side is this (even sizes);
      ``None`` keeps the source size. ``fps``: resample to this rate (``None``: every frame).
    * ``shard_size_bytes``: no shard file exceeds this, except a single sample larger than the
      bound, which gets a shard of its own.
    * ``min_frames``: videos with fewer decoded frames are rejected, like undecodable ones;
      rejections go to ``out_dir/rejected.jsonl`` and never stop the run.
    * ``workers``: decoding processes (default ``os.cpu_count()``); output does not depend on it.
    * ``seed``: the order of samples within each split (shuffled across shards).
    * ``modalities``: ``rgb`` plus any of ``flow`` / ``warped_flow``: flow planes computed with
      ``flow_algorithm`` (`dataloading.sources.flow.ALGORITHMS`) on the stored (resized) frames,
      clipped to +-``flow_bound`` pixels, stored as grayscale JPEGs (`dataloading.format.shards`). A
      video whose flow fails is rejected like an undecodable one.
    * Resuming / ``overwrite``: see the module docstring. Different options than the existing
      pack in ``out_dir`` raise `PackError` unless ``overwrite`` (which first deletes the
      contents of ``out_dir``; a non-empty directory that is not a pack is never touched).
      ``out_dir/_lock`` is locked while packing, so a second packer on it fails at once.
    * ``run_stats``: if given, filled with this run's counts and timing (for the CLI).
    * ``out_dir`` an ``s3://bucket/prefix``: everything is written to ``staging_dir`` (default
      `remote.default_staging_dir`), each shard is uploaded when complete and its local copy
      removed, ``rejected.jsonl`` and ``manifest.json`` are uploaded last (`remote`); the
      journal, options and lock stay in ``staging_dir``. The prefix is listed before any work:
      wrong credentials raise `storage.StorageError` (a ``ValueError``) naming it, nothing
      written. A failed upload raises `StorageError` naming the object; a re-run resumes.
    * ``body``: replaces the local packing step once the output is validated and locked, called
      as ``body(items, classes, out_dir, opts, shard_size_bytes, progress, remote)`` and
      returning (manifest, run counts) like `_pack_locked` (the cluster pack, `cluster.pack`);
      ``extra_options`` are recorded in ``_options.json`` beside the pack options.
    * ``verify``: before resuming, check every shard already packed byte for byte against what
      its journal recorded and re-pack those that changed (`verify.drop_changed_shards`; reads
      the whole existing pack). Without it a resume checks sizes only.

    Raises `PackError` (a ``ValueError``) for invalid options, an options mismatch, a video that
    moved to another split since the resumed run, and when no sample could be packed.
    """
    t_start = time.perf_counter()
    remote = RemoteOut(str(out_dir), staging_dir) if storage.is_uri(out_dir) else None
    out_dir = remote.staging if remote is not None else Path(out_dir)
    fps = None if fps is None else float(fps)
    modalities = tuple(modalities)
    has_flow = any(m in modality.FLOW_MODALITIES for m in modalities)
    opts = PackOptions(codec, short_side, int(jpeg_quality), int(gop), fps, int(min_frames), int(seed), modalities,
                       flow_algorithm if has_flow else None, float(flow_bound) if has_flow else None)
    opts.validate()
    if shard_size_bytes < 1:
        raise PackError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise PackError(f"workers must be >= 1, got {workers}")
    classes = list(classes)
    items = list(items)
    if not items:
        raise PackError("no input videos to pack")
    for it in items:
        if it.split not in SPLITS:
            raise PackError(f"{it.path}: split {it.split!r} is not one of {', '.join(SPLITS)}")
        if not (0 <= it.label < len(classes) and classes[it.label] == it.class_name):
            raise PackError(
                f"{it.path}: label {it.label} / class {it.class_name!r} does not match the class list"
            )

    options = {"format_version": FORMAT_VERSION, **asdict(opts), "modalities": list(opts.modalities),
               "classes": classes, **(extra_options or {})}
    if remote is not None:
        remote.check_access()  # credentials and the prefix, before any local or encoding work
    with prepare_out_dir(out_dir, options, overwrite):  # holds the directory lock
        if remote is not None:
            remote.prepare(options, overwrite)
        verified = drop_changed_shards(out_dir, remote, progress) if verify and not overwrite else None
        if body is not None:
            manifest, stats = body(items, classes, out_dir, opts, shard_size_bytes, progress, remote)
        else:
            manifest, stats = _pack_locked(items, classes, out_dir, opts, shard_size_bytes, workers, progress, remote)
    if run_stats is not None:
        run_stats.update({"workers": workers, **stats}, elapsed_seconds=time.perf_counter() - t_start)
        if verified is not None:
            run_stats["verified"] = verified
        if remote is not None:
            run_stats.update(staging_dir=str(out_dir), uploaded_objects=remote.uploaded_objects,
                             uploaded_bytes=remote.uploaded_bytes)
    if manifest["num_samples"] == 0:
        raise PackError(
            f"nothing usable packed: all {manifest['num_rejected']} input videos were rejected "
            f"(reasons in {out_dir / REJECTED_FILE})"
        )
    return manifest


def _pack_locked(
    items: list[VideoItem],
    classes: list[str],
    out_dir: Path,
    opts: PackOptions,
    shard_size_bytes: int,
    workers: int,
    progress: bool,
    remote: RemoteOut | None = None,
) -> tuple[dict, dict]:
    """The body of `pack_dataset` once ``out_dir`` is prepared and locked: (manifest, run counts).
    The manifest is written only when it lists at least one sample. ``remote``: ``out_dir`` is
    the staging directory of an upload (`remote.RemoteOut`)."""
    uploaded_size = remote.uploaded_size if remote is not None else None
    states = {split: load_split_state(out_dir, split, uploaded_size) for split in SPLITS
              if (out_dir / split).is_dir()}
    if remote is not None:
        for state in states.values():
            remote.upload_staged(state.shards)  # journaled by a killed run, not uploaded yet
    # A video must stay in the split it was packed into: moving it (e.g. another val_fraction)
    # would leak it between train and val.
    done: dict[str, str] = {}
    for split, state in states.items():
        # a rejected video whose file changed since (size, mtime) is tried again
        for src in state.packed_sources | (state.rejected.keys() - state.changed_rejected()):
            done[src] = split
    for it in items:
        if done.get(it.path, it.split) != it.split:
            raise PackError(
                f"{it.path}: is in split {it.split!r} now but was packed into {done[it.path]!r} in "
                f"{out_dir}; the inputs changed -- pick a new --out, or pass --overwrite to start over"
            )

    plan = []  # (split, items to process now)
    for split in SPLITS:
        ordered = split_order(items, split, opts.seed)
        if ordered:
            plan.append((split, [it for it in ordered if it.path not in done]))
    total = sum(1 for it in items if it.split in dict(plan))
    skipped = total - sum(len(todo) for _, todo in plan)
    stats = {"packed": 0, "rejected": 0, "skipped": skipped, "frames": 0}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=skipped, unit="video", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix(rejected=0)
    rejected_log = open(out_dir / REJECTED_FILE, "a")
    try:
        for split, todo in plan:
            if bar is not None:
                bar.set_description(f"pack {split}")
            (out_dir / split).mkdir(exist_ok=True)
            state = states.get(split) or SplitState([], {})
            journal = Journal(out_dir / split / JOURNAL_FILE)
            writer = ShardWriter(
                out_dir, split, shard_size_bytes, journal, next_shard=len(state.shards), next_index=state.num_samples,
                on_shard_done=remote.upload_shard if remote is not None else None,
            )
            # The forkserver preloads the encoder module (cv2, av, flow) once for all workers.
            results = procpool.ordered_results(encode.pack_one, [(it.path, opts) for it in todo], workers,
                                               preload=[encode.__name__], on_crash=encode.worker_died)
            try:
                for it, result in zip(todo, results):
                    if "rejected" in result:
                        stats["rejected"] += 1
                        reason = result["rejected"]
                        journal.append(rejected_record(it.path, reason), sync=False)
                        with naming_path(out_dir / REJECTED_FILE):  # a full disk's write errors name no file
                            rejected_log.write(json.dumps({"path": it.path, "reason": reason, "split": split}) + "\n")
                            rejected_log.flush()
                    else:
                        members, sample_stats = encode.sample_members(it, result, writer.next_index, opts)
                        sample_stats["source_bytes"] = _source_bytes(it.path)
                        writer.add(members, sample_stats)
                        stats["packed"] += 1
                        stats["frames"] += result["num_frames"]
                    if bar is not None:
                        bar.set_postfix(rejected=stats["rejected"], refresh=False)
                        bar.update(1)
                writer.finish_shard()
            except BaseException:
                writer.abort()
                raise
            finally:
                results.close()  # stops the worker pool now, also on errors / Ctrl-C
                journal.close()
    finally:
        rejected_log.close()
        if bar is not None:
            bar.close()

    states = {split: load_split_state(out_dir, split, uploaded_size) for split in SPLITS
              if (out_dir / split).is_dir()}
    manifest = write_outputs(out_dir, opts, classes, states, {split for split, _ in plan})
    if remote is not None:
        remote.finish(manifest)  # rejected.jsonl, then the manifest: after every shard it names
    return manifest, stats


def _source_bytes(path: str) -> int | None:
    """Size of a source video (for the storage-cost report), None when it cannot be read."""
    try:
        return os.path.getsize(path)
    except OSError:
        return None
