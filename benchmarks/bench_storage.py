"""Streaming from object storage with real latency: `tools.bench_storage`'s rows at 20 ms and
50 ms per request with a 200 MB/s cap, in one run.

    .venv/bin/python benchmarks/bench_storage.py [--json out.json] [--shape 20,200 --shape 50,200]

Generates (once, ~10 min) 8 classes x 64 synthetic videos of 4 s at 25 fps, 320x240, packs
them as JPEG frame packs at short side 256 in 128 MB shards (~1.5 MB per clip, ~85 clips per
shard) and again in 32 MB shards (for the half-cache row), starts the loopback S3 server
(moto's server mode, as the tests do), uploads both, and measures each row through
`tools.shaping_proxy`. RGB TSN, K = 3, batch 8, 1 DALI thread.

The fixture's own limits (printed with the baselines): moto serves a ranged GET by copying the
whole object in Python, so small ranged GETs of a 128 MB shard cost it tens of ms of CPU on
these 2 cores; the sparse row is bounded by that, not by the latency alone.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback S3 server of the tests (tests/s3.py)


def _shape(text: str) -> tuple[float, float]:
    latency, _, bandwidth = text.partition(",")
    return float(latency), float(bandwidth or 200)


def main() -> int:
    import s3
    from dataloading.pack import pack_dataset
    from dataloading.planning.spec import PipelineSpec
    from dataloading.sources.inputs import read_inputs
    from tools import bench_storage
    from tools.synth import SynthSpec, generate_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "data" / "bench-storage"), help="where the benchmark data lives")
    p.add_argument("--shape", action="append", type=_shape, metavar="LATENCY_MS,MBPS",
                   help="latency per request and bandwidth cap (repeatable; default 20,200 and 50,200)")
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()

    work = Path(args.work)
    videos, packed = work / "videos", work / "packed"
    spec = SynthSpec(num_classes=8, videos_per_class=64, seed=2, min_seconds=4, max_seconds=4,
                     sizes=((320, 240),), fps_choices=(25,))
    wanted = spec.num_classes * spec.videos_per_class
    if not (videos / "labels.csv").is_file() or len((videos / "labels.csv").read_text().splitlines()) - 1 != wanted:
        generate_dataset(videos, spec)
    # the same videos in 32 MB shards for the half-cache row (24 shards: half the bytes is 12
    # copies, not the 2 or 3 of the big shards)
    small = work / "packed-32mb"
    for out, shard_bytes in ((packed, 128 << 20), (small, 32 << 20)):
        if not (out / "manifest.json").is_file():
            items, classes = read_inputs(csv_path=videos / "labels.csv")
            pack_dataset(items, classes, out, codec="jpeg", short_side=256, shard_size_bytes=shard_bytes)
    log_dir = Path(tempfile.mkdtemp(prefix="tsn-bench-s3-"))
    server, proc = s3.start_server(log_dir / "moto.log")
    saved = dict(os.environ)
    try:
        os.environ.update(s3.environment(server))
        print("uploading the pack to the loopback server ...", file=sys.stderr)
        remote, half_remote = s3.upload_dir(server, packed, "bench"), s3.upload_dir(server, small, "bench-32mb")
        run_spec = PipelineSpec(mode="train", num_segments=3, snippet_length=1, modality="rgb", batch_size=8,
                                num_threads=1)
        result = bench_storage.bench_storage(packed, remote, run_spec, shapes=args.shape or bench_storage.SHAPES,
                                             half_remote=half_remote, log=lambda m: print(m, file=sys.stderr))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3.stop_server(proc)
        shutil.rmtree(log_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print("\n".join(bench_storage.format_table(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
