"""`tsn bench-checkpoint`: the training loop's wait per checkpoint, synchronous against in the
background, for the tiny default TSN and a BN-Inception TSN, into a local directory or
``s3://`` (`cluster.bench_checkpoint`; ``benchmarks/bench_checkpoint.py`` runs both storages
against the loopback S3 server)."""

from __future__ import annotations

import json
from pathlib import Path


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-checkpoint", help="training-loop stall per checkpoint: synchronous vs in the "
                                                       "background, tiny and BN-Inception TSN, local or s3://")
    p.add_argument("--storage", required=True,
                   help="where the checkpoints go: a local directory or s3://bucket/prefix (AWS variables from the "
                        "environment); the benchmark's checkpoints are deleted afterwards")
    p.add_argument("--models", default="tiny,bninception", help="comma-separated: tiny, bninception")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints per row")
    p.add_argument("--steps-between", type=int, default=10, help="tiny-TSN training steps between checkpoints")
    p.add_argument("--json", help="write the result JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from cluster.bench_checkpoint import MODELS, format_table, run_bench
    from dataloading.store.storage import is_uri

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"--models: expected some of {', '.join(MODELS)}, got {args.models!r}")
    if args.checkpoints < 1 or args.steps_between < 0:
        raise ValueError("--checkpoints must be >= 1 and --steps-between >= 0")
    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).expanduser().resolve())
    result = run_bench(storage, models=models, checkpoints=args.checkpoints, steps_between=args.steps_between)
    text = json.dumps(result, indent=2)
    print(text)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
