"""`tsn predict` (classes of video files from one or several checkpoints, `app.predict`; a whole
collection into a parquet table, in parts, on a Ray cluster with ``--address``:
`app.batch_predict`, `cluster.batch_predict`) and `tsn export` (a checkpoint's model as TorchScript or ONNX, `app.export`): arguments, printing,
exit codes."""

from __future__ import annotations

import argparse
import json
import sys

from dataloading.sources import flow

# app.export.FORMATS (not imported here: app.export imports torch, which `tsn --help` should not
# wait for; tests/test_export_onnx.py checks the two agree)
EXPORT_FORMATS = ("torchscript", "onnx")


def add_cli(subparsers) -> None:
    """Register ``tsn predict`` and ``tsn export``."""
    p = subparsers.add_parser(
        "predict", help="top-k classes of video files (test protocol of the checkpoints' configs)",
        description="Decode each video (PyAV), compute flow when a checkpoint's modality needs it, apply the "
        "checkpoint's test protocol (model.test_segments x the test crops) and print the top-k classes. "
        "Several --checkpoint streams are fused with tsn fuse's weights. Exit code 1 when a video failed "
        "(the others are still predicted). With --out: a whole collection (--shards: a packed split, scored "
        "exactly as tsn eval does; --videos: a list file or a directory) into a parquet table, in parts, "
        "resumable, on a Ray cluster with --address (one actor per worker holding the model).")
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files (anything FFmpeg decodes)")
    batch = p.add_argument_group("a collection into a table (--out)")
    batch.add_argument("--out", metavar="FILE.parquet",
                       help="write one row per video (top-k, all scores, errors) here; a re-run finishes a killed one")
    batch.add_argument("--shards", metavar="DIR|s3://...", help="score a packed dataset's split (tsn pack output)")
    batch.add_argument("--split", help="the split of --shards (default: the checkpoint's val split)")
    batch.add_argument("--videos", dest="video_source", metavar="LIST.txt|DIR",
                       help="score these video files: a text file of paths (one per line) or a directory")
    batch.add_argument("--address", metavar="auto|HOST:PORT|local",
                       help="spread the parts over this Ray cluster (local: a new one on this machine); "
                       "default: this process")
    batch.add_argument("--workers", type=int, default=1, help="Ray actors, each holding the model (default 1)")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    batch.add_argument("--part-size", type=int, default=None, metavar="N",
                       help="videos per part: the unit of work and of resume (default 256)")
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
        "export", help="a checkpoint's model (with consensus) as TorchScript or ONNX",
        description="Export the checkpoint's TSN for the input layout (B, K, L, C, H, W) of its config, batch size B "
        "free: TorchScript (torch.jit.trace, torch.jit.save; tsn.json as an extra file) or ONNX (torch.onnx.export, "
        "input 'video', output 'scores', tsn.json's entries as metadata_props). The file carries the classes, "
        "modality, input shape and normalisation. The export is checked against the eager model on a batch of "
        "another size (for ONNX in ONNX Runtime, before the file replaces --out) and the largest score difference "
        "printed.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by tsn train (.pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. model.pt or model.onnx")
    p.add_argument("--format", choices=list(EXPORT_FORMATS),
                   help="export format (default: onnx when --out ends in .onnx, else torchscript)")
    p.add_argument("--segments", type=int, metavar="K", help="K of the input layout (default model.num_segments)")
    p.set_defaults(func=_run_export)


def _run_predict(args: argparse.Namespace) -> int:
    """0 when every video was predicted, 1 when any failed, 2 on bad arguments / checkpoints."""
    from app.predict import check_streams, describe, load_stream, predict_videos

    if args.out or args.shards or args.video_source or args.address:
        return _run_batch(args)
    if not args.videos:
        print("error: give VIDEO files, or --out with --shards / --videos for a collection", file=sys.stderr)
        return 2
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


def _run_batch(args: argparse.Namespace) -> int:
    """A collection into ``--out``: 0 when every video was scored, 1 when any failed, 2 on bad arguments."""
    from app.batch_predict import DEFAULT_PART_SIZE, list_videos, plan_job, run_local

    problem = None
    if not args.out:
        problem = "--shards / --videos / --address write a table: give --out FILE.parquet"
    elif bool(args.shards) == bool(args.video_source) or args.videos:
        problem = "give exactly one of --shards DIR or --videos LIST|DIR with --out (no VIDEO arguments)"
    elif len(args.checkpoint) != 1 or args.weights or args.softmax:
        problem = "--out scores one checkpoint (fuse several tables' scores with tsn fuse)"
    elif args.flow_algorithm:
        problem = "--flow-algorithm applies to VIDEO files only"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    videos = list_videos(args.video_source) if args.video_source else ()
    job = plan_job(args.checkpoint[0], shards=args.shards, split=args.split, videos=videos, fast=args.fast,
                   top_k=args.top_k, part_size=args.part_size or DEFAULT_PART_SIZE)
    print(f"# {job.describe()} -> {args.out}" + (f" on Ray at {args.address}" if args.address else ""))
    if args.address:
        from cluster.batch_predict import run_on_cluster

        s = run_on_cluster(job, args.out, address=args.address, workers=args.workers,
                           cpus_per_worker=args.cpus_per_worker, device=args.device)
    else:
        import time

        t0 = time.perf_counter()
        s = run_local(job, args.out, device=args.device, progress=True)
        s.update(seconds=time.perf_counter() - t0, workers=1)
    for video, error in s["failed"]:
        print(f"error: {video}: {error}", file=sys.stderr)
    rate = s["scored_now"] / s["seconds"] if s["seconds"] > 0 else 0.0
    print(f"wrote {args.out}: {s['videos']} videos ({s['errors']} failed); scored {s['scored_now']} now "
          f"in {s['seconds']:.1f}s, {rate:.2f} videos/s on {s['workers']} worker(s)")
    return 1 if s["errors"] else 0


def _run_export(args: argparse.Namespace) -> int:
    from app.export import export_checkpoint

    fmt = args.format or export_format_of(args.out)
    meta = export_checkpoint(args.checkpoint, args.out, fmt=fmt, segments=args.segments)
    shape = "x".join("B" if d is None else str(d) for d in meta["input_shape"])
    print(f"exported {args.checkpoint} -> {args.out} ({meta['format']}, input {shape}, "
          f"{len(meta['class_names'])} classes; max abs score difference to the eager model "
          f"{meta['check_max_abs_diff']:.3g})")
    return 0


def export_format_of(out: str) -> str:
    """The format `tsn export` writes when --format is not given: by ``out``'s extension."""
    return "onnx" if out.lower().endswith(".onnx") else "torchscript"
