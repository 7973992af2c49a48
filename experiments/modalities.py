"""The paper's modality table (TSN.md section 8) reproduced on the synthetic dataset.

    .venv/bin/python experiments/modalities.py [--out experiments/results/modalities]
        [--videos-per-class 100] [--epochs 40] [--backbone resnet18] [--flow-algorithm dis]
        [--pan-fraction 0.7] [--init-from-rgb]

The defaults are the README's table: ~45 minutes on the 2-core machine (data ~5, training ~40).

1. Generates the synthetic dataset (all 10 classes: 6 told apart only by motion, 4 by
   appearance) with a camera pan on ``--pan-fraction`` of the videos, and packs it with
   ``--modalities rgb,flow,warped_flow`` (flow and warped flow computed at packing).
2. Trains RGB, RGB difference, flow and warped flow TSNs with the same budget (``--backbone``
   from scratch, K = 3, same epochs, batch, lr and seed; L = 1 for RGB, 5 for the others; no flip,
   since direction defines classes), each in this process (`app.worker.train`, no Ray).
3. Scores every stream with the test protocol (``model.test_segments`` x 10 crops) and fuses
   them as the paper does (weighted average of scores: RGB + RGB diff 1 : 1.5, flow + warped
   1 : 1, RGB + flow + warped 1 : 1 : 0.5, all four 1 : 1.5 : 1 : 0.5).
4. Writes ``results.json`` and ``table.md``: top-1 and mean class accuracy per row in the
   paper's layout, plus the accuracy on the motion classes and on the videos with camera pan,
   where the paper's claims live (motion streams beat RGB on motion classes; warped flow beats
   flow under camera motion; fusion beats each stream).

Everything is seeded; a re-run with the same arguments reuses the packed dataset and the
finished runs (``app.worker`` does not redo a finished run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STREAMS = {  # name -> (modality, snippet_length)
    "RGB": ("rgb", 1),
    "RGB diff": ("rgb_diff", 5),
    "Flow": ("flow", 5),
    "Warped flow": ("warped_flow", 5),
}
FUSIONS = {  # the paper's rows, with its weights (TSN.md section 7)
    "RGB + RGB diff": {"RGB": 1.0, "RGB diff": 1.5},
    "Flow + warped flow": {"Flow": 1.0, "Warped flow": 1.0},
    "RGB + flow + warped flow": {"RGB": 1.0, "Flow": 1.0, "Warped flow": 0.5},
    "All four": {"RGB": 1.0, "RGB diff": 1.5, "Flow": 1.0, "Warped flow": 0.5},
}
PAPER_UCF101 = {"RGB": 84.5, "RGB diff": 83.8, "RGB + RGB diff": 87.3, "Flow": 87.2, "Warped flow": 86.9,
                "Flow + warped flow": 87.8, "RGB + flow + warped flow": 92.3, "All four": 91.7}


def make_dataset(out: Path, *, videos_per_class: int, pan_fraction: float, flow_algorithm: str,
                 seed: int) -> Path:
    """Generate + pack (both resumable); returns the packed directory."""
    from tools import synth
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs

    spec = synth.SynthSpec(num_classes=len(synth.CLASS_NAMES), videos_per_class=videos_per_class, seed=seed,
                           min_seconds=2.0, max_seconds=4.0, sizes=((160, 120),), fps_choices=(15,),
                           camera_pan_fraction=pan_fraction)
    videos, packed = out / "synth", out / "packed"
    if not (videos / "labels.csv").is_file():
        synth.generate_dataset(videos, spec, progress=True)
    if not (packed / "manifest.json").is_file():
        items, classes = read_inputs(csv_path=videos / "labels.csv", val_fraction=0.3, seed=seed)
        pack_dataset(items, classes, packed, codec="jpeg", short_side=64, seed=seed, progress=True,
                     modalities=("rgb", "flow", "warped_flow"), flow_algorithm=flow_algorithm)
    return packed


def source_key(path) -> str:
    """A source video's identity independent of where the dataset directory sits: its path
    below the generator's output (``videos/<class>/<file>``)."""
    return "/".join(Path(path).parts[-3:])


