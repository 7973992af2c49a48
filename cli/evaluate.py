"""`tsn eval` (test protocol of a checkpoint -> per-video scores) and `tsn fuse` (multi-stream
fusion of saved scores); the work is `app.evaluate`'s."""

from __future__ import annotations

import argparse
import sys

from app.run_store import SCORES_FILE
from dataloading.store.files import atomic_write_json


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test protocol (segments x 10 crops) of a checkpoint; per-video scores")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by tsn train (.pt)")
    p.add_argument("--data", help="packed dataset (default: data.shards of the checkpoint's config)")
    p.add_argument("--split", help="split to evaluate (default: data.val_split of the config)")
    p.add_argument("--segments", type=int, help="snippets per video (default: model.test_segments, 25)")
    p.add_argument("--batch-size", type=int, help="videos per batch (default: train.test_batch_size_per_worker)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. --set loader.device=cpu")
    p.add_argument("--out", default=SCORES_FILE, help=f"per-video scores file (default: {SCORES_FILE})")
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=_run_eval)

    p = subparsers.add_parser("fuse", help="fuse several streams' per-video scores (weighted average)")
    p.add_argument("scores", nargs="+", help="scores files (tsn eval / tsn train output), RGB first")
    p.add_argument("--weights", type=float, nargs="+",
                   help="one weight per file (default: 1 1.5 for two, 1 1 0.5 for three, else equal)")
    p.add_argument("--softmax", action="store_true", help="fuse softmax probabilities instead of raw scores")
    p.add_argument("--out", help="write the fused scores here (.npz)")
    p.add_argument("--json", help="write the metrics of every input and of the fusion here")
    p.set_defaults(func=_run_fuse)


def _run_eval(args: argparse.Namespace) -> int:
    from app.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, segments=args.segments,
                            batch_size=args.batch_size, overrides=args.overrides, out=args.out)
    print(f"top1 {r.top1:.4f}  top5 {r.top5:.4f}  mean class acc {r.mean_class_accuracy:.4f}  "
          f"({r.num_videos} videos) -> {args.out}")
    if args.json:
        atomic_write_json(args.json, r.metrics())
    return 0


def _run_fuse(args: argparse.Namespace) -> int:
    from app.evaluate import fuse_score_files, fusion_table

    if args.weights is not None and len(args.weights) != len(args.scores):
        print(f"error: {len(args.scores)} score files but {len(args.weights)} --weights", file=sys.stderr)
        return 2
    report = fuse_score_files(args.scores, args.weights, softmax=args.softmax, out=args.out)
    print(fusion_table(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0
