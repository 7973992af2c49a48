"""`tsn tune`: a Ray Tune search over `tsn train` runs, ASHA early stopping on val top-1
(`cluster.tune`). The config and the space are checked before Ray starts."""

from __future__ import annotations

import argparse
import sys

from app.config import load_config
from cluster.tune import load_space, run_tune  # Ray is imported in run_tune only

# Ray's exceptions for a search that failed as a whole (matched by name: only cluster/ imports Ray).
RAY_FAILURES = ("TuneError", "TrainingFailedError")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search hyperparameters with Ray Tune (ASHA on val top-1)",
        description="Ray Tune over `tsn train`: each trial is a normal training run of the config with values "
                    "sampled from --space, named RUN_NAME-<trial id> under run.storage_path/run.name; ASHA stops "
                    "trials early on val top-1. Writes tune_summary.csv and best_config.yaml (for "
                    "`tsn train --config`) there.")
    p.add_argument("--config", help="YAML config (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--space", required=True, metavar="SPACE.yaml",
                   help="search space: dotted config keys -> {choice: [...]}, {uniform: [low, high]}, "
                        "{loguniform: [low, high]}, {randint: [low, high]} or a fixed value")
    p.add_argument("--num-samples", type=int, required=True, metavar="N", help="trials to run")
    p.add_argument("--address", help="Ray cluster to connect to (default: start a local one)")
    p.add_argument("--grace-epochs", type=int, default=1, metavar="E",
                   help="epochs every trial trains before ASHA may stop it (default 1)")
    p.add_argument("--workers-per-trial", type=int, default=1, metavar="W",
                   help="training workers per trial, each with cluster.cpus_per_worker CPUs (default 1)")
    p.add_argument("--max-concurrent", type=int, metavar="M", help="trials at once (default: as many as fit)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling (default: a fresh one, printed)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # bad keys fail here, before any work
    space = load_space(args.space, cfg)  # and a bad space key or value, before Ray starts
    try:
        outcome = run_tune(cfg, space, num_samples=args.num_samples, address=args.address,
                           grace_epochs=args.grace_epochs, workers_per_trial=args.workers_per_trial,
                           max_concurrent=args.max_concurrent, seed=args.seed)
    except Exception as e:
        if type(e).__name__ in RAY_FAILURES:
            print(f"error: the search failed: {e}", file=sys.stderr)
            return 1
        raise
    if outcome["best"] is None:
        print("error: no trial reported a validation (see the summary for their errors)", file=sys.stderr)
        return 1
    return 0
