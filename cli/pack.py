"""`tsn pack` (videos -> WebDataset shards, `dataloading.pack`) and `tsn inspect` (summarise
and verify a packed dataset, `dataloading.pack.inspect`): argument parsing, exit codes, printing."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from functools import partial
from pathlib import Path

from cli.errors import user_os_error
from dataloading import modality
from dataloading.format import shards
from dataloading.pack import DEFAULT_SHARD_SIZE_BYTES, REJECTED_FILE, format_size, inspect, pack_dataset, parse_size
from dataloading.pack.manifest import classes_without_videos
from dataloading.sources import flow
from dataloading.sources.inputs import read_inputs
from dataloading.sources.items import MISSING_FILENAME, format_missing
from dataloading.store import storage
from dataloading.store.files import atomic_write_text


def add_cli(subparsers) -> None:
    """Register ``tsn pack`` and ``tsn inspect`` on an argparse subparsers object."""
    _add_pack(subparsers)
    _add_inspect(subparsers)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _short_side_arg(text: str) -> int | None:
    if text.lower() in ("0", "none", "keep"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid short side {text!r}: a pixel count, or 0/none to keep the source size"
        ) from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"short side must be >= 2 pixels (or 0/none to keep the source size), got {value}"
        )
    return value


def _modalities_arg(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in modality.PACKABLE_MODALITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid modalities {text!r}: a comma-separated list of {', '.join(modality.PACKABLE_MODALITIES)}")
    return names


def _add_pack(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pack",
        help="decode videos and pack them into WebDataset shards",
        description="Decode source videos, resize, encode (JPEG frame packs or a video codec) and write "
        "size-bounded WebDataset tar shards with DALI indexes, a manifest and a rejection log. "
        "Re-running the same command resumes an interrupted run.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="LABELS.csv",
                     help="CSV with header path,label[,split]; paths relative to the CSV")
    src.add_argument("--ucf101", metavar="SPLITDIR",
                     help="UCF101 split dir (classInd.txt, trainlist0N.txt, testlist0N.txt)")
    src.add_argument("--hmdb51", metavar="SPLITDIR", help="HMDB51 split dir (<class>_test_split<N>.txt)")
    src.add_argument("--kinetics", metavar="CSV", nargs="+",
                     help="Kinetics annotation CSVs (label,youtube_id,time_start,time_end,split); clips "
                          "<youtube_id>_<start:06d>_<end:06d>.<ext> anywhere under --video-root; missing clips "
                          "are skipped and listed in DIR/missing_clips.txt")
    src.add_argument("--ssv2", metavar="LABELDIR",
                     help="Something-Something v2 label dir (labels.json, train.json, validation.json); "
                          "videos --video-root/<id>.webm")
    src.add_argument("--folders", metavar="ROOT",
                     help="a class-folder tree ROOT/<class>/<video> (or ROOT/<split>/<class>/<video>)")
    p.add_argument("--video-root", metavar="ROOT",
                   help="UCF101/HMDB51: directory holding <class>/<video>; Kinetics / Something-Something: "
                        "directory holding the clips")
    p.add_argument("--split-id", type=int, metavar="N",
                   help="UCF101/HMDB51 official split 1-3 (default 1); the test list becomes split 'val'")
    p.add_argument("--classes", metavar="FILE",
                   help="CSV / --folders: class names, one per line (default: classes.txt beside the CSV; "
                        "the sorted class directories)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, or s3://bucket/prefix (credentials and endpoint from the AWS_* "
                        "variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)")
    p.add_argument("--staging", metavar="DIR", default=None,
                   help="--out s3://...: local directory where each shard is written before its upload, and "
                        "where the resume journal lives (default ~/.cache/tsn/staging/<hash of --out>; keep it "
                        "to resume)")
    p.add_argument("--codec", default="jpeg", choices=list(shards.CODEC_LAYOUT),
                   help="jpeg = JPEG frame packs (default); h264 / vp9 / mjpeg = a re-encoded video")
    p.add_argument("--gop", type=int, default=8, metavar="N", help="video codecs: keyframe every N frames (default 8)")
    p.add_argument("--short-side", type=_short_side_arg, default=256, metavar="N",
                   help="resize the short side to N pixels (default 256; 0 keeps the source size)")
    p.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="jpeg codec quality 1-100 (default 90)")
    p.add_argument("--fps", type=float, default=None, metavar="F",
                   help="resample to F frames/s (default: keep every frame)")
    p.add_argument("--shard-size", type=_size_arg, default=DEFAULT_SHARD_SIZE_BYTES, metavar="SIZE",
                   help="max shard size, e.g. 256MB, 1GiB, 500k (default 256MiB)")
    p.add_argument("--min-frames", type=int, default=16, metavar="N",
                   help="reject videos with fewer decoded frames (default 16)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="CSV without a split column / --folders without split directories: stratified "
                        "fraction of each class moved to 'val'")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0, help="sample order / val split seed (default 0)")
    p.add_argument("--modalities", type=_modalities_arg, default=(modality.RGB,), metavar="LIST",
                   help="comma-separated: rgb (always), flow, warped_flow (default rgb); flow entries are "
                        "grayscale JPEG frame packs of the quantised x, y planes")
    p.add_argument("--flow-algorithm", default="tvl1", choices=list(flow.ALGORITHMS),
                   help="optical flow: tvl1 (the paper's; slow on CPU), dis (fast), farneback (default tvl1)")
    p.add_argument("--flow-bound", type=float, default=flow.DEFAULT_BOUND, metavar="PX",
                   help=f"flow is clipped to +-PX pixels before 8-bit quantisation (default {flow.DEFAULT_BOUND:g})")
    p.add_argument("--overwrite", action="store_true", help="delete an existing pack in --out first")
    p.add_argument("--verify", action="store_true",
                   help="resuming: check every shard already packed against the SHA-256 recorded when it was "
                        "written (reads the whole pack) and re-pack those that changed since (the repair for "
                        "what `tsn inspect --verify` reports)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--address", metavar="URL", default=None,
                   help="pack on a Ray cluster (auto, HOST:PORT, ray://HOST:10001): one Ray task per chunk of videos "
                        "on every CPU of the cluster; --out must be s3:// or a directory every node mounts at the "
                        "same path (default: pack on this machine with --workers processes)")
    p.add_argument("--videos-per-task", type=int, default=None, metavar="N",
                   help="--address: videos per Ray task (default: ~4 tasks per cluster CPU, at most 256)")
    p.set_defaults(func=run_pack)
    return p


def _terminated(signum, frame):
    raise _Terminated()


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a supervisor stopping the pack): cleaned up like Ctrl-C, exit code 143."""


