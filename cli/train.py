"""`tsn train`: the distributed job on Ray (default) or the per-worker loop in this process
(``--local``; under torchrun one DDP worker per process).

Either way the dataset is prepared by the driver before training starts
(`app.data.prepare_dataset`). Under torchrun every process is its own driver: rank 0 prepares,
the others wait at a barrier.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from app import distributed
from app.build import select_device
from app.config import Config, load_config
from app.data import check_training_splits, prepare_dataset
from app.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from app.preemption import install_sigterm_handler
from app.run_store import RunStore
from app.worker import resolve_run_dir, train
from tsn.engine import TrainingStopped

# Ray's exceptions for a job that failed after its restarts (matched by name: only cluster/
# imports Ray).
RAY_FAILURES = ("TrainingFailedError", "WorkerGroupError", "ControllerError")


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
        return _run_ray(args, cfg)
    if args.address:
        print("error: --address is for the distributed job; drop --local", file=sys.stderr)
        return 2
    started_group = _init_process_group_from_env(cfg)
    try:
        select_device(cfg)  # a device mismatch or a URI run directory fails before the data is prepared
        resolve_run_dir(cfg, args.run_dir)
        _prepare_on_rank0(cfg)
        install_sigterm_handler()  # a drain / spot reclaim: checkpoint at the step, then end (app.preemption)
        try:
            results = train(cfg, args.run_dir)
        except TrainingStopped as stopped:
            if distributed.rank() == 0:
                print(f"[tsn] {stopped}: checkpoint stored; the same command resumes at step {stopped.step}",
                      file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        rank = distributed.rank()
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"top1 {results['top1']:.4f}  top5 {results['top5']:.4f}  mean class acc "
              f"{results['mean_class_accuracy']:.4f}  ({results['num_val_videos']} val videos, "
              f"{results['steps']} steps) -> {RunStore(resolve_run_dir(cfg, args.run_dir)).results_path}")
    return 0


def _prepare_on_rank0(cfg: Config) -> None:
    """`prepare_dataset` on rank 0; the other ranks wait for its outcome and fail with it."""
    failure = None
    if distributed.rank() == 0:
        try:
            check_training_splits(cfg, prepare_dataset(cfg, progress=False))
        except Exception as e:  # every rank raises it: none is left waiting
            failure = e
    failure = distributed.broadcast_from_rank0(failure)
    if failure is not None:
        raise failure


def _run_ray(args: argparse.Namespace, cfg: Config) -> int:
    from cluster.job import run_job  # only cluster/ imports Ray

    try:
        run_job(cfg, args.run_dir, args.address)
    except Exception as e:
        if type(e).__name__ in RAY_FAILURES:
            print(f"error: training failed after {cfg.cluster.max_failures} restart(s): {e}", file=sys.stderr)
            return 1
        raise
    return 0


def _init_process_group_from_env(cfg: Config) -> bool:
    """Join a process group when launched by torchrun (WORLD_SIZE > 1 in the environment)."""
    if distributed.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True
