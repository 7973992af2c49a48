"""Optical-flow extraction benchmark on a realistic frame size: every algorithm (TV-L1, DIS,
Farneback) and modality (flow, warped flow), the packer's path vs the naive reference path,
flow frames/s per core, plus the packer's process pool.

    .venv/bin/python benchmarks/bench_flow.py [--frames 9] [--workers 2] [--json out.json]

Uses the first video of the bench-loader data set (6 classes x 6 synthetic videos of 320x240 at
25 fps, generated once like benchmarks/bench_loader.py), resized to short side 256 as `tsn pack`
stores it; runs `tsn bench-flow`'s measurement. Prints JSON and a table; ratios are within this run.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from tools import bench_flow
    from dataloading.sources.inputs import read_inputs
    from tools.synth import SynthSpec, generate_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "data" / "bench"), help="where the benchmark data lives")
    p.add_argument("--frames", type=int, default=bench_flow.DEFAULT_FRAMES)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="best of N timings per row")
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()

    videos = Path(args.work) / "videos"
    if not (videos / "labels.csv").is_file():
        generate_dataset(videos, SynthSpec(num_classes=6, videos_per_class=6, seed=1, min_seconds=6, max_seconds=10,
                                           sizes=((320, 240),), fps_choices=(25,)))
    items, _ = read_inputs(csv_path=videos / "labels.csv")
    source = sorted(it.path for it in items)[0]
    frames = bench_flow.video_frames(source, args.frames, args.short_side)
    result = bench_flow.run_bench(frames, source=source, workers=args.workers,
                                  repeats=args.repeats, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    print(bench_flow.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