def run_pack(args: argparse.Namespace) -> int:
    """``tsn pack``: 0 when finished (even with rejected inputs), 2 on user errors, 130 on Ctrl-C,
    143 on SIGTERM (both: the open shard dropped, the workers stopped, resumable)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.ucf101 is None and args.hmdb51 is None and args.split_id is not None:
            raise ValueError("--split-id applies to --ucf101/--hmdb51 split files")
        missing: list = []
        items, classes = read_inputs(
            csv_path=args.input,
            ucf101_dir=args.ucf101,
            hmdb51_dir=args.hmdb51,
            kinetics_csvs=args.kinetics,
            ssv2_dir=args.ssv2,
            folder_root=args.folders,
            video_root=args.video_root,
            split_id=1 if args.split_id is None else args.split_id,
            classes_path=args.classes,
            val_fraction=args.val_fraction,
            seed=args.seed,
            missing=missing,
        )
        if missing:
            print(f"{len(missing)} listed clips are not under {args.video_root} and are skipped "
                  f"(the list is written to {storage.join(args.out, MISSING_FILENAME)} after packing)",
                  file=sys.stderr)
        run_stats: dict = {}
        packer = pack_dataset
        if args.address is not None:
            if args.workers is not None:
                raise ValueError("--workers applies to a local pack; with --address every CPU of the Ray cluster "
                                 "takes tasks")
            from cluster.pack import pack_on_cluster

            packer = partial(pack_on_cluster, address=args.address, videos_per_task=args.videos_per_task)
        elif args.videos_per_task is not None:
            raise ValueError("--videos-per-task applies to a cluster pack (--address)")
        manifest = packer(
            items,
            classes,
            args.out,
            codec=args.codec,
            short_side=args.short_side,
            jpeg_quality=args.jpeg_quality,
            gop=args.gop,
            fps=args.fps,
            shard_size_bytes=args.shard_size,
            min_frames=args.min_frames,
            workers=args.workers,
            seed=args.seed,
            modalities=args.modalities,
            flow_algorithm=args.flow_algorithm,
            flow_bound=args.flow_bound,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            run_stats=run_stats,
            staging_dir=args.staging,
            verify=args.verify,
        )
    except (ValueError, FileNotFoundError) as e:
        resume = (f"; once that is fixed the same command resumes into {args.out} (what is uploaded is kept)"
                  if isinstance(e, storage.StorageError) and storage.is_uri(args.out) else "")
        print(f"error: {e}{resume}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{'terminated' if isinstance(e, _Terminated) else 'interrupted'}; run the same command again to "
              f"resume into {args.out}", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except OSError as e:  # e.g. the disk is full: one line naming the file, no traceback
        if e.errno in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR):  # a path to fix, nothing to resume
            print(f"error: {user_os_error(e)}", file=sys.stderr)
            return 2
        where = f"{e.filename}: " if e.filename else ""
        fix = "free some space (or pick another --out), then " if e.errno == errno.ENOSPC else ""
        print(f"error: {where}{e.strerror or e}; {fix}run the same command again to resume into {args.out} "
              f"(finished shards are kept, the unfinished one was removed)", file=sys.stderr)
        return 2
    if missing:
        if storage.is_uri(args.out):
            storage.put_bytes(storage.join(args.out, MISSING_FILENAME), format_missing(missing).encode())
        else:
            atomic_write_text(Path(args.out) / MISSING_FILENAME, format_missing(missing))
    print(format_totals(manifest, run_stats, args.out))
    if missing:
        print(f"  missing {len(missing)} listed clips (not packed): see {storage.join(args.out, MISSING_FILENAME)}")
    return 0


def format_totals(manifest: dict, run_stats: dict, out_dir) -> str:
    """The end-of-run summary printed by `tsn pack`."""
    splits = manifest["splits"]
    per_split = ", ".join(f"{s} {v['num_samples']}" for s, v in splits.items())
    num_bytes = sum(v["num_bytes"] for v in splits.values())
    lines = [
        f"packed {manifest['num_samples']} videos ({per_split}) into {len(manifest['shards'])} shards, "
        f"{format_size(num_bytes)} in {out_dir} ({manifest['layout']}, codec {manifest['codec']}; modalities "
        f"{', '.join(shards.manifest_modalities(manifest))}"
        + (f", flow {manifest['flow']['algorithm']} bound {manifest['flow']['bound']:g}" if manifest.get("flow") else "")
        + ")",
        f"  {format_size(manifest['bytes_per_video'])} per video, "
        f"{format_size(manifest['bytes_per_hour_of_video'])} per hour of video",
    ]
    if manifest["num_rejected"]:
        lines.append(f"  rejected {manifest['num_rejected']} videos: see {storage.join(out_dir, REJECTED_FILE)}")
    for split, v in splits.items():
        if v["num_samples"] == 0:
            lines.append(f"  warning: split {split!r} has no usable videos")
    for name in classes_without_videos(manifest, "train"):
        lines.append(f"  warning: class {name!r} has no training videos (rejected, or all moved to val: "
                     f"see {storage.join(out_dir, REJECTED_FILE)} and --val-fraction); a model cannot learn it")
    elapsed = run_stats.get("elapsed_seconds", 0.0)
    done = run_stats.get("packed", 0) + run_stats.get("rejected", 0)
    frames = run_stats.get("frames", 0)
    rate = f", {done / elapsed:.1f} videos/s, {frames / elapsed:.0f} frames/s" if elapsed > 0 else ""
    lines.append(
        f"  this run: {run_stats.get('packed', 0)} packed, {run_stats.get('rejected', 0)} rejected, "
        f"{run_stats.get('skipped', 0)} already done; "
        f"{elapsed:.1f} s with {run_stats.get('workers', '?')} workers{rate}"
    )
    if "verified" in run_stats:
        v = run_stats["verified"]
        lines.append(f"  verify: {v['checked']} shards already packed checked ({format_size(v['bytes_read'])} read), "
                     f"{v['changed']} had changed and were re-packed")
    if "uploaded_objects" in run_stats:
        lines.append(f"  uploaded {run_stats['uploaded_objects']} objects, {format_size(run_stats['uploaded_bytes'])} "
                     f"(staging and resume journal: {run_stats['staging_dir']})")
    return "\n".join(lines)


def _add_inspect(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="summarise (and optionally verify) a packed dataset",
        description="Summarise a `tsn pack` output: classes and counts per split, shards, sizes, rejected inputs. "
        "Exit code 1 when files are missing/mismatched or (--verify) samples are bad.",
    )
    p.add_argument("dir", metavar="DIR", help="a directory written by `tsn pack`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true", help="also open and check every sample (decodes every frame)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --verify")
    p.set_defaults(func=run_inspect)
    return p


def run_inspect(args: argparse.Namespace) -> int:
    """``tsn inspect``: 0 ok, 1 problems found, 2 not a packed dataset."""
    try:
        summary = inspect.inspect_dataset(args.dir)
        if args.verify:
            summary["verify"] = inspect.verify_dataset(args.dir, progress=not args.no_progress and not args.json)
            summary["ok"] = summary["ok"] and summary["verify"]["ok"]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else inspect.format_summary(summary))
    return 0 if summary["ok"] else 1
