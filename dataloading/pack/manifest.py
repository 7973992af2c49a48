"""The end of a pack: ``rejected.jsonl`` and ``manifest.json`` rebuilt from the journals.

Both are derived from the splits' journals (`journal.SplitState`), never from what this run
happened to see, so they are complete and duplicate-free after any number of interrupted and
resumed runs. Keys of the manifest: see `dataloading.pack.packer.pack_dataset`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from dataloading.format import shards
from dataloading.pack.journal import SplitState
from dataloading.pack.options import FORMAT_VERSION, MANIFEST_FILE, REJECTED_FILE, PackOptions
from dataloading.sources.items import SPLITS
from dataloading.store import files


def write_outputs(out_dir: Path, opts: PackOptions, classes: list[str], states: dict[str, SplitState],
                  planned: set[str]) -> dict:
    """Rewrite ``rejected.jsonl`` (appended to while packing) from the journals and write
    ``manifest.json`` when it lists at least one sample; returns the manifest."""
    rejected_lines = [
        json.dumps({"path": path, "reason": reason, "split": split}) + "\n"
        for split, state in states.items()
        for path, reason in state.rejected.items()
    ]
    files.atomic_write_text(out_dir / REJECTED_FILE, "".join(rejected_lines))
    manifest = build_manifest(opts, classes, states, len(rejected_lines), planned)
    if manifest["num_samples"]:
        files.atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def build_manifest(
    opts: PackOptions, classes: list[str], states: dict[str, SplitState], num_rejected: int, planned: set[str]
) -> dict:
    """The manifest from the journals' finished shards. A split appears when it was in this
    run's inputs (``planned``) or has finished shards."""
    splits = {}
    all_shards = []
    for split in SPLITS:
        state = states.get(split)
        if state is None or (split not in planned and not state.shards):
            continue
        class_counts = Counter()
        for rec in state.shards:
            class_counts.update(rec["class_counts"])
        # sha256: absent from shards journaled before it was recorded
        shard_list = [{k: r[k] for k in ("path", "index_path", "num_samples", "num_bytes", "first_sample_index",
                                         "sha256") if k in r} for r in state.shards]
        splits[split] = {
            "num_samples": state.num_samples,
            "num_frames": sum(r["num_frames"] for r in state.shards),
            "num_bytes": sum(r["num_bytes"] for r in state.shards),
            "duration_seconds": sum(r["duration_seconds"] for r in state.shards),
            # bytes of the source videos packed here (the storage-cost ratio of `tsn inspect`);
            # None when a shard's journal record lacks it (packed before it was recorded)
            "source_bytes": _total(r.get("source_bytes") for r in state.shards),
            "class_counts": {name: class_counts.get(name, 0) for name in classes},
            "shards": shard_list,
        }
        all_shards += [{**s, "split": split} for s in shard_list]
    num_samples = sum(s["num_samples"] for s in splits.values())
    num_bytes = sum(s["num_bytes"] for s in splits.values())
    duration_s = sum(s["duration_seconds"] for s in splits.values())
    source_bytes = _total(s["source_bytes"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "layout": opts.layout,
        "codec": opts.codec,
        "short_side": opts.short_side,
        "jpeg_quality": opts.jpeg_quality,
        "gop": opts.gop,
        "fps": opts.fps,
        "min_frames": opts.min_frames,
        "seed": opts.seed,
        "modalities": list(opts.modalities),
        # how the flow entries were made (null for an RGB-only pack); see dataloading.format.shards
        "flow": {"algorithm": opts.flow_algorithm, "bound": opts.flow_bound, "order": shards.FLOW_ORDER,
                 "frames_per_video": "num_frames - 1"} if opts.flow_modalities else None,
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": num_samples,
        "num_rejected": num_rejected,
        "splits": splits,
        "shards": all_shards,
        "bytes_per_video": num_bytes / num_samples if num_samples else 0.0,
        "bytes_per_hour_of_video": num_bytes / (duration_s / 3600.0) if duration_s > 0 else 0.0,
        "source_bytes": source_bytes,
        "created_unix": time.time(),
    }


def _total(values) -> int | None:
    """Sum of ``values``; None when any is None (unknown)."""
    values = list(values)
    return None if None in values else sum(values)


def classes_without_videos(manifest: dict, split: str) -> list[str]:
    """The classes with no sample in ``split`` of a pack that has that split (e.g. every
    training video of a class rejected, or moved to val by ``--val-fraction``)."""
    info = manifest.get("splits", {}).get(split)
    if info is None:
        return []
    counts = info.get("class_counts", {})
    return [name for name in manifest.get("classes", []) if not counts.get(name)]
