"""Data-path benchmark on realistic frame sizes: DALI vs the reference loader vs the
mmaction2-style decord loader vs the decode limit, same sampling and threads, one run.

    .venv/bin/python benchmarks/bench_loader.py [--threads 1] [--batches 12] [--json out.json]

Generates (once) 6 classes x 16 synthetic videos of 320x240 at 25 fps, 6-10 s, H.264 like most
source datasets (~1 min), packs them as JPEG frame packs at short side 256 (~280 MB), then runs
`tsn bench-loader`'s measurement. Prints JSON and a table; ratios are within this run.

96 videos make 12 batches of 8 per epoch: the loader builds one DALI pipeline per epoch (exact
resume), and with the 4-batch epochs of 36 videos the rebuild's after-effects (new buffers,
page faults, an empty prefetch queue) dominated the "steady state" (measured 163-205 clips/s
there vs 263-277 here for K=8, L=1; a real epoch is hundreds of batches).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from tools import bench_loader as bench
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs
    from tools.synth import SynthSpec, generate_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "data" / "bench"), help="where the benchmark data lives")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each row reports its median")
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()

    work = Path(args.work)
    videos, packed = work / "videos", work / "packed"
    spec = SynthSpec(num_classes=6, videos_per_class=16, seed=1, min_seconds=6, max_seconds=10,
                     sizes=((320, 240),), fps_choices=(25,))
    wanted = spec.num_classes * spec.videos_per_class
    if (packed / "manifest.json").is_file() and json.loads((packed / "manifest.json").read_text())["num_samples"] != wanted:
        shutil.rmtree(packed)  # an older, smaller benchmark set: rebuild
    if not (videos / "labels.csv").is_file() or len((videos / "labels.csv").read_text().splitlines()) - 1 != wanted:
        generate_dataset(videos, spec)
    if not (packed / "manifest.json").is_file():
        items, classes = read_inputs(csv_path=videos / "labels.csv")
        pack_dataset(items, classes, packed, codec="jpeg", short_side=256)
    result = bench.run_bench(packed, str(videos / "labels.csv"), args.threads, args.batches, args.batch_size,
                             repeats=args.repeats, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    print(bench.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
