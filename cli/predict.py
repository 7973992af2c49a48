"""`tsn predict` (classes of video files from one or several checkpoints, `app.predict`) and
`tsn export` (a checkpoint's model as TorchScript, `app.export`): arguments, printing, exit codes."""

from __future__ import annotations

import argparse
import json
import sys

from dataloading.sources import flow


def add_cli(subparsers) -> None:
    """Register ``tsn predict`` and ``tsn export``."""
    p = subparsers.add_parser(
        "predict", help="top-k classes of video files (test protocol of the checkpoints' configs)",
        description="Decode each video (PyAV), compute flow when a checkpoint's modality needs it, apply the "
        "checkpoint's test protocol (model.test_segments x the test crops) and print the top-k classes. "
        "Several --checkpoint streams are fused with tsn fuse's weights. Exit code 1 when a video failed "
        "(the others are still predicted).")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (anything FFmpeg decodes)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="a checkpoint written by tsn train (.pt); repeat for several streams, RGB first")
    p.add_argument("--weights", type=float, nargs="+",
                   help="fusion weight per checkpoint (default: 1 1.5 for two, 1 1 0.5 for three, else equal)")
    p.add_argument("--softmax", action="store_true", help="fuse softmax probabilities instead of raw scores")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print per video (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--fast", action="store_true",
                   help="model.num_segments snippets of the centre crop instead of the full test protocol")
    p.add_argument("--flow-algorithm", choices=list(flow.ALGORITHMS),
                   help="flow streams: override the algorithm recorded in the checkpoint's dataset manifest")
    p.add_argument("--device", default="cpu", help="torch device for the network (default cpu)")
    p.set_defaults(func=_run_predict)

    p = subparsers.add_parser(
        "export", help="a checkpoint's model (with consensus) as TorchScript",
        description="Trace the checkpoint's TSN for the input layout (B, K, L, C, H, W) of its config and save it "
        "with torch.jit.save; the file carries tsn.json (classes, modality, input shape, normalisation).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by tsn train (.pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. model.pt")
    p.add_argument("--format", default="torchscript", choices=["torchscript"], help="export format (torchscript)")
    p.add_argument("--segments", type=int, metavar="K", help="K of the input layout (default model.num_segments)")
    p.set_defaults(func=_run_export)


def _run_predict(args: argparse.Namespace) -> int:
    """0 when every video was predicted, 1 when any failed, 2 on bad arguments / checkpoints."""
    from app.predict import check_streams, describe, load_stream, predict_videos

    if args.top_k < 1:
        print(f"error: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    if args.weights is not None and len(args.weights) != len(args.checkpoint):
        print(f"error: {len(args.checkpoint)} checkpoints but {len(args.weights)} --weights", file=sys.stderr)
        return 2
    streams = [load_stream(c, fast=args.fast, device=args.device, flow_algorithm=args.flow_algorithm)
               for c in args.checkpoint]
    names = check_streams(streams)
    k = min(args.top_k, len(names))
    if not args.json:
        for s in streams:
            print(f"# {describe(s)}")

    def show(pred) -> None:
        if pred.error is not None:
            print(f"error: {pred.video}: {pred.error}", file=sys.stderr)
        elif not args.json:
            print(pred.video)
            for rank, t in enumerate(pred.top_k(names, k), start=1):
                print(f"  {rank}. {t['class']:<30s} score {t['score']:9.4f}  p {t['probability']:.4f}")

    preds = predict_videos(args.videos, streams, weights=args.weights, softmax=args.softmax, on_result=show)
    if args.json:
        doc = {"checkpoints": [s.path for s in streams],
               "weights": list(args.weights) if args.weights else None,
               "protocol": [describe(s) for s in streams],
               "videos": [{"video": p.video, "error": p.error} if p.error is not None
                          else {"video": p.video, "top_k": p.top_k(names, k)} for p in preds]}
        print(json.dumps(doc, indent=1))
    failed = sum(p.error is not None for p in preds)
    if failed:
        print(f"error: {failed} of {len(preds)} videos could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def _run_export(args: argparse.Namespace) -> int:
    from app.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.out, fmt=args.format, segments=args.segments)
    shape = "x".join("B" if d is None else str(d) for d in meta["input_shape"])
    print(f"exported {args.checkpoint} -> {args.out} ({meta['format']}, input {shape}, "
          f"{len(meta['class_names'])} classes)")
    return 0
