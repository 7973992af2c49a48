"""Proof that the whole training path learns, and that RGB difference sees motion that RGB cannot.

Dataset (generated here with `tools.synth`, ~5 s): 4 classes, 100 videos each, 64x64 px,
15 fps, 2-3 s, packed as JPEG frames at 48 px; stratified 60 % train / 40 % val (160 val videos):

* ``move_left`` / ``move_right``: the same L-shaped object translating left or right. By
  construction every single frame has the same distribution in both classes, so an RGB TSN
  with average consensus (a mean of per-frame scores) cannot tell them apart better than chance.
* ``shape_circle`` / ``shape_square``: told apart by appearance.

Both models (tiny CNN, 48 px, K = 3, from scratch) train through ``app.worker.train`` on CPU
and are scored with the val protocol (centre crop) on the last epoch's weights (no model
selection on the evaluated videos). Assertions, on 160 val videos (80 of them motion):

* RGB-diff top-1 >= chance + 0.3 = 0.55. P(>= 88 of 160 correct | p = 0.25) < 1e-15.
* RGB-diff accuracy on the two motion classes >= 0.75 and >= RGB's + 0.25. RGB's expected value
  there is <= 0.5 (a coin between left and right); its std on 80 videos is <= 0.056.

Horizontal flip: the train-time flip turns a ``move_left`` video into a ``move_right`` one while
keeping its label, which makes direction unlearnable; the test turns it off (``augment.flip``
when the config has it, else by zeroing the flip draw of the data path). For the same reason the
10-crop test protocol (5 of its views flipped) averages direction away: its numbers (written to
results.json by train) are reported, not asserted.

Measured on the 2-core CI machine: see the module's printed summary (``pytest -s``).
"""

from __future__ import annotations

import csv
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

CLASSES = ("move_left", "move_right", "shape_circle", "shape_square")
MOTION = ("move_left", "move_right")
VIDEOS_PER_CLASS = 100
EPOCHS = 12


def _render(job) -> None:
    """Spawn-pool worker: render one synthetic video with the public synth API."""
    from tools import synth

    spec, class_index, video_index, out = job
    path = Path(out) / synth.video_relpath(class_index, video_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = synth.video_plan(spec, class_index, video_index)
    synth.write_video(path, synth.iter_frames(plan), plan.fps, plan.width_px, plan.height_px)


@pytest.fixture(scope="module")
def motion_dataset(tmp_path_factory):
    from tools import synth
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs

    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("motion")
    # The catalogue index of each class; num_classes covers the largest so video_plan accepts it.
    indices = [synth.CLASS_NAMES.index(c) for c in CLASSES]
    spec = synth.SynthSpec(num_classes=max(indices) + 1, videos_per_class=VIDEOS_PER_CLASS, seed=0,
                           min_seconds=2.0, max_seconds=3.0, sizes=((64, 64),), fps_choices=(15,))
    jobs = [(spec, c, v, str(root)) for c in indices for v in range(VIDEOS_PER_CLASS)]
    # spawn: rendering in this process would leave cv2 / codec threads behind, and the packer
    # forks its decoding workers.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_render, jobs, chunksize=20))
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((synth.video_relpath(c, v), synth.CLASS_NAMES[c]) for _, c, v, _ in jobs)
    items, classes = read_inputs(csv_path=root / "labels.csv", val_fraction=0.4, seed=0)
    packed = root / "packed"
    pack_dataset(items, classes, packed, codec="jpeg", short_side=48, min_frames=8, workers=2, progress=False)
    print(f"\n[learning] dataset: {len(jobs)} videos generated + packed in {time.perf_counter() - t0:.1f}s")
    return packed


def _disable_flip(monkeypatch) -> list[str]:
    """Config overrides (or a data-path patch) that turn the train-time horizontal flip off."""
    from app.config import AugmentConfig

    if "flip" in AugmentConfig.model_fields:
        return ["augment.flip=false"]
    from dataloading.planning import sampling

    column = sampling.AUG_DRAWS.index("flip") - len(sampling.AUG_DRAWS)
    original = sampling.batch_draws

    def no_flip(*args, **kwargs):
        draws = original(*args, **kwargs)
        draws[:, column] = 0  # pick(0, 2) == 0: not flipped
        return draws

    monkeypatch.setattr(sampling, "batch_draws", no_flip)
    return []


def _train_and_score(packed: Path, modality: str, run_dir: Path, extra: list[str]) -> dict:
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader
    from tsn.checkpoint import load_checkpoint
    from app.config import load_config
    from tsn.evaluation import evaluate
    from app.build import build_model
    from app.worker import train

    cfg = load_config(None, [
        f"data.shards={packed}", f"model.modality={modality}", f"model.snippet_length={1 if modality == 'rgb' else 5}",
        "model.backbone=tiny", "model.partial_bn=false",  # from scratch: no ImageNet statistics to keep
        "model.dropout=0.5", "model.test_segments=3", "augment.input_size=48", "augment.resize_short=48",
        "augment.scales=[1.0, 0.875]", "train.batch_size_per_worker=16", f"train.epochs={EPOCHS}",
        "optim.lr=0.05", "train.log_every_n_steps=0", "checkpoint.keep_last=1", *extra])
    t0 = time.perf_counter()
    results = train(cfg, run_dir)
    seconds = time.perf_counter() - t0
    # The last epoch's weights, scored with the val protocol (centre crop, no flip).
    latest = sorted(run_dir.glob("checkpoints/ckpt-e*.pt"), key=lambda p: load_checkpoint(p)["step"])[-1]
    model = build_model(cfg, len(CLASSES), fresh=False)
    model.load_state_dict(load_checkpoint(latest)["model"])
    val = evaluate(model, TSNLoader(packed, "val", pipeline_spec(cfg, "val")), "cpu", num_classes=len(CLASSES))
    motion = [CLASSES.index(c) for c in MOTION]
    return {"top1": val.top1, "mean_class_accuracy": val.mean_class_accuracy,
            "per_class": dict(zip(CLASSES, val.per_class_accuracy.round(3).tolist())),
            "motion_accuracy": float(np.mean(val.per_class_accuracy[motion])),
            "num_val_videos": val.num_videos, "seconds": seconds,
            "test_protocol_top1": results["top1"], "test_protocol_per_class": results["per_class_accuracy"]}


@pytest.mark.slow
def test_rgb_diff_learns_motion_that_rgb_cannot_see(motion_dataset, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    extra = _disable_flip(monkeypatch)
    rgb = _train_and_score(motion_dataset, "rgb", tmp_path / "rgb", extra)
    diff = _train_and_score(motion_dataset, "rgb_diff", tmp_path / "rgb_diff", extra)
    for name, r in (("rgb", rgb), ("rgb_diff", diff)):
        print(f"[learning] {name}: val top1 {r['top1']:.3f}, motion classes {r['motion_accuracy']:.3f}, "
              f"per class {r['per_class']}, {r['seconds']:.1f}s; 10-crop protocol top1 "
              f"{r['test_protocol_top1']:.3f} {r['test_protocol_per_class']}")
    assert diff["num_val_videos"] == rgb["num_val_videos"] == 160
    assert diff["top1"] >= 0.25 + 0.3, diff
    assert diff["motion_accuracy"] >= 0.75, diff
    assert diff["motion_accuracy"] >= rgb["motion_accuracy"] + 0.25, (rgb, diff)
