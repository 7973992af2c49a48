"""The 4-class motion set and its train-then-score recipe, shared by the learning test
(`tests/test_learning.py`) and the TSM experiment (`experiments/temporal_shift.py`). Here, not in
`tools/`, because training and scoring use `app` (tools/ sits below it).

Dataset (`make_motion_dataset`, ~15 s on 2 cores): 4 synthetic classes, 100 videos each, 64x64 px,
15 fps, 2-3 s, packed as JPEG frames at 48 px; stratified 60 % train / 40 % val (160 val videos):

* ``move_left`` / ``move_right``: the same L-shaped object translating left or right. By
  construction every single frame has the same distribution in both classes, so a model that
  scores frames independently (RGB TSN with average consensus) cannot tell them apart.
* ``shape_circle`` / ``shape_square``: told apart by appearance.

`train_and_score` trains one model in this process (`app.worker.train`, no Ray) and scores the
last epoch's weights with the val protocol (centre crop, no model selection on the scored videos).
"""

from __future__ import annotations

import csv
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = ("move_left", "move_right", "shape_circle", "shape_square")
MOTION = ("move_left", "move_right")
VIDEOS_PER_CLASS = 100

# The recipe's settings; callers add theirs after (the last value of a key wins).
BASE_OVERRIDES = (
    "model.backbone=tiny", "model.partial_bn=false",  # from scratch: no ImageNet statistics to keep
    "model.dropout=0.5", "model.test_segments=3", "augment.input_size=48", "augment.resize_short=48",
    "augment.scales=[1.0, 0.875]", "train.batch_size_per_worker=16", "train.epochs=12",
    "optim.lr=0.05", "train.log_every_n_steps=0", "checkpoint.keep_last=1",
)


def _render(job) -> None:
    """Spawn-pool worker: render one synthetic video with the public synth API."""
    from tools import synth

    spec, class_index, video_index, out = job
    path = Path(out) / synth.video_relpath(class_index, video_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = synth.video_plan(spec, class_index, video_index)
    synth.write_video(path, synth.iter_frames(plan), plan.fps, plan.width_px, plan.height_px)


def make_motion_dataset(root: Path, videos_per_class: int = VIDEOS_PER_CLASS) -> Path:
    """Generate and pack the set under ``root``; returns the packed directory (reused when there)."""
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs
    from tools import synth

    packed = Path(root) / "packed"
    if (packed / "manifest.json").is_file():
        return packed
    t0 = time.perf_counter()
    # The catalogue index of each class; num_classes covers the largest so video_plan accepts it.
    indices = [synth.CLASS_NAMES.index(c) for c in CLASSES]
    spec = synth.SynthSpec(num_classes=max(indices) + 1, videos_per_class=videos_per_class, seed=0,
                           min_seconds=2.0, max_seconds=3.0, sizes=((64, 64),), fps_choices=(15,))
    jobs = [(spec, c, v, str(root)) for c in indices for v in range(videos_per_class)]
    # spawn: rendering in this process would leave cv2 / codec threads behind, and the packer
    # forks its decoding workers.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_render, jobs, chunksize=20))
    with (Path(root) / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((synth.video_relpath(c, v), synth.CLASS_NAMES[c]) for _, c, v, _ in jobs)
    items, classes = read_inputs(csv_path=Path(root) / "labels.csv", val_fraction=0.4, seed=0)
    pack_dataset(items, classes, packed, codec="jpeg", short_side=48, min_frames=8, workers=2, progress=False)
    print(f"[motion set] {len(jobs)} videos generated + packed in {time.perf_counter() - t0:.1f}s", flush=True)
    return packed


def train_and_score(packed: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Train with `BASE_OVERRIDES` + ``overrides``, score the last epoch on val; the numbers."""
    from app.build import build_model
    from app.config import load_config
    from app.pipeline import pipeline_spec
    from app.worker import train
    from dataloading.pipeline.loader import TSNLoader
    from tsn.checkpoint import load_checkpoint
    from tsn.evaluation import evaluate

    cfg = load_config(None, [f"data.shards={packed}", *BASE_OVERRIDES, *overrides])
    t0 = time.perf_counter()
    results = train(cfg, run_dir)
    seconds = time.perf_counter() - t0
    latest = sorted(Path(run_dir).glob("checkpoints/ckpt-e*.pt"), key=lambda p: load_checkpoint(p)["step"])[-1]
    model = build_model(cfg, len(CLASSES), fresh=False)
    model.load_state_dict(load_checkpoint(latest)["model"])
    val = evaluate(model, TSNLoader(packed, "val", pipeline_spec(cfg, "val")), "cpu", num_classes=len(CLASSES))
    motion = [CLASSES.index(c) for c in MOTION]
    return {"top1": val.top1, "mean_class_accuracy": val.mean_class_accuracy,
            "per_class": dict(zip(CLASSES, val.per_class_accuracy.round(3).tolist())),
            "motion_accuracy": float(np.mean(val.per_class_accuracy[motion])),
            "num_val_videos": val.num_videos, "seconds": seconds,
            "test_protocol_top1": results["top1"], "test_protocol_per_class": results["per_class_accuracy"]}
