"""`tsn bench-train`: is the trainer fed? The config's TSN training step fed by the loader
against the same step on in-memory batches, in one process, as one worker of the training job
sees it (rank 0 of ``cluster.num_workers``, ``cluster.cpus_per_worker`` cores); the measurement
itself is `tools.bench_train`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-train", help="training steps/s fed by the loader vs on in-memory batches, "
                                                  "data-wait fraction, CPU seconds per video of each side")
    p.add_argument("--config",
                   help="YAML config (default: the embedded defaults; its dataset is prepared on first use)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_size_per_worker=16")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per row and round")
    p.add_argument("--warmup", type=int, default=20, help="steps before each row is timed")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all rows; each row reports its median")
    p.add_argument("--cpus", type=int, default=None,
                   help="pin this process to that many cores (default: cluster.cpus_per_worker, one worker's "
                        "share; 0: no pinning, every core this process may use)")
    p.add_argument("--json", help="write the result JSON here")
    p.set_defaults(func=_run)


def _pin(cpus: int) -> int:
    """Restrict this process (threads created from now on: DALI's, torch's) to its first ``cpus``
    allowed cores; returns the cores it may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus <= 0 or cpus >= len(allowed):
        return len(allowed)
    os.sched_setaffinity(0, allowed[:cpus])
    return cpus


def _run(args) -> int:
    from app.config import load_config

    cfg = load_config(args.config, args.overrides)
    cpus = args.cpus if args.cpus is not None else max(1, int(cfg.cluster.cpus_per_worker))
    if cpus < 0:
        raise ValueError(f"--cpus must be >= 0, got {cpus}")
    cores = _pin(cpus)  # before DALI or torch start their threads

    import torch

    from app.build import build_model, build_optimization, select_device, shard_access
    from app.data import check_training_splits, prepare_dataset
    from app.pipeline import pipeline_spec
    from dataloading.pipeline.loader import TSNLoader
    from tools.bench_train import format_table, run_bench
    from tsn.engine import train_step

    torch.set_num_threads(cores)  # as a Ray worker does (cluster.cpus_per_worker)
    manifest = prepare_dataset(cfg, progress=False)
    check_training_splits(cfg, manifest)
    device = select_device(cfg)
    d, world_size = cfg.data, cfg.cluster.max_workers  # an elastic [min, max] group: its full size
    spec = pipeline_spec(cfg, "train")

    def make_loader(prefetch_batches: int):
        # epochs: as many as the run could take, so the next epoch is prepared as in training
        return TSNLoader(d.shards, d.train_split, spec, rank=0, world_size=world_size,
                         prefetch_batches=prefetch_batches, epochs=1 << 30, **shard_access(cfg))

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, len(manifest["classes"]), fresh=True).to(device)
    optimizer, scheduler, scaler = build_optimization(cfg, model, lr=cfg.optim.lr, steps_per_epoch=1_000_000,
                                                      device=device)
    model.train()

    def step(batch) -> None:
        loss, _ = train_step(model, batch.frames.to(device), batch.label.to(device), optimizer,
                             clip_grad_norm=cfg.train.clip_grad_norm, scaler=scaler)
        scheduler.step()
        float(loss)  # the engine reads the loss every step (and so synchronises CUDA)

    result = run_bench(make_loader, step, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                       cores=float(cores), log=lambda m: print(m, file=sys.stderr))
    result.update({"dataset": str(d.shards), "world_size": world_size, "rank": 0})
    print(json.dumps(result, indent=2))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
