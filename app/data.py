"""`tsn stream`: the embedded default end to end for the data path.

Generates the synthetic dataset and packs it on first use (`ensure_dataset`), then streams
the train split through the DALI pipeline for the configured epochs and the val split once
in eval mode, printing throughput. Later the training job replaces the consumer; the data
preparation (`ensure_dataset`) is shared with it.
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
    from dataloading import inputs, pack, shards
    from tools import synth

    spec = synth.SynthSpec(num_classes=classes, videos_per_class=videos_per_class, seed=seed,
                           min_seconds=2.0, max_seconds=4.0, sizes=((160, 120), (192, 144)),
                           fps_choices=(15, 25))
    recipe = {"synth": dataclasses.asdict(spec), "short_side": short_side, "val_fraction": val_fraction,
              "codec": "jpeg"}
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
    if labels.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) != recipe["synth"]:
        log.warning("%s holds videos of another synth spec: regenerating it", synth_dir)
        shutil.rmtree(synth_path)  # resuming would mix the two specs
    if not labels.is_file():
        log.info("generating the synthetic dataset in %s (%d classes x %d videos)", synth_dir, classes,
                 videos_per_class)
        synth.generate_dataset(synth_dir, spec, progress=progress)
        spec_path.write_text(json.dumps(recipe["synth"], indent=2) + "\n")
    log.info("packing %s into %s", labels, shards_dir)
    items, class_names = inputs.read_inputs(csv_path=labels, val_fraction=val_fraction, seed=seed)
    manifest = pack.pack_dataset(items, class_names, shards_dir, codec="jpeg", short_side=short_side,
                                 seed=seed, progress=progress)
    recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
    return manifest


def stream(cfg, epochs: int, progress: bool = True) -> dict:
    """Stream train (train-mode augmentation) and val (eval mode) through DALI; returns stats."""
    from dataloading.loader import TSNLoader, pipeline_spec
    from app.config import DataConfig

    d = cfg.data
    if d.shards != DataConfig.shards and not (Path(d.shards) / "manifest.json").is_file():
        raise FileNotFoundError(f"data.shards={d.shards}: not a packed dataset (run `tsn pack` first)")
    if d.shards == DataConfig.shards:
        manifest = ensure_dataset(d.shards, d.synth_dir, classes=d.synth_classes,
                                  videos_per_class=d.synth_videos_per_class, seed=d.synth_seed,
                                  short_side=d.pack_short_side, val_fraction=d.val_fraction, progress=progress)
    else:
        from dataloading.shards import load_manifest

        manifest = load_manifest(d.shards)
    stats = {"dataset": d.shards, "layout": manifest["layout"], "epochs": []}
    train = TSNLoader(d.shards, d.train_split, pipeline_spec(cfg, "train"))
    for epoch in range(epochs):
        t0, clips, frames = time.perf_counter(), 0, 0
        for batch in tqdm(train, total=len(train), desc=f"train epoch {epoch}", disable=not progress,
                          file=sys.stderr):
            clips += batch.frames.shape[0]
            frames += batch.frame_indices.numel()
        dt = time.perf_counter() - t0
        stats["epochs"].append({"epoch": epoch, "clips": clips, "seconds": dt, "clips_per_s": clips / dt,
                                "frames_per_s": frames / dt})
        print(f"epoch {epoch}: {clips} clips in {dt:.1f}s = {clips / dt:.1f} clips/s, "
              f"{frames / dt:.0f} frames/s, batch {tuple(batch.frames.shape)}")
    if d.val_split in manifest["splits"]:
        val = TSNLoader(d.shards, d.val_split, pipeline_spec(cfg, "val"))
        t0, clips = time.perf_counter(), 0
        for batch in tqdm(val, total=len(val), desc="val", disable=not progress, file=sys.stderr):
            clips += batch.frames.shape[0]
        dt = time.perf_counter() - t0
        stats["val"] = {"clips": clips, "seconds": dt, "clips_per_s": clips / dt}
        print(f"val: {clips} clips in {dt:.1f}s = {clips / dt:.1f} clips/s")
    stats["skipped_corrupt"] = len(train.skipped)
    return stats


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("stream", help="stream a packed dataset through the DALI pipeline (default: the "
                                             "embedded synthetic dataset) and print throughput")
    p.add_argument("--config", help="YAML config (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.shards=/data/ucf101-packed")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--json", help="write the throughput stats here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from app.config import load_config

    cfg = load_config(args.config, args.overrides)
    stats = stream(cfg, args.epochs, progress=not args.no_progress)
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    return 0
