"""`tsn stream`: a packed dataset (default: the embedded synthetic one, prepared on first use)
through the DALI pipeline, printing throughput (`app.data.stream`)."""

from __future__ import annotations

from dataloading.store.files import atomic_write_json


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("stream", help="stream a packed dataset through the DALI pipeline (default: the "
                                             "embedded synthetic dataset) and print throughput")
    p.add_argument("--config", help="YAML config (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.shards=/data/ucf101-packed")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--json", help="write the throughput stats here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from app.config import load_config
    from app.data import stream

    cfg = load_config(args.config, args.overrides)
    stats = stream(cfg, args.epochs, progress=not args.no_progress)
    if args.json:
        atomic_write_json(args.json, stats)
    return 0