def panned_sources(videos: Path, spec_seed: int, videos_per_class: int, pan_fraction: float) -> set[str]:
    """Source paths (as in labels.csv) of the videos generated with a camera pan."""
    from tools import synth

    spec = synth.SynthSpec(num_classes=len(synth.CLASS_NAMES), videos_per_class=videos_per_class, seed=spec_seed,
                           min_seconds=2.0, max_seconds=4.0, sizes=((160, 120),), fps_choices=(15,),
                           camera_pan_fraction=pan_fraction)
    out = set()
    for c in range(spec.num_classes):
        for v in range(videos_per_class):
            if np.any(synth.video_plan(spec, c, v).pan_velocity_px_per_s != 0):
                out.add(source_key(videos / synth.video_relpath(c, v)))
    return out


def split_sources(packed: Path, split: str) -> dict[int, str]:
    """sample_index -> source path, from the split's shards (the samples' JSON members)."""
    out = {}
    for tar_path in sorted((packed / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out[int(meta["sample_index"])] = source_key(meta["source"])
    return out


def last_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint of a finished `app.worker` run (its checkpoints.json lists them in order)."""
    from app.run_store import RunStore

    store = RunStore(run_dir)
    return store.local_checkpoint_path(store.checkpoint_entries()[-1])


def train_stream(name: str, packed: Path, run_dir: Path, *, epochs: int, seed: int, backbone: str,
                 init_from: Path | None = None) -> Path:
    """Train one stream; returns its test-protocol scores file.

    ``init_from``: a trained RGB checkpoint seeding this stream (the paper's cross-modality
    pre-training: first conv averaged over RGB and replicated over the stream's channels).
    """
    from app.config import load_config
    from app.run_store import SCORES_FILE
    from app.worker import train

    modality, snippet = STREAMS[name]
    cfg = load_config(None, [
        f"data.shards={packed}", f"model.modality={modality}", f"model.snippet_length={snippet}",
        f"model.backbone={backbone}", "model.num_segments=3", "model.test_segments=5", "model.dropout=0.5",
        *([f"model.init_from={init_from}"] if init_from else []),
        "augment.input_size=56", "augment.resize_short=64", "augment.flip=false",
        # The paper's flow scales for every stream: one budget, one augmentation.
        "augment.scales=[1.0, 0.875, 0.75]",
        f"train.epochs={epochs}", "train.batch_size_per_worker=16", "train.log_every_n_steps=0",
        "optim.lr=0.05", f"optim.lr_steps=[{int(epochs * 0.75)}]", f"run.seed={seed}",
        "checkpoint.keep_last=1"])
    t0 = time.perf_counter()
    train(cfg, run_dir)
    print(f"[modalities] {name}: trained in {time.perf_counter() - t0:.0f}s -> {run_dir}", flush=True)
    return run_dir / SCORES_FILE


def accuracy(pred: np.ndarray, label: np.ndarray, mask: np.ndarray) -> float:
    return float((pred[mask] == label[mask]).mean()) if mask.any() else float("nan")


def mean_class_accuracy(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    per = [(pred[label == c] == c).mean() for c in range(num_classes) if (label == c).any()]
    return float(np.mean(per))


def row(sample_index, label, scores, *, class_names, sources, panned) -> dict:
    from tools.synth import MOTION_CLASSES

    pred = scores.argmax(axis=1)
    motion = np.array([class_names[l] in MOTION_CLASSES for l in label])
    pan = np.array([sources[int(i)] in panned for i in sample_index])
    return {"top1": accuracy(pred, label, np.ones_like(motion)), "mean_class_accuracy":
            mean_class_accuracy(pred, label, len(class_names)), "motion_top1": accuracy(pred, label, motion),
            "appearance_top1": accuracy(pred, label, ~motion), "pan_top1": accuracy(pred, label, pan),
            "pan_motion_top1": accuracy(pred, label, pan & motion), "no_pan_top1": accuracy(pred, label, ~pan),
            "num_videos": int(len(label)), "num_pan_videos": int(pan.sum()), "num_motion_videos": int(motion.sum())}


def table(rows: dict) -> str:
    head = ("| modality | top-1 | mean class acc. | motion classes | camera pan | pan + motion | "
            "paper (UCF101 top-1) |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['top1']:.1f} | {100 * r['mean_class_accuracy']:.1f} | "
                     f"{100 * r['motion_top1']:.1f} | {100 * r['pan_top1']:.1f} | {100 * r['pan_motion_top1']:.1f} | "
                     f"{PAPER_UCF101.get(name, '')} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "modalities"))
    p.add_argument("--videos-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--pan-fraction", type=float, default=0.7)
    p.add_argument("--flow-algorithm", default="dis", choices=("tvl1", "dis", "farneback"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--backbone", default="resnet18",
                   help="tiny (2 convs, 7 px receptive field: sees colour and local motion, not shape) "
                        "or a timm name, e.g. resnet18")
    p.add_argument("--init-from-rgb", action="store_true",
                   help="seed the RGB-diff, flow and warped-flow streams from the trained RGB stream "
                        "(cross-modality pre-training; the paper seeds from ImageNet RGB weights)")
    args = p.parse_args(argv)

    import torch

    from app.run_store import load_scores
    from tsn.scores import fuse_scores

    torch.set_num_threads(args.threads)
    # One directory per setting: a re-run with other arguments never reuses data or runs
    # made for different ones.
    data_setting = f"v{args.videos_per_class}-pan{args.pan_fraction:g}-{args.flow_algorithm}-s{args.seed}"
    out = Path(args.out) / (f"v{args.videos_per_class}-e{args.epochs}-pan{args.pan_fraction:g}-"
                            f"{args.flow_algorithm}-s{args.seed}"
                            + ("" if args.backbone == "tiny" else f"-{args.backbone}")
                            + ("-rgbinit" if args.init_from_rgb else ""))
    data = Path(args.out) / f"data-{data_setting}"  # shared by the settings that train on it
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    packed = make_dataset(data, videos_per_class=args.videos_per_class, pan_fraction=args.pan_fraction,
                          flow_algorithm=args.flow_algorithm, seed=args.seed)
    data_s = time.perf_counter() - t0
    scores, rgb_run = {}, out / "runs" / "rgb"
    for name in STREAMS:  # RGB first: it may seed the others
        run_dir = out / "runs" / name.replace(" ", "_").lower()
        init = last_checkpoint(rgb_run) if args.init_from_rgb and name != "RGB" else None
        scores[name] = load_scores(train_stream(name, packed, run_dir, epochs=args.epochs, seed=args.seed,
                                                backbone=args.backbone, init_from=init))
    manifest = json.loads((packed / "manifest.json").read_text())
    class_names = list(manifest["classes"])
    sources = split_sources(packed, "val")
    panned = panned_sources(data / "synth", args.seed, args.videos_per_class, args.pan_fraction)

    rows = {}
    for name, s in scores.items():
        rows[name] = row(s["sample_index"], s["label"], s["scores"], class_names=class_names, sources=sources,
                         panned=panned)
    for name, weights in FUSIONS.items():
        idx, label, fused = fuse_scores([scores[k] for k in weights], list(weights.values()))
        rows[name] = row(idx, label, fused, class_names=class_names, sources=sources, panned=panned)
    order = ["RGB", "RGB diff", "RGB + RGB diff", "Flow", "Warped flow", "Flow + warped flow",
             "RGB + flow + warped flow", "All four"]
    rows = {k: rows[k] for k in order}
    report = {"args": vars(args), "classes": class_names, "rows": rows, "data_seconds": data_s,
              "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(table(rows))
    print(table(rows))
    print(f"[modalities] {out / 'results.json'} ({report['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
