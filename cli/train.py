"""`tsn train`: the distributed job on Ray (default) or the per-worker loop in this process
(``--local``; under torchrun one DDP worker per process)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from app.config import Config, load_config
from app.worker import RESULTS_FILE, _rank, resolve_run_dir, train


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a TSN (--local: in this process)",
                              description="Train a TSN on a packed dataset (default: the embedded synthetic one). "
                                          "Re-running the same command resumes the run from its last checkpoint.")
    p.add_argument("--local", action="store_true",
                   help="train in this process (under torchrun: one DDP worker per process)")
    p.add_argument("--config", help="YAML config (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: run.storage_path/run.name)")
    p.add_argument("--address", help="Ray cluster to connect to (default: start a local one; not with --local)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # bad keys fail here, before any work
    if not args.local:
        from cluster.job import run_from_args  # only cluster/ imports Ray

        return run_from_args(args, cfg)
    if args.address:
        print("error: --address is for the distributed job; drop --local", file=sys.stderr)
        return 2
    started_group = _init_process_group_from_env(cfg)
    rank = _rank()
    try:
        results = train(cfg, args.run_dir)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"top1 {results['top1']:.4f}  top5 {results['top5']:.4f}  mean class acc "
              f"{results['mean_class_accuracy']:.4f}  ({results['num_val_videos']} val videos, "
              f"{results['steps']} steps) -> {resolve_run_dir(cfg, args.run_dir) / RESULTS_FILE}")
    return 0


def _init_process_group_from_env(cfg: Config) -> bool:
    """Join a process group when launched by torchrun (WORLD_SIZE > 1 in the environment)."""
    if _distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True

