"""Batch inference benchmark: a collection scored by `tsn predict --out` in one process and on
1 and 2 Ray actors, against the single-process per-file `tsn predict`, in the same run.

    .venv/bin/python benchmarks/bench_predict.py [--videos-per-class 24] [--json out.json]

Data: 6 synthetic classes of 3-4 s clips at 320x240, 25 fps (generated once under --work), packed
as JPEG frames at short side 128 (the val split is scored). Model: an RGB ResNet-18 TSN with
random weights at input 112, test protocol 5 segments x 10 crops (``--fast``: 3 centre crops).
Rows (videos/s, and the ratio to the first row):

* ``files, 1 process``: `app.predict.predict_videos` over the split's source files (PyAV decode);
* ``files, N Ray actors``: the same files as a `--videos` collection in parts;
* ``shards, 1 process`` / ``shards, N Ray actors``: the packed split (DALI loader, as `tsn eval`).

Ray rows include the actors' start (model load) but not the cluster's own start; each row's
output table is committed (parquet) as a user's run would be. On this 2-core machine 2 actors
share the cores with the driver: the ratio says what the pool costs and buys, not what a
cluster of GPU nodes does.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _checkpoint(path: Path, packed: Path) -> str:
    import torch

    from app.build import build_model
    from app.config import config_from_dict, config_to_dict
    from app.run_store import write_checkpoint
    from dataloading.format import shards
    from tsn.checkpoint import checkpoint_state

    cfg = config_from_dict({}, [f"data.shards={packed}", "model.modality=rgb", "model.snippet_length=1",
                                "model.backbone=resnet18", "model.test_segments=5", "augment.input_size=112",
                                "augment.resize_short=128", "train.test_batch_size_per_worker=2"])
    classes = shards.load_manifest(packed)["classes"]
    torch.manual_seed(0)
    model = build_model(cfg, len(classes), fresh=False)
    state = checkpoint_state(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0,
                             loader_position=(1, 0), config=config_to_dict(cfg), meta={"class_names": list(classes)})
    write_checkpoint(path, state)
    return str(path)


def main() -> int:
    from app import batch_predict as bp
    from app.predict import load_stream, predict_videos
    from dataloading.format import shards
    from dataloading.pack import pack_dataset
    from dataloading.sources.inputs import read_inputs
    from tools import reference
    from tools.synth import SynthSpec, generate_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "data" / "bench-predict"), help="where the benchmark data lives")
    p.add_argument("--videos-per-class", type=int, default=24)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor counts to measure")
    p.add_argument("--fast", action="store_true", help="val protocol (K centre crops) instead of 5 x 10 crops")
    p.add_argument("--json", help="also write the JSON result here")
    args = p.parse_args()

    work = Path(args.work)
    videos = work / f"videos-{args.videos_per_class}"
    if not (videos / "labels.csv").is_file():
        generate_dataset(videos, SynthSpec(num_classes=6, videos_per_class=args.videos_per_class, seed=2,
                                           min_seconds=3, max_seconds=4, sizes=((320, 240),), fps_choices=(25,)))
    packed = work / f"packed-{args.videos_per_class}"
    if not (packed / "manifest.json").is_file():
        items, classes = read_inputs(csv_path=videos / "labels.csv", val_fraction=0.5, seed=0)
        pack_dataset(items, classes, packed, codec="jpeg", short_side=128, progress=False)
    ckpt = _checkpoint(work / "resnet18.pt", packed)
    sources = {}
    for tar in shards.split_shards(packed, "val")[0]:
        for sample in reference.iter_shard(tar):
            meta = json.loads(sample.members["json"])
            sources[meta["sample_index"]] = meta["source"]
    files = [sources[i] for i in sorted(sources)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, workers, seconds, n):
            rows.append({"row": name, "workers": workers, "videos": n, "seconds": round(seconds, 2),
                         "videos_per_s": round(n / seconds, 3)})
            print(f"  {name}: {n} videos in {seconds:.1f}s", file=sys.stderr)

        t0 = time.perf_counter()
        preds = predict_videos(files, [load_stream(ckpt, fast=args.fast)])
        row("files, 1 process (tsn predict)", 1, time.perf_counter() - t0, len(preds))
        part = max(1, len(files) // 4)  # 4 parts: 2 actors stay busy
        file_job = bp.plan_job(ckpt, videos=files, fast=args.fast, part_size=part)
        shard_job = bp.plan_job(ckpt, shards=str(packed), split="val", fast=args.fast, part_size=part)
        t0 = time.perf_counter()
        s = bp.run_local(shard_job, f"{tmp}/local.parquet")
        row("shards, 1 process", 1, time.perf_counter() - t0, s["videos"])

        import ray

        from cluster.batch_predict import run_on_cluster

        ray.init(address="local", num_cpus=max(args.workers) + 1, include_dashboard=False, log_to_driver=False)
        try:
            for w in args.workers:
                for name, job in (("files", file_job), ("shards", shard_job)):
                    s = run_on_cluster(job, f"{tmp}/{name}-{w}.parquet", address="local", workers=w, progress=False)
                    row(f"{name}, {w} Ray actor(s)", w, s["seconds"], s["videos"])
        finally:
            ray.shutdown()

    base = rows[0]["videos_per_s"]
    for r in rows:
        r["vs_tsn_predict"] = round(r["videos_per_s"] / base, 2)
    doc = {"benchmark": "batch predict", "protocol": "fast (3 centre crops)" if args.fast else "5 segments x 10 crops",
           "model": "resnet18 @112, random weights", "val_videos": len(files), "rows": rows}
    print(json.dumps(doc, indent=1))
    print(f"\n{'row':<36s} {'videos':>6s} {'s':>7s} {'videos/s':>9s} {'x tsn predict':>13s}")
    for r in rows:
        print(f"{r['row']:<36s} {r['videos']:>6d} {r['seconds']:>7.1f} {r['videos_per_s']:>9.2f} {r['vs_tsn_predict']:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
