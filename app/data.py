"""Dataset preparation in the driver, and the data path end to end (`tsn stream`).

* `prepare_dataset(cfg)`: run ONCE by the driver (`tsn train --local`, the Ray job's driver,
  `tsn stream`) before any worker starts: generates + packs the embedded synthetic default
  (`ensure_dataset`) when it is missing or of another recipe; any other ``data.shards`` must
  already be a packed dataset. Training workers never generate or pack data.
* `training_manifest(cfg)`: what a training worker calls instead: the manifest, or a clear
  error when the dataset is missing or lacks the train / val split.
* `stream(cfg, epochs)`: the train split through the DALI pipeline for some epochs and the val
  split once in eval mode, printing throughput.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dataloading.store.files import atomic_write_json

log = logging.getLogger(__name__)


RECIPE_FILE = "synth_recipe.json"  # beside manifest.json: what the embedded default was built from


def ensure_dataset(shards_dir: str, synth_dir: str, *, classes: int, videos_per_class: int, seed: int,
                   short_side: int, val_fraction: float, progress: bool = True) -> dict:
    """Return the manifest of ``shards_dir``; generate + pack the synthetic default when missing.

    Only the embedded default is generated: a user's ``data.shards`` that does not exist is an
    error, not a reason to synthesise data in its place (the caller decides which it is).
    The recipe (these arguments) is stored beside the manifest; a dataset built from another
    recipe (e.g. after ``--set data.synth_videos_per_class=...``) is rebuilt rather than
    silently reused.
    """
    from dataloading import pack
    from dataloading.format import shards
    from dataloading.sources import inputs
    from tools import synth

    spec = synth.SynthSpec(num_classes=classes, videos_per_class=videos_per_class, seed=seed,
                           min_seconds=2.0, max_seconds=4.0, sizes=((160, 120), (192, 144)),
                           fps_choices=(15, 25))
    recipe = {"synth": dataclasses.asdict(spec), "synth_version": synth.SYNTH_VERSION, "short_side": short_side,
              "val_fraction": val_fraction, "codec": "jpeg"}
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    shards_path, synth_path = Path(shards_dir), Path(synth_dir)
    recipe_path = shards_path / RECIPE_FILE
    if (shards_path / "manifest.json").is_file():
        if not recipe_path.is_file():
            # Not built here (no recipe): never delete what this function did not make.
            log.warning("%s has no %s: using it as it is", shards_dir, RECIPE_FILE)
            return shards.load_manifest(shards_dir)
        if json.loads(recipe_path.read_text()) == recipe:
            return shards.load_manifest(shards_dir)
        log.warning("%s was built from another recipe than the config asks for: rebuilding it", shards_dir)
        shutil.rmtree(shards_path)
    labels = synth_path / "labels.csv"
    spec_path = synth_path / "synth_spec.json"
    # the videos' own recipe: the spec and the generator's version (frames change with either)
    videos = {"synth": recipe["synth"], "synth_version": recipe["synth_version"]}
    if labels.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) != videos:
        log.warning("%s holds videos of another synth spec: regenerating it", synth_dir)
        shutil.rmtree(synth_path)  # resuming would mix the two specs
    if not labels.is_file():
        log.info("generating the synthetic dataset in %s (%d classes x %d videos)", synth_dir, classes,
                 videos_per_class)
        synth.generate_dataset(synth_dir, spec, progress=progress)
        atomic_write_json(spec_path, videos)
    log.info("packing %s into %s", labels, shards_dir)
    items, class_names = inputs.read_inputs(csv_path=labels, val_fraction=val_fraction, seed=seed)
    manifest = pack.pack_dataset(items, class_names, shards_dir, codec="jpeg", short_side=short_side,
                                 seed=seed, progress=progress)
    atomic_write_json(recipe_path, recipe)
    return manifest


def prepare_dataset(cfg, *, progress: bool = True) -> dict:
    """The driver's step before any worker starts: the manifest of ``data.shards``, generating +
    packing the embedded default first when it is missing or of another recipe. Any other
    ``data.shards`` must already be a packed dataset (never synthesised in its place): a local
    directory or an ``s3://bucket/prefix``, whose train and val objects (tars with the
    manifest's sizes, DALI indices) are all checked to exist here, before any worker starts
    or any run file is written (`shards.split_shards`)."""
    from dataloading.format import shards
    from dataloading.store import storage

    d = cfg.data
    if d.uses_embedded_dataset:
        return ensure_dataset(d.shards, d.synth_dir, classes=d.synth_classes, videos_per_class=d.synth_videos_per_class,
                              seed=d.synth_seed, short_side=d.pack_short_side, val_fraction=d.val_fraction,
                              progress=progress)
    storage.check_supported(d.shards)
    try:
        manifest = shards.load_manifest(d.shards)  # names a missing bucket apart from a missing manifest
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.shards={e}") from None
    for split in (d.train_split, d.val_split):  # local and s3:// alike, as the docstring says
        if split in manifest.get("splits", {}):
            shards.split_shards(d.shards, split)  # raises naming a missing / damaged object
    return manifest


def check_training_splits(cfg, manifest: dict) -> None:
    """Fail unless the manifest packs ``data.train_split`` and ``data.val_split``."""
    have = manifest.get("splits", {})
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split not in have:
            raise ValueError(f"{key}={split!r}: not packed in {cfg.data.shards} (have: {', '.join(sorted(have))}); "
                             f"pack with a validation split")


def check_dataset_fits(cfg, manifest: dict, world_size: int) -> None:
    """The driver's checks of a prepared dataset against the job, before any worker starts:

    * every rank needs at least one training video (``world_size``: the largest worker group
      the job may run), and the val split at least one video;
    * the manifest must not claim more samples than its shards hold: per split, its
      ``num_samples`` against the sum over its shards, and (local datasets) each shard's count
      against the header of its DALI index (``v1.2 <samples>``); the loader would otherwise
      plan batches of samples that do not exist.

    One ValueError naming the split and the fix; nothing is checked twice in the workers."""
    from dataloading.store import storage

    d = cfg.data
    splits = manifest.get("splits", {})
    for split in (d.train_split, d.val_split):
        info = splits.get(split) or {}
        claimed = int(info.get("num_samples", 0))
        in_shards = sum(int(s.get("num_samples", 0)) for s in info.get("shards", []))
        if claimed > in_shards:
            raise ValueError(f"data.shards={d.shards}: manifest.json says split {split!r} has {claimed} samples, its "
                             f"shards list {in_shards}; the manifest does not match the shards: re-run `tsn pack` "
                             f"(it resumes and rewrites the manifest)")
        if not storage.is_uri(d.shards):
            for shard in info.get("shards", []):
                held = _index_sample_count(Path(d.shards) / shard["index_path"])
                if held is not None and int(shard["num_samples"]) > held:
                    raise ValueError(f"data.shards={d.shards}: manifest.json says {shard['path']} (split {split!r}) "
                                     f"holds {shard['num_samples']} samples, its index lists {held}; re-run `tsn pack`")
    train_n = int((splits.get(d.train_split) or {}).get("num_samples", 0))
    if train_n < world_size:
        raise ValueError(f"data.shards={d.shards}: split {d.train_split!r} has {train_n} video(s), fewer than the "
                         f"{world_size} workers (one at least each); lower cluster.num_workers or pack more videos")
    if int((splits.get(d.val_split) or {}).get("num_samples", 0)) < 1:
        raise ValueError(f"data.shards={d.shards}: split {d.val_split!r} has no videos to validate on; pack with "
                         f"--val-fraction > 0 or set data.val_split")


def _index_sample_count(idx_path: Path) -> int | None:
    """`shards.index_sample_count`, None when the file is missing or its header unreadable
    (checked, and rebuilt where possible, by the shard checks elsewhere)."""
    from dataloading.format import shards

    try:
        return shards.index_sample_count(idx_path)
    except (OSError, ValueError):
        return None


def training_manifest(cfg) -> dict:
    """A training worker's view of the dataset: the manifest of the already prepared
    ``data.shards`` (`prepare_dataset` ran in the driver), with both splits checked."""
    from dataloading.format import shards

    d = cfg.data
    try:
        manifest = shards.load_manifest(d.shards)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.shards={e} (the embedded default is prepared by the driver: "
                                f"`tsn train`)") from None
    check_training_splits(cfg, manifest)
    return manifest


def stream(cfg, epochs: int, progress: bool = True) -> dict:
    """Stream train (train-mode augmentation) and val (eval mode) through DALI; returns stats."""
    from app.build import shard_access
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader
    from dataloading.pipeline.stage_times import format_stages, per_batch

    d = cfg.data
    manifest = prepare_dataset(cfg, progress=progress)
    stats = {"dataset": d.shards, "layout": manifest["layout"], "epochs": []}
    access = shard_access(cfg)  # the node cache, as training reads the shards
    train = TSNLoader(d.shards, d.train_split, pipeline_spec(cfg, "train"), **access)
    for epoch in range(epochs):
        t0, clips, frames, batches = time.perf_counter(), 0, 0, 0
        before = train.stage_times.snapshot()
        for batch in tqdm(train, total=len(train), desc=f"train epoch {epoch}", disable=not progress,
                          file=sys.stderr):
            clips += batch.frames.shape[0]
            frames += batch.frame_indices.numel()
            batches += 1
        dt = time.perf_counter() - t0
        fetched = train.object_storage_bytes.get(epoch, 0)
        stages = per_batch(before, train.stage_times.snapshot(), batches)
        stats["epochs"].append({"epoch": epoch, "clips": clips, "seconds": dt, "clips_per_s": clips / dt,
                                "frames_per_s": frames / dt, "object_storage_bytes": fetched,
                                **({"stages_s_per_batch": stages} if train.stage_times.enabled else {})})
        print(f"epoch {epoch}: {clips} clips in {dt:.1f}s = {clips / dt:.1f} clips/s, "
              f"{frames / dt:.0f} frames/s, batch {tuple(batch.frames.shape)}{_fetched(d.shards, fetched)}")
        if train.stage_times.enabled:
            print(f"  input stages, ms per batch: {format_stages(stages)}")
    if d.val_split in manifest["splits"]:
        val = TSNLoader(d.shards, d.val_split, pipeline_spec(cfg, "val"), **access)
        t0, clips = time.perf_counter(), 0
        for batch in tqdm(val, total=len(val), desc="val", disable=not progress, file=sys.stderr):
            clips += batch.frames.shape[0]
        dt = time.perf_counter() - t0
        fetched = sum(val.object_storage_bytes.values())
        stats["val"] = {"clips": clips, "seconds": dt, "clips_per_s": clips / dt, "object_storage_bytes": fetched}
        print(f"val: {clips} clips in {dt:.1f}s = {clips / dt:.1f} clips/s{_fetched(d.shards, fetched)}")
    stats["skipped_corrupt"] = len(train.skipped)
    return stats


def _fetched(shards_uri: str, n_bytes: int) -> str:
    from dataloading.store import storage

    return f", {n_bytes / 1e6:.1f} MB from object storage" if storage.is_uri(shards_uri) else ""
