"""`tsn synth`: generate the synthetic action-video dataset (`tools.synth`)."""

from __future__ import annotations

import argparse
import sys

from tools.synth import CLASS_NAMES, SynthSpec, generate_dataset
from tools.synth.spec import MAX_CLASSES, MIN_CLASSES


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x120, got {text!r}") from None
    return width, height


def add_cli(subparsers) -> None:
    """Register ``synth`` on an argparse subparsers object (``func`` -> exit code)."""
    defaults = SynthSpec()
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic action-video dataset",
        description="Generate labelled synthetic action videos (H.264 .mp4) with labels.csv and "
        f"classes.txt. Classes, in order: {', '.join(CLASS_NAMES)}. Re-running resumes.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--classes", type=int, default=defaults.num_classes,
                        help=f"number of classes, a catalogue prefix ({MIN_CLASSES}..{MAX_CLASSES})")
    parser.add_argument("--videos-per-class", type=int, default=defaults.videos_per_class)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--size", type=_parse_size, action="append", metavar="WxH",
                        help="frame size choice, repeatable (default: "
                        f"{' '.join(f'{w}x{h}' for w, h in defaults.sizes)})")
    parser.add_argument("--fps", type=int, action="append",
                        help=f"frame rate choice, repeatable (default: {' '.join(map(str, defaults.fps_choices))})")
    parser.add_argument("--camera-pan-fraction", type=float, default=defaults.camera_pan_fraction)
    parser.add_argument("--approach-period-s", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=defaults.approach_period_s,
                        help="range of the approach / recede sawtooth period in seconds (default: "
                        f"{defaults.approach_period_s[0]:g} {defaults.approach_period_s[1]:g}; shorter: faster looming)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        spec = SynthSpec(
            num_classes=args.classes,
            videos_per_class=args.videos_per_class,
            seed=args.seed,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            sizes=tuple(args.size) if args.size else SynthSpec.sizes,
            fps_choices=tuple(args.fps) if args.fps else SynthSpec.fps_choices,
            camera_pan_fraction=args.camera_pan_fraction,
            approach_period_s=tuple(args.approach_period_s),
        )
        summary = generate_dataset(args.out, spec, workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:
        print(f"tsn synth: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"synth: {summary['num_videos']} videos ({summary['num_written']} written, "
        f"{summary['num_skipped']} skipped), {summary['num_classes']} classes, "
        f"{summary['seconds_total']:.1f} s of video in {summary['wall_seconds']:.1f} s -> {summary['out_dir']}"
    )
    return 0

