"""Data-path benchmark on realistic frame sizes: DALI vs the reference loader vs the
mmaction2-style decord loader vs the decode limit, same sampling and threads, one run.

    .venv/bin/python benchmarks/bench_loader.py [--threads 1] [--batches 12] [--json out.json]

Generates (once) 6 classes x 6 synthetic videos of 320x240 at 25 fps, 6-10 s, H.264 like most
source datasets, packs them as JPEG frame packs at short side 256, then runs `tsn bench-loader`'s
measurement. Prints JSON and a table; ratios are within this run.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from dataloading import bench
    from dataloading.inputs import read_inputs
    from dataloading.pack import pack_dataset
    from dataloading.synth import SynthSpec, generate_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "data" / "bench"), help="where the benchmark data lives")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()

    work = Path(args.work)
    videos, packed = work / "videos", work / "packed"
    if not (videos / "labels.csv").is_file():
        generate_dataset(videos, SynthSpec(num_classes=6, videos_per_class=6, seed=1, min_seconds=6, max_seconds=10,
                                           sizes=((320, 240),), fps_choices=(25,)))
    if not (packed / "manifest.json").is_file():
        items, classes = read_inputs(csv_path=videos / "labels.csv")
        pack_dataset(items, classes, packed, codec="jpeg", short_side=256)
    result = bench.run_bench(packed, str(videos / "labels.csv"), args.threads, args.batches, args.batch_size,
                             log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    print(bench.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
