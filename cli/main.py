"""The `tsn` command: one CLI, one subcommand per job.

Each subcommand module registers itself with ``add_cli(subparsers)`` and sets ``func`` (a
function of the parsed arguments returning the exit code). Modules are imported here
explicitly, so what `tsn X` runs is one grep away. User errors (bad arguments, bad config,
missing files) print one ``error: ...`` line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cli.errors import user_os_error


def build_parser() -> argparse.ArgumentParser:
    # One import per command module, in `tsn --help` order.
    from cli import train as train_cmd
    from cli import tune as tune_cmd
    from cli import dashboard
    from cli import submit  # tsn submit, tsn jobs
    from cli import pack  # tsn pack, tsn inspect
    from tools import bench_flow
    from tools import bench_loader
    from cli import bench_train
    from cli import bench_pack
    from cli import bench_checkpoint
    from cli import synth
    from cli import stream
    from cli import evaluate  # tsn eval, tsn fuse
    from cli import predict  # tsn predict, tsn export

    parser = argparse.ArgumentParser(prog="tsn", description="Temporal Segment Networks: data, training, operations.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (synth, pack, stream, bench_loader, bench_train, bench_pack, bench_checkpoint, train_cmd, tune_cmd, evaluate, predict, submit, dashboard, bench_flow):
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Never reach for the network for model weights (the machines have none; tests neither).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        # A full disk, a read-only file system or a path that is not what it must be (a file
        # or a looping symlink where a directory goes) is the user's to fix, not a bug: one
        # line (the writers name the file and the fix in strerror, `app.run_store.write_checkpoint`).
        line = user_os_error(e)
        if args.verbose or line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
