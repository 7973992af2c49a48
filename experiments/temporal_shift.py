"""TSM against TSN at equal budget on the 4-class motion set (`experiments/motion_set.py`).

    .venv/bin/python experiments/temporal_shift.py [--out experiments/results/temporal_shift]
        [--backbone resnet10t] [--segments 8] [--epochs 40] [--fold-div 8]

Both models are RGB (one frame per segment, so only the model can see motion), the same
ResNet from scratch, K segments, epochs, lr schedule, batch and seed; they differ only in
``model.temporal_shift.fold_div`` (0: TSN). Flip is off (it turns left into right). Scored on the
160 val videos with the val protocol (K centre crops, the last epoch's weights). Writes
``results.json`` and prints a table: top-1, accuracy on the two motion classes (a coin for a
model that sees frames one at a time) and on the two shape classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import motion_set  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "temporal_shift"))
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--fold-div", type=int, default=8)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    packed = motion_set.make_motion_dataset(out / "data")
    common = ["augment.flip=false", "model.modality=rgb", "model.snippet_length=1", f"model.backbone={args.backbone}",
              f"model.num_segments={args.segments}", f"model.test_segments={args.segments}",
              f"train.epochs={args.epochs}", f"optim.lr_steps=[{int(args.epochs * 0.75)}]", "optim.lr=0.05"]
    results = {}
    for name, fold_div in (("TSN", 0), (f"TSM (fold_div {args.fold_div})", args.fold_div)):
        run = out / "runs" / ("tsn" if fold_div == 0 else f"tsm{fold_div}")
        r = motion_set.train_and_score(packed, run, [*common, f"model.temporal_shift.fold_div={fold_div}"])
        r["shape_accuracy"] = (r["per_class"]["shape_circle"] + r["per_class"]["shape_square"]) / 2
        results[name] = r
        print(f"[temporal shift] {name}: top1 {r['top1']:.3f}, motion {r['motion_accuracy']:.3f}, "
              f"per class {r['per_class']}, {r['seconds']:.0f}s", flush=True)
    doc = {"settings": vars(args) | {"overrides": common}, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"\n| model | top-1 | motion classes | shape classes | train s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['top1']:.3f} | {r['motion_accuracy']:.3f} | {r['shape_accuracy']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
