"""`tsn bench-pack`: videos/s of the single-process pack and of the cluster pack with 1, 2, ...
Ray workers, in one run (`tools.bench_pack`; each cluster is a local Ray cluster of that many
CPUs, started by `cluster.pack.connect`)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-pack", help="videos/s of the single-process pack vs the cluster pack with "
                                                 "1, 2, ... Ray workers")
    p.add_argument("--input", required=True, metavar="LABELS.csv",
                   help="CSV with header path,label[,split] (as `tsn pack --input`), e.g. data/synth/labels.csv")
    p.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="Ray cluster sizes (CPUs = workers) to measure (default 1 2)")
    p.add_argument("--codec", default="jpeg", help="as `tsn pack --codec` (default jpeg)")
    p.add_argument("--short-side", type=int, default=256, metavar="N", help="as `tsn pack` (default 256)")
    p.add_argument("--min-frames", type=int, default=16, metavar="N", help="as `tsn pack` (default 16)")
    p.add_argument("--shard-size", default="256MB", metavar="SIZE", help="as `tsn pack` (default 256MB)")
    p.add_argument("--videos-per-task", type=int, default=None, metavar="N",
                   help="videos per Ray task (default: as `tsn pack --address`)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where each row packs (deleted after it; default: a temporary directory)")
    p.add_argument("--json", help="write the result JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dataloading.pack import parse_size
    from dataloading.sources.inputs import read_inputs
    from tools.bench_pack import format_table, run_bench

    if any(n < 1 for n in args.ray_workers):
        raise ValueError(f"--ray-workers must be >= 1, got {args.ray_workers}")
    items, classes = read_inputs(csv_path=args.input)
    pack_kwargs = {"codec": args.codec, "short_side": args.short_side or None, "min_frames": args.min_frames,
                   "shard_size_bytes": parse_size(args.shard_size)}

    def start_cluster(n: int) -> None:
        from cluster.pack import connect

        connect("local", num_cpus=n)

    def cluster_pack(items, classes, out_dir, **kw):
        from cluster.pack import pack_on_cluster

        return pack_on_cluster(items, classes, out_dir, address="local", videos_per_task=args.videos_per_task, **kw)

    def stop_cluster() -> None:
        from cluster.pack import disconnect

        disconnect()

    with tempfile.TemporaryDirectory(prefix="tsn-bench-pack-") as tmp:
        result = run_bench(items, classes, args.work_dir or tmp, start_cluster=start_cluster,
                           cluster_pack=cluster_pack, stop_cluster=stop_cluster, ray_workers=args.ray_workers,
                           pack_kwargs=pack_kwargs, log=lambda m: print(m, file=sys.stderr))
    result.update({"input": str(args.input), **{k: v for k, v in pack_kwargs.items()},
                   "videos_per_task": args.videos_per_task})
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
